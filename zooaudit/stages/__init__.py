"""The audit stages as plain functions (no Prefect); ``zooaudit_tasks`` wraps them in tasks.

Model stages (they run the model; :mod:`.model` runs them end to end):
  :mod:`.activations`  plan the shards, extract on a staging branch, publish all or nothing
  :mod:`.controls`     the controls extracted beside the activations (random-init copy,
                       input embeddings, word-set embeddings, token text)
Array stages (they read committed arrays only; each takes an :class:`ActivationsRef`):
  :mod:`.factorize`, :mod:`.similarity`, :mod:`.bias` (with :mod:`.weat`) per model;
  :mod:`.zoo` (model × model, revisions) and :mod:`.trend` (checkpoint trends, drift) across models.
:mod:`.registry` declares them; :mod:`.refs` holds what they hand each other.

Every stage has a cache key — a hash of (model hash, dataset hash, stage parameters,
zooaudit version) — written into its commit's metadata; a stage whose key is already on
``main`` is skipped and reports ``skipped=True``. Stage inputs and outputs are small
immutable references and results (never arrays). docs/architecture.md has the picture.
"""

from .activations import (
    ExtractionPlan,
    activations_ref,
    begin_activations,
    cache_hit,
    cached_activations,
    extract_shards,
    pending_shards,
    plan_extraction,
    publish_activations,
    run_activations,
    shard_groups,
)
from .bias import run_bias
from .cached import committed_audit
from .common import load_model, skipped
from .controls import control_plans, control_ref
from .factorize import run_factorize
from .model import committed_model_stages, run_model_stages, unsharded_controls
from .refs import ActivationsRef, ControlRef, StageResult
from .registry import ARRAY_STAGES, ZOO_STAGES, array_stage, run_array_stage, run_zoo_stage, zoo_stage
from .similarity import run_similarity
from .statistics import run_statistics
from .trend import drift_to_previous, run_checkpoint_trend
from .validate import validate_model, validate_zoo
from .zoo import revisions_group, run_revision_similarity, run_zoo_similarity, zoo_similarity_group

__all__ = [
    "ARRAY_STAGES",
    "ZOO_STAGES",
    "ActivationsRef",
    "ControlRef",
    "ExtractionPlan",
    "StageResult",
    "activations_ref",
    "array_stage",
    "begin_activations",
    "cache_hit",
    "cached_activations",
    "committed_audit",
    "committed_model_stages",
    "control_plans",
    "control_ref",
    "drift_to_previous",
    "extract_shards",
    "load_model",
    "pending_shards",
    "plan_extraction",
    "publish_activations",
    "revisions_group",
    "run_activations",
    "run_array_stage",
    "run_bias",
    "run_checkpoint_trend",
    "run_factorize",
    "run_model_stages",
    "run_revision_similarity",
    "run_similarity",
    "run_statistics",
    "run_zoo_similarity",
    "run_zoo_stage",
    "shard_groups",
    "skipped",
    "unsharded_controls",
    "validate_model",
    "validate_zoo",
    "zoo_similarity_group",
    "zoo_stage",
]
