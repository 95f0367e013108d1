"""Cold zoo audit with random-init controls: one code tree before a change against another after it.

Each timed run is a **cold** ``audit_zoo`` of the builtin zoo (default: its 6 models on
digits and colored-digits, whole test splits) with ``similarity.control = "random_init"``:
a fresh, empty store in a temporary folder, a fresh Python process, a fresh temporary
Prefect server (own ``PREFECT_HOME``, started before the clock starts). Only the builtin
weights are reused: each tree trains them once into a cache (untimed), and every run's store
gets a copy of that ``weights/`` folder, so training is never timed (the driver checks that
no weight file was written during the run and reports it).

"Before" is a git revision (``--before``, default ``0e17322``, the base of the stage
restructuring) checked out into a temporary ``git worktree`` under /tmp; "after" is a code
tree on disk (``--after``, default this checkout, uncommitted edits included). Runs alternate
``before, after, before, …, after, before`` (``--repeats`` after runs, one more before run), each
in a subprocess whose ``PYTHONPATH`` puts its tree first — ``import zooaudit`` resolves to that
tree (the venv's editable install only serves names the tree lacks; the driver refuses any
entry-point module that resolves outside its tree and prints where ``zooaudit`` came from).

The driver (this file, ``_driver`` mode) finds each tree's flow by trying, in order,
``zooaudit_flows.audit_zoo``, ``flows.audit_zoo``, ``zooaudit.flows.audit_zoo`` (attribute
``audit_zoo``), keeping the first whose file lies in the tree.

Reported: every run's flow wall time (``audit_s``, the ``audit_zoo`` call alone) and process
wall time; the median of each side and after / before of the medians and of the minima; and
each after run ÷ the mean of the two before runs around it (``bench_timing.bracketed_ratios``,
median over runs: cancels the machine's linear drift). Also, from each run: the task runs the
Prefect server recorded (sum of durations per task name), and — threads runner only — how
many random-initialised copies of builtin models were built and how many samples went through
them (forward pre-hooks), beside the forward samples through the trained models::

Noise: on the shared 2-core box a null comparison (``--after-rev 0e17322``, both trees the same
code, default zoo, 2 repeats) gave after / before 1.27 bracketed (audit 42–83 s a run), so a
difference under ≈ 30 % needs more repeats or a quiet box; the random-init build and sample
counts are exact and do not depend on load::

    .venv/bin/python benchmarks/bench_cold_audit.py                       # 0e17322 vs this tree, 2 repeats
    .venv/bin/python benchmarks/bench_cold_audit.py --after-rev HEAD      # 0e17322 vs the last commit
    .venv/bin/python benchmarks/bench_cold_audit.py --models builtin:mlp-w32-s0 builtin:cnn-w8-s0 \\
        --max-samples 200 --repeats 1                                    # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_BEFORE = "0e17322"
ENTRY_POINTS = ("zooaudit_flows.audit_zoo", "flows.audit_zoo", "zooaudit.flows.audit_zoo")
ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
       "HF_HUB_OFFLINE": "1"}


# ----------------------------------------------------------------------------- pure helpers

def tree_pythonpath(tree: Path) -> list[str]:
    """The import roots of a code tree: its root, and ``src/`` if it has one (a src layout)."""
    roots = [tree / "src"] if (tree / "src").is_dir() else []
    return [str(p) for p in roots + [tree]]


def schedule(repeats: int) -> list[str]:
    """``before, after, before, …, after, before``: ``repeats`` after runs, each between two before runs."""
    return ["before"] + ["after", "before"] * repeats


def task_totals(runs: list[tuple[str, float]]) -> dict[str, dict]:
    """``{task: {"n": runs, "s": summed seconds}}`` from ``(task key, seconds)``, slowest first; Prefect's
    task key is ``<function qualname>-<source hash>``, and the hash is dropped."""
    out: dict[str, dict] = {}
    for name, seconds in runs:
        base = name.rsplit("-", 1)[0] if "-" in name else name
        slot = out.setdefault(base, {"n": 0, "s": 0.0})
        slot["n"] += 1
        slot["s"] = round(slot["s"] + seconds, 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["s"]))


def compare(before: list[float], after: list[float]) -> dict:
    """Medians, minima and ratios after / before; bracketed ratios when the runs alternate
    ``b, a, b, …, a, b`` (``len(before) == len(after) + 1``)."""
    out = {"before_median_s": round(statistics.median(before), 2), "after_median_s": round(statistics.median(after), 2),
           "ratio_of_medians": round(statistics.median(after) / statistics.median(before), 3),
           "ratio_of_minima": round(min(after) / min(before), 3)}
    if len(before) == len(after) + 1:
        from bench_timing import bracketed_ratios

        br = bracketed_ratios(after, before)
        out["bracketed"] = [round(r, 3) for r in br]
        out["median_bracketed"] = round(statistics.median(br), 3)
    return out


# ----------------------------------------------------------------------------- driver (child process)

def tree_package_dirs(tree: Path) -> dict[str, str]:
    """``{import name: folder}`` from the tree's ``[tool.setuptools.package-dir]`` (e.g.
    ``zooaudit_flows = "flows"``): names that exist only through the installed package mapping."""
    import tomllib

    try:
        dirs = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    except (OSError, KeyError, TypeError, ValueError):
        return {}
    return {name: str(tree / folder) for name, folder in dirs.items()
            if name and "." not in name and (tree / folder / "__init__.py").is_file()}


def install_tree_packages(tree: Path) -> dict[str, str]:
    """Serve the tree's ``package-dir`` names from the tree itself, ahead of every other finder —
    the venv's editable install maps them to the checkout it was installed from, which for a
    worktree of another revision is the wrong tree."""
    import importlib.util

    mapping = tree_package_dirs(tree)

    class TreeFinder:
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            folder = mapping.get(fullname)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])

    if mapping:
        sys.meta_path.insert(0, TreeFinder)
    return mapping


def _under(path: str | None, tree: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(tree)


def _find_flow(tree: Path):
    """The first of ``ENTRY_POINTS`` whose package lies in ``tree``. A package that is there but
    fails to import is an error (a half-migrated tree), not a reason to fall back to the next name."""
    import importlib
    import importlib.util

    tried = []
    for name in ENTRY_POINTS:
        pkg = name.rsplit(".", 1)[0]
        try:
            found = importlib.util.find_spec(pkg)
        except ModuleNotFoundError:
            found = None
        if found is None:
            tried.append(f"{pkg}: absent")
            continue
        where = list(found.submodule_search_locations or []) or [found.origin]
        if not any(_under(w, tree) for w in where):
            tried.append(f"{pkg}: resolves outside the tree ({where[0]})")
            continue
        mod = importlib.import_module(name)   # errors propagate
        if not _under(mod.__file__, tree):
            raise SystemExit(f"{name} resolves to {mod.__file__}, outside {tree}")
        return name, mod.audit_zoo
    raise SystemExit("no audit_zoo entry point in " + str(tree) + ":\n  " + "\n  ".join(tried))


class ForwardCounter:
    """Counts builtin models built (trained copies vs random-initialised controls) and the
    samples through their forward passes, by wrapping ``zooaudit.zoo.builtin.build``."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.counts = {"random_init_builds": 0, "random_init_forward_calls": 0, "random_init_forward_samples": 0,
                       "trained_builds": 0, "trained_forward_calls": 0, "trained_forward_samples": 0}
        self.installed = False

    def install(self) -> None:
        try:
            from zooaudit.zoo import builtin
        except ImportError:
            return
        orig, offset = getattr(builtin, "build", None), getattr(builtin, "RANDOM_INIT_SEED_OFFSET", None)
        if orig is None or offset is None:
            return

        def build(spec, *a, **kw):
            module = orig(spec, *a, **kw)
            kind = "random_init" if spec.seed >= offset else "trained"

            def hook(_m, inputs):
                n = int(inputs[0].shape[0]) if inputs and hasattr(inputs[0], "shape") else 0
                with self.lock:
                    self.counts[f"{kind}_forward_calls"] += 1
                    self.counts[f"{kind}_forward_samples"] += n

            module.register_forward_pre_hook(hook)
            with self.lock:
                self.counts[f"{kind}_builds"] += 1
            return module

        builtin.build = build
        self.installed = True


