"""Smooth Grad-CAM++ against Grad-CAM++: cost and how far the maps move, per layer.

The builtin scene CNN briefly trained on generated scenes (40 Adam steps, seed 0), its maps of
the same inputs at each layer (predicted class, ``normalise="max"``): the time of Grad-CAM++ and of
Smooth Grad-CAM++ (``--samples`` noisy copies, ``--sigma`` × each input's range; one clean forward
plus one forward and backward per copy and batch, so about ``1 + samples`` times Grad-CAM++), the
mean absolute difference of the maps and their mean per-sample Spearman correlation. On ``act4``
(then global average pooling and a linear head) the layer gradient does not depend on the input,
so the two methods must agree there to rounding — the script asserts it.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_smooth_gradcampp.py --n 64 --size 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from zooaudit.attribution_maps import attribution_maps
from zooaudit.data import load_dataset
from zooaudit.zoo.builtin import BUILTIN_ZOO, build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--sigma", type=float, default=0.15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset({"name": "scenes", "options": {"n_test": args.n, "image_size": args.size}})
    x, y = torch.from_numpy(ds.inputs), torch.from_numpy(ds.labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(BUILTIN_ZOO["scene-cnn-a25-w8-s0"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    print("| layer | map size | Grad-CAM++ s | Smooth Grad-CAM++ s | ratio | mean abs diff | mean Spearman |")
    print("|---|---|---|---|---|---|---|")
    for layer in ("act4", "act3", "act2"):
        t0 = time.perf_counter()
        a = attribution_maps(model, ds.inputs, layer, methods=["gradcam++"], batch_size=32)
        t1 = time.perf_counter()
        b = attribution_maps(model, ds.inputs, layer, methods=["smoothgradcam++"], batch_size=32,
                             smooth_samples=args.samples, smooth_sigma=args.sigma)
        t2 = time.perf_counter()
        ma, mb = a.maps.values[:, 0], b.maps.values[:, 0]
        rho = np.nanmean([spearmanr(u.ravel(), v.ravel())[0] for u, v in zip(ma, mb)])
        diff = float(np.abs(ma - mb).mean())
        if layer == "act4":
            assert diff < 1e-6, diff
        print(f"| {layer} | {a.attrs['layer_size']} | {t1 - t0:.3f} | {t2 - t1:.3f} | {(t2 - t1) / (t1 - t0):.1f}× | "
              f"{diff:.2e} | {rho:.3f} |")


if __name__ == "__main__":
    main()
