"""The activations stage (a model stage): plan the shards, create the arrays on a
staging branch, commit every shard there as it is written, publish all or nothing on
``main``. The controls (:mod:`.controls`) are extracted by the same machinery, from plans
derived from this one (:func:`zooaudit.stages.controls.control_plans`).

The :class:`ExtractionPlan` (shards, batch size, autocast, …) lives only here and in the
other model stages; array stages get the :class:`~.refs.ActivationsRef` of the result
(:func:`activations_ref`).

Resumability: shards are committed on the staging branch ``staging-<cache key>``,
one or a few per commit (metadata ``{"stage": "shard", "for": key, "shards": [i, ...],
"nonfinite": [{layer: count}, ...]}``; branches written before coalescing hold one
``"shard": i`` per commit and are read too). A run killed mid-extraction leaves that
branch behind; the next run with the same cache key finds it, skips the committed
shards and extracts only the missing ones. ``main`` moves only in :func:`publish_activations`, by one
conditional ``reset_branch`` to the staging tip, so no half-written version is
ever visible there. Shards are deterministic functions of (model, samples), so
a resumed run's arrays are bitwise identical to an uninterrupted run's.

Overlap: :func:`extract_shards` computes on the calling thread and hands each
finished shard to a background writer thread through a bounded queue, so the
Zarr encoding and the Icechunk write/commit of shard ``i`` run while shard
``i + 1`` is being computed. Coalescing: the writer takes every shard waiting in
the queue (after letting the first wait up to :data:`WRITE_LINGER_S` for more) and
writes them in one session and one commit (contiguous shards as one write per
array). A session, a commit and each Zarr array write cost about the same whatever
the rows (≈ 24 ms a commit, more than a small model's forward of a shard), so
small models share that cost among up to :data:`WRITE_QUEUE_SIZE` shards; a large
model's shards, slower to compute than the linger, are committed one by one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import zarr

from .. import layout
from ..data import Shard, plan_shards
from ..errors import ZooauditError
from ..extract import forward_batches, layer_shapes, select_layers
from ..keys import cache_key
from ..specs import AuditModelSpec, DatasetSpec
from ..store import MAIN, Store, commit_metadata
from ..tokens import TokenRows, is_token_shape, token_rows_per_shard
from ..store import Repository
from .common import load_model, load_random_init, plan_dataset, shard_dataset, skipped
from .refs import ActivationsRef, ControlRef, StageResult

log = logging.getLogger("zooaudit.stages")

STORED_DTYPES = ("float32", "float16")


@dataclass
class ExtractionPlan:
    """Everything a shard task needs (small and picklable). Model stages only.

    The activations of the model itself (``variant="model"``, stage ``activations``, arrays
    under ``<ds_key>/``) and each control extracted beside them (:mod:`.controls`: stage
    ``controls/<kind>``, arrays under ``root = <ds_key>/controls/<kind>``, ``variant``
    ``random_init`` for the seeded random-initialised copy) are planned alike.
    """

    store: str
    model_uri: str
    model_key: str
    model_hash: str
    dataset: DatasetSpec
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
    has_group_sets: bool = False  # set-valued (multi-hot) attributes: the bias stage's amplification applies
    dtype: str = "float32"      # stored activations: float32 | float16
    autocast: str = "none"      # forward precision: none | bf16 | fp16 (torch.autocast)
    token_rows: int = 0         # all-tokens layers: token rows reserved per shard (zooaudit.tokens)
    stage: str = "activations"  # commit stage name: activations | controls/<kind>
    root: str = ""              # layout root of the arrays (default: ds_key)
    variant: Literal["model", "random_init"] = "model"   # which network runs the shards
    provenance: dict = field(default_factory=dict)       # e.g. random_init_seed of a control
    # Controls extracted in the same shards (same inputs, same staging branch and commits,
    # published with the activations); each keeps its own root, layers and cache key.
    companions: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = self.root or self.ds_key

    @property
    def repository(self) -> Repository:
        return Repository.model(self.store, self.model_key)

    @property
    def sample_layers(self) -> list[str]:
        """Layers stored per sample; all-tokens layers ``(token, unit)`` are left out."""
        return [name for name in self.layers if not is_token_shape(self.shapes[name])]

    @property
    def product_keys(self) -> list[str]:
        """Cache keys of what one extraction of this plan publishes: its own and its companions'."""
        return [self.cache_key, *(c.cache_key for c in self.companions)]


