"""Peak memory of the attribution engine against the number of mapped samples.

``zooaudit.attribution_maps`` (the default methods of ``AttributionSpec``: Grad-CAM, Grad-CAM++,
Layer-CAM, Score-CAM, Eigen-CAM, gradient × input, Integrated Gradients) on N generated scenes
(3 × 64 × 64) with the builtin scene CNN (random init, layer ``act4``), batch 32, in a fresh
subprocess per N. Reported per N: peak RSS (``ru_maxrss``), RSS just before the call (imports,
model, inputs), the inputs' and the returned maps' bytes, and the working memory — the peak above
the pre-call RSS less the maps the call returns (O(N) by design: the stage stores every mapped
sample's maps). Target (issue 15): the working memory flat in N (ratio ≤ 1.2 at N × 8).

    .venv/bin/python benchmarks/bench_attribution_memory.py --n 64 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(n: int, batch: int) -> dict:
    import time

    import numpy as np
    import torch

    from zooaudit.attribution_maps import attribution_maps
    from zooaudit.data import load_dataset
    from zooaudit.specs import AttributionSpec

    torch.set_num_threads(1)
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_cam import build

    model, layer = build("scene-cnn")
    data = load_dataset({"name": "scenes", "options": {"n_test": n, "image_size": 64}})
    x = np.ascontiguousarray(data.inputs[:n], dtype=np.float32)
    methods = AttributionSpec().methods
    attribution_maps(model, x[:2], layer, methods=methods, batch_size=batch)   # warm-up: lazy imports, allocator
    before = _rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out = attribution_maps(model, x, layer, methods=methods, batch_size=batch, ig_steps=AttributionSpec().ig_steps)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    maps_mib = out["maps"].nbytes / 2**20
    return {"n": n, "peak_mib": round(peak, 1), "before_mib": round(before, 1),
            "peak_before_call_mib": round(peak_before, 1), "inputs_mib": round(x.nbytes / 2**20, 1),
            "maps_mib": round(maps_mib, 1), "working_mib": round(peak - max(before, peak_before) - maps_mib, 1),
            "wall_s": round(wall, 2), "methods": list(methods)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs=2, default=[64, 512], metavar=("SMALL", "LARGE"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch_size)))
        return
    rows = []
    for n in args.n:
        done = subprocess.run([sys.executable, __file__, "--child", str(n), "--batch-size", str(args.batch_size)],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    small, large = rows
    print(json.dumps({"peak_ratio": round(large["peak_mib"] / small["peak_mib"], 3),
                      "working_ratio": round(max(large["working_mib"], 1) / max(small["working_mib"], 1), 3)}))


if __name__ == "__main__":
    main()
