"""The audit stages as plain functions (no Prefect): plan, extract, factorize,
similarity, bias, zoo comparison. ``tasks/`` wraps each one in a Prefect task.

Every stage has a cache key — a hash of (model hash, dataset hash, stage
parameters, zooaudit version) — written into its commit's metadata; a stage
whose key is already on ``main`` is skipped and reports ``skipped=True``.
Stage inputs and outputs are small, JSON-able dataclasses (never arrays).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import xarray as xr

from . import layout
from .analysis import bias as bias_mod
from .analysis import factorize as fact_mod
from .analysis.similarity import similarity_matrix
from .data import Shard, load_dataset, plan_shards
from .errors import ZooauditError
from .extract import forward_batches, layer_shapes, select_layers
from .keys import cache_key, slug_key
from .specs import AuditModelSpec, DatasetSpec
from .store import MAIN, Store, commit, commit_metadata, find_commit, write_dataset
from .zoo import LoadedModel, resolve_model

log = logging.getLogger(__name__)


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


@functools.lru_cache(maxsize=16)
def _cached_model(uri: str, store_url: str) -> LoadedModel:
    return resolve_model(uri, Store(store_url))


def load_model(uri: str, store_url: str) -> LoadedModel:
    """Resolve a model once per process (shard tasks on one worker share it)."""
    return _cached_model(uri, store_url)


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
    n_outputs = int(forward_batches(model.module, dataset.inputs[:1], [], batch_size=1)[1].shape[1])
    params = {"layers": layers, "pooling": spec.pooling, "shard_size": spec.shard_size, "dtype": "float32"}
    key = cache_key("activations", model=model.content_hash, dataset=dataset.content_hash, **params)
    return ExtractionPlan(
        store=store.url, model_uri=spec.model, model_key=model.key, model_hash=model.content_hash,
        dataset=ds_spec.model_dump(), ds_key=dataset.key, ds_hash=dataset.content_hash, n_samples=len(dataset),
        layers=layers, shapes=shapes, n_outputs=n_outputs, pooling=spec.pooling, batch_size=spec.batch_size,
        device=spec.device, shard_size=spec.shard_size, shards=plan_shards(len(dataset), spec.shard_size),
        cache_key=key, has_groups=bool(dataset.groups),
    )


def _repo(plan_or_store, model_key: str | None = None):
    store = Store(plan_or_store.store) if isinstance(plan_or_store, ExtractionPlan) else plan_or_store
    key = model_key or plan_or_store.model_key
    return store, f"models/{key}", store.model_repo(key)


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
                                    plan.shard_size)
    session.commit("activations template", metadata={"stage": "staging", "for": plan.cache_key})
    return repo.writable_session(staging), base


def extract_shard(plan: ExtractionPlan, shard: Shard, fork):
    """Forward one shard (all layers in one pass per batch) and write it into ``fork``."""
    model = load_model(plan.model_uri, plan.store)
    dataset = load_dataset(plan.dataset)
    acts, logits = forward_batches(model.module, dataset.inputs[shard.start:shard.stop], plan.layers,
                                   pooling=plan.pooling, batch_size=plan.batch_size, device=plan.device,
                                   with_outputs=plan.n_outputs is not None)
    layout.write_shard(fork.store, plan.ds_key, shard.start, acts, logits)
    return fork


def publish_activations(plan: ExtractionPlan, session, base: str, forks, *, run_id: str | None = None,
                        params: dict | None = None) -> StageResult:
    """Merge the shard forks, commit on staging, fast-forward ``main`` (all or nothing)."""
    import icechunk

    store, repo_name, repo = _repo(plan)
    session.merge(*forks)
    summary = {"layers": plan.layers, "n_samples": plan.n_samples, "shards": len(plan.shards)}
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


def run_factorize(plan: ExtractionPlan, acts_snapshot: str, fspec: dict, run_id: str | None = None) -> StageResult:
    """PCA (all layers) and NMF (non-negative layers) with explained variance; one commit."""
    key = cache_key("factorize", activations=plan.cache_key, **fspec)
    _, _, repo = _repo(plan)
    if (snap := find_commit(repo, key)) is not None:
        return skipped("factorize", plan, key, snap)
    session = _read_session(plan, acts_snapshot)
    results: dict[tuple[str, str], xr.Dataset] = {}
    summary: dict = {}
    for layer in plan.layers:
        acts = layout.open_activations(session.store, plan.ds_key, layer)
        A = layout.as_matrix(acts)
        k = min(fspec["k"], *A.shape)
        for method in fspec["methods"]:
            if method == "nmf" and not fact_mod.is_nonnegative(A):
                summary[f"{layer}/nmf"] = "skipped: layer has negative values"
                continue
            if method == "pca":
                f = fact_mod.pca(A, k, name=layer)
            else:
                f = fact_mod.nmf(A, k, random_state=fspec["random_state"], max_iter=fspec["max_iter"], name=layer)
            ds = f.to_dataset(acts["sample"].values)
            if method == "pca":
                curve = f.metrics["explained_variance_curve"]
                ds["explained_variance_curve"] = ("rank", curve)
                ds = ds.assign_coords(rank=np.arange(1, len(curve) + 1))
            ds.attrs.update({"layer": layer, "k": k})
            results[(layer, method)] = ds
            summary[f"{layer}/{method}"] = round(float(f.metrics["explained_variance"]), 6)

    def write(s):
        for (layer, method), ds in results.items():
            write_dataset(s, ds, layout.factors_group(plan.ds_key, layer, method))

    return _commit_result(plan, "factorize", key, fspec, write, {"explained_variance": summary}, run_id)


def run_similarity(plan: ExtractionPlan, acts_snapshot: str, run_id: str | None = None) -> StageResult:
    """The layer × layer linear-CKA matrix of the model (one joint pass over the data)."""
    key = cache_key("similarity", activations=plan.cache_key, metric="linear_cka")
    _, _, repo = _repo(plan)
    if (snap := find_commit(repo, key)) is not None:
        return skipped("similarity", plan, key, snap)
    session = _read_session(plan, acts_snapshot)
    layers = {l: layout.as_matrix(layout.open_activations(session.store, plan.ds_key, l)) for l in plan.layers}
    mat = similarity_matrix(layers, metric="linear_cka")

    def write(s):
        write_dataset(s, mat.to_dataset(name="linear_cka"), layout.similarity_group(plan.ds_key, "linear_cka"))

    return _commit_result(plan, "similarity", key, {"metric": "linear_cka"}, write,
                          {"linear_cka": mat.values.round(6).tolist(), "layers": plan.layers}, run_id)


def run_bias(plan: ExtractionPlan, acts_snapshot: str, bspec: dict, run_id: str | None = None) -> StageResult | None:
    """Accuracy per group with bootstrap CIs and worst-group accuracy, per group attribute."""
    if not plan.has_groups or plan.n_outputs is None:
        return None
    key = cache_key("bias", activations=plan.cache_key, **bspec)
    _, _, repo = _repo(plan)
    if (snap := find_commit(repo, key)) is not None:
        return skipped("bias", plan, key, snap)
    session = _read_session(plan, acts_snapshot)
    samples = xr.open_zarr(session.store, group=layout.samples_group(plan.ds_key), consolidated=False,
                           zarr_format=3).load()
    outputs = xr.open_zarr(session.store, group=layout.outputs_group(plan.ds_key), consolidated=False,
                           zarr_format=3).load()
    reports, summary = {}, {}
    for attr in samples.attrs.get("group_attributes", []):
        rep = bias_mod.group_metrics(samples["label"].values, outputs["prediction"].values, samples[attr].values,
                                     n_boot=bspec["n_boot"], random_state=bspec["random_state"], ci=bspec["ci"],
                                     min_group_size=bspec["min_group_size"],
                                     group_names=samples.attrs["group_names"].get(attr))
        reports[attr] = rep
        summary[attr] = {"overall_accuracy": round(rep.overall_accuracy, 6),
                         "worst_group_accuracy": round(rep.worst_group_accuracy, 6),
                         "worst_group": rep.worst_group,
                         "accuracy": dict(zip(rep.table["group"].values.tolist(),
                                              rep.table["accuracy"].values.round(6).tolist()))}

    def write(s):
        for attr, rep in reports.items():
            ds = xr.merge([rep.table, rep.cells.rename({v: f"cell_{v}" for v in rep.cells.data_vars})])
            ds.attrs.update({"attribute": attr, "overall_accuracy": rep.overall_accuracy,
                             "worst_group_accuracy": rep.worst_group_accuracy, "worst_group": rep.worst_group,
                             **{k: v for k, v in bspec.items()}})
            write_dataset(s, ds, layout.bias_group(plan.ds_key, attr))

    return _commit_result(plan, "bias", key, bspec, write, summary, run_id)


# -- zoo level -------------------------------------------------------------------------


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


# -- validation (before anything is committed) --------------------------------------------


def validate_model(spec: AuditModelSpec) -> LoadedModel:
    """Fail early, with one clear paragraph, on a bad model, layer, dataset or store."""
    store = Store.open(spec.store)
    model = load_model(spec.model, store.url)
    select_layers(model.module, spec.layers or model.default_layers)
    fits = [d.name for d in spec.datasets if load_dataset(d).input_shape == tuple(model.input_shape)]
    if not fits:
        names = ", ".join(d.name for d in spec.datasets) or "(none)"
        raise ZooauditError(
            f"Model {spec.model!r} takes inputs of shape {tuple(model.input_shape)}, but none of the requested "
            f"datasets ({names}) has that shape. Allowed: datasets whose samples have shape "
            f"{tuple(model.input_shape)} (builtin digits models: 'digits'; colored models: 'colored-digits')."
        )
    return model


def validate_zoo(spec) -> None:
    """Validate every model of the zoo and the comparison layer before any audit starts."""
    if not spec.models:
        raise ZooauditError("The zoo is empty: give at least one model URI (e.g. 'builtin:mlp-w64-s0'). "
                            "Builtin models: " + ", ".join(__import__("zooaudit.zoo.builtin", fromlist=["x"])
                                                           .default_zoo()) + ".")
    layers: set[str] = set()
    for uri in spec.models:
        model = validate_model(spec.model_spec(uri))
        layers.update(select_layers(model.module, spec.layers or model.default_layers))
    if spec.compare_layer not in layers:
        raise ZooauditError(f"compare_layer {spec.compare_layer!r} is not among the audited layers of any zoo "
                            f"model. Allowed: {', '.join(sorted(layers))}.")
