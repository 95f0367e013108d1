"""The ``zooaudit`` command line.

    zooaudit demo                      train the builtin zoo if needed, audit it, print the report
    zooaudit audit-zoo [options]       audit a zoo (default: the builtin zoo)
    zooaudit audit-model MODEL [opts]  audit one model
    zooaudit layers MODEL              list a model's layers with output shapes

Bad input exits with status 2 and one paragraph naming the bad value and what
is allowed; nothing is committed. Ctrl-C stops the run's Dask cluster and temporary Prefect
server and exits with status 130, printing the command that resumes it. Installed as ``zooaudit_infra.cli`` (the console script
``zooaudit``); the flows (``zooaudit_flows``) and Prefect are imported only by the commands
that run them, so ``zooaudit layers``/``history``/``down`` start without them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import time

from zooaudit.errors import ZooauditError, problems

EXIT_BAD_INPUT = 2
EXIT_STORE_UNAVAILABLE = 75   # sysexits EX_TEMPFAIL: the store's server failed; rerun when it is back
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as a shell reports a Ctrl-C


def _env_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")


def _ctrl_c_detacher():
    """The ``preexec_fn`` of the temporary server's child, built in the parent: its own process
    group, so a terminal's Ctrl-C (SIGINT to the foreground group) reaches the CLI and not the
    server — the CLI still needs it to record the interrupted flow run, and stops it afterwards
    (a server killed first left the engine retrying its state report for ~2 minutes and then
    raising a ConnectError instead of the interrupt). Out of the CLI's group, the server dies with
    the CLI (PR_SET_PDEATHSIG), so a CLI killed outright (SIGKILL to its group) leaves no server.

    ``prctl`` is looked up here, before the fork: the child of a multi-threaded parent (torch,
    OpenMP) must not import or ``dlopen`` between fork and exec."""
    import signal

    parent = os.getpid()
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def detach() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
            if os.getppid() != parent:   # the CLI died before prctl took effect
                os._exit(1)

    return detach


def _temporary_server():
    """Prefect's temporary server (``SubprocessASGIServer``), started detached from Ctrl-C."""
    from prefect.server.api.server import SubprocessASGIServer

    class _Server(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            popen, detach = subprocess.Popen, _ctrl_c_detacher()

            def detached(*args, **kwargs):
                return popen(*args, preexec_fn=detach, **kwargs)

            subprocess.Popen = detached
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    return _Server()


@contextlib.contextmanager
def prefect_api():
    """Use ``$PREFECT_API_URL`` when set; otherwise run a temporary local Prefect
    server (ephemeral mode) for the duration of the command. Its URL is exported
    so Dask worker processes report to the same server."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = _temporary_server()
    server.start(timeout=60)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        # Drain Prefect's log and event queues while the server still listens;
        # stopping first leaves them retrying against a dead port at exit.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="store root URL (default $ZOOAUDIT_STORE or ./zooaudit-store)")
    p.add_argument("--dataset", action="append", dest="datasets", metavar="NAME[=PATH]",
                   help="dataset to audit on (repeatable): digits, colored-digits, text[=FILE] (txt/csv/json/yaml)")
    p.add_argument("--layers", nargs="+", help="layer module paths or globs")
    p.add_argument("--max-samples", type=int, help="audit only the first N samples of each dataset")
    p.add_argument("--metric", action="append", dest="metrics", metavar="NAME",
                   help="similarity metric (repeatable; default: linear_cka)")
    p.add_argument("--threads", action="store_true", help="run tasks on threads instead of a local Dask cluster")
    p.add_argument("--dask-address", help="existing Dask scheduler address")
    p.add_argument("--pooling", choices=["mean", "flatten", "none", "cls", "token_mean", "tokens"],
                   help="how spatial maps are stored; 'none' keeps (channel, y, x) maps for concept heat maps; "
                   "token outputs: cls, token_mean, or tokens (all tokens + per-sample offsets)")
    p.add_argument("--device", help="'auto', 'cpu' or 'cuda[:n]' (default cpu)")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], help="mixed-precision forward (GPU; bf16 also CPU)")
    p.add_argument("--dtype", choices=["float32", "float16"], help="dtype of the stored activations")
    p.add_argument("--factorize", action="append", dest="factorize_methods", metavar="METHOD",
                   help="factorization method (repeatable): pca, nmf, semi_nmf, sae, eigencam (default: pca, nmf)")
    p.add_argument("--k", type=int, help="components per layer (default 8)")
    p.add_argument("--k-sweep", type=int, nargs="+", help="also fit these k and plot the quality curve")
    p.add_argument("--text-reference", metavar="SENTENCE",
                   help="text encoders: token attributions of each text's similarity to this sentence")


def _spec_fields(args) -> dict:
    out: dict = {}
    if args.store:
        out["store"] = args.store
    if args.datasets:
        out["datasets"] = [{"name": n.partition("=")[0], "path": n.partition("=")[2] or None,
                            "max_samples": args.max_samples} for n in args.datasets]
    elif args.max_samples is not None:      # 0 is a value (refused by the spec), not "unset"
        out["datasets"] = [{"name": "digits", "max_samples": args.max_samples},
                           {"name": "colored-digits", "max_samples": args.max_samples}]
    if args.layers:
        out["layers"] = args.layers
    if args.threads:
        out["task_runner"] = "threads"
    if args.dask_address:
        out["dask_address"] = args.dask_address
    for name in ("pooling", "device", "autocast", "dtype"):
        if getattr(args, name, None):
            out[name] = getattr(args, name)
    fact = {key: value for key, value in (("methods", getattr(args, "factorize_methods", None)),
                                          ("k", getattr(args, "k", None)), ("k_sweep", getattr(args, "k_sweep", None)))
            if value is not None}                 # --k 0 reaches the spec's bound check
    if fact:
        out["factorize"] = fact
    if getattr(args, "text_reference", None) is not None:
        out["attribution"] = {"text_reference": args.text_reference}
    return out


def _snippet(store_url: str, audit) -> str:
    ref = next((r for a in audit.models for r in a.refs), None)
    if ref is None:
        return ""
    layer = ref.layers[0]
    return (
        "Open the activations with xarray:\n"
        "    from zooaudit.store import Store, open_group\n"
        f"    acts = open_group(Store({store_url!r}).model_repo({ref.model_key!r}), "
        f"{ref.ds_key + '/acts/' + layer!r})['activations']"
    )


def cmd_audit_zoo(args) -> int:
    from zooaudit.specs import AuditZooSpec
    from zooaudit.stages import validate_zoo

    fields = _spec_fields(args)
    if getattr(args, "models", None) is not None:
        fields["models"] = args.models
    if getattr(args, "compare_layers", None):
        fields["compare_layers"] = args.compare_layers
    if getattr(args, "tag", None):
        fields["tag"] = args.tag
    if getattr(args, "manifest", None):
        fields["manifest"] = args.manifest
    if getattr(args, "metrics", None):
        fields["similarity"] = {"metrics": args.metrics}
    spec = AuditZooSpec(**fields)
    t0 = time.perf_counter()
    print(f"zooaudit: {len(spec.models)} models → store {spec.store or os.environ.get('ZOOAUDIT_STORE') or './zooaudit-store'}")
    print("checking models (training the builtin zoo where weights are missing)…", flush=True)
    validate_zoo(spec)  # fails fast, before Prefect starts or anything is committed
    print(f"  ready in {time.perf_counter() - t0:.1f}s; starting the audit flow", flush=True)
    with prefect_api() as api:
        print(f"  Prefect API: {api}", flush=True)
        from zooaudit_flows.audit_zoo import audit_zoo

        result = audit_zoo(spec)
    from zooaudit.store import Store

    store = Store.open(spec.store)
    for m in result.models:
        done = sum(not r.skipped for r in m.results)
        print(f"  {m.model:32s} {done} stages committed, {len(m.results) - done} skipped (cache hit)")
    for z in result.zoo_results:
        print(f"  {z.stage} on {z.dataset}: {'skipped (cache hit)' if z.skipped else 'committed'}")
    print(f"\nDone in {time.perf_counter() - t0:.1f}s. Report: {result.report}")
    print(_snippet(store.url, result))
    return 0


def cmd_audit_model(args) -> int:
    from zooaudit.specs import AuditModelSpec
    from zooaudit.stages import validate_model

    spec = AuditModelSpec(model=args.model, **_spec_fields(args))
    validate_model(spec)
    with prefect_api():
        from zooaudit_flows.audit_model import run_audit_model

        audit = run_audit_model(spec)
    for r in audit.results:
        print(f"  {r.stage:11s} {r.dataset:30s} {'skipped (cache hit)' if r.skipped else 'committed'} "
              f"{(r.snapshot or '')[:12]}")
    return 0


def cmd_layers(args) -> int:
    from zooaudit.extract import layer_shapes, list_layers
    from zooaudit.store import Store
    from zooaudit.zoo import resolve_model

    model = resolve_model(args.model, Store.open(args.store))
    names = list_layers(model.module)
    # Text encoders: per-sample token counts vary, so token outputs show as (-1, unit).
    pooling = "tokens" if hasattr(model.module, "collate") else "none"
    # strict=False: containers (ModuleList) and modules the forward bypasses have no output shape.
    shapes = layer_shapes(model.module, model.input_shape, names, pooling, strict=False)
    for n in (n for n in names if n in shapes):
        mark = "*" if n in model.default_layers else " "
        print(f"{mark} {n:12s} {type(dict(model.module.named_modules())[n]).__name__:10s} {shapes[n]}")
    print("(* = audited by default)")
    return 0


def cmd_versions(args) -> int:
    """``history`` / ``diff`` / ``show``: read versions of a model's repository."""
    from zooaudit import versions
    from zooaudit.store import Store, open_group

    store = Store.open(args.store)
    _, repo = versions.model_repository(store, args.model)
    if args.command == "history":
        print(versions.format_history(versions.history(repo, args.at, results_only=not args.all)))
    elif args.command == "diff":
        print(versions.format_diff(versions.diff_versions(repo, args.a, args.b), args.a, args.b))
    elif args.group:
        snapshot = versions.resolve_version(repo, args.at)
        try:
            ds = open_group(repo, args.group, snapshot=snapshot)
            print(ds.load(scheduler="synchronous") if ds.nbytes < 1_000_000 else ds)   # values when small
        except ValueError as err:      # zarr refuses '..' and '.' segments
            raise ZooauditError(f"Bad group path {args.group!r}: {err} Allowed: a path inside the repository, "
                                "e.g. digits-<hash>/acts/embed (see 'zooaudit show MODEL').") from None
        except (FileNotFoundError, KeyError) as err:
            raise ZooauditError(f"No group {args.group!r} at version {args.at or 'main'} ({snapshot}).") from err
    else:
        print(f"{args.model} at {args.at or 'main'} ({versions.resolve_version(repo, args.at)})")
        print(versions.format_stages(versions.stages_at(repo, args.at)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zooaudit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="audit the builtin zoo end to end and print the report location")
    _options(p)
    p = sub.add_parser("audit-zoo", help="audit every model of a zoo")
    _options(p)
    p.add_argument("--models", nargs="*", help="model URIs (default: the builtin zoo)")
    p.add_argument("--compare-layer", action="append", dest="compare_layers", metavar="LAYER",
                   help="layer compared across models and revisions (repeatable; default: embed)")
    p.add_argument("--tag", help="tag the version of every audited repository, e.g. 'nightly-{date}'")
    p.add_argument("--manifest", help="zoo manifest (YAML: listed models, checkpoint globs, per-family layers)")
    p = sub.add_parser("audit-model", help="audit one model")
    p.add_argument("model")
    _options(p)
    p = sub.add_parser("layers", help="list a model's layers with output shapes")
    p.add_argument("model")
    p.add_argument("--store")
    p = sub.add_parser("history", help="list the versions of a model's results (tag, snapshot, time, cache key)")
    p.add_argument("model", help="model URI or key, or 'zoo'")
    p.add_argument("--store")
    p.add_argument("--at", help="list the history up to this tag or snapshot (default: main)")
    p.add_argument("--all", action="store_true", help="include internal commits (extraction template, shards)")
    p = sub.add_parser("diff", help="what changed between two versions: stages, headline metrics, arrays")
    p.add_argument("model", help="model URI or key, or 'zoo'")
    p.add_argument("a", help="tag, branch or snapshot id")
    p.add_argument("b", help="tag, branch or snapshot id")
    p.add_argument("--store")
    p = sub.add_parser("show", help="the results of a model as of a version, or one group read at it")
    p.add_argument("model", help="model URI or key, or 'zoo'")
    p.add_argument("--store")
    p.add_argument("--at", help="tag, branch or snapshot id (default: main)")
    p.add_argument("--group", help="print this group read with xarray (e.g. digits-<hash>/acts/embed)")
    from . import stack

    p = sub.add_parser("up", help="start the local stack: Prefect server + UI, S3, Dask, deployment runner")
    stack.add_arguments(p, for_up=True)
    p = sub.add_parser("down", help="stop the local stack started by 'zooaudit up'")
    stack.add_arguments(p, for_up=False)
    return parser


def _resume_message(argv: list[str] | None) -> int:
    """Ctrl-C: the context managers have unwound by now (the local Dask cluster and the temporary
    Prefect server are stopped); every commit is all-or-nothing, so what finished is kept and the
    same command picks up from it."""
    rerun = shlex.join(["zooaudit", *(sys.argv[1:] if argv is None else argv)])
    print(f"zooaudit: interrupted. Nothing partial was committed; finished stages and extracted "
          f"shards are kept. To resume, rerun:\n  {rerun}", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    _env_defaults()
    args = build_parser().parse_args(argv)
    interrupted = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            # recorded: a KeyboardInterrupt raised inside a library's callback can reach us
            # wrapped in another error (e.g. pydantic's PydanticSerializationError from Prefect)
            interrupted.set()
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return _main(args, argv, interrupted)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(args, argv: list[str] | None, interrupted) -> int:
    from pydantic import ValidationError

    try:
        if args.command in ("demo", "audit-zoo"):
            return cmd_audit_zoo(args)
        if args.command == "audit-model":
            return cmd_audit_model(args)
        if args.command in ("history", "diff", "show"):
            return cmd_versions(args)
        if args.command in ("up", "down"):
            from . import stack

            return stack.cmd_up(args) if args.command == "up" else stack.cmd_down(args)
        return cmd_layers(args)
    except ZooauditError as err:
        print(f"zooaudit: error: {err}", file=sys.stderr)
        from zooaudit.store import StoreUnavailable

        return EXIT_STORE_UNAVAILABLE if isinstance(err, StoreUnavailable) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return _resume_message(argv)
    except ValidationError as err:
        print(f"zooaudit: error: invalid parameters — {problems(err)}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        if interrupted.is_set():   # the Ctrl-C, wrapped by a library on its way up
            return _resume_message(argv)
        # A store server that failed mid-read (inside a stage, a flow or the report): one paragraph, no traceback.
        from zooaudit.store import outage, resolve_store_url

        down = outage(err, f"running {args.command}", resolve_store_url(getattr(args, "store", None)))
        if down is None:
            raise
        print(f"zooaudit: error: {down}", file=sys.stderr)
        return EXIT_STORE_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