def activations_ref(plan: ExtractionPlan, snapshot: str, controls: dict[str, ControlRef] | None = None
                    ) -> ActivationsRef:
    """What the array stages take: the committed activations of ``plan`` at ``snapshot``."""
    return ActivationsRef(
        store=plan.store, model_uri=plan.model_uri, model_key=plan.model_key, model_hash=plan.model_hash,
        dataset=plan.dataset, ds_key=plan.ds_key, ds_hash=plan.ds_hash, snapshot=snapshot,
        cache_key=plan.cache_key, layers=list(plan.layers), shapes=dict(plan.shapes), pooling=plan.pooling,
        n_samples=plan.n_samples, n_outputs=plan.n_outputs, has_groups=plan.has_groups,
        has_group_sets=plan.has_group_sets, model_info=dict(plan.model_info), device=plan.device,
        controls=dict(controls or {}))
# Finished shards waiting for the writer: bounded (in count and in bytes) so a slow
# store applies back-pressure instead of piling activations up in memory. The writer
# takes all that wait, up to these bounds, into one commit.
WRITE_QUEUE_SIZE = 8
WRITE_QUEUE_BYTES = 64 << 20
# How long the writer lets a shard wait for more before committing it (unless the queue
# fills or compute ends first). Without it, a writer whose Python work holds the GIL finds
# 1-2 shards waiting and pays the per-commit cost (≈ 24 ms) for each: digits CNN, 32 shards,
# 0 s: 15-30 commits, stage 3.7× the bare forward; 0.05 s: ≈ 11, 3.2-3.4×; 0.1 s: 5-6, 2.7-2.8×.
# A shard that takes longer than this to compute (large models) is still committed alone.
WRITE_LINGER_S = 0.1


def plan_extraction(spec: AuditModelSpec, ds_spec: DatasetSpec) -> ExtractionPlan | None:
    """Resolve model, dataset and layers; plan the shards. None if the model's
    input shape does not fit the dataset (the model is not audited on it)."""
    store = Store.open(spec.store)
    model = load_model(spec.model, store.url)
    dataset, ds_hash = plan_dataset(ds_spec)
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
    dtype, autocast = spec.dtype, spec.autocast
    params = {"layers": layers, "pooling": spec.pooling, "shard_size": spec.shard_size, "dtype": dtype}
    if autocast != "none":   # changes the numbers; keys of float32 runs stay as they were
        params["autocast"] = autocast
    key = cache_key("activations", model=model.content_hash, dataset=ds_hash, **params)
    return ExtractionPlan(
        store=store.url, model_uri=spec.model, model_key=model.key, model_hash=model.content_hash,
        dataset=ds_spec, ds_key=dataset.key, ds_hash=ds_hash, n_samples=len(dataset),
        layers=layers, shapes=shapes, n_outputs=n_outputs, pooling=spec.pooling, batch_size=spec.batch_size,
        device=spec.device, shard_size=spec.shard_size, shards=plan_shards(len(dataset), spec.shard_size),
        cache_key=key, has_groups=bool(dataset.groups), has_group_sets=bool(dataset.group_sets),
        model_info=dict(model.info), dtype=dtype, autocast=autocast,
        token_rows=token_rows,
    )


def cached_activations(plan: ExtractionPlan) -> str | None:
    """Snapshot of already-committed activations (or control) for this plan, if any."""
    return plan.repository.find(plan.cache_key)


def _staging_branch(plan: ExtractionPlan) -> str:
    return f"staging-{plan.cache_key}"


@dataclass
class Staging:
    """The staging branch of one extraction: where it started and what it holds.

    Attributes:
        branch: the staging branch name.
        base: the ``main`` snapshot it was created from (``main`` is reset from it on publish).
        done: ``{shard index: {layer: non-finite count}}`` of the shards committed there.
    """

    branch: str
    base: str
    done: dict[int, dict[str, int]] = field(default_factory=dict)


