"""Extraction overhead: activations of 4+ layers into the local store ÷ a bare forward pass.

All timings in one run, on the same model, inputs and batches:

- ``bare``: ``model(batch)`` under ``torch.inference_mode()`` over every batch (the reference);
- ``zooaudit``: the activations stage — staging branch, every shard computed (one
  forward per batch, hooks on all layers, spatial mean pooling) and committed to a
  local Icechunk repository by the background writer, then published on ``main``;
- ``naive``: forward hooks → ``.numpy()`` per batch → concatenate → ``np.save`` per layer.

Each is repeated ``--repeats`` times in alternation (``bare, zooaudit, naive, bare, ...,
bare``). The machine's speed drifts, so three ratios are reported: of the minimum wall
times (least disturbed run of each), the median over repeats of each run against the mean
of the two bare runs around it (``benchmarks/bench_timing.py``), and of process CPU time (all
threads of this process, the writer included). Run (CPU, 2 cores shared):

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_extract.py

``--tiny``: the same comparison on a small model (``--model``, default the digits CNN
``builtin:cnn-w16-s0``, 1×8×8 inputs, layers ``act1 act2 embed head``), where a shard's
forward takes less time than its store work (session, writes, commit)::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_extract.py --tiny --n 32768 --repeats 5

GPU (``--device cuda --autocast bf16``): the stage, the bare pass and the naive loop all run
on the GPU (batches copied from pinned host memory, non-blocking; the bare pass ends at a
``synchronize``); ``throughput_fraction_of_bare`` is the issue's figure (target ≥ 0.9)::

    .venv/bin/python benchmarks/bench_extract.py --arch resnet50 --size 224 --n 4096 \
        --batch-size 256 --shard-size 1024 --device cuda --autocast bf16 --repeats 3

Memory mode (``--memory N [N ...]``): for each N a fresh child process runs the whole
activations stage (plan + ``run_activations`` into a fresh local store) of a small model
(default ``builtin:cnn-w16-s0``, 4 layers) on N samples and reports its peak RSS
(``ru_maxrss``). The N inputs are written by this process block by block into a ``.npy``
file (never whole in RAM here), which the child's ``arrays`` dataset memory-maps. Target:
peak RSS flat in N (largest / smallest N ≤ 1.2)::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_extract.py --memory 10000 200000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_timing import summary

from zooaudit import stages
from zooaudit.data.arrays import memory_mapped
from zooaudit.extract import AUTOCAST_DTYPES, autocast_context
from zooaudit.specs import AuditModelSpec, DatasetSpec


def bare_forward(model, x: np.ndarray, batch_size: int, device: str = "cpu", autocast: str = "none") -> None:
    """``model(batch)`` over every batch on ``device``. On CUDA each batch is copied from pinned
    host memory without blocking, as the extraction does, and the time ends at a synchronize."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model.to(dev).eval()
    with torch.inference_mode(), autocast_context(dev.type, autocast):
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(x[start:start + batch_size])
            model(batch.pin_memory().to(dev, non_blocking=True) if cuda else batch)
    if cuda:
        torch.cuda.synchronize(dev)


def naive_hooks_npsave(model, x: np.ndarray, layers: list[str], batch_size: int, out: Path,
                       device: str = "cpu", autocast: str = "none") -> None:
    dev = torch.device(device)
    model.to(dev).eval()
    modules = dict(model.named_modules())
    got: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: got[n].append((o.mean(dim=(2, 3)) if o.ndim == 4 else o).float().cpu().numpy().copy()))
        for n in layers]
    try:
        with torch.inference_mode(), autocast_context(dev.type, autocast):
            for start in range(0, len(x), batch_size):
                model(torch.from_numpy(x[start:start + batch_size]).to(dev))
    finally:
        for h in handles:
            h.remove()
    for n in layers:
        np.save(out / f"{n}.npy", np.concatenate(got[n]))


