"""Versions of results: tags, history, differences, reading at a tag or snapshot.

Every commit on ``main`` that holds a stage result carries its stage, dataset,
cache key and summary (headline metrics) in its metadata (:mod:`zooaudit.store`).
A *version* is any snapshot of ``main``; nightly runs tag theirs
``nightly-YYYY-MM-DD`` (Icechunk tag names may not contain ``/``, and tags are
immutable, so a second run on the same night that changed something is tagged
``nightly-YYYY-MM-DD-2``).

    history(repo)            the commits of main, newest first: time, snapshot, tags, stage, cache key
    resolve_version(repo, a) a tag, branch or snapshot id → snapshot id (clear error otherwise)
    stages_at(repo, a)       the result of each (stage, dataset) as of a version
    diff_versions(repo, a, b) which stages changed and which headline metrics moved
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, field

import icechunk

from .errors import ZooauditError
from .store import MAIN, Store

NIGHTLY_PREFIX = "nightly-"
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def nightly_tag(day: dt.date) -> str:
    """``nightly-YYYY-MM-DD``: the tag of the nightly run of ``day``."""
    return f"{NIGHTLY_PREFIX}{day:%Y-%m-%d}"


def validate_tag(name: str) -> str:
    if not _TAG_RE.fullmatch(name):
        raise ZooauditError(f"Bad tag name {name!r}: use letters, digits, '.', '_' and '-' (no '/'), "
                            "starting with a letter or digit, at most 128 characters.")
    return name


def tag_version(repo: icechunk.Repository, name: str, snapshot: str | None = None) -> str:
    """Tag ``snapshot`` (default: the tip of ``main``) as ``name``; return the tag used.

    Idempotent: if ``name`` already tags this snapshot nothing changes. Tags are
    immutable, so if ``name`` tags another snapshot the version gets ``name-2``,
    ``name-3``, ... (the first free one, or the one already on this snapshot).
    """
    validate_tag(name)
    snapshot = snapshot or repo.lookup_branch(MAIN)
    for i in range(1, 1000):
        candidate = name if i == 1 else f"{name}-{i}"
        for _ in range(2):   # a concurrent run may create the same tag between our check and create
            if candidate in repo.list_tags():
                break
            try:
                repo.create_tag(candidate, snapshot)
                return candidate
            except icechunk.IcechunkError:
                continue
        if repo.lookup_tag(candidate) == snapshot:
            return candidate
    raise ZooauditError(f"Too many versions tagged {name!r}.")


def tag_repositories(store: Store, model_keys: list[str], name: str, *, zoo: bool = True) -> dict[str, str]:
    """Tag the current version of each model repository (and the zoo repository): ``{repo: tag}``."""
    out = {f"models/{k}": tag_version(store.model_repo(k), name) for k in sorted(set(model_keys))}
    if zoo:
        out["zoo"] = tag_version(store.zoo_repo(), name)
    return out


# -- history ------------------------------------------------------------------------------


@dataclass
class Version:
    """One commit of ``main`` that holds a stage result."""

    snapshot: str
    time: dt.datetime
    message: str
    stage: str | None
    dataset: str | None
    cache_key: str | None
    tags: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def slot(self) -> tuple[str, str]:
        """What this commit is the result of: (stage, dataset)."""
        return (self.stage or "?", self.dataset or "")


def _dataset_label(meta: dict) -> str | None:
    ds = meta.get("dataset")
    name = ds.get("name") if isinstance(ds, dict) else ds
    if name is None:
        return None
    h = meta.get("dataset_hash")
    return f"{name}@{str(h)[:8]}" if h else str(name)


def _tags_by_snapshot(repo: icechunk.Repository) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in sorted(repo.list_tags()):
        out.setdefault(repo.lookup_tag(t), []).append(t)
    return out


def history(repo: icechunk.Repository, at: str | None = None, *, results_only: bool = True) -> list[Version]:
    """Commits of ``main`` (or of the version ``at`` and its ancestors), newest first.

    ``results_only`` leaves out the internal commits of a staged extraction
    (template, shards) and the repository's initial commit: they have no cache key.
    """
    tags = _tags_by_snapshot(repo)
    snapshot = resolve_version(repo, at)
    out = []
    for info in repo.ancestry(snapshot_id=snapshot):
        meta = dict(info.metadata or {})
        if results_only and not meta.get("cache_key"):
            continue
        out.append(Version(info.id, info.written_at, info.message, meta.get("stage"), _dataset_label(meta),
                           meta.get("cache_key"), tags.get(info.id, []), dict(meta.get("summary") or {})))
    return out


def resolve_version(repo: icechunk.Repository, at: str | None) -> str:
    """Snapshot id of ``at``: a tag, a branch or a snapshot id; None = the tip of ``main``."""
    if at is None:
        return repo.lookup_branch(MAIN)
    tags = repo.list_tags()
    if at in tags:
        return repo.lookup_tag(at)
    if at in repo.list_branches():
        return repo.lookup_branch(at)
    try:
        return repo.lookup_snapshot(at).id
    except (icechunk.IcechunkError, ValueError):
        pass
    shown = ", ".join(sorted(tags)[-10:]) or "none"
    raise ZooauditError(f"Unknown version {at!r}: not a tag, branch or snapshot id of this repository. "
                        f"Tags (latest 10): {shown}; see 'zooaudit history MODEL' for snapshot ids.")


def stages_at(repo: icechunk.Repository, at: str | None = None) -> dict[tuple[str, str], Version]:
    """The result in force for each (stage, dataset) at version ``at``: its most recent commit."""
    out: dict[tuple[str, str], Version] = {}
    for v in history(repo, at):
        out.setdefault(v.slot, v)
    return out


# -- differences ------------------------------------------------------------------------------


def flatten_metrics(summary: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) summary as ``{"a.b.0": value}``; NaN kept, booleans skipped."""
    out: dict[str, float] = {}
    items = summary.items() if isinstance(summary, dict) else enumerate(summary)
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[name] = float(v)
        elif isinstance(v, (dict, list, tuple)):
            out.update(flatten_metrics(v, name + "."))
    return out


