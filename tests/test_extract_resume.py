"""Resumable extraction: a killed run leaves nothing visible on ``main``; the rerun
extracts only the missing shards and ends bitwise identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr

from zooaudit import layout, stages
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.stages import activations as extraction
from zooaudit.store import MAIN, Store, find_commit

MODEL = "builtin:cnn-w8-s0"


def _spec(store_url, **kw):
    kw.setdefault("datasets", [DatasetSpec(name="digits", split="all")])
    kw.setdefault("shard_size", 20)
    return AuditModelSpec(model=MODEL, store=store_url, batch_size=16, layers=["act*", "embed"],
                          task_runner="threads", **kw)


def _arrays(plan, snapshot) -> dict[str, np.ndarray]:
    """Every array of the dataset group at ``snapshot`` (activations, logits, samples)."""
    repo = Store(plan.store).model_repo(plan.model_key)
    root = zarr.open_group(repo.readonly_session(snapshot_id=snapshot).store, path=plan.ds_key, mode="r")
    out = {}
    for sub in ("samples", "outputs", *[f"acts/{layer}" for layer in plan.layers]):
        for name, arr in root[sub].arrays():
            out[f"{sub}/{name}"] = arr[...]
    return out


def _shard_commits(plan) -> list[dict]:
    """Metadata of the plan's shard commits on its staging branch, oldest first (the branch's
    ancestry also holds the shard commits of plans published earlier in the same store)."""
    repo = Store(plan.store).model_repo(plan.model_key)
    branch = f"staging-{plan.cache_key}"
    if branch not in repo.list_branches():
        return []
    return [i.metadata for i in reversed(list(repo.ancestry(branch=branch)))
            if (i.metadata or {}).get("stage") == "shard" and i.metadata.get("for") == plan.cache_key]


def _staged_shards(plan) -> int:
    """Shards committed on the staging branch (a commit may hold several)."""
    return sum(len(extraction._committed_shards(meta)) for meta in _shard_commits(plan))


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, arr in a.items():
        assert arr.dtype == b[k].dtype, k
        # bytes, not values: NaN-safe and exact
        assert arr.tobytes() == b[k].tobytes(), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run in a store that the cheaper tests below share (their
    cache keys differ, so their staging branches and commits do not collide)."""
    url = "file://" + str(tmp_path_factory.mktemp("ref") / "store")
    spec = _spec(url)
    plan = stages.plan_extraction(spec, spec.datasets[0])
    res = stages.run_activations(plan)
    return plan, _arrays(plan, res.snapshot)


def _first(arrays: dict, n: int) -> dict:
    """The first ``n`` samples of every array (all are sample-major)."""
    return {k: v[:n] for k, v in arrays.items()}


CHILD = """
import sys
from zooaudit import stages
from zooaudit.specs import AuditModelSpec
spec = AuditModelSpec.model_validate_json(sys.argv[1])
plan = stages.plan_extraction(spec, spec.datasets[0])
staging = stages.begin_activations(plan)
print("begun", flush=True)
stages.extract_shards(plan, stages.pending_shards(plan, staging), staging.branch)
stages.publish_activations(plan, staging)
print("published", flush=True)
"""


