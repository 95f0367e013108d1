"""Shared pieces of the stages: results, the extraction plan, commits and cache hits."""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..data import Shard, load_dataset
from ..errors import ZooauditError
from ..extract import forward_batches
from ..keys import canonical_json
from ..store import Store, commit, commit_metadata
from ..zoo import LoadedModel, resolve_model

log = logging.getLogger("zooaudit.stages")


@dataclass
class StageResult:
    """What a stage did: its cache key, the snapshot holding its result, whether it was skipped."""

    stage: str
    model: str
    dataset: str
    cache_key: str
    snapshot: str | None
    skipped: bool
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)



@dataclass
class ExtractionPlan:
    """Everything a shard task needs (small and picklable)."""

    store: str
    model_uri: str
    model_key: str
    model_hash: str
    dataset: dict          # DatasetSpec as a dict
    ds_key: str
    ds_hash: str
    n_samples: int
    layers: list[str]
    shapes: dict[str, tuple[int, ...]]
    n_outputs: int | None
    pooling: str
    batch_size: int
    device: str
    shard_size: int
    shards: list[Shard]
    cache_key: str
    has_groups: bool
    model_info: dict = field(default_factory=dict)
    dtype: str = "float32"      # stored activations: float32 | float16
    autocast: str = "none"      # forward precision: none | bf16 | fp16 (torch.autocast)
    token_rows: int = 0         # all-tokens layers: token rows reserved per shard (zooaudit.tokens)

    @property
    def sample_layers(self) -> list[str]:
        """Layers stored per sample ``(sample, ...)``; all-tokens layers ``(token, unit)`` are left
        out (the analyses that need one row per sample skip them)."""
        return [name for name in self.layers if not (len(self.shapes[name]) == 2 and self.shapes[name][0] == -1)]

    @property
    def family(self) -> str:
        """The model without its revision: ``builtin:mlp-w64-s0@5`` → ``builtin:mlp-w64-s0``."""
        return self.model_uri.split("@", 1)[0]

    @property
    def revision(self):
        """Sortable revision of the model within its family (the checkpoint epoch when known)."""
        return self.model_info.get("epoch", self.model_uri.partition("@")[2] or "")



def random_subset(n: int, cap: int, rng) -> np.ndarray:
    """Sorted fixed random subset of ``range(n)``: at most ``cap`` indices, all when n ≤ cap.

    ``rng``: a seed, or a ``numpy.random.Generator`` whose stream the caller goes on
    drawing from (it is drawn from only when n > cap)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(rng).choice(n, cap, replace=False))


@functools.lru_cache(maxsize=16)
def _cached_model(uri: str, store_url: str) -> LoadedModel:
    return resolve_model(uri, Store(store_url))



def load_model(uri: str, store_url: str) -> LoadedModel:
    """Resolve a model once per process (shard tasks on one worker share it)."""
    return _cached_model(uri, store_url)


def _fingerprint(path: str | None) -> tuple | None:
    """What stands for the content behind a dataset ``path`` without reading it: size and
    mtime of the file, or of every file under the folder (None without a path)."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        st = os.stat(path)
        return (st.st_size, st.st_mtime_ns)
    return tuple(sorted((os.path.join(root, name), st.st_size, st.st_mtime_ns)
                        for root, _, names in os.walk(path)
                        for name in names for st in (os.stat(os.path.join(root, name)),)))


@functools.lru_cache(maxsize=8)
def _loaded_dataset(spec_json: str, _fingerprint):
    """The one loaded copy of a dataset in this process: planning (hash, shapes) and the
    shards read the same arrays instead of loading the files a second time."""
    return load_dataset(json.loads(spec_json))


@functools.lru_cache(maxsize=8)
def _dataset_hash(spec_json: str, _fingerprint) -> str:
    return _loaded_dataset(spec_json, _fingerprint).content_hash


def plan_dataset(ds_spec) -> tuple:
    """``(AuditDataset, content hash)`` of a dataset spec (or dict), loaded and hashed once per
    process while the spec and the files behind its ``path`` are unchanged: a zoo audit plans
    and validates every model on the same datasets. The dataset is shared: read it, never modify it."""
    spec = ds_spec.model_dump() if hasattr(ds_spec, "model_dump") else dict(ds_spec)
    key = (canonical_json(spec), _fingerprint(spec.get("path")))
    return _loaded_dataset(*key), _dataset_hash(*key)