@dataclass
class StageChange:
    stage: str
    dataset: str
    status: str                  # "added", "removed", "changed" (new cache key), "recommitted" (same key)
    cache_key_a: str | None
    cache_key_b: str | None
    metrics: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)   # name → (a, b)


@dataclass
class VersionDiff:
    snapshot_a: str
    snapshot_b: str
    stages: list[StageChange]
    arrays: dict[str, list[str]]   # "new", "updated", "deleted" → array paths


def _moved(a: float | None, b: float | None, rtol: float) -> bool:
    if a is None or b is None:
        return a is not b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) != math.isnan(b)
    return abs(a - b) > rtol * max(1.0, abs(a), abs(b))


def diff_versions(repo: icechunk.Repository, a: str, b: str, *, rtol: float = 1e-9) -> VersionDiff:
    """What changed from version ``a`` to version ``b``: stages whose result differs
    (added, removed, new cache key, or recommitted), the headline metrics (numeric
    summary entries) that moved, and the arrays Icechunk reports as new/updated/deleted."""
    sa, sb = resolve_version(repo, a), resolve_version(repo, b)
    at_a, at_b = stages_at(repo, sa), stages_at(repo, sb)
    changes = []
    for slot in sorted(set(at_a) | set(at_b)):
        va, vb = at_a.get(slot), at_b.get(slot)
        if va is not None and vb is not None and va.snapshot == vb.snapshot:
            continue
        status = ("added" if va is None else "removed" if vb is None
                  else "changed" if va.cache_key != vb.cache_key else "recommitted")
        ma = flatten_metrics(va.summary) if va else {}
        mb = flatten_metrics(vb.summary) if vb else {}
        moved = {k: (ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb)) if _moved(ma.get(k), mb.get(k), rtol)}
        changes.append(StageChange(slot[0], slot[1], status, va and va.cache_key, vb and vb.cache_key, moved))
    arrays = {"new": [], "updated": [], "deleted": []}
    if sa != sb:
        d = repo.diff(from_snapshot_id=sa, to_snapshot_id=sb)
        # A group rewritten in place (mode="w") shows as deleted and re-created: call that "updated".
        created, removed = set(d.new_arrays), set(d.deleted_arrays)
        touched = set(d.updated_arrays) | set(d.updated_chunks) | (created & removed)
        arrays = {"new": sorted(created - removed), "updated": sorted(touched - (created - removed)),
                  "deleted": sorted(removed - created)}
    return VersionDiff(sa, sb, changes, arrays)


