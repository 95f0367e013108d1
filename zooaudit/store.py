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

Atomicity of multi-task writes (``zooaudit.stages``): Icechunk cannot fork a
session with uncommitted changes, so sharded writes go to a staging branch
(template commit, then the merged forks) and ``main`` is fast-forwarded to the
result in one conditional ``reset_branch``. ``main`` never points at a
half-written version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import icechunk
import xarray as xr
import zarr

from .errors import ZooauditError
from .keys import canonical_json

DEFAULT_STORE = "./zooaudit-store"
SCHEMES = ("file", "s3")
MAIN = "main"

# Icechunk warns on every local repository open; we serialize commits per
# repository ourselves (see `Store.lock`), which is what the warning asks for.
if hasattr(icechunk, "set_logs_filter") and "ICECHUNK_LOG" not in os.environ:
    icechunk.set_logs_filter("error")


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
    def open(cls, url: str | None = None) -> "Store":
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
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        return icechunk.s3_storage(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            region=os.environ.get("AWS_REGION", "us-east-1"),
            endpoint_url=endpoint,
            allow_http=bool(endpoint and endpoint.startswith("http://")),
            force_path_style=bool(endpoint),
            from_env=True,
        )

    def repo(self, *parts: str) -> icechunk.Repository:
        """Open (or create) the Icechunk repository at ``<root>/<parts...>``.

        Creation races (two tasks opening a new repository at once) are
        serialized by the repository lock; on S3 the loser of the race opens
        the repository the winner created.
        """
        storage = self._storage(*parts)
        with self.lock("/".join(parts)):
            try:
                return icechunk.Repository.open_or_create(storage)
            except icechunk.IcechunkError:
                if not icechunk.Repository.exists(storage):
                    raise
                return icechunk.Repository.open(storage)

    def model_repo(self, model_key: str) -> icechunk.Repository:
        return self.repo("models", model_key)

    def zoo_repo(self) -> icechunk.Repository:
        return self.repo("zoo")

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Serialize commits to one repository (local filesystems are not safe for
        concurrent commits). On S3, Icechunk's conditional writes detect conflicts
        and :func:`commit` rebases instead."""
        if self.scheme != "file":
            yield
            return
        path = self.path("locks", name.replace("/", "__") + ".lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _s3fs_options() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


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
    """Snapshot id of the commit on ``branch`` that carries ``cache_key``, or None."""
    try:
        for info in repo.ancestry(branch=branch):
            if (info.metadata or {}).get("cache_key") == cache_key:
                return info.id
    except icechunk.IcechunkError:
        return None
    return None


def commit(
    store: Store,
    repo_name: str,
    repo: icechunk.Repository,
    write: Callable[[icechunk.Session], None],
    *,
    message: str,
    metadata: dict[str, Any],
) -> str:
    """Open a session on ``main``, let ``write`` fill it, commit it: all or nothing.

    If ``write`` raises, nothing is committed. Commits to one repository are
    serialized (file://) or rebased on conflict (s3://).
    """
    with store.lock(repo_name):
        session = repo.writable_session(MAIN)
        write(session)
        return session.commit(message, metadata=metadata, rebase_with=icechunk.ConflictDetector())


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
    ds.to_zarr(session.store, group=group, mode="w", consolidated=False, zarr_format=3)