def _mtime(path) -> float | None:
    try:
        return os.stat(path).st_mtime_ns if path and os.path.exists(path) else None
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def _shard_dataset(spec_json: str, _mtime_ns):
    # Per shard only a stat of the path (a folder's full fingerprint walks every file);
    # the first lookup resolves to the copy planning loaded.
    return _loaded_dataset(spec_json, _fingerprint(json.loads(spec_json).get("path")))


def shard_dataset(plan: ExtractionPlan):
    """The plan's dataset, loaded once per process (not once per shard or stage: file-backed
    sets are read and decoded whole) — the same copy :func:`plan_dataset` loaded when the
    plan was made in this process, not a second one. Keyed by the spec and its path's mtime."""
    return _shard_dataset(canonical_json(plan.dataset), _mtime(plan.dataset.get("path")))


def random_init_activations(plan: ExtractionPlan, idx: np.ndarray, layers: list[str], *, inputs=None,
                            required: bool = True) -> tuple[dict, dict]:
    """``({layer: (len(idx), p) float64}, provenance)``: a random-initialised copy of the
    plan's model run on dataset samples ``idx`` (sorted), pooled as the stored activations.

    The copy comes from the model source's ``random_init`` factory (a fixed torch seed:
    the same copy in every run, whichever stage asks); ``provenance`` records
    ``random_init_seed``. A model whose source cannot build one is an error naming the
    other controls, or ``({}, {})`` when not ``required`` (the bias probes go without it).
    ``inputs``: the dataset's samples ``idx`` when the caller has loaded them already.
    """
    model = load_model(plan.model_uri, plan.store)
    if model.random_init is None:
        if not required:
            return {}, {}
        raise ZooauditError(f"Model {plan.model_uri!r} cannot build a random-initialised copy (its source has no "
                            "architecture to re-initialise); use control='shuffle' or control='none'.")
    if inputs is None:
        inputs = shard_dataset(plan).inputs[idx]
    acts, _ = forward_batches(model.random_init(), inputs, layers, pooling=plan.pooling,
                              batch_size=plan.batch_size, device=plan.device, with_outputs=False)
    seed = model.random_init_seed
    return ({k: acts[k].reshape(acts[k].shape[0], -1).astype(np.float64) for k in layers},
            {} if seed is None else {"random_init_seed": int(seed)})


def _repo(plan_or_store, model_key: str | None = None):
    store = Store(plan_or_store.store) if isinstance(plan_or_store, ExtractionPlan) else plan_or_store
    key = model_key or plan_or_store.model_key
    return store, f"models/{key}", store.model_repo(key)



def _committed_summary(repo, snapshot: str) -> dict:
    return dict((repo.lookup_snapshot(snapshot).metadata or {}).get("summary") or {})



def skipped(stage: str, plan: ExtractionPlan, key: str, snapshot: str) -> StageResult:
    """A cache hit: the result committed earlier, with the summary stored in its metadata."""
    log.info("%s of %s on %s: cache key %s already committed (snapshot %s) — skipped",
             stage, plan.model_uri, plan.ds_key, key, snapshot)
    _, _, repo = _repo(plan)
    return StageResult(stage, plan.model_uri, plan.ds_key, key, snapshot, True, _committed_summary(repo, snapshot))



def _read_session(plan: ExtractionPlan, snapshot: str):
    _, _, repo = _repo(plan)
    return repo.readonly_session(snapshot_id=snapshot)



def _commit_result(plan: ExtractionPlan, stage: str, key: str, params: dict, write, summary: dict,
                   run_id: str | None) -> StageResult:
    store, repo_name, repo = _repo(plan)
    meta = commit_metadata(stage, key, params, model=plan.model_uri, model_hash=plan.model_hash,
                           dataset=plan.dataset, dataset_hash=plan.ds_hash, flow_run_id=run_id, summary=summary)
    snap = commit(store, repo_name, repo, write, message=f"{stage} {plan.model_uri} on {plan.dataset['name']}",
                  metadata=meta)
    return StageResult(stage, plan.model_uri, plan.ds_key, key, snap, False, summary)
