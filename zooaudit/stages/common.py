"""Shared pieces of the stages: the per-process model and dataset caches, fixed random
subsets, cache hits and result commits through the repository handle
(:class:`zooaudit.store.Repository`)."""

from __future__ import annotations

import copy
import functools
import json
import logging
import os

import numpy as np

from ..data import load_dataset
from ..errors import ZooauditError
from ..keys import canonical_json
from ..store import Store, commit_metadata
from ..zoo import LoadedModel, resolve_model
from .refs import StageResult

log = logging.getLogger("zooaudit.stages")


def random_subset(n: int, cap: int, rng) -> np.ndarray:
    """Sorted fixed random subset of ``range(n)``: at most ``cap`` indices, all when n ≤ cap.

    ``rng``: a seed, or a ``numpy.random.Generator`` whose stream the caller goes on
    drawing from (it is drawn from only when n > cap)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(rng).choice(n, cap, replace=False))


def attribution_target(target: str, class_names: list[str], n_classes: int | None):
    """An attribution spec's ``target`` for the maps: ``"predicted"`` / ``"true"`` as they are, a
    class index as an int, a class name (of ``class_names``) as its index."""
    if target in ("predicted", "true"):
        return target
    if target.lstrip("-").isdigit():
        return int(target)
    if target in class_names:
        return class_names.index(target)
    raise ZooauditError(f"Unknown attribution target {target!r}. Allowed: 'predicted', 'true', a class index in "
                        f"[0, {n_classes})" + (f", or a class name: {', '.join(class_names)}." if class_names else "."))


@functools.lru_cache(maxsize=16)
def _cached_model(uri: str, store_url: str) -> LoadedModel:
    return resolve_model(uri, Store(store_url))



def load_model(uri: str, store_url: str) -> LoadedModel:
    """Resolve a model once per process (shard tasks on one worker share it). Model stages only."""
    return _cached_model(uri, store_url)


def device_module(module, device: str, what: str = ""):
    """``(module, torch.device)``: the shared CPU copy itself, or a copy moved to the GPU (the
    per-process model cache must stay on the CPU for the other stages). ``device`` resolves as
    everywhere (:func:`zooaudit.devices.resolve_device`; absent CUDA falls back to the CPU)."""
    from ..devices import resolve_device

    dev = resolve_device(device, what=what, missing_cuda="cpu")
    return (module, dev) if dev.type == "cpu" else (copy.deepcopy(module).to(dev), dev)


@functools.lru_cache(maxsize=4)
def load_random_init(uri: str, store_url: str):
    """The seeded random-initialised copy of a model, built once per process by the model
    source's ``random_init`` factory (the same copy in every process: a fixed torch seed)."""
    return load_model(uri, store_url).random_init()


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


def shard_dataset(plan):
    """The plan's dataset, loaded once per process (not once per shard or stage: file-backed
    sets are read and decoded whole) — the same copy :func:`plan_dataset` loaded when the
    plan was made in this process, not a second one. Keyed by the spec and its path's mtime."""
    return _shard_dataset(canonical_json(plan.dataset.model_dump()), _mtime(plan.dataset.path))


def skipped(stage: str, target, key: str, snapshot: str) -> StageResult:
    """A cache hit: the result committed earlier, with the summary stored in its metadata.
    ``target``: the plan or :class:`~.refs.ActivationsRef` the stage ran on."""
    log.info("%s of %s on %s: cache key %s already committed (snapshot %s) — skipped",
             stage, target.model_uri, target.ds_key, key, snapshot)
    return StageResult(stage, target.model_uri, target.ds_key, key, snapshot, True,
                       target.repository.summary(snapshot))


def commit_stage(ref, stage: str, key: str, params: dict, write, summary: dict, run_id: str | None) -> StageResult:
    """Commit one array stage's result to the model's repository, with its provenance
    (cache key, parameters, model and dataset hashes, flow run) in the commit metadata."""
    meta = commit_metadata(stage, key, params, **ref.provenance(), flow_run_id=run_id, summary=summary)
    snap, new = ref.repository.commit_once(write, message=f"{stage} {ref.model_uri} on {ref.dataset.name}",
                                           metadata=meta)
    if not new:   # a concurrent run of the same stage committed this key first: report its result
        return skipped(stage, ref, key, snap)
    return StageResult(stage, ref.model_uri, ref.ds_key, key, snap, False, summary)


# -- reading committed arrays (what array stages do instead of running the model) -----------


def read_rows(a, idx: np.ndarray | None) -> np.ndarray:
    """Rows ``idx`` (sorted; None = all) of a NumPy or Dask ``(n, p)`` array as float64 in memory."""
    from ..analysis.stats import compute_here

    part = a if idx is None or len(idx) == a.shape[0] else a[idx]
    return np.asarray(compute_here(part), dtype=np.float64)


def open_matrices(ref, layers: list[str] | None = None, session=None) -> dict:
    """``{layer: lazy (n_samples, n_features) Dask matrix}`` of the committed activations of
    ``ref`` (default: its per-sample layers), read at ``ref.snapshot``."""
    from .. import layout

    session = session or ref.repository.session(ref.snapshot)
    return {name: layout.as_matrix(layout.open_activations(session.store, ref.ds_key, name))
            for name in (ref.sample_layers if layers is None else layers)}


def control_rows(ref, kind: str, layers: list[str], idx: np.ndarray | None = None, *,
                 required: bool = True) -> tuple[dict, dict]:
    """``({layer: (len(idx), p) float64}, provenance)``: rows ``idx`` of a control extracted
    beside ``ref``'s activations (:mod:`.controls`), or ``({}, {})`` when ``ref`` has no such
    control and it is not ``required``."""
    from .. import layout

    control = ref.controls.get(kind)
    if control is None:
        if not required:
            return {}, {}
        raise ZooauditError(f"No {kind} control was extracted for {ref.model_uri!r} on {ref.ds_key!r}; the model "
                            "stage extracts it when the spec asks for it (SimilaritySpec.control='random_init', "
                            "or bias probes on a dataset with groups). Rerun the audit.")
    session = ref.repository.session(control.snapshot)
    out = {name: read_rows(layout.as_matrix(layout.open_activations(session.store, control.group, name)), idx)
           for name in layers}
    return out, dict(control.provenance)
