"""The audit stages as plain functions (no Prefect): plan, extract, factorize,
similarity, bias, zoo comparison. ``tasks/`` wraps each one in a Prefect task.

Every stage has a cache key — a hash of (model hash, dataset hash, stage
parameters, zooaudit version) — written into its commit's metadata; a stage
whose key is already on ``main`` is skipped and reports ``skipped=True``.
Stage inputs and outputs are small, JSON-able dataclasses (never arrays).
"""

from .analysis import run_factorize
from .bias import run_bias
from .cached import committed_audit
from .common import ExtractionPlan, StageResult, load_model, skipped
from .extraction import (
    begin_activations,
    cached_activations,
    extract_shard,
    extract_shards,
    pending_shards,
    plan_extraction,
    publish_activations,
    run_activations,
    shard_groups,
)
from .similarity import run_similarity
from .validate import validate_model, validate_zoo
from .zoo import (
    revisions_group,
    run_revision_similarity,
    run_zoo_similarity,
    zoo_similarity_group,
)

__all__ = [
    "ExtractionPlan",
    "StageResult",
    "begin_activations",
    "cached_activations",
    "committed_audit",
    "extract_shard",
    "extract_shards",
    "load_model",
    "pending_shards",
    "plan_extraction",
    "publish_activations",
    "revisions_group",
    "run_activations",
    "run_bias",
    "run_factorize",
    "run_revision_similarity",
    "run_similarity",
    "run_zoo_similarity",
    "shard_groups",
    "skipped",
    "validate_model",
    "validate_zoo",
    "zoo_similarity_group",
]
