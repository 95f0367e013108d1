"""The S3 commit lock (``Store._s3_lock``): the holder's TTL in the lock object, a heartbeat that
refreshes only a lock still ours, a release that a hung heartbeat cannot hang, and a commit that
is not made under a lost lock.

The lock object logic runs on any fsspec filesystem: the fast tests drive it on a local
directory (``file://``; the ``file://`` store itself serialises commits with ``fcntl``, which has
no TTL and no heartbeat); the slow ones on the session stack's SeaweedFS, where the refresh is a
conditional put (``If-Match``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import numpy as np
import pytest
import xarray as xr

import zooaudit.store as store_mod
from zooaudit.errors import ZooauditError
from zooaudit.store import LockHold, Store, commit_metadata, write_dataset
from zooaudit.versions import history

OTHER = "other-host:4242:0123456789abcdef"


@pytest.fixture
def local(store_url):
    """A file:// store and the path of one lock object under it."""
    store = Store.open(store_url)
    return store, store.path("locks", "models__toy.lock")


def _write(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(record, fh)


def _read(path: str) -> dict:
    """The lock record; read again when caught mid-refresh (a local write truncates first)."""
    for _ in range(50):
        with open(path) as fh:
            raw = fh.read()
        if raw:
            return json.loads(raw)
        time.sleep(0.01)
    raise AssertionError(f"{path} stayed empty")


def _until(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_lock_object_records_the_holders_ttl(local, monkeypatch):
    store, path = local
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "7")
    with store._s3_lock(path) as hold:
        held = _read(path)
        assert isinstance(hold, LockHold) and not hold.lost
    assert held["ttl"] == 7.0 and held["owner"].startswith(f"{os.uname().nodename}:{os.getpid()}:")
    assert abs(held["time"] - time.time()) < 5
    assert not os.path.exists(path), "the lock was not released"


@pytest.mark.parametrize(("holder_ttl", "waiter_ttl", "broken"), [
    (60.0, 1.0, False),    # the holder refreshes every 15 s: 5 s old is fresh, whatever the waiter's TTL
    (2.0, 600.0, True),    # the holder's TTL passed: stale, though the waiter's own TTL is long
    (None, 1.0, True),     # a lock written without a TTL (older zooaudit): the waiter's own TTL
    (None, 600.0, False),
])
def test_staleness_is_judged_by_the_holders_ttl(local, monkeypatch, holder_ttl, waiter_ttl, broken):
    store, path = local
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", str(waiter_ttl))
    record = {"owner": OTHER, "time": time.time() - 5.0, **({"ttl": holder_ttl} if holder_ttl else {})}
    _write(path, record)
    t0 = time.monotonic()
    if broken:
        with store._s3_lock(path, timeout=10):
            assert _read(path)["owner"] != OTHER
        assert time.monotonic() - t0 < 5
    else:
        with pytest.raises(ZooauditError, match="Timed out"):
            with store._s3_lock(path, timeout=1.5):
                pass
        assert _read(path) == record, "a fresh lock of another run was touched"


def test_a_garbage_ttl_in_the_lock_object_falls_back_to_ours(local, monkeypatch):
    store, path = local
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "600")
    for bad in ("soon", -3, float("nan")):
        record = {"owner": OTHER, "time": time.time() - 5.0, "ttl": bad}
        _write(path, json.loads(json.dumps(record)))
        with pytest.raises(ZooauditError, match="Timed out"):
            with store._s3_lock(path, timeout=0.5):
                pass


def test_heartbeat_stops_when_another_run_took_the_lock(local, monkeypatch):
    """The lock object is replaced by another run's (ours was broken as stale meanwhile): the
    heartbeat must not overwrite it, the hold says it was lost, and the release leaves it."""
    store, path = local
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "1")   # a beat every 0.25 s
    theirs = {"owner": OTHER, "time": time.time(), "ttl": 60.0}
    with store._s3_lock(path) as hold:
        _write(path, theirs)
        time.sleep(1.0)   # four beat periods
        assert _read(path) == theirs, "the heartbeat overwrote another run's lock"
        assert hold.lost, "the heartbeat did not notice the lock was taken"
    assert "another owner" in hold.reason and OTHER in hold.reason
    assert _read(path) == theirs, "the release deleted another run's lock"


