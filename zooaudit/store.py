"""Icechunk repositories on ``file://`` or ``s3://``: layout, commits, cache lookups.

Layout (DESIGN.md §3) under a store root URL::

    <root>/models/<model-key>     one Icechunk repository per model
    <root>/zoo                    zoo-level results (cross-model similarity)
    <root>/weights/...            safetensors weights of the builtin zoo
    <root>/reports/<run-id>/      HTML report, PNG figures, JSON manifest
    <root>/locks/                 commit locks (file:// only)

Commits carry provenance in their metadata (stage, cache key, parameters,
package versions); :func:`find_commit` finds a stage's cache key on ``main``
so that reruns skip completed work.

On ``s3://`` the endpoint, region and credentials come from the environment
(``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``; the flows layer may fill them from a Prefect Secret
block) and are never written anywhere. Commits to one repository are
serialized by a lock object written with an S3 conditional put (``If-None-Match``)
— valid across machines, unlike the ``fcntl`` lock used for ``file://`` — and a
commit that still meets a conflict is rebased, or retried (see :func:`commit`).

Atomicity of multi-task writes (``zooaudit.stages``): Icechunk cannot fork a
session with uncommitted changes, so sharded writes go to a staging branch
(template commit, then the merged forks) and ``main`` is fast-forwarded to the
result in one conditional ``reset_branch``. ``main`` never points at a
half-written version.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any
from urllib.parse import urlparse

import dask
import icechunk
import numpy as np
import xarray as xr
import zarr

from .errors import ZooauditError
from .keys import canonical_json

log = logging.getLogger("zooaudit.store")

DEFAULT_STORE = "./zooaudit-store"
S3_LOCK_TTL = 300.0   # seconds after which an S3 lock left by a killed process is broken (default)
S3_RETRY_WINDOW = 60.0   # seconds an unreachable S3 server is retried before the store gives up (default)
SCHEMES = ("file", "s3")
MAIN = "main"

# Icechunk warns on every local repository open; we serialize commits per
# repository ourselves (see `Store.lock`), which is what the warning asks for.
if hasattr(icechunk, "set_logs_filter") and "ICECHUNK_LOG" not in os.environ:
    icechunk.set_logs_filter("error")


def _seconds(var: str, default: float, minimum: float = 0.0) -> float:
    """A positive number of seconds, at least ``minimum``, from the environment variable ``var``
    (``default`` if unset)."""
    raw = os.environ.get(var)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0 and value >= minimum):
        at_least = f", at least {minimum:g}" if minimum else ""
        raise ZooauditError(f"Bad {var}={raw!r}: it must be a positive number of seconds{at_least} "
                            f"(default {default:g}).")
    return value


def lock_ttl() -> float:
    """Seconds after which an S3 lock object whose holder stopped refreshing it is broken:
    ``$ZOOAUDIT_S3_LOCK_TTL``, default :data:`S3_LOCK_TTL`. The holder refreshes it every
    quarter of this, so only a killed (or partitioned) holder's lock goes stale."""
    # at least 1 s: the holder refreshes every TTL/4, and a lock must outlive a PUT's round trip
    return _seconds("ZOOAUDIT_S3_LOCK_TTL", S3_LOCK_TTL, minimum=1.0)


def retry_window() -> float:
    """Seconds the store keeps retrying an S3 server that does not answer (refused or
    dropped connections, 5xx) before it raises :class:`StoreUnavailable`:
    ``$ZOOAUDIT_S3_RETRY_S``, default :data:`S3_RETRY_WINDOW`."""
    return _seconds("ZOOAUDIT_S3_RETRY_S", S3_RETRY_WINDOW)


