"""CAM maps: zooaudit.attribution_maps against pytorch-grad-cam on the same model, layer and batch.

Both compute Grad-CAM and Score-CAM of the same inputs for the same target classes (each
sample's true class) at the same layer, with pytorch-grad-cam's conventions
(``normalise="minmax"``, bilinear upsampling), so the maps must agree within 1e-5; the script
checks that and reports each library's time and the ratio zooaudit / pytorch-grad-cam
(target ≤ 1.0 for both methods). Each timing is the best of ``--repeat`` runs after one
untimed warm-up of both. Machines here are noisy and shared: compare ratios, not seconds.

Models: ``resnet18`` (torchvision, random init, seed 0, layer4 → ``layer3``) or ``scene-cnn``
(the builtin scenes CNN architecture, random init, ``act4``). Inputs: the generated scenes.

    .venv/bin/python benchmarks/bench_cam.py --model scene-cnn --n 64
    .venv/bin/python benchmarks/bench_cam.py --model resnet18 --n 16 --size 64 --methods gradcam
    .venv/bin/python benchmarks/bench_cam.py --model resnet18 --n 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from zooaudit.attribution_maps import attribution_maps
from zooaudit.data import load_dataset


def build(name: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "resnet18":
            import torchvision

            return torchvision.models.resnet18(num_classes=4).eval(), "layer3"
        from zooaudit.zoo.builtin import BUILTIN_ZOO, build as build_builtin

        return build_builtin(BUILTIN_ZOO["scene-cnn-a25-w8-s0"]).eval(), "act4"


def pgc_maps(model, layer, x, y, method, batch_size):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": pgc.GradCAM, "scorecam": pgc.ScoreCAM}[method]
    cam = cls(model, [dict(model.named_modules())[layer]])
    if method == "scorecam":
        cam.batch_size = batch_size          # its masked-input batch, as ours
    try:
        out = []
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[start:start + batch_size]).to(next(model.parameters()).device)
            out.append(cam(xb, targets=[ClassifierOutputTarget(int(t)) for t in y[start:start + batch_size]]))
        return np.concatenate(out)
    finally:
        cam.activations_and_grads.release()


def best(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["resnet18", "scene-cnn"], default="scene-cnn")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=["gradcam", "scorecam"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    data = load_dataset({"name": "scenes", "options": {"n_test": args.n, "image_size": args.size}})
    model, layer = build(args.model)
    model = model.to(args.device)
    x, y = data.inputs, data.labels
    rows = []
    for method in args.methods:
        def ours():
            return attribution_maps(model, x, layer, methods=[method], target="true", labels=y, normalise="minmax",
                                    batch_size=args.batch_size, device=args.device)["maps"].values[:, 0]

        def theirs():
            return pgc_maps(model, layer, x, y, method, args.batch_size)

        ours(), theirs()                      # warm-up: imports, thread pools, allocator
        t_ours, m_ours = best(ours, args.repeat)
        t_ref, m_ref = best(theirs, args.repeat)
        rows.append({"method": method, "model": args.model, "layer": layer, "n": args.n, "size": args.size,
                     "device": args.device, "pytorch_grad_cam_s": round(t_ref, 3), "zooaudit_s": round(t_ours, 3),
                     "ratio": round(t_ours / t_ref, 3), "max_abs_diff": float(np.abs(m_ours - m_ref).max())})
        print(json.dumps(rows[-1]), flush=True)
    assert all(r["max_abs_diff"] < 1e-5 for r in rows), "maps differ from pytorch-grad-cam's"


if __name__ == "__main__":
    main()
