"""A user's exported model against the builtin CNN: the whole ``audit-zoo`` command, as a ratio.

Issue 18's path: a two-convolution CNN (3×32×32 inputs, 3 classes) saved with
``torch.export`` (dynamic batch), audited on an ``arrays`` ``.npz`` of 60 samples with a
``group_background`` attribute::

    zooaudit audit-zoo --models 'file:net.pt2?input_shape=3x32x32' --dataset arrays=x.npz

against the reference, the builtin colour CNN on 60 colored-digits samples (it has a group
attribute too, so both audits run every stage)::

    zooaudit audit-zoo --models builtin:cnn-colored-w16-s0 --dataset colored-digits --max-samples 60

Each run is the CLI in a fresh process on a fresh store (its temporary Prefect server and
local Dask cluster included: the same start-up on both sides); the builtin weights are
trained once into a cache and copied into each reference store, so training is not timed.
Runs alternate ``ref, file, ref, …, file, ref``; reported: each file run ÷ the mean of the
two reference runs around it (median over repeats), and the stage durations Prefect logged.
``--pooling none`` stores the unpooled maps (16×32×32 = 16 384 features per sample for
``conv2``): the case that took 52 minutes in its bias stage::

    .venv/bin/python benchmarks/bench_file_model.py                  # pooled (mean), 2 repeats
    .venv/bin/python benchmarks/bench_file_model.py --pooling none --repeats 1
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
ZOOAUDIT = [sys.executable, "-m", "zooaudit_infra.cli"]
REF_MODEL, REF_DATASET = "builtin:cnn-colored-w16-s0", "colored-digits"
N = 60


def make_inputs(folder: Path) -> tuple[str, str]:
    """``net.pt2`` (torch.export, dynamic batch) and ``x.npz`` (60 samples, group_background)."""
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 3)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(self.pool(x).flatten(1))

    ep = torch.export.export(Net().eval(), (torch.randn(4, 3, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, folder / "net.pt2")
    rng = np.random.default_rng(0)
    np.savez(folder / "x.npz", inputs=rng.standard_normal((N, 3, 32, 32)).astype(np.float32),
             labels=rng.integers(0, 3, N), group_background=rng.integers(0, 2, N))
    return f"file:{folder / 'net.pt2'}?input_shape=3x32x32", f"arrays={folder / 'x.npz'}"


def audit(store: Path, model: str, dataset: str, extra: list[str]) -> tuple[float, dict[str, float]]:
    """Wall seconds of one CLI audit and ``{task: seconds}`` from its log lines."""
    cmd = [*ZOOAUDIT, "audit-zoo", "--store", f"file://{store}", "--models", model, "--dataset", dataset, *extra]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        sys.exit(f"audit failed ({' '.join(cmd)}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    stamps = [(m.group(2), m.group(1)) for m in
              re.finditer(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO\s+\| Task run '([^']+)' - Finished", out.stdout + out.stderr,
                          re.M)]
    secs = lambda s: sum(float(x) * f for x, f in zip(s.split(":"), (3600, 60, 1)))  # noqa: E731
    stages, last = {}, None
    for name, when in stamps:   # time since the previous task finished: where the run's time went
        base = re.sub(r"-(file|builtin)-.*|-[0-9a-f]{3}$", "", name)
        if last is not None:
            stages[base] = stages.get(base, 0.0) + secs(when) - last
        last = secs(when)
    return wall, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pooling", default="mean")
    args = ap.parse_args()
    extra = ["--pooling", args.pooling] + (["--factorize", "pca", "--factorize", "eigencam"]
                                           if args.pooling == "none" else [])
    with tempfile.TemporaryDirectory(prefix="bench-file-model-") as tmp:
        tmp = Path(tmp)
        model, dataset = make_inputs(tmp)
        warm = tmp / "warm"          # trains the builtin weights (untimed)
        audit(warm, REF_MODEL, REF_DATASET, ["--max-samples", str(N), *extra])
        ref_runs, file_runs, logs = [], [], {}
        for i in range(2 * args.repeats + 1):
            store = tmp / f"run-{i}"
            if i % 2 == 0:
                shutil.copytree(warm / "weights", store / "weights")
                wall, stages = audit(store, REF_MODEL, REF_DATASET, ["--max-samples", str(N), *extra])
                ref_runs.append(wall)
                logs.setdefault("builtin", stages)
            else:
                wall, stages = audit(store, model, dataset, extra)
                file_runs.append(wall)
                logs.setdefault("file", stages)
            print(f"run {i}: {'builtin' if i % 2 == 0 else 'file   '} {wall:7.1f} s", flush=True)
    ratios = [f / ((ref_runs[k] + ref_runs[k + 1]) / 2) for k, f in enumerate(file_runs)]
    print(f"pooling={args.pooling}: file model {median(file_runs):.1f} s, builtin CNN {median(ref_runs):.1f} s; "
          f"file / builtin (bracketed, median of {len(ratios)}) = {median(ratios):.2f}")
    for side, stages in logs.items():
        top = sorted(stages.items(), key=lambda kv: -kv[1])[:6]
        print(f"  {side}: " + ", ".join(f"{k} {v:.1f} s" for k, v in top))


if __name__ == "__main__":
    main()