def timed(fn) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def zooaudit_stage(spec, ds_spec, commits: list[int] | None = None) -> tuple[float, float]:
    """Plan (untimed: model load, dry forward), then time the activations stage itself.
    ``commits``: gets the number of shard commits the stage made (the writer coalesces
    the shards waiting in its queue into one commit)."""
    plan = stages.plan_extraction(spec, ds_spec)
    out = {}
    t = timed(lambda: out.setdefault("res", stages.run_activations(plan)))
    assert not out["res"].skipped and out["res"].summary["n_samples"] == plan.n_samples
    if commits is not None:
        repo = plan.repository.icechunk
        commits.append(sum((i.metadata or {}).get("stage") == "shard" and i.metadata.get("for") == plan.cache_key
                           for i in repo.ancestry(snapshot_id=out["res"].snapshot)))
    return t


MEMORY_LAYERS = {"builtin": ["act1", "act2", "embed", "head"]}


def _rss_mib() -> float:
    """Peak resident set of this process so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args) -> None:
    """One N of the memory mode, in its own process: plan + activations stage; print JSON."""
    from zooaudit.stages import activations as extraction

    folder = Path(args.folder)
    ds_spec = DatasetSpec(name="arrays", path=str(folder / "inputs.npy"))
    spec = AuditModelSpec(model=args.model, store="file://" + str(folder / "store"), datasets=[ds_spec],
                          layers=MEMORY_LAYERS.get(args.model.split(":")[0]), pooling="mean",
                          batch_size=args.batch_size, shard_size=args.shard_size, task_runner="threads")
    t0 = time.perf_counter()
    plan = stages.plan_extraction(spec, ds_spec)
    after_plan, t1 = _rss_mib(), time.perf_counter()
    res = stages.run_activations(plan)
    t2 = time.perf_counter()
    assert not res.skipped and res.summary["n_samples"] == args.child_memory
    dataset = extraction.shard_dataset(plan)
    print(json.dumps({"n": args.child_memory, "peak_rss_mib": round(_rss_mib(), 1),
                      "peak_rss_after_plan_mib": round(after_plan, 1), "plan_s": round(t1 - t0, 2),
                      "extract_s": round(t2 - t1, 2), "shards": len(plan.shards), "layers": plan.layers,
                      "inputs_mib": round(dataset.inputs.nbytes / 2**20, 1),
                      "inputs_memory_mapped": memory_mapped(dataset.inputs), **_rss_split()}))


def _rss_split() -> dict[str, float]:
    """Current anonymous / file-backed resident memory, MiB (file pages: mapped files such as
    the memory-mapped inputs and shared libraries; the kernel can drop them under pressure)."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return {f"end_{k.lower()}_mib": round(int(fields[k].split()[0]) / 1024, 1) for k in ("RssAnon", "RssFile")}


