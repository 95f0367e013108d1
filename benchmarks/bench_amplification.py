"""Bias amplification: the vectorised bootstrap (multinomial counts over distinct rows) against a
loop over resamples that recomputes the measures on resampled rows, in the same process.

    .venv/bin/python benchmarks/bench_amplification.py --n 20000 --boot 200
    .venv/bin/python benchmarks/bench_amplification.py memory --n 100000 1000000
    .venv/bin/python benchmarks/bench_amplification.py memory --n 100000 1000000 --multi-hot [--whole-sort]

Both paths compute the six measures with the same code (``bias_amplification``); the loop calls
it with ``n_boot=0`` on each resample. The percentile intervals of the two agree to Monte Carlo
error (different resamples), which the script prints. ``memory``: peak RSS of a fresh subprocess
per N (``ru_maxrss``) for the whole call (bootstrap + permutations). ``--multi-hot``: the task labels and
predictions as ``(n, 10)`` uint8 label sets (``multi_label=True``; each sample's class plus a second label
in 30% of the samples); ``--whole-sort``: with the whole-matrix ``np.unique(axis=0)`` of the label rows
(the code before the packed, blocked patterns) for the before figure."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import numpy as np


def data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    G, T = 2, 10
    a = rng.integers(0, G, n)
    t = np.where(rng.random(n) < 0.6, (a * 5 + rng.integers(0, 5, n)) % T, rng.integers(0, T, n))
    p = np.where(rng.random(n) < 0.3, (a * 5 + rng.integers(0, 5, n)) % T, t)
    return a, t, p


def speed(n: int, boot: int) -> None:
    from zooaudit.analysis.amplification import bias_amplification

    a, t, p = data(n)
    kw = {"n_permutations": 0, "max_order": 1}
    bias_amplification(a, t, a, t, p, n_boot=0, **kw)   # warm-up
    t0 = time.perf_counter()
    base = bias_amplification(a, t, a, t, p, n_boot=0, **kw)
    t_point = time.perf_counter() - t0
    t0 = time.perf_counter()
    vec = bias_amplification(a, t, a, t, p, n_boot=boot, **kw)
    t_vec = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    vals = []
    for _ in range(boot):
        i = rng.integers(0, n, n)
        vals.append(bias_amplification(a, t, a[i], t[i], p[i], n_boot=0, **kw)["value"].values)
    t_loop = time.perf_counter() - t0
    loop_ci = np.nanquantile(np.array(vals), [0.025, 0.975], axis=0).T
    diff = np.nanmax(np.abs(loop_ci - vec["value_ci"].values))
    print(f"n={n} boot={boot}: point estimate {t_point:.3f} s; vectorised bootstrap {t_vec:.3f} s; "
          f"loop over resamples {t_loop:.3f} s; speed-up {t_loop / t_vec:.1f}x; "
          f"max |CI difference| {diff:.4f} (Monte Carlo); values {np.round(base['value'].values, 4).tolist()}")


def multi_hot_data(n: int, seed: int = 0):
    a, t, p = data(n, seed)
    rng = np.random.default_rng(seed + 1)
    T = np.zeros((n, 10), np.uint8)
    T[np.arange(n), t] = 1
    extra = rng.random(n) < 0.3
    T[np.flatnonzero(extra), rng.integers(0, 10, int(extra.sum()))] = 1
    P = np.zeros((n, 10), np.uint8)
    P[np.arange(n), p] = 1
    P[np.flatnonzero(extra), (t[extra] + 1) % 10] = 1
    return a, T, P


def _one(n: int, multi: bool = False, whole_sort: bool = False) -> None:
    import zooaudit.analysis.amplification as amp

    if whole_sort:
        amp._PACKED_LABELS = 0
    a, t, p = multi_hot_data(n) if multi else data(n)
    t0 = time.perf_counter()
    amp.bias_amplification(a, t, a, t, p, n_boot=200, n_permutations=200, max_order=1, multi_label=multi)
    print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} {time.perf_counter() - t0:.1f}")


def memory(ns: list[int], flags: list[str]) -> None:
    out = []
    for n in ns:
        res = subprocess.run([sys.executable, __file__, "_one", "--n", str(n), *flags], capture_output=True,
                             text=True, check=True)
        mib, sec = res.stdout.split()
        out.append(float(mib))
        print(f"n={n}: peak RSS {mib} MiB ({sec} s)")
    print(f"ratio {out[-1] / out[0]:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="speed", choices=["speed", "memory", "_one"])
    ap.add_argument("--n", type=int, nargs="+", default=[20000])
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--multi-hot", action="store_true")
    ap.add_argument("--whole-sort", action="store_true")
    args = ap.parse_args()
    flags = [f for f, on in (("--multi-hot", args.multi_hot), ("--whole-sort", args.whole_sort)) if on]
    if args.mode == "speed":
        speed(args.n[0], args.boot)
    elif args.mode == "memory":
        memory(args.n, flags)
    else:
        _one(args.n[0], args.multi_hot, args.whole_sort)