# -- the CLI's tables ---------------------------------------------------------------------------


def model_repository(store: Store, model: str) -> tuple[str, icechunk.Repository]:
    """The repository of ``model`` (a model URI such as ``builtin:mlp-w64-s0``, or its key), or
    ``zoo`` for the zoo-level results. Never creates one."""
    from .keys import slug_key

    if model == "zoo":
        return "zoo", store.existing_repo("zoo")
    key = model if model in store.model_keys() else slug_key(model)
    return key, store.existing_repo("models", key)


def format_history(versions: list[Version]) -> str:
    lines = [f"{'time (UTC)':19s}  {'snapshot':20s}  {'stage':12s}  {'dataset':24s}  {'cache key':34s}  tags"]
    for v in versions:
        lines.append(f"{v.time.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}  {v.snapshot:20s}  "
                     f"{v.stage or '?':12s}  {v.dataset or '':24s}  {v.cache_key or '':34s}  {', '.join(v.tags)}")
    return "\n".join(lines)


def format_diff(d: VersionDiff, a: str, b: str, max_metrics: int = 20) -> str:
    lines = [f"{a} ({d.snapshot_a}) → {b} ({d.snapshot_b})"]
    if not d.stages:
        lines.append("no stage changed")
    for c in d.stages:
        keys = (f"{c.cache_key_a} → {c.cache_key_b}" if c.status == "changed"
                else c.cache_key_b or c.cache_key_a or "")
        lines.append(f"  {c.status:11s} {c.stage:12s} {c.dataset:24s} {keys}")
        if c.status in ("added", "removed"):
            continue   # every metric "moved"; 'zooaudit show' lists them
        for name, (va, vb) in list(c.metrics.items())[:max_metrics]:
            fa = "—" if va is None else f"{va:.6g}"
            fb = "—" if vb is None else f"{vb:.6g}"
            delta = f"  ({vb - va:+.3g})" if va is not None and vb is not None else ""
            lines.append(f"      {name}: {fa} → {fb}{delta}")
        if len(c.metrics) > max_metrics:
            lines.append(f"      … {len(c.metrics) - max_metrics} more metrics moved")
    for kind in ("new", "updated", "deleted"):
        if d.arrays[kind]:
            lines.append(f"  arrays {kind}: {', '.join(d.arrays[kind][:12])}"
                         + (f" … (+{len(d.arrays[kind]) - 12})" if len(d.arrays[kind]) > 12 else ""))
    return "\n".join(lines)


def format_stages(stages: dict[tuple[str, str], Version], max_metrics: int = 12) -> str:
    lines = []
    for (stage, dataset), v in sorted(stages.items()):
        lines.append(f"{stage:12s} {dataset:24s} {v.snapshot}  {v.cache_key}  "
                     f"{v.time.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}")
        metrics = flatten_metrics(v.summary)
        for name, value in list(metrics.items())[:max_metrics]:
            lines.append(f"    {name} = {value:.6g}")
        if len(metrics) > max_metrics:
            lines.append(f"    … {len(metrics) - max_metrics} more")
    return "\n".join(lines) or "no results"
