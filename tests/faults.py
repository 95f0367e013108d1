"""Fault-injection helpers: run the real ``zooaudit`` CLI in its own process group, kill or
interrupt it from the outside, and check what the store shows afterwards.

The CLI is started with ``start_new_session=True``, so its pid is the process group of
everything it starts (the temporary Prefect server, the LocalCluster's scheduler and
workers); a signal to the group reaches them all, as a terminal's Ctrl-C would.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import zarr
import zarr.errors

from zooaudit.errors import ZooauditError
from zooaudit.store import MAIN, Store
from zooaudit_infra.stack import _group_members

# "Task run 'factorize-3f1' - Finished in state Completed()" → the task's name without Prefect's suffix.
_TASK_DONE = re.compile(r"Task run '([^']+)' - Finished in state")


def task_name(run_name: str) -> str:
    """``extract-shards-activations-0`` → ``extract-shards-activations``; ``plan-controls-60e``
    → ``plan-controls``; ``factorize-builtin-mlp-w32-s0-ea7b507a`` → ``factorize``."""
    name = re.sub(r"-(builtin|file|hf|torch|zoo)-.*$", "", run_name)
    return re.sub(r"-([0-9a-f]{3}|\d+)$", "", name)


def _terminal_signals() -> None:
    """SIGINT as in a terminal: a test started from a background job inherits it ignored, and
    Python then leaves it ignored (no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class CliRun:
    """One ``zooaudit`` CLI subprocess in its own session; its output is collected line by line
    with the time each line arrived (seconds since start)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: str | None = None) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "zooaudit_infra.cli", *args], env=env, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_terminal_signals)
        self.pgid = self.proc.pid
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def markers(self) -> list[tuple[float, str]]:
        """(seconds since start, task name) of every task run finished so far."""
        return [(t, task_name(m.group(1))) for t, line in list(self.lines) if (m := _TASK_DONE.search(line))]

    def wait_for(self, predicate, timeout: float) -> bool:
        """Poll ``predicate()`` until true (True), the process ends or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return bool(predicate())
            time.sleep(0.02)
        return False

    def signal_group(self, sig: int) -> None:
        with _suppress_gone():
            os.killpg(self.pgid, sig)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        """SIGKILL the whole group and reap the CLI (idempotent)."""
        self.signal_group(signal.SIGKILL)
        with _suppress_gone():
            self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


class _suppress_gone:
    def __enter__(self):
        return self

    def __exit__(self, typ, err, tb):
        return typ is not None and issubclass(typ, (ProcessLookupError, subprocess.TimeoutExpired))


def group_gone(pgid: int, timeout: float = 20.0) -> list[int]:
    """Wait until no live process of group ``pgid`` is left; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def descendants_gone(pids: set[int]) -> list[int]:
    """Those of ``pids`` still alive (not zombies) — children that left the group (setsid) included."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


# -- what the store shows ------------------------------------------------------------


def repo_names(store: Store) -> list[str]:
    names = [f"models/{key}" for key in store.model_keys()]
    try:
        store.existing_repo("zoo")
        names.append("zoo")
    except ZooauditError:   # no zoo repository (yet): nothing to check there
        pass
    return names


def main_arrays(store: Store, name: str, *, tag: str | None = None) -> dict[str, str]:
    """sha256 (with dtype and shape) of every array on the tip of ``main`` (or at ``tag``) of
    repository ``name``, read in full: a chunk that a commit names but the store lacks raises."""
    repo = store.existing_repo(*name.split("/"))
    session = repo.readonly_session(tag=tag) if tag else repo.readonly_session(branch=MAIN)
    try:
        root = zarr.open_group(session.store, mode="r")
    except zarr.errors.GroupNotFoundError:
        return {}   # created, nothing committed yet (only the repository's initial snapshot)
    out = {}
    for path, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array):
            data = node[...]
            digest = hashlib.sha256(data.tobytes()).hexdigest()
            out[path] = f"{data.dtype}{tuple(data.shape)}:{digest}"
    return out


def _existing(store: Store) -> list[str]:
    """Repositories that exist (a run killed while creating one leaves an empty folder: nothing)."""
    out = []
    for name in repo_names(store):
        try:
            store.existing_repo(*name.split("/"))
        except ZooauditError:
            continue
        out.append(name)
    return out


def store_arrays(store_url: str) -> dict[str, dict[str, str]]:
    """:func:`main_arrays` of every repository of the store."""
    store = Store.open(store_url)
    return {name: main_arrays(store, name) for name in _existing(store)}


def committed_stages(store_url: str) -> dict[str, list[str]]:
    """Cache keys of the stage commits on ``main`` of every repository, oldest first."""
    store = Store.open(store_url)
    out = {}
    for name in _existing(store):
        repo = store.existing_repo(*name.split("/"))
        out[name] = [i.metadata["cache_key"] for i in reversed(list(repo.ancestry(branch=MAIN)))
                     if (i.metadata or {}).get("cache_key")]
    return out


def file_locks_held(store_dir: Path) -> list[str]:
    """Lock files of a file:// store that some process still holds (a non-blocking flock fails)."""
    held = []
    for path in sorted((store_dir / "locks").glob("*.lock")) if (store_dir / "locks").exists() else []:
        with open(path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
            except BlockingIOError:
                held.append(path.name)
    return held


def s3_lock_objects(store_url: str) -> list[str]:
    """Lock objects present under an s3:// store's ``locks/`` (left by a killed run until broken)."""
    store = Store.open(store_url)
    fs = store.fs
    prefix = store.path("locks")
    fs.invalidate_cache(prefix)
    try:
        listed = [p.rstrip("/") for p in fs.ls(prefix, detail=False)]
    except FileNotFoundError:
        return []
    # The listing may name the folder itself (its marker object): only the lock objects count.
    return sorted(name for p in listed if (name := p.rsplit("/", 1)[-1]) and name != "locks")


def store_tags(store_url: str) -> dict[str, dict[str, str]]:
    """``{repository: {tag: snapshot}}`` of every repository of the store (repositories without tags omitted)."""
    store = Store.open(store_url)
    out = {}
    for name in _existing(store):
        repo = store.existing_repo(*name.split("/"))
        if tags := {t: repo.lookup_tag(t) for t in repo.list_tags()}:
            out[name] = tags
    return out


def tagged_on_main(store_url: str, name: str) -> dict[str, bool]:
    """For each tag of repository ``name``: whether its snapshot is on ``main``'s ancestry."""
    repo = Store.open(store_url).existing_repo(*name.split("/"))
    on_main = {i.id for i in repo.ancestry(branch=MAIN)}
    return {t: repo.lookup_tag(t) in on_main for t in repo.list_tags()}


def published_reports(store_url: str) -> dict[str, list[str]]:
    """``{by-key marker: sorted file names of the report folder it points to}``: the reports a
    run published (the marker is written after every file of its report)."""
    store = Store.open(store_url)
    fs = store.fs
    prefix = store.path("reports", "by-key")
    fs.invalidate_cache(store.path("reports"))
    if not fs.exists(prefix):
        return {}
    out = {}
    for marker in sorted(fs.ls(prefix, detail=False)):
        index = fs.cat_file(marker).decode().strip()
        folder = index.rsplit("/", 1)[0]
        out[marker.rsplit("/", 1)[-1]] = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
    return out
