"""Extraction: plan the shards, create the arrays on a staging branch, fill them
from per-shard forks, publish all or nothing on ``main``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import zarr

from .. import layout
from ..data import Shard, load_dataset, plan_shards
from ..errors import ZooauditError
from ..extract import forward_batches, layer_shapes, select_layers
from ..keys import cache_key
from ..tokens import is_token_shape, token_rows_per_shard
from ..specs import AuditModelSpec, DatasetSpec
from ..store import MAIN, Store, commit_metadata, find_commit
from .common import ExtractionPlan, StageResult, _repo, load_model

log = logging.getLogger("zooaudit.stages")


def plan_extraction(spec: AuditModelSpec, ds_spec: DatasetSpec) -> ExtractionPlan | None:
    """Resolve model, dataset and layers; plan the shards. None if the model's
    input shape does not fit the dataset (the model is not audited on it)."""
    store = Store.open(spec.store)
    model = load_model(spec.model, store.url)
    dataset = load_dataset(ds_spec)
    if tuple(model.input_shape) != dataset.input_shape:
        log.info("skipping %s on %s: input shape %s ≠ %s", spec.model, ds_spec.name, model.input_shape,
                 dataset.input_shape)
        return None
    layers = select_layers(model.module, spec.layers or model.default_layers)
    shapes = layer_shapes(model.module, model.input_shape, layers, spec.pooling)
    n_outputs = int(forward_batches(model.module, dataset.inputs[:1], [], batch_size=1)[1].shape[1]) \
        if model.has_logits else None
    # All-tokens layers: rows reserved per shard (zooaudit.tokens); needs one tokenisation pass.
    token_rows = token_rows_per_shard(model.module.collate, dataset.inputs, spec.shard_size) \
        if any(is_token_shape(s) for s in shapes.values()) else 0
    params = {"layers": layers, "pooling": spec.pooling, "shard_size": spec.shard_size, "dtype": "float32"}
    key = cache_key("activations", model=model.content_hash, dataset=dataset.content_hash, **params)
    return ExtractionPlan(
        store=store.url, model_uri=spec.model, model_key=model.key, model_hash=model.content_hash,
        dataset=ds_spec.model_dump(), ds_key=dataset.key, ds_hash=dataset.content_hash, n_samples=len(dataset),
        layers=layers, shapes=shapes, n_outputs=n_outputs, pooling=spec.pooling, batch_size=spec.batch_size,
        device=spec.device, shard_size=spec.shard_size, shards=plan_shards(len(dataset), spec.shard_size),
        cache_key=key, has_groups=bool(dataset.groups), model_info=dict(model.info), token_rows=token_rows,
    )



def cached_activations(plan: ExtractionPlan) -> str | None:
    """Snapshot of already-committed activations for this plan, if any."""
    _, _, repo = _repo(plan)
    return find_commit(repo, plan.cache_key)



def _staging_branch(plan: ExtractionPlan) -> str:
    return f"staging-{plan.cache_key}"



def begin_activations(plan: ExtractionPlan):
    """Create the arrays on a staging branch; return ``(writable session, base snapshot)``.

    Shard writers get ``session.fork()``; :func:`publish_activations` merges and publishes.
    """
    store, _, repo = _repo(plan)
    dataset = load_dataset(plan.dataset)
    base = repo.lookup_branch(MAIN)
    staging = _staging_branch(plan)
    if staging in repo.list_branches():
        repo.delete_branch(staging)
    repo.create_branch(staging, base)
    session = repo.writable_session(staging)
    layout.create_activation_arrays(session.store, dataset, plan.ds_key, plan.shapes, plan.n_outputs,
                                    plan.shard_size, token_rows=plan.token_rows)
    session.commit("activations template", metadata={"stage": "staging", "for": plan.cache_key})
    return repo.writable_session(staging), base



@dataclass
class ShardResult:
    """A written shard: its fork (to merge) and its count of non-finite values per layer."""

    fork: object
    nonfinite: dict[str, int]


def extract_shard(plan: ExtractionPlan, shard: Shard, fork) -> ShardResult:
    """Forward one shard (all layers in one pass per batch) and write it into ``fork``.

    NaN/Inf activations are stored as computed, but counted per layer so the
    published commit reports them instead of hiding them.
    """
    model = load_model(plan.model_uri, plan.store)
    dataset = load_dataset(plan.dataset)
    acts, logits = forward_batches(model.module, dataset.inputs[shard.start:shard.stop], plan.layers,
                                   pooling=plan.pooling, batch_size=plan.batch_size, device=plan.device,
                                   with_outputs=plan.n_outputs is not None)
    layout.write_shard(fork.store, plan.ds_key, shard.start, acts, logits)
    return ShardResult(fork, {name: int((~np.isfinite(a)).sum()) for name, a in acts.items()})



def publish_activations(plan: ExtractionPlan, session, base: str, shards: list[ShardResult], *,
                        run_id: str | None = None,
                        params: dict | None = None) -> StageResult:
    """Merge the shard forks, commit on staging, fast-forward ``main`` (all or nothing)."""
    import icechunk

    store, repo_name, repo = _repo(plan)
    session.merge(*(s.fork for s in shards))
    nonfinite = {layer: sum(s.nonfinite.get(layer, 0) for s in shards) for layer in plan.layers}
    for layer, count in nonfinite.items():
        zarr.open_group(session.store, path=layout.acts_group(plan.ds_key, layer), mode="r+").attrs[
            "nonfinite_count"] = count
        if count:
            log.warning("%s layer %s: %d NaN/Inf activation values on %s", plan.model_uri, layer, count,
                        plan.ds_key)
    summary = {"layers": plan.layers, "n_samples": plan.n_samples, "shards": len(plan.shards),
               "nonfinite": nonfinite}
    meta = commit_metadata("activations", plan.cache_key, params or {}, model=plan.model_uri,
                           model_hash=plan.model_hash, dataset=plan.dataset, dataset_hash=plan.ds_hash,
                           layers=plan.layers, flow_run_id=run_id, summary=summary)
    snapshot = session.commit(f"activations {plan.model_uri} on {plan.dataset['name']}", metadata=meta)
    with store.lock(repo_name):
        try:
            repo.reset_branch(MAIN, snapshot, from_snapshot_id=base)
        except icechunk.IcechunkError as err:
            raise ZooauditError(f"Another run committed to {repo_name!r} while activations were written; "
                                "rerun (completed stages are skipped).") from err
    repo.delete_branch(_staging_branch(plan))
    return StageResult("activations", plan.model_uri, plan.ds_key, plan.cache_key, snapshot, False, summary)
