"""Peak RSS of the contextual-bias call and of the bias-features stage's AUC pass, a fresh subprocess per N.

    PYTHONPATH=... flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_bias_memory.py contextual --n 100000 1000000
    PYTHONPATH=... flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_bias_memory.py features --n 100000 1000000 --k 1000

``contextual``: ``contextual_bias`` with 200 bootstrap resamples on synthetic single-label data (10
categories, a 2-valued context that follows the category in 70% of the samples, 80% right
predictions), training split of N/2 samples. ``--form codes``: class codes and no scores (the call's
own memory; inputs O(N) ints); ``--form stage``: what the amplification stage passes — class codes and
``(N,)`` float32 own-class softmax scores of float32 logits, computed by blocks (issue 17; before it:
float64 one-hot matrices and ``(N, 10)`` scores). Printed per N: peak RSS
(``ru_maxrss``), RSS before the call, the call's own tracemalloc peak and its wall.

``features``: the stage's reading and ranking (``stages.bias_features._block_aucs``) of ``(N, k)``
float32 codes from a Zarr store on disk (chunks of 2048 samples × every component, as factorize writes
them), for two targets (a binary group value and the errors). The store is written first by another
subprocess (not measured; generated chunk by chunk) under ``--dir``, removed afterwards unless ``--keep``.

``--impl reference``: the 30d50b3 code (``tests/bias_reference.py``; for ``features`` with its fixed
64-component float64 blocks) instead of the current one, for the before figure.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _context_data(n: int, seed: int, form: str):
    rng = np.random.default_rng(seed)
    C, Z = 10, 2
    y = rng.integers(0, C, n)
    z = np.where(rng.random(n) < 0.7, y % Z, rng.integers(0, Z, n))
    pred = np.where(rng.random(n) < 0.8, y, rng.integers(0, C, n))
    if form == "codes":
        return y, z, pred, None
    # as the stage (issue 17): class codes, and each sample's own-class softmax score of float32 logits
    # (as stored), computed by blocks of 65 536 rows as stages.amplification.own_class_scores reads the
    # stored logits — inline: importing that module adds ~490 MiB of base RSS, which would hide the
    # call's own growth with N. Drawn in float32: a float64 draw would be a temporary the stage never has.
    own = np.empty(n, np.float32)
    for s in range(0, n, 65_536):
        logits = rng.standard_normal((min(65_536, n - s), C), dtype=np.float32)
        rows = np.arange(len(logits))
        logits[rows, pred[s:s + len(logits)]] += 2.0
        logits -= logits.max(1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(1, keepdims=True)
        own[s:s + len(logits)] = logits[rows, y[s:s + len(logits)]]
    return y, z, pred, own


def _one_contextual(n: int, form: str, impl: str) -> None:
    if impl == "reference":
        sys.path.insert(0, str(HERE.parent / "tests"))
        from bias_reference import contextual_bias
    else:
        from zooaudit.analysis.contextual import contextual_bias
    ty, tz, _, _ = _context_data(n // 2, 1, form)
    y, z, pred, scores = _context_data(n, 0, form)
    before = _rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    ds = contextual_bias(ty, tz, y, z, pred, scores, n_boot=200, random_state=0)
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"{_rss_mib():.0f} {before:.0f} {peak:.1f} {wall:.1f} {ds.sizes['pair']} "
          f"{float(ds['bias'][0]):.6f}")


def _targets(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"colour=green": rng.random(n) < 0.4, "error": rng.random(n) < 0.1}


def _store(d: Path, n: int, k: int) -> Path:
    return d / f"codes-{n}x{k}.zarr"


def _write(n: int, k: int, d: Path) -> None:
    import dask.array as da
    import xarray as xr

    path = _store(d, n, k)
    if path.exists():
        return
    t = _targets(n)["colour=green"]
    weights = np.zeros(k, np.float32)
    weights[:: max(1, k // 10)] = np.linspace(0.05, 1.0, len(weights[:: max(1, k // 10)]))   # a few carry it
    noise = da.random.RandomState(0).standard_normal((n, k), chunks=(2048, k)).astype(np.float32)
    codes = noise + da.from_array(t.astype(np.float32)[:, None], chunks=(2048, 1)) * weights[None, :]
    ds = xr.Dataset({"codes": (("sample", "component"), codes)}, coords={"sample": np.arange(n)})
    import dask

    with dask.config.set(scheduler="threads", num_workers=2):
        ds.to_zarr(path, zarr_format=3, consolidated=False, mode="w")


def _one_features(n: int, k: int, d: Path, impl: str) -> None:
    import xarray as xr

    from zooaudit.specs import BiasSpec
    from zooaudit.stages import bias_features as bf

    codes = xr.open_zarr(_store(d, n, k), consolidated=False)["codes"]
    targets = _targets(n)
    bspec = BiasSpec()
    before = _rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    if impl == "reference":   # the 30d50b3 stage: 64 components at a time, float64, whole-matrix DeLong
        sys.path.insert(0, str(HERE.parent / "tests"))
        from bias_reference import component_aucs

        out = xr.concat([component_aucs(np.asarray(codes.isel(component=slice(j, j + 64)).values, np.float64),
                                        targets, ci=bspec.ci, min_group_size=bspec.min_group_size,
                                        component_names=np.arange(j, min(j + 64, k)))
                         for j in range(0, k, 64)], dim="component", data_vars="minimal", coords="minimal",
                        compat="override", combine_attrs="override")
    else:
        out = bf._block_aucs(codes, targets, bspec)
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    best = float(out["separation"].sel(target="colour=green").max())
    print(f"{_rss_mib():.0f} {before:.0f} {peak:.1f} {wall:.1f} {out.sizes['component']} {best:.6f}")


def _child(args: list[str]) -> list[str]:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-3000:]}")
    return res.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["contextual", "features", "_contextual", "_features", "_write"])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--form", choices=["codes", "stage"], default="codes")
    ap.add_argument("--impl", choices=["current", "reference"], default="current")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/zooaudit-bench-bias"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if a.mode == "_contextual":
        return _one_contextual(a.n[0], a.form, a.impl)
    if a.mode == "_features":
        return _one_features(a.n[0], a.k, a.dir, a.impl)
    if a.mode == "_write":
        return _write(a.n[0], a.k, a.dir)
    peaks = []
    for n in a.n:
        if a.mode == "features":
            a.dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            _child(["_write", "--n", str(n), "--k", str(a.k), "--dir", str(a.dir)])
            print(f"n={n}: store {_store(a.dir, n, a.k)} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
            out = _child(["_features", "--n", str(n), "--k", str(a.k), "--dir", str(a.dir), "--impl", a.impl])
        else:
            out = _child(["_contextual", "--n", str(n), "--form", a.form, "--impl", a.impl])
        rss, before, traced, wall, size, check = out
        peaks.append(float(rss))
        what = "components" if a.mode == "features" else "pairs"
        print(f"n={n}: peak RSS {rss} MiB (before the call {before} MiB, +{float(rss) - float(before):.0f} MiB "
              f"during it; the call's tracemalloc peak {traced} MiB); "
              f"{wall} s; {size} {what}; check {check}", flush=True)
        if a.mode == "features" and not a.keep:
            shutil.rmtree(_store(a.dir, n, a.k), ignore_errors=True)
    if len(peaks) > 1:
        print(f"ratio {peaks[-1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()