def memory_mode(args) -> None:
    """Peak RSS of the activations stage per N, each N in a fresh child process."""
    from zooaudit.data import load_dataset

    runs = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        # Train / fetch the model's weights once; each child copies them into its fresh store.
        stages.load_model(args.model, "file://" + str(tmp / "weights-store"))
        shape = tuple(stages.load_model(args.model, "file://" + str(tmp / "weights-store")).input_shape)
        digits = load_dataset({"name": "digits", "split": "all"}).inputs if shape == (1, 8, 8) else None
        for n in args.memory:
            folder = tmp / f"n{n}"
            folder.mkdir()
            if (tmp / "weights-store" / "weights").exists():
                shutil.copytree(tmp / "weights-store" / "weights", folder / "store" / "weights")
            x = np.lib.format.open_memmap(folder / "inputs.npy", mode="w+", dtype=np.float32, shape=(n, *shape))
            rng = np.random.default_rng(n)
            for start in range(0, n, 8192):   # block by block: this process never holds all N
                stop = min(n, start + 8192)
                x[start:stop] = (digits[rng.integers(0, len(digits), stop - start)] if digits is not None
                                 else rng.standard_normal((stop - start, *shape), dtype=np.float32))
            x.flush()
            del x
            cmd = [sys.executable, __file__, "--child-memory", str(n), "--folder", str(folder), "--model", args.model,
                   "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            shutil.rmtree(folder)
    peaks = {r["n"]: r["peak_rss_mib"] for r in runs}
    print(json.dumps({"model": args.model, "batch_size": args.batch_size, "shard_size": args.shard_size,
                      "runs": runs, "peak_rss_ratio_largest_over_smallest":
                          round(peaks[max(peaks)] / peaks[min(peaks)], 3)}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="samples")
    p.add_argument("--size", type=int, default=32, help="image side (3×size×size inputs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--memory", type=int, nargs="+", metavar="N",
                   help="memory mode: peak RSS of the activations stage for each N (fresh process each)")
    p.add_argument("--model", default="builtin:cnn-w16-s0", help="memory and --tiny modes: the model")
    p.add_argument("--tiny", action="store_true", help="time --model (a small model) instead of --arch")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:n] (the stage and both references)")
    p.add_argument("--autocast", default="none", choices=sorted(AUTOCAST_DTYPES), help="bf16 | fp16 on a GPU")
    p.add_argument("--tmp", help="folder for the stores, inputs and .npy files (default: the system's temp folder)")
    p.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory is not None:
        return memory_child(args)
    if args.memory:
        return memory_mode(args)

    if args.tiny:
        uri, layers = args.model, MEMORY_LAYERS.get(args.model.split(":")[0])
    else:
        layers = ["layer1", "layer2", "layer3", "layer4"]
        uri = f"torchvision:{args.arch}?num_classes=10&input_shape=3x{args.size}x{args.size}&seed=0"
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        loaded = stages.load_model(uri, "file://" + str(tmp / "store0"))   # builtin: trains the weights there
        model, shape = loaded.module, tuple(loaded.input_shape)
        layers = layers or loaded.default_layers
        x = np.random.default_rng(0).standard_normal((args.n, *shape)).astype(np.float32)
        np.savez(tmp / "x.npz", inputs=x, labels=np.arange(args.n) % 10)
        ds_spec = DatasetSpec(name="arrays", path=str(tmp / "x.npz"))
        dev = {"device": args.device, "autocast": args.autocast}
        bare_forward(model, x[:args.batch_size], args.batch_size, **dev)          # warm-up
        wall: dict[str, list[float]] = {"bare": [], "zooaudit": [], "naive": []}
        cpu: dict[str, list[float]] = {"bare": [], "zooaudit": [], "naive": []}
        commits: list[int] = []

        def record(name, t):
            wall[name].append(t[0])
            cpu[name].append(t[1])

        for r in range(args.repeats):
            record("bare", timed(lambda: bare_forward(model, x, args.batch_size, **dev)))
            # a fresh store each repeat: nothing cached, every shard computed and committed
            # (trained builtin weights copied in, not trained again)
            if r and (tmp / "store0" / "weights").exists():
                shutil.copytree(tmp / "store0" / "weights", tmp / f"store{r}" / "weights")
            spec = AuditModelSpec(model=uri, store="file://" + str(tmp / f"store{r}"), datasets=[ds_spec],
                                  layers=layers, pooling="mean", batch_size=args.batch_size,
                                  shard_size=args.shard_size, task_runner="threads", **dev)
            record("zooaudit", zooaudit_stage(spec, ds_spec, commits))
            out = tmp / f"naive{r}"
            out.mkdir()
            record("naive", timed(lambda out=out: naive_hooks_npsave(model, x, layers, args.batch_size, out, **dev)))
        record("bare", timed(lambda: bare_forward(model, x, args.batch_size, **dev)))   # closes the last bracket

    def ratios(name):
        return {**summary(wall[name], wall["bare"]),
                "cpu": round(sum(cpu[name]) / sum(cpu["bare"][:-1]), 3)}

    result = {
        "model": uri, "n": args.n, "device": args.device, "autocast": args.autocast,
        "folder": str(Path(args.tmp or tempfile.gettempdir()).resolve()), "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "layers": layers, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "shards": -(-args.n // args.shard_size), "shard_commits": commits,
        "min_wall_s": {k: round(min(v), 3) for k, v in wall.items()},
        "zooaudit_over_bare": ratios("zooaudit"),
        # GPU target (issue 3): the stage's throughput ≥ 0.9 of the bare forward's
        "throughput_fraction_of_bare": round(min(wall["bare"]) / min(wall["zooaudit"]), 3),
        "naive_over_bare": ratios("naive"),
        "wall_s": {k: [round(t, 3) for t in v] for k, v in wall.items()},
        "cpu_s": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