def test_heartbeat_does_not_recreate_a_broken_lock(local, monkeypatch):
    store, path = local
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "1")
    with store._s3_lock(path) as hold:
        os.remove(path)   # broken as stale by another run
        time.sleep(1.0)
        assert not os.path.exists(path), "the heartbeat re-created a lock that was broken"
        assert hold.lost
    assert "gone" in hold.reason


def test_refreshing_keeps_a_long_held_lock_fresh(local, monkeypatch):
    """The heartbeat still does its job: held for 3 TTLs, the object's time moves and a waiter
    never breaks it."""
    store, path = local
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "1")
    with store._s3_lock(path) as hold:
        first = _read(path)["time"]
        with pytest.raises(ZooauditError, match="Timed out"):
            with store._s3_lock(path, timeout=3.0):
                pass
        assert _read(path)["time"] > first and not hold.lost


def test_a_torn_lock_record_is_held_not_broken_and_not_a_crash(local, monkeypatch):
    """A waiter that reads the lock object mid-refresh (empty: a local write truncates, then
    writes) waits for it like any held lock: no JSON error, the object is not broken."""
    store, path = local
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "60")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    with pytest.raises(ZooauditError, match="Timed out"):
        with store._s3_lock(path, timeout=1.0):
            pass
    assert os.path.exists(path) and os.path.getsize(path) == 0


def test_a_lock_record_torn_for_a_whole_ttl_is_broken(local, monkeypatch):
    """An object that stays unparseable for longer than the TTL was left by a writer that died
    between truncating and writing: it is stale, broken, and the lock taken."""
    store, path = local
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "1")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    with store._s3_lock(path, timeout=10.0) as hold:
        assert _read(path)["ttl"] == 1.0 and not hold.lost
    assert not os.path.exists(path)


class _HangingHeartbeatFS:
    """A local filesystem whose calls from the lock heartbeat thread block until ``gate`` opens
    (a request to a server that hangs)."""

    def __init__(self, inner, gate: threading.Event, entered: threading.Event) -> None:
        self._inner, self._gate, self._entered = inner, gate, entered

    def _maybe_hang(self) -> None:
        if threading.current_thread().name == "zooaudit-lock-heartbeat":
            self._entered.set()
            self._gate.wait(60)

    def cat_file(self, path, *args, **kwargs):
        self._maybe_hang()
        return self._inner.cat_file(path, *args, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if mode != "create":
            self._maybe_hang()
        return self._inner.pipe_file(path, value, mode=mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_a_hung_heartbeat_does_not_hang_the_release(local, monkeypatch):
    store, path = local
    inner = store.fs
    gate, entered = threading.Event(), threading.Event()
    fake = _HangingHeartbeatFS(inner, gate, entered)
    monkeypatch.setattr(Store, "fs", property(lambda self: fake))
    monkeypatch.setattr(store_mod, "HEARTBEAT_JOIN_S", 0.5)
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "1")
    released = threading.Event()

    def hold_and_release():
        with store._s3_lock(path):
            assert entered.wait(3.0), "the heartbeat never ran"
        released.set()

    t0 = time.monotonic()
    th = threading.Thread(target=hold_and_release, daemon=True)
    th.start()
    try:
        assert released.wait(5.0), "the release waited for a heartbeat stuck in a request"
        assert time.monotonic() - t0 < 4.0
        assert not os.path.exists(path), "the lock was not released"
    finally:
        gate.set()
        th.join(10)
    time.sleep(0.3)   # the unstuck beat sees the release and writes nothing
    assert not os.path.exists(path), "the heartbeat re-created the released lock"


def _ds(value: float) -> xr.Dataset:
    return xr.Dataset({"v": ("i", np.full(8, value))})


def test_a_commit_is_not_made_under_a_lost_lock(store_url, monkeypatch):
    """The first attempt's lock is lost before the commit: nothing is committed under it; the
    commit is retried under a new lock and lands once."""
    holds: list[LockHold] = []
    real_lock = Store.lock

    def flaky_lock(self, name):
        import contextlib

        @contextlib.contextmanager
        def cm():
            with real_lock(self, name) as hold:
                if not holds:
                    hold.lose("taken by another run (test)")
                holds.append(hold)
                yield hold
        return cm()

    writes = []

    def write(session):
        writes.append(1)
        write_dataset(session, _ds(3.0), "g")

    repo = Store.open(store_url).model_repository("toy")
    repo.icechunk   # created before the lock turns flaky
    monkeypatch.setattr(Store, "lock", flaky_lock)
    snap, committed = repo.commit_once(write, message="toy k", metadata=commit_metadata("toy", "k", {"v": 3}))
    assert committed and len(holds) == 2 and len(writes) == 2
    keys = [v.cache_key for v in history(repo.icechunk)]
    assert keys.count("k") == 1 and repo.find("k") == snap
    assert float(repo.open("g")["v"].values[0]) == 3.0


# -- on the stack's SeaweedFS: the refresh is a conditional put ---------------------------


@pytest.fixture
def s3lock(local_stack, monkeypatch):
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "1")
    store = Store.open(f"s3://{local_stack.config.bucket}/l-{uuid.uuid4().hex[:8]}")
    return store, store.path("locks", "models__toy.lock")