def _committed_shards(meta: dict) -> dict[int, dict[str, int]]:
    """``{shard index: {layer: non-finite count}}`` recorded by one shard commit: a coalesced
    commit lists ``"shards"`` with one ``"nonfinite"`` mapping each; older commits hold one
    ``"shard"`` and its mapping."""
    if "shards" in meta:
        counts = meta.get("nonfinite") or [{}] * len(meta["shards"])
        return {int(i): {k: int(v) for k, v in c.items()} for i, c in zip(meta["shards"], counts, strict=True)}
    return {int(meta["shard"]): {k: int(v) for k, v in meta.get("nonfinite", {}).items()}}


def _read_staging(repo, plan: ExtractionPlan, branch: str, main_tip: str) -> Staging | None:
    """The committed shards of an earlier run on ``branch``, or None if that branch
    does not belong to this plan or ``main`` has moved since it was created."""
    done: dict[int, dict[str, int]] = {}
    for info in repo.ancestry(branch=branch):
        meta = info.metadata or {}
        if meta.get("for") != plan.cache_key:
            return None
        if meta.get("stage") == "shard":
            done.update(_committed_shards(meta))
        elif meta.get("stage") == "staging":
            same = meta.get("base") == main_tip and meta.get("products", [plan.cache_key]) == plan.product_keys
            return Staging(branch, main_tip, done) if same else None
    return None


def begin_activations(plan: ExtractionPlan) -> Staging:
    """Create the arrays on a staging branch, or pick up the one a killed run left.

    Returns the :class:`Staging` whose ``done`` lists the shards that need no
    recomputation (empty for a fresh start).
    """
    repository = plan.repository
    repo = repository.icechunk
    dataset = shard_dataset(plan)
    with repository.lock():
        base = repo.lookup_branch(MAIN)
        branch = _staging_branch(plan)
        if branch in repo.list_branches():
            found = _read_staging(repo, plan, branch, base)
            if found is not None:
                log.info("%s on %s: resuming extraction, %d of %d shards already committed",
                         plan.model_uri, plan.ds_key, len(found.done), len(plan.shards))
                return found
            # Left by a run whose base is no longer main's tip: restart from scratch.
            repo.delete_branch(branch)
        repo.create_branch(branch, base)
        session = repo.writable_session(branch)
        layout.create_activation_arrays(session.store, dataset, plan.root, plan.shapes, plan.n_outputs,
                                        plan.shard_size, dtype=plan.dtype, token_rows=plan.token_rows)
        for c in plan.companions:
            layout.create_activation_arrays(session.store, dataset, c.root, c.shapes, None, c.shard_size,
                                            dtype=c.dtype)
        session.commit("activations template", metadata={"stage": "staging", "for": plan.cache_key,
                                                         "base": base, "products": plan.product_keys})
    return Staging(branch, base)


def pending_shards(plan: ExtractionPlan, staging: Staging) -> list[Shard]:
    """The shards of ``plan`` not yet committed on the staging branch."""
    return [s for s in plan.shards if s.index not in staging.done]


