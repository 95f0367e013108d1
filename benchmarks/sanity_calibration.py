"""Calibration of the attribution sanity-check thresholds on the scenes zoo.

For each scenes model (training background agreement 0.95, 0.75, 0.25) the stage's own sanity
inputs — the first ``--n`` samples of its fixed random subset of the scenes test split, targets
the trained model's predictions — are mapped by every default method on the trained model and on
the cascade of randomisations (:func:`zooaudit.sanity_checks.randomisation_maps`, seed 0). The
script prints, per model and method, the mean Spearman and SSIM with the trained maps once
every layer is random (the statistics ``AttributionSpec.sanity_*threshold`` flag on), as JSON.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/sanity_calibration.py --n 8 32
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch

from zooaudit.attribution_maps import attribution_maps
from zooaudit.data import load_dataset
from zooaudit.sanity_checks import randomisation_maps
from zooaudit.specs import AttributionSpec
from zooaudit.stages.common import load_model, random_subset
from zooaudit.zoo.builtin import scenes_sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[8, 32], help="sanity samples (stage default: 8)")
    ap.add_argument("--store", default=None, help="store URL holding the builtin weights (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    aspec = AttributionSpec()
    store = args.store or "file://" + tempfile.mkdtemp() + "/store"
    data = load_dataset({"name": "scenes", "split": "test"})
    idx = random_subset(len(data), aspec.max_samples, aspec.random_state)
    out = {}
    for agreement, uri in scenes_sweep().items():
        module = load_model(uri, store).module.eval()
        for n in args.n:
            x = data.inputs[idx[:n]]
            pred = attribution_maps(module, x, "act4", methods=["gradcam"], target="predicted",
                                    batch_size=aspec.batch_size, ig_steps=aspec.ig_steps)["target"].values
            s = randomisation_maps(module, x, "act4", methods=list(aspec.methods), targets=pred,
                                   seed=aspec.random_state, batch_size=aspec.batch_size, ig_steps=aspec.ig_steps,
                                   ig_baseline=aspec.ig_baseline).isel(step=-1)
            out[f"{uri} a={agreement} n={n}"] = {
                str(m): {"spearman": round(float(s["spearman"].sel({"method": m})), 3),
                         "ssim": round(float(s["ssim"].sel({"method": m})), 3)} for m in s["method"].values}
            print(json.dumps({f"{uri} a={agreement} n={n}": out[f"{uri} a={agreement} n={n}"]}), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