@pytest.mark.slow
def test_killed_process_resumes_only_missing_shards_bitwise_identical(tmp_path, reference, monkeypatch):
    ref_plan, ref_arrays = reference
    url = "file://" + str(tmp_path / "store")
    spec = _spec(url)
    plan = stages.plan_extraction(spec, spec.datasets[0])   # trains the weights here, not in the child
    assert plan.cache_key == ref_plan.cache_key and len(plan.shards) == 90
    base = Store(url).model_repo(plan.model_key).lookup_branch(MAIN)

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen([sys.executable, "-c", CHILD, spec.model_dump_json()], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while _staged_shards(plan) < 3:          # a real kill, a few shards into the run
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "child never committed a shard"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    committed = _staged_shards(plan)
    assert 3 <= committed < len(plan.shards), "the kill landed after the run finished; test proves nothing"

    # Nothing half-written is visible: main is where it was, without the cache key.
    repo = Store(url).model_repo(plan.model_key)
    assert repo.lookup_branch(MAIN) == base and find_commit(repo, plan.cache_key) is None

    computed = []
    real = extraction.compute_shard

    def spy(plan_, shard):
        computed.append(shard.index)
        return real(plan_, shard)

    monkeypatch.setattr(extraction, "compute_shard", spy)
    staging = stages.begin_activations(plan)
    assert set(staging.done) and len(staging.done) >= committed
    res = stages.run_activations(plan)
    assert sorted(computed) == sorted(set(range(len(plan.shards))) - set(staging.done))
    assert repo.list_branches() == {MAIN}
    _assert_bitwise_equal(_arrays(plan, res.snapshot), ref_arrays)


def test_task_failing_after_k_shards_keeps_them_and_rerun_completes(reference, monkeypatch):
    ref_plan, ref_arrays = reference
    url = ref_plan.store
    spec = _spec(url, datasets=[DatasetSpec(name="digits", split="all", max_samples=200)])
    plan = stages.plan_extraction(spec, spec.datasets[0])
    real = extraction.compute_shard

    def failing(plan_, shard):
        if shard.index == 5:
            raise RuntimeError("worker lost")
        return real(plan_, shard)

    monkeypatch.setattr(extraction, "compute_shard", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        stages.run_activations(plan)
    repo = Store(url).model_repo(plan.model_key)
    assert find_commit(repo, plan.cache_key) is None
    staging = stages.begin_activations(plan)
    assert sorted(staging.done) == [0, 1, 2, 3, 4]
    with pytest.raises(Exception, match="shards .* are not committed"):
        stages.publish_activations(plan, staging)      # incomplete: refused, main untouched
    assert find_commit(repo, plan.cache_key) is None

    computed = []
    monkeypatch.setattr(extraction, "compute_shard", lambda p, s: computed.append(s.index) or real(p, s))
    res = stages.run_activations(plan)
    assert computed == list(range(5, len(plan.shards))) and len(plan.shards) == 10
    _assert_bitwise_equal(_arrays(plan, res.snapshot), _first(ref_arrays, 200))
    assert stages.run_activations(plan).skipped


def test_writer_failure_is_raised_and_stops_compute(reference, monkeypatch):
    spec = _spec(reference[0].store, datasets=[DatasetSpec(name="digits", max_samples=180)])
    plan = stages.plan_extraction(spec, spec.datasets[0])
    staging = stages.begin_activations(plan)
    computed = []
    real = extraction.compute_shard
    monkeypatch.setattr(extraction, "compute_shard", lambda p, s: computed.append(s.index) or real(p, s))

    def broken_write(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(layout, "write_shard", broken_write)
    monkeypatch.setattr(extraction, "WRITE_QUEUE_SIZE", 2)
    with pytest.raises(OSError, match="disk full"):
        stages.extract_shards(plan, plan.shards, staging.branch)
    # bounded queue: the producer stops within the failing batch (≤ queue size) + a full
    # queue + the shard being computed when the failure is seen
    assert len(computed) <= 2 * 2 + 1 < len(plan.shards)
    assert _staged_shards(plan) == 0


def test_float16_storage(reference):
    ref_plan, ref_arrays = reference
    spec = _spec(ref_plan.store, dtype="float16", datasets=[DatasetSpec(name="digits", split="all", max_samples=100)])
    plan = stages.plan_extraction(spec, spec.datasets[0])
    assert plan.cache_key != ref_plan.cache_key
    got = _arrays(plan, stages.run_activations(plan).snapshot)
    for layer in plan.layers:
        a = got[f"acts/{layer}/activations"]
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, ref_arrays[f"acts/{layer}/activations"][:100].astype(np.float16))


def test_retried_task_skips_committed_shards(reference, monkeypatch):
    spec = _spec(reference[0].store, datasets=[DatasetSpec(name="digits", max_samples=60)])
    plan = stages.plan_extraction(spec, spec.datasets[0])
    staging = stages.begin_activations(plan)
    stages.extract_shards(plan, plan.shards[:2], staging.branch)
    computed = []
    real = extraction.compute_shard
    monkeypatch.setattr(extraction, "compute_shard", lambda p, s: computed.append(s.index) or real(p, s))
    results = stages.extract_shards(plan, plan.shards, staging.branch)      # the retry of the whole group
    assert computed == [2] and [r.index for r in results] == [2]
    assert stages.publish_activations(plan, staging).summary["shards"] == 3


def test_waiting_shards_share_one_commit_and_resume_skips_them(reference, monkeypatch):
    """The writer commits the shards that pile up while it is busy in one commit, which
    records every one of them with its own NaN/Inf counts; a rerun skips them all."""
    ref_plan, ref_arrays = reference
    spec = _spec(ref_plan.store, datasets=[DatasetSpec(name="digits", split="all", max_samples=120)])
    plan = stages.plan_extraction(spec, spec.datasets[0])
    assert len(plan.shards) == 6
    staging = stages.begin_activations(plan)
    layer_a, layer_b = plan.layers[0], plan.layers[-1]
    bad = {2: {layer_a: [0, 5]}, 3: {layer_a: [1, 2, 3], layer_b: [4]}}   # shard: {layer: rows made NaN}
    real_compute = extraction.compute_shard
    computed = []

    def compute(plan_, shard):
        computed.append(shard.index)
        acts, logits = real_compute(plan_, shard)
        acts = {name: a.copy() for name, a in acts.items()}
        for name, rows in bad.get(shard.index, {}).items():
            acts[name][rows, 0] = np.nan
        return acts, logits

    queued = threading.Event()

    class Queue(extraction._WriteQueue):   # a writer busy until the producer has queued all five shards
        def put(self, item, nbytes):
            super().put(item, nbytes)
            if item[0].index == 4:
                queued.set()

        def take(self, linger=0.0):
            assert queued.wait(60)
            return super().take(linger)

    monkeypatch.setattr(extraction, "compute_shard", compute)
    monkeypatch.setattr(extraction, "_WriteQueue", Queue)
    results = stages.extract_shards(plan, plan.shards[:5], staging.branch)
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert [m["shards"] for m in _shard_commits(plan)] == [[0, 1, 2, 3, 4]]
    assert len({r.snapshot for r in results}) == 1
    assert results[2].nonfinite == {layer_a: 2, **{n: 0 for n in plan.layers if n != layer_a}}
    assert results[3].nonfinite[layer_a] == 3 and results[3].nonfinite[layer_b] == 1

    computed.clear()
    resumed = stages.begin_activations(plan)
    assert sorted(resumed.done) == [0, 1, 2, 3, 4] and resumed.done[3][layer_b] == 1
    res = stages.run_activations(plan)
    assert computed == [5]
    assert res.summary["nonfinite"] == {n: {layer_a: 5, layer_b: 1}.get(n, 0) for n in plan.layers}
    expected = _first(ref_arrays, 120)
    for shard, layers in bad.items():
        for name, rows in layers.items():
            a = expected[f"acts/{name}/activations"] = expected[f"acts/{name}/activations"].copy()
            a[[plan.shards[shard].start + r for r in rows], 0] = np.nan
    _assert_bitwise_equal(_arrays(plan, res.snapshot), expected)


def test_resumes_a_branch_of_single_shard_commits(reference, monkeypatch):
    """Staging branches written before coalescing (one ``"shard": i`` per commit) still resume."""
    ref_plan, ref_arrays = reference
    spec = _spec(ref_plan.store, datasets=[DatasetSpec(name="digits", split="all", max_samples=80)])
    plan = stages.plan_extraction(spec, spec.datasets[0])
    staging = stages.begin_activations(plan)
    repo = Store(plan.store).model_repo(plan.model_key)
    for shard in plan.shards[:2]:
        acts, logits = extraction.compute_shard(plan, shard)
        session = repo.writable_session(staging.branch)
        layout.write_shard(session.store, plan.ds_key, shard.start, acts, logits)
        session.commit(f"shard {shard.index}", metadata={"stage": "shard", "for": plan.cache_key,
                                                         "shard": shard.index,
                                                         "nonfinite": {n: 0 for n in plan.layers}})
    assert sorted(stages.begin_activations(plan).done) == [0, 1]
    computed = []
    real = extraction.compute_shard
    monkeypatch.setattr(extraction, "compute_shard", lambda p, s: computed.append(s.index) or real(p, s))
    assert stages.extract_shards(plan, plan.shards[:3], staging.branch)[0].index == 2   # a retried task too
    res = stages.run_activations(plan)
    assert computed == [2, 3] and len(plan.shards) == 4
    _assert_bitwise_equal(_arrays(plan, res.snapshot), _first(ref_arrays, 80))


def test_writer_lingers_for_more_shards_until_compute_ends(reference, monkeypatch):
    """With a long linger the writer holds the first shard for the rest (one commit), and
    the end of compute releases it at once instead of after the linger."""
    spec = _spec(reference[0].store, datasets=[DatasetSpec(name="digits", split="all", max_samples=40)])
    plan = stages.plan_extraction(spec, spec.datasets[0])
    staging = stages.begin_activations(plan)
    monkeypatch.setattr(extraction, "WRITE_LINGER_S", 600.0)
    t0 = time.monotonic()
    results = stages.extract_shards(plan, plan.shards, staging.branch)
    assert time.monotonic() - t0 < 300, "the writer waited out its linger after compute had ended"
    assert [r.index for r in results] == [0, 1] and [m["shards"] for m in _shard_commits(plan)] == [[0, 1]]