def _s3_read(store: Store, path: str) -> dict:
    store.fs.invalidate_cache(path)
    return json.loads(store.fs.cat_file(path))


@pytest.mark.slow
def test_s3_lock_records_ttl_and_waiters_judge_by_it(s3lock, monkeypatch):
    store, path = s3lock
    with store._s3_lock(path):
        assert _s3_read(store, path)["ttl"] == 1.0
    # another run's 5-second-old lock with a 60 s TTL is not broken by a waiter whose TTL is 1 s
    record = {"owner": OTHER, "time": time.time() - 5.0, "ttl": 60.0}
    store.fs.pipe_file(path, json.dumps(record).encode())
    with pytest.raises(ZooauditError, match="Timed out"):
        with store._s3_lock(path, timeout=2.0):
            pass
    assert _s3_read(store, path) == record
    store.fs.rm_file(path)


@pytest.mark.slow
def test_s3_heartbeat_is_a_conditional_put(s3lock):
    """The lock object is rewritten with our own owner token but other content (what a
    read-compare-write cannot tell from ours): the refresh's If-Match refuses it, the hold is
    lost, and the object is left as it was."""
    store, path = s3lock
    with store._s3_lock(path) as hold:
        mine = _s3_read(store, path)
        forged = {**mine, "time": mine["time"] + 1000.0}
        store.fs.pipe_file(path, json.dumps(forged).encode())
        assert _until(lambda: hold.lost, 5.0), "the heartbeat overwrote a lock object it did not write"
        assert "conditional" in hold.reason
        time.sleep(0.6)
        assert _s3_read(store, path) == forged
    # the release deletes the object (it names our token): nothing is left behind
    store.fs.invalidate_cache()
    assert not store.fs.exists(path)


@pytest.mark.slow
def test_s3_heartbeat_stops_when_taken_and_the_commit_retries(s3lock):
    store, path = s3lock
    repo = store.model_repository("toy")
    repo.icechunk
    taken = []

    def write(session):
        write_dataset(session, _ds(5.0), "g")
        if not taken:   # another run breaks our lock and takes it (its own TTL 1 s, never refreshed)
            taken.append(1)
            store.fs.pipe_file(path, json.dumps({"owner": OTHER, "time": time.time(), "ttl": 1.0}).encode())
            time.sleep(1.0)   # four of our beat periods: the heartbeat finds it

    t0 = time.monotonic()
    snap, committed = repo.commit_once(write, message="toy k", metadata=commit_metadata("toy", "k", {"v": 5}))
    assert committed and repo.find("k") == snap
    assert [v.cache_key for v in history(repo.icechunk)].count("k") == 1
    assert time.monotonic() - t0 < 30
    store.fs.invalidate_cache()
    assert not store.fs.exists(path), "a lock object was left behind"
