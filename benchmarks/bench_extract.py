"""Extraction overhead: activations of 4+ layers into the local store ÷ a bare forward pass.

All timings in one run, on the same model, inputs and batches:

- ``bare``: ``model(batch)`` under ``torch.inference_mode()`` over every batch (the reference);
- ``zooaudit``: the activations stage — staging branch, every shard computed (one
  forward per batch, hooks on all layers, spatial mean pooling) and committed to a
  local Icechunk repository by the background writer, then published on ``main``;
- ``naive``: forward hooks → ``.numpy()`` per batch → concatenate → ``np.save`` per layer.

Each is repeated ``--repeats`` times in alternation. On a shared machine the wall
time is noisy, so three ratios are reported: of the minimum wall times (least
disturbed run of each), the median of per-repeat ratios (each pair ran back to
back), and of process CPU time (all threads of this process, the writer included;
blind to other processes' load). Run (CPU, 2 cores shared):

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_extract.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from zooaudit import stages
from zooaudit.specs import AuditModelSpec, DatasetSpec


def bare_forward(model, x: np.ndarray, batch_size: int) -> None:
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            model(torch.from_numpy(x[start:start + batch_size]))


def naive_hooks_npsave(model, x: np.ndarray, layers: list[str], batch_size: int, out: Path) -> None:
    modules = dict(model.named_modules())
    got: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: got[n].append(o.mean(dim=(2, 3)).numpy().copy())) for n in layers]
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                model(torch.from_numpy(x[start:start + batch_size]))
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


def zooaudit_stage(spec, ds_spec) -> tuple[float, float]:
    """Plan (untimed: model load, dry forward), then time the activations stage itself."""
    plan = stages.plan_extraction(spec, ds_spec)
    out = {}
    t = timed(lambda: out.setdefault("res", stages.run_activations(plan)))
    assert not out["res"].skipped and out["res"].summary["n_samples"] == plan.n_samples
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="samples")
    p.add_argument("--size", type=int, default=32, help="image side (3×size×size inputs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arch", default="resnet18")
    args = p.parse_args()

    layers = ["layer1", "layer2", "layer3", "layer4"]
    uri = f"torchvision:{args.arch}?num_classes=10&input_shape=3x{args.size}x{args.size}&seed=0"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x = np.random.default_rng(0).standard_normal((args.n, 3, args.size, args.size)).astype(np.float32)
        np.savez(tmp / "x.npz", inputs=x, labels=np.arange(args.n) % 10)
        ds_spec = DatasetSpec(name="arrays", path=str(tmp / "x.npz"))
        model = stages.load_model(uri, "file://" + str(tmp / "store0")).module
        bare_forward(model, x[:args.batch_size], args.batch_size)          # warm-up
        wall: dict[str, list[float]] = {"bare": [], "zooaudit": [], "naive": []}
        cpu: dict[str, list[float]] = {"bare": [], "zooaudit": [], "naive": []}

        def record(name, t):
            wall[name].append(t[0])
            cpu[name].append(t[1])

        for r in range(args.repeats):
            record("bare", timed(lambda: bare_forward(model, x, args.batch_size)))
            # a fresh store each repeat: nothing cached, every shard computed and committed
            spec = AuditModelSpec(model=uri, store="file://" + str(tmp / f"store{r}"), datasets=[ds_spec],
                                  layers=layers, pooling="mean", batch_size=args.batch_size,
                                  shard_size=args.shard_size, task_runner="threads")
            record("zooaudit", zooaudit_stage(spec, ds_spec))
            out = tmp / f"naive{r}"
            out.mkdir()
            record("naive", timed(lambda out=out: naive_hooks_npsave(model, x, layers, args.batch_size, out)))

    def ratios(name):
        return {
            "min_wall": round(min(wall[name]) / min(wall["bare"]), 3),
            "median_pair_wall": round(statistics.median(a / b for a, b in zip(wall[name], wall["bare"])), 3),
            "cpu": round(sum(cpu[name]) / sum(cpu["bare"]), 3),
        }

    result = {
        "model": uri, "n": args.n, "batch_size": args.batch_size, "shard_size": args.shard_size,
        "layers": layers, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "min_wall_s": {k: round(min(v), 3) for k, v in wall.items()},
        "zooaudit_over_bare": ratios("zooaudit"),
        "naive_over_bare": ratios("naive"),
        "wall_s": {k: [round(t, 3) for t in v] for k, v in wall.items()},
        "cpu_s": {k: [round(t, 3) for t in v] for k, v in cpu.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
