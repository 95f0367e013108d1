"""Zoo-level stages: model × model similarity on a shared dataset."""

from __future__ import annotations

import logging

import numpy as np

from .. import layout
from ..analysis.similarity import similarity_matrix
from ..errors import ZooauditError
from ..keys import cache_key, slug_key
from ..store import Store, commit, commit_metadata, find_commit, write_dataset
from .common import ExtractionPlan, StageResult, _committed_summary, _read_session

log = logging.getLogger("zooaudit.stages")


def run_zoo_similarity(store_url: str, plans: list[ExtractionPlan], snapshots: dict[str, str], layer: str,
                       run_id: str | None = None) -> StageResult | None:
    """Model × model linear CKA of ``layer`` over the models audited on one dataset.

    ``snapshots`` maps model URI → activations snapshot. Sample ids must agree
    exactly across models (a mismatch is an error, never a silent misalignment).
    """
    plans = [p for p in plans if layer in p.layers]
    if len(plans) < 2:
        return None
    store = Store(store_url)
    ds_key = plans[0].ds_key
    key = cache_key("zoo-similarity", dataset=plans[0].ds_hash, layer=layer, metric="linear_cka",
                    models=sorted((p.model_uri, p.cache_key) for p in plans))
    repo = store.zoo_repo()
    if (snap := find_commit(repo, key)) is not None:
        log.info("zoo similarity on %s: cache key %s already committed — skipped", ds_key, key)
        return StageResult("zoo-similarity", "zoo", ds_key, key, snap, True, _committed_summary(repo, snap))
    arrays, ids = {}, None
    for p in plans:
        session = _read_session(p, snapshots[p.model_uri])
        acts = layout.open_activations(session.store, p.ds_key, layer)
        sid = acts["sample"].values
        if ids is not None and not np.array_equal(ids, sid):
            raise ZooauditError(f"Models {plans[0].model_uri!r} and {p.model_uri!r} were audited on different "
                                f"samples of {ds_key!r}; cross-model similarity needs identical sample ids.")
        ids = sid
        arrays[p.model_uri] = layout.as_matrix(acts)
    mat = similarity_matrix(arrays, metric="linear_cka", dims=("model_a", "model_b"))
    mat.attrs.update({"layer": layer, "dataset": ds_key})
    group = zoo_similarity_group(ds_key, layer)
    summary = {"group": group, "layer": layer, "models": list(arrays), "linear_cka": mat.values.round(6).tolist()}

    def write(s):
        write_dataset(s, mat.to_dataset(name="linear_cka"), group)

    meta = commit_metadata("zoo-similarity", key, {"layer": layer, "metric": "linear_cka"},
                           dataset=plans[0].dataset, models=[p.model_uri for p in plans], flow_run_id=run_id,
                           summary=summary)
    snap = commit(store, "zoo", repo, write, message=f"zoo similarity of {layer} on {ds_key}", metadata=meta)
    return StageResult("zoo-similarity", "zoo", ds_key, key, snap, False, summary)



def zoo_similarity_group(ds_key: str, layer: str) -> str:
    """Group of the model × model matrix of ``layer`` in the zoo repository."""
    return f"{ds_key}/similarity/{slug_key(layer, 24)}/linear_cka"