def shard_groups(shards: list[Shard], max_groups: int = 64) -> list[list[Shard]]:
    """Bundle shards into at most ``max_groups`` contiguous task-sized groups
    (Prefect tasks stay coarse; inside a group, writes overlap compute)."""
    if not shards:
        return []
    per = -(-len(shards) // max_groups)
    return [shards[i:i + per] for i in range(0, len(shards), per)]


@dataclass
class ShardResult:
    """A committed shard: its index, snapshot and count of non-finite values per layer."""

    index: int
    snapshot: str
    nonfinite: dict[str, int]


def compute_shard(plan: ExtractionPlan, shard: Shard) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Forward one shard (all layers in one pass per batch); activations cast to the stored dtype."""
    return _forward_shard(plan, shard)


def compute_companions(plan: ExtractionPlan, shard: Shard) -> dict[str, dict[str, np.ndarray]]:
    """``{companion root: activations}`` of the controls extracted with ``plan`` on ``shard``."""
    return {c.root: _forward_shard(c, shard)[0] for c in plan.companions}


def _forward_shard(plan: ExtractionPlan, shard: Shard) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    dataset = shard_dataset(plan)
    module = load_model(plan.model_uri, plan.store).module if plan.variant == "model" else \
        load_random_init(plan.model_uri, plan.store)
    acts, logits = forward_batches(module, dataset.inputs[shard.start:shard.stop], plan.layers,
                                   pooling=plan.pooling, batch_size=plan.batch_size, device=plan.device,
                                   with_outputs=plan.n_outputs is not None, autocast=plan.autocast)
    if plan.dtype != "float32":
        acts = {name: a.astype(plan.dtype) for name, a in acts.items()}
    return acts, logits


def _nonfinite(a: np.ndarray) -> int:
    """Count of NaN/Inf values of ``a``. One float64 sum decides the common all-finite case
    (a NaN or Inf propagates; float32 values cannot overflow a float64 sum); only then
    are the values counted one by one."""
    if a.dtype.kind != "f" or np.isfinite(a.sum(dtype=np.float64)):
        return 0
    return int(np.count_nonzero(~np.isfinite(a)))


def _nbytes(acts: dict, logits, companions: dict | None = None) -> int:
    """Bytes of one computed shard (what it holds in memory while it waits for the writer)."""
    return (sum(np.asarray(a).nbytes for a in acts.values()) + (0 if logits is None else logits.nbytes)
            + sum(np.asarray(a).nbytes for c in (companions or {}).values() for a in c.values()))


def _contiguous_runs(batch: list[tuple]) -> list[list[tuple]]:
    """Split ``[(shard, acts, logits), ...]`` (in compute order) into runs of adjacent shards."""
    runs: list[list[tuple]] = []
    for item in batch:
        if runs and runs[-1][-1][0].stop == item[0].start:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _write_batch(store, ds_key: str, batch: list[tuple], arrays: layout.ArrayCache | None) -> None:
    """Write the shards of ``batch`` into one session's ``store``: each run of adjacent
    shards as one write per array (whole chunks either way: shards start on chunk
    boundaries); all-tokens layers keep one reserved chunk per shard, written shard by shard."""
    for run in _contiguous_runs(batch):
        first_acts = run[0][1]
        dense = [name for name, a in first_acts.items() if not isinstance(a, TokenRows)]
        tokens = [name for name in first_acts if name not in dense]
        if len(run) == 1:
            acts, logits = {name: first_acts[name] for name in dense}, run[0][2]
        else:   # one concatenation copy (bounded by WRITE_QUEUE_BYTES) for one Zarr call per array
            acts = {name: np.concatenate([np.asarray(item[1][name]) for item in run]) for name in dense}
            logits = None if run[0][2] is None else np.concatenate([item[2] for item in run])
        layout.write_shard(store, ds_key, run[0][0].start, acts, logits, arrays)
        for shard, shard_acts, _ in run if tokens else ():
            layout.write_shard(store, ds_key, shard.start, {name: shard_acts[name] for name in tokens}, None, arrays)


def _commit_shards(plan: ExtractionPlan, branch: str, batch: list[tuple], *, repo=None,
                   arrays: layout.ArrayCache | None = None) -> list[ShardResult]:
    """Write the whole chunks of the shards ``batch = [(shard, acts, logits[, {companion root:
    acts}]), ...]`` (the plan's companions, :attr:`ExtractionPlan.companions`) on the staging branch in one session and commit them together: all of them or none.

    NaN/Inf activations are stored as computed but counted per layer and shard (in the
    commit metadata, so a resumed run still reports them at publish). ``repo`` and
    ``arrays``: the repository and array metadata a writer keeps across its commits."""
    import icechunk

    repository = plan.repository
    opened = repository.icechunk if repo is None else repo
    nonfinite = [{name: _nonfinite(np.asarray(a)) for name, a in item[1].items()} for item in batch]
    indexes = [item[0].index for item in batch]
    session = opened.writable_session(branch)
    _write_batch(session.store, plan.root, [item[:3] for item in batch], arrays)
    for c in plan.companions:   # the controls of the same shards, in the same session and commit
        _write_batch(session.store, c.root, [(item[0], item[3][c.root], None) for item in batch], arrays)
    meta = {"stage": "shard", "for": plan.cache_key, "shards": indexes, "nonfinite": nonfinite}
    label = f"shard {indexes[0]}" if len(indexes) == 1 else f"shards {', '.join(map(str, indexes))}"
    # Shards write distinct chunks, so a commit that finds the branch moved
    # (another writer committed) rebases without conflict.
    with repository.lock():
        snap = session.commit(label, metadata=meta, rebase_with=icechunk.ConflictDetector())
    return [ShardResult(i, snap, counts) for i, counts in zip(indexes, nonfinite, strict=True)]


class _WriteQueue:
    """Computed shards waiting for the writer, bounded by ``max_items`` and ``max_bytes``
    (a shard larger than ``max_bytes`` still goes through, alone). The producer blocks in
    :meth:`put` while it is full; the writer takes everything waiting in :meth:`take`."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max(1, max_items), max_bytes
        self._items: collections.deque = collections.deque()
        self._bytes = 0
        self._closed = False
        self._blocked = False
        self._first_put = 0.0
        self._cond = threading.Condition()

    def _fits(self, nbytes: int) -> bool:
        return not self._items or (len(self._items) < self.max_items and self._bytes + nbytes <= self.max_bytes)

    def put(self, item, nbytes: int) -> None:
        with self._cond:
            if not self._fits(nbytes):
                self._blocked = True     # a lingering take must not wait for a producer that waits for it
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._fits(nbytes))
                self._blocked = False
            if not self._items:
                self._first_put = time.monotonic()
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()

    def close(self) -> None:
        """No more items: :meth:`take` returns ``[]`` once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, linger: float = 0.0) -> list:
        """Wait for one item, then take it and every item waiting — after up to ``linger``
        seconds from that item's arrival for more to come (not once the queue is full or
        closed). ``[]``: closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed)
            if linger > 0 and self._items:
                self._cond.wait_for(lambda: self._closed or self._blocked or len(self._items) >= self.max_items,
                                    timeout=self._first_put + linger - time.monotonic())
            batch = [item for item, _ in self._items]
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()
            return batch