class StoreUnavailable(ZooauditError):
    """The store's server could not be reached, or failed a write (outage, full volume).
    Nothing half-written is on ``main``: a rerun skips what was committed."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types of a failing store server or connection (not of bad input or conflicts)."""
    found: list[type[BaseException]] = [OSError, icechunk.IcechunkError, TimeoutError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        found += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        found.append(aiohttp.ClientError)
    return tuple(found)


_STORE_CLIENTS = {"botocore", "aiobotocore", "aiohttp", "s3fs", "icechunk", "fsspec"}


def _store_failure(err: BaseException, url: str) -> bool:
    """Whether a transport-type error is the store's: a plain ``OSError`` is, on S3 (s3fs raises
    them for server errors) or for a full or failing disk; a missing file is not."""
    if isinstance(err, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    module = type(err).__module__
    if module == "builtins" and isinstance(err, OSError) and not isinstance(err, TimeoutError):
        return url.startswith("s3://") or err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)
    # other libraries' OSError subclasses (requests and the Hugging Face Hub, PIL, ssl, gzip) are
    # not the store's: only the store's own client stack is
    return module == "builtins" or module.split(".")[0] in _STORE_CLIENTS


def outage(err: BaseException, what: str, url: str) -> StoreUnavailable | None:
    """A :class:`StoreUnavailable` explaining ``err`` (raised while doing ``what`` on the store
    ``url``) when it, or an exception it was raised from, is a store transport failure; else None."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ZooauditError):
            return None
        if isinstance(cur, _transport_errors()) and _store_failure(cur, url):
            endpoint = s3_settings()["endpoint"] if url.startswith("s3://") else None
            where = f"{url}" + (f" (endpoint {endpoint})" if endpoint else "")
            reason = " ".join(str(cur).split())[:300] or type(cur).__name__
            return StoreUnavailable(
                f"The store {where} failed while {what}: {type(cur).__name__}: {reason}. Nothing half-written "
                "is on main (commits are all or nothing); check that the store's server is up and has space, "
                "then rerun — completed stages are skipped.")
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return None


def resolve_store_url(url: str | None = None) -> str:
    """Normalise a store root: explicit URL, else ``$ZOOAUDIT_STORE``, else ``./zooaudit-store``.

    Plain paths become absolute ``file://`` URLs. Unknown schemes are refused.
    """
    url = url or os.environ.get("ZOOAUDIT_STORE") or DEFAULT_STORE
    parsed = urlparse(url)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return "file://" + os.path.abspath(os.path.expanduser(url))
    if parsed.scheme not in SCHEMES:
        raise ZooauditError(
            f"Unknown store URL scheme {parsed.scheme!r} in {url!r}. Allowed: a local path, "
            "file:///absolute/path, or s3://bucket/prefix (endpoint and credentials from the "
            "environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."
        )
    if parsed.scheme == "file":
        return "file://" + os.path.abspath(parsed.netloc + parsed.path)
    if not parsed.netloc or not (3 <= len(parsed.netloc) <= 63):
        raise ZooauditError(
            f"Bad S3 bucket name {parsed.netloc!r} in {url!r}: bucket names must be 3–63 characters."
        )
    return f"s3://{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")


def package_versions() -> dict[str, str]:
    """Versions recorded in every commit's metadata."""
    out = {"python": platform.python_version()}
    for name in ("zooaudit", "torch", "numpy", "zarr", "icechunk", "xarray", "scikit-learn", "fairlearn"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class Store:
    """A store root (``file://`` or ``s3://``) and the repositories under it."""

    url: str

    @classmethod
    def open(cls, url: str | None = None) -> Store:
        return cls(resolve_store_url(url))

    @property
    def scheme(self) -> str:
        return urlparse(self.url).scheme

    # -- paths -----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """URL (s3) or local path (file) of a location under the root."""
        base = self.url[len("file://"):] if self.scheme == "file" else self.url
        return "/".join([base.rstrip("/"), *parts])

    @property
    def fs(self):
        import fsspec

        if self.scheme == "file":
            return fsspec.filesystem("file", auto_mkdir=True)
        return fsspec.filesystem("s3", **_s3fs_options())

    # -- repositories ------------------------------------------------------------
    def _storage(self, *parts: str) -> icechunk.Storage:
        if self.scheme == "file":
            path = self.path(*parts)
            os.makedirs(path, exist_ok=True)
            return icechunk.local_filesystem_storage(path)
        parsed = urlparse(self.path(*parts))
        s3 = s3_settings()
        return icechunk.s3_storage(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            region=s3["region"],
            endpoint_url=s3["endpoint"],
            allow_http=s3["allow_http"],
            force_path_style=bool(s3["endpoint"]),
            from_env=True,   # credentials straight from the environment: never in our objects or logs
        )

    def _config(self) -> icechunk.RepositoryConfig | None:
        """On S3, Icechunk's own retries of a failing request span about :func:`retry_window`
        (backoff doubling from 0.1 s to 4 s), so that an outage ends in :class:`StoreUnavailable`
        after the same bounded time whichever layer meets it (not persisted in the repository)."""
        if self.scheme == "file":
            return None
        window = retry_window()
        tries = 6 + max(0, math.ceil((window - 6.3) / 4))   # 0.1+0.2+…+3.2 = 6.3 s, then 4 s each
        retries = icechunk.StorageRetriesSettings(max_tries=tries, initial_backoff_ms=100, max_backoff_ms=4000)
        return icechunk.RepositoryConfig(storage=icechunk.StorageSettings(retries=retries))

    def repo(self, *parts: str) -> icechunk.Repository:
        """Open (or create) the Icechunk repository at ``<root>/<parts...>``.

        Creation races (two tasks opening a new repository at once) are
        serialized by the repository lock; on S3 the loser of the race opens
        the repository the winner created.
        """
        storage = self._storage(*parts)
        with self.lock("/".join(parts)):
            try:
                return icechunk.Repository.open_or_create(storage, config=self._config())
            except icechunk.IcechunkError:
                if not icechunk.Repository.exists(storage):
                    raise
                return icechunk.Repository.open(storage, config=self._config())

    def model_repo(self, model_key: str) -> icechunk.Repository:
        return self.repo("models", model_key)

    def existing_repo(self, *parts: str) -> icechunk.Repository:
        """Open the repository at ``<root>/<parts...>`` for reading; never creates one."""
        missing = self.scheme == "file" and not os.path.isdir(self.path(*parts))   # _storage would mkdir it
        if missing or not icechunk.Repository.exists(self._storage(*parts)):
            known = ", ".join(self.model_keys()) or "none"
            raise ZooauditError(f"No repository {'/'.join(parts)!r} in store {self.url}. Models in this store: "
                                f"{known}.")
        return icechunk.Repository.open(self._storage(*parts), config=self._config())

    def model_keys(self) -> list[str]:
        """Keys of the model repositories in this store."""
        folder = self.path("models")
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []

    def zoo_repo(self) -> icechunk.Repository:
        return self.repo("zoo")

    def model_repository(self, model_key: str) -> Repository:
        """The handle of a model's repository (:class:`Repository`)."""
        return Repository.model(self, model_key)

    def zoo_repository(self) -> Repository:
        """The handle of the zoo repository (:class:`Repository`)."""
        return Repository.zoo(self)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[LockHold]:
        """Serialize commits to one repository across processes: ``fcntl`` on a local
        filesystem, a conditionally written lock object on S3 (across machines). Yields a
        :class:`LockHold`, whose ``lost`` says whether the lock was broken or taken meanwhile
        (never, for ``fcntl``: the kernel holds it until we close it)."""
        if self.scheme != "file":
            with self._s3_lock(self.path("locks", name.replace("/", "__") + ".lock")) as hold:
                yield hold
            return
        path = self.path("locks", name.replace("/", "__") + ".lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield LockHold(path)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _s3_lock(self, path: str, timeout: float = 900.0) -> Iterator[LockHold]:
        """Hold the lock object ``path``: created with ``If-None-Match: *`` (the S3 server
        refuses a second creator), deleted on release. The object records its holder's TTL
        (:func:`lock_ttl` of the holder's environment); a lock not refreshed for that long was
        left by a killed process and is broken (a lock written without one: our own TTL).

        While held, a heartbeat refreshes it every quarter of the TTL — only while it is still
        ours (see :meth:`_refresh`); if it was broken or taken, the heartbeat stops and the
        yielded :class:`LockHold` says so (``lost``), so a commit is not made under it.

        An S3 server that does not answer is retried for :func:`retry_window` seconds, then
        :class:`StoreUnavailable` is raised (nothing was written). A release that cannot reach
        the server is logged, not raised: the lock goes stale and is broken after the TTL."""
        fs = self.fs
        ttl, window = lock_ttl(), retry_window()
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        deadline = time.monotonic() + timeout
        delay = 0.05
        down_since: float | None = None
        torn_since: float | None = None   # since when the lock object reads unparseable
        etag: str | None = None
        while True:
            try:
                etag = _etag(fs.pipe_file(path, _lock_record(token, ttl), mode="create"))
                break
            except _transport_errors() as err:
                if not (isinstance(err, OSError) and _lock_taken(err)):
                    if isinstance(err, FileNotFoundError):   # no such bucket: retrying cannot help
                        raise ZooauditError(f"Cannot write the commit lock {path} of the store {self.url}: "
                                            f"{err}. Check that the bucket exists (`zooaudit up` creates "
                                            "its own) and the store URL is spelled right.") from err
                    if isinstance(err, PermissionError):
                        raise (outage(err, f"taking the commit lock {path}", self.url) or err) from err
                    down_since = down_since or time.monotonic()
                    if time.monotonic() - down_since > window:
                        raise (outage(err, f"taking the commit lock {path} (retried {window:.0f}s)",
                                      self.url) or err) from err
                    log.warning("store lock %s: S3 server not answering (%s); retrying", path, type(err).__name__)
                    time.sleep(min(1.0, window / 10))
                    continue
            down_since = None
            fs.invalidate_cache(path)
            with contextlib.suppress(FileNotFoundError, *_transport_errors()):
                held = _read_record(fs, path)
                if held is None:
                    # torn (mid-write): held and fresh, unless it stays torn for a whole TTL
                    # (its writer died between truncating and writing): then it is stale
                    torn_since = torn_since or time.monotonic()
                    held = {} if time.monotonic() - torn_since > ttl else None
                else:
                    torn_since = None
                if held is not None and held.get("owner") == token:
                    # our own create went through but its answer was lost and the retry got a 412:
                    # the lock is ours, not another run's (no ETag: the first refresh is unconditional)
                    break
                if held is not None and _is_stale(held, ttl) and self._break_stale(path, held, ttl):
                    continue
            if time.monotonic() > deadline:
                raise ZooauditError(f"Timed out after {timeout:.0f}s waiting for the store lock {path}; if no "
                                    f"other run is active, delete that object.")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        # Heartbeat: a lock held longer than the TTL (a long extraction) is refreshed,
        # so only a lock whose holder died goes stale.
        hold = LockHold(path)
        done = threading.Event()

        def beat() -> None:
            tag = etag
            while not done.wait(ttl / 4):
                try:
                    tag = self._refresh(path, token, ttl, tag, done)
                except LockLost as lost:
                    hold.lose(str(lost))
                    log.error("store lock %s: %s; stopped refreshing it (a commit under it is not made)",
                              path, lost)
                    return
                except Exception as err:  # noqa: BLE001 — an outage: the next beat tries again
                    log.warning("store lock %s: refresh failed (%s: %s); retrying", path, type(err).__name__, err)

        heart = threading.Thread(target=beat, name="zooaudit-lock-heartbeat", daemon=True)
        heart.start()
        try:
            yield hold
        finally:
            done.set()
            # A beat stuck in a request to a hung server must not hang the commit: wait a bounded
            # time, then release anyway (the thread is a daemon; its conditional write, if it
            # ever lands, is refused once the lock object is gone — see _refresh. Without an ETag
            # a write already in flight can re-create the object: it then goes stale after the TTL).
            heart.join(HEARTBEAT_JOIN_S)
            if heart.is_alive():
                log.warning("store lock %s: the heartbeat did not stop within %.0fs (a request to the "
                            "server hangs); releasing the lock anyway", path, HEARTBEAT_JOIN_S)
            if hold.lost:
                log.error("store lock %s was lost while held: %s", path, hold.reason)
            self._release(path, token, window)

    def _refresh(self, path: str, token: str, ttl: float, etag: str | None, done: threading.Event) -> str | None:
        """Rewrite our lock object ``path`` with a fresh time, only if it is still ours; returns
        its new ETag (None where the backend gives none). Raises :class:`LockLost` when the
        object is gone (broken as stale) or names another owner.

        With the ETag of our last write, the rewrite is a conditional put (``If-Match``, which
        SeaweedFS and AWS enforce): a lock broken and re-created by another run since then is
        refused (412), never overwritten. Without one (a local filesystem, or a create whose
        answer was lost) it is read-compare-write: the owner is checked first, and a lock broken
        and re-created between that read and our write would be overwritten — a window of one
        round trip, once per quarter TTL."""
        fs = self.fs
        fs.invalidate_cache(path)
        try:
            held = _read_record(fs, path)
        except FileNotFoundError:
            raise LockLost("the lock object is gone (broken as stale by another run)") from None
        if held is None:   # caught mid-write: the next beat reads it again
            raise ZooauditError("the lock object is being rewritten (unparseable for now)")
        if held.get("owner") != token:
            raise LockLost(f"the lock object now names another owner ({held.get('owner')})")
        if done.is_set():   # released meanwhile: do not re-create what the release deletes
            return etag
        try:
            out = fs.pipe_file(path, _lock_record(token, ttl), **({"IfMatch": etag} if etag else {}))
        except OSError as err:
            if etag and (_lock_taken(err) or isinstance(err, FileNotFoundError)):
                raise LockLost("the lock object changed since our last refresh (the conditional "
                               "write was refused): broken or taken by another run") from None
            raise
        return _etag(out)

    def _break_stale(self, path: str, held: dict, ttl: float | None = None) -> bool:
        """Delete the stale lock ``held`` read at ``path``. Two waiters may both see it stale:
        a breaker object (itself created with ``If-None-Match``) lets one of them break it, and
        the lock is read again under it, so a fresh lock that replaced the stale one meanwhile
        is never deleted. ``ttl``: ours (the breaker records it as the lock does). Returns True
        when the lock was broken."""
        fs = self.fs
        ttl = lock_ttl() if ttl is None else ttl
        breaker = path + ".break"
        try:
            fs.pipe_file(breaker, json.dumps({"time": time.time(), "ttl": ttl}).encode(), mode="create")
        except OSError as err:
            if not _lock_taken(err):
                raise
            with contextlib.suppress(FileNotFoundError):   # a breaker that died: its object goes stale too
                seen = _read_record(fs, breaker)
                if seen is None or _is_stale(seen, ttl):   # torn for good: its writer died
                    fs.rm_file(breaker)
            return False
        try:
            fs.invalidate_cache(path)
            try:
                now = _read_record(fs, path)
            except FileNotFoundError:
                return True
            now = {} if now is None else now   # torn: the same as the torn record we judged stale
            if now.get("owner") != held.get("owner") or now.get("time") != held.get("time"):
                return False   # refreshed or replaced since we read it
            log.warning("breaking stale store lock %s (held by %s, not refreshed for %.0fs, its TTL %.0fs)", path,
                        held.get("owner"), time.time() - float(held.get("time", 0)), _held_ttl(held, ttl))
            fs.rm_file(path)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError, *_transport_errors()):
                fs.rm_file(breaker)

    def _release(self, path: str, token: str, window: float) -> None:
        fs = self.fs
        give_up = time.monotonic() + min(window, 30.0)
        while True:
            try:
                fs.invalidate_cache(path)
                held = _read_record(fs, path)
                if held is None:   # caught mid-write: read it again
                    raise TimeoutError("the lock object is being rewritten")
                if held.get("owner") == token:
                    fs.rm_file(path)
                return
            except FileNotFoundError:
                return
            except _transport_errors() as err:
                if time.monotonic() > give_up:
                    log.warning("could not release the store lock %s (%s: %s); it is broken after %.0fs",
                                path, type(err).__name__, err, lock_ttl())
                    return
                time.sleep(0.5)


HEARTBEAT_JOIN_S = 5.0   # seconds a release waits for a lock heartbeat stuck in a request


class LockLost(ZooauditError):
    """The commit lock was broken (as stale) or taken by another run while we held it."""


class LockHold:
    """What the holder of a commit lock knows while inside it: ``lost`` (and its ``reason``)
    once the heartbeat found the lock broken or taken by another run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reason: str | None = None
        self._lost = threading.Event()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def lose(self, reason: str) -> None:
        self.reason = reason
        self._lost.set()


def _lock_record(token: str, ttl: float) -> bytes:
    """The lock object's content: its owner, when it was last refreshed, and the holder's TTL
    (so that a waiter with another ``$ZOOAUDIT_S3_LOCK_TTL`` judges it by the holder's)."""
    return json.dumps({"owner": token, "time": time.time(), "ttl": ttl}).encode()


def _held_ttl(held: dict, default: float) -> float:
    """The TTL a lock (or breaker) object records; ``default`` where it records none (written by
    an older zooaudit) or no positive finite number."""
    try:
        ttl = float(held["ttl"])
    except (KeyError, TypeError, ValueError):
        return default
    return ttl if math.isfinite(ttl) and ttl > 0 else default


def _read_record(fs: Any, path: str, tries: int = 5) -> dict | None:
    """The JSON record of the lock (or breaker) object ``path``; None when it stays unparseable.

    A backend whose writes are not atomic (a local filesystem truncates, then writes) can show a
    reader an empty or partial record while the holder refreshes it; that is a lock being
    written, i.e. held and fresh, never a stale one to break. Read again a few times first.
    Raises ``FileNotFoundError`` when the object is gone."""
    for attempt in range(tries):
        raw = fs.cat_file(path)
        try:
            held = json.loads(raw)
        except ValueError:
            time.sleep(0.02 * (attempt + 1))
            fs.invalidate_cache(path)
            continue
        return held if isinstance(held, dict) else {}
    return None


def _is_stale(held: dict, default_ttl: float) -> bool:
    """Whether the lock object ``held`` went unrefreshed for longer than its own TTL."""
    try:
        since = time.time() - float(held.get("time", 0))
    except (TypeError, ValueError):
        return True   # no readable time: not a lock any live holder writes
    return since > _held_ttl(held, default_ttl)


def _etag(put_answer: Any) -> str | None:
    """The ETag of an S3 put's answer (s3fs returns the ``PutObject`` response); None elsewhere."""
    return put_answer.get("ETag") if isinstance(put_answer, dict) else None


def _lock_taken(err: OSError) -> bool:
    """True when a conditional create failed because the object exists (HTTP 412 / 409)."""
    if isinstance(err, FileExistsError):
        return True
    cause = getattr(err, "__cause__", None)
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or "pre-condition" in str(err)


def s3_settings() -> dict[str, Any]:
    """Endpoint and region of the S3 store, from the environment (no credentials here)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # Plain HTTP only for an explicit http:// endpoint (a local SeaweedFS / MinIO).
    return {"endpoint": endpoint, "region": region, "allow_http": bool(endpoint and endpoint.startswith("http://"))}


def _s3fs_options() -> dict[str, Any]:
    s3 = s3_settings()
    client_kwargs: dict[str, Any] = {"region_name": s3["region"]}
    if s3["endpoint"]:
        client_kwargs["endpoint_url"] = s3["endpoint"]
    opts: dict[str, Any] = {"client_kwargs": client_kwargs,
                            "config_kwargs": {"s3": {"addressing_style": "path"}} if s3["endpoint"] else {}}
    # Keys passed explicitly (from the environment, read now) so that fsspec's instance cache,
    # keyed by these arguments, never hands out a client made with other credentials.
    for arg, var in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
        if os.environ.get(var):
            opts[arg] = os.environ[var]
    return opts


# -- commits and cache lookups ---------------------------------------------------


def commit_metadata(stage: str, cache_key: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Provenance written into every commit (JSON-safe)."""
    return {
        "stage": stage,
        "cache_key": cache_key,
        "params": json.loads(canonical_json(params)),
        "versions": package_versions(),
        **{k: v for k, v in extra.items() if v is not None},
    }


def find_commit(repo: icechunk.Repository, cache_key: str, branch: str = MAIN) -> str | None:
    """Snapshot id of the commit on ``branch`` that carries ``cache_key``, or None. A commit
    carries its own key, and those of the products published with it (``products``: the
    controls extracted in the same shards as the activations)."""
    try:
        for info in repo.ancestry(branch=branch):
            meta = info.metadata or {}
            if meta.get("cache_key") == cache_key or cache_key in (meta.get("products") or ()):
                return info.id
    except icechunk.IcechunkError:
        return None
    return None


def _current_result(repo: icechunk.Repository, metadata: dict[str, Any]) -> str | None:
    """Snapshot of the latest commit on ``main`` for the same stage, model and dataset as
    ``metadata`` if it carries the same cache key (the result in force is this one), else None.
    An older commit with this key that a different result superseded does not count."""
    slot = ("stage", "model", "dataset_hash")
    try:
        for info in repo.ancestry(branch=MAIN):
            meta = info.metadata or {}
            if meta.get("cache_key") and all(meta.get(k) == metadata.get(k) for k in slot):
                return info.id if meta.get("cache_key") == metadata.get("cache_key") else None
    except icechunk.IcechunkError:
        return None
    return None


def _commit(store: Store, repo_name: str, repo: icechunk.Repository, write: Callable[[icechunk.Session], None],
            *, message: str, metadata: dict[str, Any], attempts: int = 5) -> tuple[str, bool]:
    """:meth:`Repository.commit_once` (see there)."""
    try:
        return _commit_attempts(store, repo_name, repo, write, message=message, metadata=metadata,
                                attempts=attempts)
    except ZooauditError:
        raise
    except Exception as err:
        if (down := outage(err, f"committing {message!r} to {repo_name!r}", store.url)) is not None:
            raise down from err
        raise


def _commit_attempts(store: Store, repo_name: str, repo: icechunk.Repository,
                     write: Callable[[icechunk.Session], None], *, message: str, metadata: dict[str, Any],
                     attempts: int) -> tuple[str, bool]:
    key = metadata.get("cache_key")
    for attempt in range(attempts):
        with store.lock(repo_name) as hold:
            # Checked under the lock: a concurrent run of the same stage may have committed
            # this very result since our caller's cache lookup; committing it twice adds nothing.
            if key and (snap := _current_result(repo, metadata)):
                log.info("%s: cache key %s was committed by another run meanwhile (snapshot %s)",
                         repo_name, key, snap)
                return snap, False
            session = repo.writable_session(MAIN)
            write(session)
            if hold.lost:
                # Another run broke our lock (our heartbeat stalled past the TTL) and may be
                # committing now: do not commit under a lock that is not ours; take it again.
                # (Icechunk's conflict detection would still catch a clash; this keeps commits
                # serialized as the lock promises. A loss between here and the commit is caught
                # by that detection only.)
                log.warning("%s: commit %r not made: the lock was lost (%s); retrying under a new one",
                            repo_name, message, hold.reason)
                continue
            try:
                return session.commit(message, metadata=metadata, rebase_with=icechunk.ConflictDetector()), True
            except (icechunk.ConflictError, icechunk.RebaseFailedError) as err:
                log.warning("%s: commit %r conflicted with another run (%s); retrying on the new tip",
                            repo_name, message, type(err).__name__)
        time.sleep(0.1 * (attempt + 1))
    raise ZooauditError(f"Could not commit {message!r} to {repo_name!r}: it conflicted with other runs (or lost its lock) "
                        f"{attempts} times.")


class Repository:
    """One Icechunk repository of a store — ``models/<model-key>`` or ``zoo`` — and everything
    the stages do with it: find a cache key, read a snapshot, commit a write with its metadata.

    The one public handle to a repository (the stages, the flows' cache checks and the
    report all go through it); opened lazily, so it is cheap to make and to pickle.
    """

    def __init__(self, store: Store | str, name: str) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.name = name
        self._repo: icechunk.Repository | None = None

    @classmethod
    def model(cls, store: Store | str, model_key: str) -> Repository:
        return cls(store, f"models/{model_key}")

    @classmethod
    def zoo(cls, store: Store | str) -> Repository:
        return cls(store, "zoo")

    def __repr__(self) -> str:
        return f"Repository({self.store.url!r}, {self.name!r})"

    def __getstate__(self) -> dict:
        return {"store": self.store, "name": self.name}   # the Icechunk handle is reopened where it lands

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["store"], state["name"])

    @property
    def icechunk(self) -> icechunk.Repository:
        """The Icechunk repository itself (opened, or created, on first use)."""
        if self._repo is None:
            self._repo = self.store.repo(*self.name.split("/"))
        return self._repo

    def lock(self):
        """The commit lock of this repository (:meth:`Store.lock`)."""
        return self.store.lock(self.name)

    def find(self, cache_key: str, branch: str = MAIN) -> str | None:
        """Snapshot id of the commit on ``branch`` that carries ``cache_key``, or None."""
        return find_commit(self.icechunk, cache_key, branch)

    def metadata(self, snapshot: str) -> dict:
        return dict(self.icechunk.lookup_snapshot(snapshot).metadata or {})

    def summary(self, snapshot: str) -> dict:
        """The stage summary a commit stored in its metadata (``{}`` when none)."""
        return dict(self.metadata(snapshot).get("summary") or {})

    def session(self, snapshot: str | None = None, *, tag: str | None = None) -> icechunk.Session:
        """A read-only session at ``snapshot`` (or ``tag``; default: the tip of ``main``)."""
        if snapshot or tag:
            return self.icechunk.readonly_session(snapshot_id=snapshot, tag=tag)
        return self.icechunk.readonly_session(branch=MAIN)

    def open(self, group: str, snapshot: str | None = None, *, tag: str | None = None) -> xr.Dataset:
        """One group as a lazy xarray Dataset."""
        return xr.open_zarr(self.session(snapshot, tag=tag).store, group=group, consolidated=False, zarr_format=3)

    def ancestry(self, branch: str = MAIN):
        return self.icechunk.ancestry(branch=branch)

    def commit(self, write: Callable[[icechunk.Session], None], *, message: str, metadata: dict[str, Any],
               attempts: int = 5) -> str:
        """The snapshot of :meth:`commit_once` (whichever run committed it)."""
        return self.commit_once(write, message=message, metadata=metadata, attempts=attempts)[0]

    def commit_once(self, write: Callable[[icechunk.Session], None], *, message: str, metadata: dict[str, Any],
                    attempts: int = 5) -> tuple[str, bool]:
        """Open a session on ``main``, let ``write`` fill it, commit it: all or nothing.
        Returns ``(snapshot, committed)``: ``committed`` is False when another run had
        committed this cache key meanwhile and its snapshot is returned instead (a cache hit:
        the caller reports it as skipped, not as its own commit).

        If ``write`` raises, nothing is committed. Commits to one repository are
        serialized by :meth:`Store.lock`; a writer that bypassed the lock is still
        caught by Icechunk's conflict detection: a commit touching other arrays is
        rebased onto it, one touching the same arrays is retried on the new tip. If
        ``main`` already carries this commit's cache key, nothing is written twice.
        No commit is lost. A store server that fails (unreachable, volume full) raises
        :class:`StoreUnavailable`; ``main`` then holds either nothing of this commit or all of it.
        """
        return _commit(self.store, self.name, self.icechunk, write, message=message, metadata=metadata,
                       attempts=attempts)


# -- reading -----------------------------------------------------------------------


def open_group(repo: icechunk.Repository, group: str, *, snapshot: str | None = None,
               tag: str | None = None) -> xr.Dataset:
    """Open one group of a repository as an xarray Dataset (lazy, Dask-backed)."""
    if snapshot or tag:
        session = repo.readonly_session(snapshot_id=snapshot, tag=tag)
    else:
        session = repo.readonly_session(branch=MAIN)
    return xr.open_zarr(session.store, group=group, consolidated=False, zarr_format=3)


def group_exists(session: icechunk.Session, group: str) -> bool:
    try:
        zarr.open_group(session.store, path=group, mode="r")
        return True
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return False


def _finite_or_none(obj):
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_dataset(session: icechunk.Session, ds: xr.Dataset, group: str) -> None:
    """Write a small in-memory result Dataset to ``group`` (replacing it).

    Fixed-width unicode labels are stored as variable-length strings: Zarr v3
    has a specified encoding for those, not for NumPy's ``<U`` dtype.
    """
    ds = ds.copy()
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":
            ds[name] = var.astype(object)
    # Zarr metadata is strict JSON: NaN/Inf attributes (e.g. the explained
    # variance of a dead, constant layer) are stored as null.
    ds.attrs = json.loads(canonical_json(_finite_or_none(ds.attrs)))
    # Lazy (Dask-backed) variables are computed here, block by block, on local threads: with a
    # distributed client as the default scheduler (a stage running on a Dask worker), xarray
    # would ship the writable session to other processes, which Icechunk refuses, and a
    # half-written group would be left in the session.
    with dask.config.set(scheduler="threads"):
        ds.to_zarr(session.store, group=group, mode="w", consolidated=False, zarr_format=3)


def _batch_ok(ds: xr.Dataset) -> bool:
    """Whether :func:`write_datasets` writes ``ds`` itself: in-memory NumPy variables of plain
    numeric, boolean or string dtypes, no encodings (anything else goes through xarray)."""
    for var in ds.variables.values():
        if not isinstance(var.data, np.ndarray) or var.encoding or var.dtype.kind not in "fiubUO":
            return False
        if var.dtype.kind == "O" and not all(isinstance(v, str) for v in var.values.ravel()):
            return False
        if any(k in var.attrs for k in ("_FillValue", "coordinates", "missing_value", "units", "calendar")):
            return False
    non_dim = _non_dim_coords(ds)
    if "coordinates" in ds.attrs or any(not isinstance(c, str) or " " in c for c in ds.variables):
        return False
    # a coordinate no variable's dimensions cover goes to a global attribute: left to xarray
    return all(any(v not in non_dim and v not in ds.variables[v].dims and
                   set(ds.variables[c].dims) <= set(ds.variables[v].dims) for v in ds.variables) for c in non_dim)


def _non_dim_coords(ds: xr.Dataset) -> list:
    return [c for c in ds.coords if c not in ds.dims]


def _array_spec(ds: xr.Dataset, name) -> tuple[np.ndarray, dict]:
    """``(data, create_array keywords)`` of variable ``name`` as ``xarray.Dataset.to_zarr``
    (zarr format 3, default encoding) writes it: floats with a NaN fill value also recorded in a
    base64 ``_FillValue`` attribute (of the float64 NaN, whatever the width), data variables naming the non-index coordinates in
    ``coordinates``, strings as variable-length UTF-8."""
    import base64

    var = ds.variables[name]
    data = var.values
    if data.dtype.kind in "UO":
        data = data.astype(object) if data.dtype.kind == "U" else data
        dtype, fill = "string", None
    else:
        dtype, fill = data.dtype, (np.nan if data.dtype.kind == "f" else None)
    attrs = dict(var.attrs)
    non_dim = _non_dim_coords(ds)
    if name not in non_dim and name not in var.dims:   # xarray.conventions._encode_coordinates' rule
        coords = sorted(str(c) for c in non_dim if set(ds.variables[c].dims) <= set(var.dims))
        if coords:
            attrs["coordinates"] = " ".join(coords)
    if fill is not None:
        attrs["_FillValue"] = base64.standard_b64encode(np.array(np.nan, np.float64).tobytes()).decode()   # float64 bytes, any width
    kw = {"shape": data.shape, "dtype": dtype, "chunks": tuple(max(1, s) for s in data.shape), "attributes": attrs,
          "dimension_names": list(var.dims)}
    if fill is not None:
        kw["fill_value"] = fill
    return data, kw


def write_datasets(session: icechunk.Session, datasets: dict[str, xr.Dataset]) -> None:
    """Write several small in-memory result Datasets ``{group: Dataset}`` (each replacing its
    group) in one batch: every group and array created and filled concurrently through Zarr's
    asynchronous API, one round-trip to the store's event loop for all of them instead of two
    per array (``to_zarr`` creates and fills arrays one at a time: ≈ 3 ms each, which for a
    stage committing ~80 small arrays was most of its commit). The stored layout — metadata and
    chunks — is what :func:`write_dataset` writes (tests/test_store_batch.py compares the two
    byte for byte); datasets this writer does not handle (lazy variables, encodings, other
    dtypes, a coordinate on no variable's dimensions), and all of them when one group lies
    inside another, go through :func:`write_dataset`, in the order given."""
    import asyncio

    import zarr.api.asynchronous as za
    from zarr.core.sync import sync

    batch = {}
    names = [g.strip("/") for g in datasets]
    nested = any(a != b and b.startswith(a + "/") for a in names for b in names)
    for group, ds in datasets.items():
        if nested or not _batch_ok(ds):   # a group inside another is cleared by its parent's write: in order
            write_dataset(session, ds, group)
            continue
        batch[group] = ds
    if not batch:
        return

    async def one(group: str, ds: xr.Dataset) -> None:
        attrs = json.loads(canonical_json(_finite_or_none(ds.attrs)))
        g = await za.open_group(store=session.store, path=group, mode="w", zarr_format=3, attributes=attrs)

        async def array(name):
            data, kw = _array_spec(ds, name)
            arr = await g.create_array(str(name), overwrite=True, **kw)
            await arr.setitem(Ellipsis, data)

        await asyncio.gather(*(array(n) for n in ds.variables))

    async def run() -> None:
        await asyncio.gather(*(one(g, ds) for g, ds in batch.items()))

    sync(run())