def _weights_listing(store: Path) -> dict[str, tuple[int, int]]:
    root = store / "weights"
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()} if root.exists() else {}


@contextlib.contextmanager
def _prefect_server():
    """A temporary local Prefect server (the venv's Prefect, the same for both trees)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        server.stop()


def _task_runs(since) -> list[tuple[str, float]]:
    import datetime as dt

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    runs: list = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_task_runs(task_run_filter=TaskRunFilter(
                start_time=TaskRunFilterStartTime(after_=since, before_=dt.datetime.now(dt.UTC))),
                limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                break
    return [(r.task_key or r.name, (r.end_time - r.start_time).total_seconds())
            for r in runs if r.start_time and r.end_time]


def driver(args) -> int:
    t_proc = time.perf_counter()
    tree = Path(args.tree).resolve()
    package_dirs = install_tree_packages(tree)
    import zooaudit

    info = {"tree": str(tree), "zooaudit_file": zooaudit.__file__, "package_dirs": package_dirs}
    print(f"driver: zooaudit from {zooaudit.__file__}", flush=True)
    if not _under(zooaudit.__file__, tree):
        raise SystemExit(f"zooaudit resolves to {zooaudit.__file__}, outside {tree}")
    from zooaudit.specs import AuditZooSpec, SimilaritySpec

    fields: dict = {"store": str(Path(args.store).resolve()), "task_runner": args.task_runner,
                    "similarity": SimilaritySpec(control="random_init")}
    if args.models:
        fields["models"] = args.models
    if args.max_samples:
        fields["datasets"] = [{"name": n, "max_samples": args.max_samples} for n in ("digits", "colored-digits")]
    spec = AuditZooSpec(**fields)
    info["models"] = list(spec.models)

    if args.mode == "prepare":   # train the weights into this store (untimed setup)
        t0 = time.perf_counter()
        try:
            from zooaudit.stages import validate_zoo
            validate_zoo(spec)
        except ImportError:
            from zooaudit.store import Store
            from zooaudit.zoo import resolve_model
            for uri in spec.models:
                resolve_model(uri, Store.open(spec.store))
        info["prepare_s"] = round(time.perf_counter() - t0, 2)
    else:
        counter = ForwardCounter()
        if args.task_runner == "threads":
            counter.install()
        entry, audit_zoo = _find_flow(tree)
        info["entry_point"] = entry
        info["entry_point_file"] = sys.modules[entry].__file__
        print(f"driver: flow {entry} from {info['entry_point_file']}", flush=True)
        weights_before = _weights_listing(Path(spec.store))
        import datetime as dt

        with _prefect_server():
            since = dt.datetime.now(dt.UTC)
            t0, c0 = time.perf_counter(), time.process_time()
            result = audit_zoo(spec)
            info["audit_s"] = round(time.perf_counter() - t0, 3)
            # CPU seconds of the driver (tasks run on its threads): far less sensitive than wall time
            # to the other jobs sharing the box
            info["audit_cpu_s"] = round(time.process_time() - c0, 3)
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)
            time.sleep(2)   # task-run end states reach the server asynchronously
            try:
                info["tasks"] = task_totals(_task_runs(since))
            except Exception as err:  # noqa: BLE001 — optional figure
                info["tasks"] = f"unavailable: {type(err).__name__}: {err}"
        info["weights_written_during_run"] = _weights_listing(Path(spec.store)) != weights_before
        info["forward"] = counter.counts if counter.installed else None
        models = getattr(result, "models", [])
        info["stages_committed"] = sum(not r.skipped for a in models for r in getattr(a, "results", []))
        info["zoo_results"] = len(getattr(result, "zoo_results", []))
    info["process_s_in_driver"] = round(time.perf_counter() - t_proc, 2)
    Path(args.out).write_text(json.dumps(info, indent=2))
    return 0


# ----------------------------------------------------------------------------- parent

@contextlib.contextmanager
def _locked(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _child(tree: Path, mode: str, store: Path, home: Path, out: Path, args, log: Path) -> tuple[dict, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "ZOOAUDIT_STORE", "PYTHONPATH")}
    env.update(ENV)
    env["PYTHONPATH"] = os.pathsep.join(tree_pythonpath(tree))
    env["PREFECT_HOME"] = str(home)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_driver", "--mode", mode, "--tree", str(tree),
           "--store", str(store), "--out", str(out), "--task-runner", args.task_runner]
    if args.models:
        cmd += ["--models", *args.models]
    if args.max_samples:
        cmd += ["--max-samples", str(args.max_samples)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, cwd=str(home), stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{mode} in {tree} failed (rc {rc}); log {log}:\n{tail}")
    return json.loads(out.read_text()), wall


def _worktree(rev: str, base: Path) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"zooaudit-before-{rev[:12]}-", dir="/tmp"))
    path.rmdir()
    subprocess.run(["git", "-C", str(base), "worktree", "add", "--detach", str(path), rev], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' tree (default %(default)s)")
    p.add_argument("--before-tree", help="use this checked-out tree as 'before' instead of a worktree of --before")
    p.add_argument("--after", default=str(REPO), help="the 'after' code tree (default: this checkout)")
    p.add_argument("--after-rev", help="check this git revision out into a worktree and use it as 'after' instead")
    p.add_argument("--repeats", type=int, default=2, help="after runs (one more before run brackets them)")
    p.add_argument("--models", nargs="+", help="model URIs (default: the builtin default zoo)")
    p.add_argument("--max-samples", type=int, help="samples per dataset (default: the whole test splits)")
    p.add_argument("--task-runner", choices=("threads", "dask"), default="threads")
    p.add_argument("--lock", default="/tmp/heavy.lock", help="flock this file around each run ('' for none)")
    p.add_argument("--tmp", default="/tmp", help="folder for the stores and worktree")
    p.add_argument("--keep", action="store_true", help="keep the worktree and the stores")
    p.add_argument("--json", help="also write the figures to this file")
    sub = p.add_argument_group("driver (internal)")
    sub.add_argument("--mode", choices=("prepare", "audit"), help=argparse.SUPPRESS)
    sub.add_argument("--tree", help=argparse.SUPPRESS)
    sub.add_argument("--store", help=argparse.SUPPRESS)
    sub.add_argument("--out", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_driver"]:
        return driver(p.parse_args(argv[1:]))
    args = p.parse_args(argv)

    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-cold-", dir=args.tmp))
    made: list[Path] = []
    try:
        if args.before_tree:
            before_tree = Path(args.before_tree).resolve()
        else:
            before_tree = _worktree(args.before, REPO)
            made.append(before_tree)
        if args.after_rev:
            after_tree = _worktree(args.after_rev, REPO)
            made.append(after_tree)
        else:
            after_tree = Path(args.after).resolve()
        trees = {"before": before_tree, "after": after_tree}
        rev = subprocess.run(["git", "-C", str(before_tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        head = subprocess.run(["git", "-C", str(trees["after"]), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(trees["after"]), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.count("\n")
        print(f"before: {before_tree} ({rev}); after: {trees['after']} (HEAD {head}, {dirty} tracked files modified)")
        print(f"config: models={args.models or 'builtin default zoo'} max_samples={args.max_samples or 'whole splits'} "
              f"control=random_init task_runner={args.task_runner} repeats={args.repeats}", flush=True)

        caches = {}
        for label, tree in trees.items():   # train each tree's builtin weights once, untimed
            cache = work / f"weights-{label}"
            (cache / "prefect").mkdir(parents=True)
            with _locked(args.lock):
                info, wall = _child(tree, "prepare", cache / "store", cache / "prefect", cache / "out.json", args,
                                    cache / "log.txt")
            caches[label] = cache / "store" / "weights"
            print(f"{label}: weights for {len(info['models'])} models trained in {info['prepare_s']:.1f}s "
                  f"(zooaudit from {info['zooaudit_file']})", flush=True)

        runs: list[dict] = []
        for i, label in enumerate(schedule(args.repeats)):
            run_dir = work / f"run-{i:02d}-{label}"
            (run_dir / "prefect").mkdir(parents=True)
            store = run_dir / "store"
            store.mkdir()
            if caches[label].exists():
                shutil.copytree(caches[label], store / "weights")
            with _locked(args.lock):
                info, wall = _child(trees[label], "audit", store, run_dir / "prefect", run_dir / "out.json", args,
                                    run_dir / "log.txt")
            info.update(label=label, process_s=round(wall, 2))
            runs.append(info)
            fwd = info.get("forward") or {}
            print(f"run {i} {label:6s} audit {info['audit_s']:7.2f}s  cpu {info['audit_cpu_s']:7.2f}s  "
                  f"process {wall:7.2f}s  "
                  f"entry {info['entry_point']}  stages committed {info['stages_committed']}  "
                  f"random-init builds {fwd.get('random_init_builds', '?')} / samples "
                  f"{fwd.get('random_init_forward_samples', '?')}  trained samples "
                  f"{fwd.get('trained_forward_samples', '?')}"
                  + ("  WEIGHTS WRITTEN DURING RUN" if info["weights_written_during_run"] else ""), flush=True)
            if not args.keep:
                shutil.rmtree(store, ignore_errors=True)

        by = {lab: [r for r in runs if r["label"] == lab] for lab in ("before", "after")}
        figures = {
            "before_rev": rev, "after_tree": str(trees["after"]), "after_head": head, "after_dirty_files": dirty,
            "models": runs[0]["models"], "max_samples": args.max_samples, "task_runner": args.task_runner,
            "entry_points": {lab: by[lab][0]["entry_point_file"] for lab in by},
            "zooaudit_files": {lab: by[lab][0]["zooaudit_file"] for lab in by},
            "audit_s": {lab: [r["audit_s"] for r in by[lab]] for lab in by},
            "process_s": {lab: [r["process_s"] for r in by[lab]] for lab in by},
            "audit": compare([r["audit_s"] for r in by["before"]], [r["audit_s"] for r in by["after"]]),
            "process": compare([r["process_s"] for r in by["before"]], [r["process_s"] for r in by["after"]]),
            "audit_cpu_s": {lab: [r["audit_cpu_s"] for r in by[lab]] for lab in by},
            "audit_cpu": compare([r["audit_cpu_s"] for r in by["before"]], [r["audit_cpu_s"] for r in by["after"]]),
            "forward": {lab: by[lab][0]["forward"] for lab in by},
            "tasks_first_run": {lab: by[lab][0]["tasks"] for lab in by},
            "weights_written_during_any_run": any(r["weights_written_during_run"] for r in runs),
            "total_bench_s": round(time.perf_counter() - t_all, 1),
        }
        print(json.dumps({k: v for k, v in figures.items() if k != "tasks_first_run"}, indent=2))
        for lab in by:
            tasks = figures["tasks_first_run"][lab]
            if isinstance(tasks, dict):
                print(f"{lab}, first run, task runs by task (n, summed s): "
                      + "; ".join(f"{k} {v['n']}× {v['s']:.2f}" for k, v in tasks.items()))
        a = figures["audit"]
        print(f"\ncold audit (random_init controls): before median {a['before_median_s']}s, after median "
              f"{a['after_median_s']}s; after/before medians {a['ratio_of_medians']}, minima {a['ratio_of_minima']}"
              + (f", median bracketed {a['median_bracketed']} {a['bracketed']}" if "bracketed" in a else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            for tree in made:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        else:
            print(f"kept: {work}" + "".join(f", worktree {t}" for t in made))


if __name__ == "__main__":
    sys.exit(main())