def extract_shards(plan: ExtractionPlan, shards: list[Shard], branch: str | None = None) -> list[ShardResult]:
    """Compute ``shards`` on this thread and commit them on the staging branch from a
    background writer thread (bounded queue: writes overlap compute). The writer commits
    the shards waiting in the queue together (:func:`_commit_shards`), one commit each time.

    A shard is committed as soon as the writer reaches it, so an interruption loses at
    most the shards in flight (the queue's and the one being computed). The first error
    (compute or write) is raised after the writer has stopped; shards committed before it
    stay committed. Returns one :class:`ShardResult` per committed shard, in the order computed.
    """
    branch = branch or _staging_branch(plan)
    # A retried task (or a duplicate one) skips the shards already committed.
    repo = plan.repository.icechunk   # opened once for all of this call's shards
    done: set[int] = set()
    for info in repo.ancestry(branch=branch):
        meta = info.metadata or {}
        if meta.get("stage") == "shard" and meta.get("for") == plan.cache_key:
            done.update(_committed_shards(meta))
    shards = [s for s in shards if s.index not in done]
    todo = _WriteQueue(WRITE_QUEUE_SIZE, WRITE_QUEUE_BYTES)
    results: list[ShardResult] = []
    failure: list[BaseException] = []
    arrays = layout.ArrayCache()

    def writer():
        while batch := todo.take(WRITE_LINGER_S):
            if failure:
                continue  # drain: a failed writer must not block the producer
            try:
                results.extend(_commit_shards(plan, branch, batch, repo=repo, arrays=arrays))
            except BaseException as err:  # noqa: BLE001 — re-raised on the caller's thread
                failure.append(err)

    thread = threading.Thread(target=writer, name=f"zooaudit-writer-{plan.model_key}", daemon=True)
    thread.start()
    try:
        for shard in shards:
            if failure:
                break
            acts, logits = compute_shard(plan, shard)
            companions = compute_companions(plan, shard)
            todo.put((shard, acts, logits, companions), _nbytes(acts, logits, companions))
    finally:
        todo.close()
        thread.join()
    if failure:
        raise failure[0]
    return results


def publish_activations(plan: ExtractionPlan, staging: Staging, *, run_id: str | None = None,
                        params: dict | None = None) -> StageResult:
    """Check every shard is committed, record the non-finite counts, fast-forward
    ``main`` to the staging tip (all or nothing)."""
    import icechunk

    repository = plan.repository
    repo = repository.icechunk
    found = _read_staging(repo, plan, staging.branch, staging.base) or Staging(staging.branch, staging.base)
    missing = [s.index for s in plan.shards if s.index not in found.done]
    if missing:
        raise ZooauditError(f"Cannot publish activations of {plan.model_uri} on {plan.ds_key}: shards {missing} "
                            f"are not committed on {staging.branch!r}; rerun to extract them.")
    nonfinite = {layer: sum(found.done[s.index].get(layer, 0) for s in plan.shards) for layer in plan.layers}
    session = repo.writable_session(staging.branch)
    for layer, count in nonfinite.items():
        zarr.open_group(session.store, path=layout.acts_group(plan.root, layer), mode="r+").attrs[
            "nonfinite_count"] = count
        if count:
            log.warning("%s layer %s: %d NaN/Inf activation values on %s", plan.model_uri, layer, count,
                        plan.ds_key)
    if not plan.layers:   # outputs only (counterfactual predictions): the publish commit records its key there
        zarr.open_group(session.store, path=layout.outputs_group(plan.root), mode="r+").attrs[
            "cache_key"] = plan.cache_key
    summary = {"layers": plan.layers, "n_samples": plan.n_samples, "shards": len(plan.shards),
               "nonfinite": nonfinite, "dtype": plan.dtype}
    if plan.provenance:
        summary["provenance"] = plan.provenance
    if plan.companions:   # their cache keys: a lookup of a companion's key finds this commit
        summary["companions"] = {c.stage: c.cache_key for c in plan.companions}
    meta = commit_metadata(plan.stage, plan.cache_key, params or {}, model=plan.model_uri,
                           model_hash=plan.model_hash, dataset=plan.dataset.model_dump(), dataset_hash=plan.ds_hash,
                           layers=plan.layers, flow_run_id=run_id, summary=summary,
                           products=plan.product_keys[1:] or None)
    with repository.lock():
        snapshot = session.commit(f"{plan.stage} {plan.model_uri} on {plan.dataset.name}", metadata=meta)
        try:
            repo.reset_branch(MAIN, snapshot, from_snapshot_id=staging.base)
        except icechunk.IcechunkError as err:
            raise ZooauditError(f"Another run committed to {repository.name!r} while activations were written; "
                                "rerun (completed stages are skipped).") from err
        repo.delete_branch(staging.branch)
    return StageResult(plan.stage, plan.model_uri, plan.ds_key, plan.cache_key, snapshot, False, summary)


def cache_hit(plan: ExtractionPlan) -> StageResult | None:
    """The committed result of this sharded product (activations or a control), or None."""
    if (snap := cached_activations(plan)) is None:
        return None
    return skipped(plan.stage, plan, plan.cache_key, snap)


def extract_product(plan: ExtractionPlan, *, run_id: str | None = None, params: dict | None = None) -> StageResult:
    """Resume or start the staging branch, extract the missing shards, publish (no cache check)."""
    staging = begin_activations(plan)
    extract_shards(plan, pending_shards(plan, staging), staging.branch)
    return publish_activations(plan, staging, run_id=run_id, params=params)


def run_activations(plan: ExtractionPlan, *, run_id: str | None = None, params: dict | None = None) -> StageResult:
    """The whole activations stage (or one control's) in this process: cache hit, else
    resume/extract and publish."""
    return cache_hit(plan) or extract_product(plan, run_id=run_id, params=params)
