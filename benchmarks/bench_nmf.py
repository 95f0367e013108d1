"""NMF: zooaudit vs scikit-learn's ``NMF(solver="cd")``, and the out-of-core memory check.

Part 1 (in this process, same data, same start, same iteration budget): a planted
non-negative float32 matrix ``N × 512`` with k = 16. Both solvers start from the same
NNDSVDa factors (scikit-learn's ``_initialize_nmf``) and run exactly ``--iters``
iterations (``tol=0``), ``--repeats`` alternating pairs per thread budget in ``--threads``
(BLAS pools limited with threadpoolctl, torch with ``set_num_threads``); per budget the
minimum walls and the back-to-back pair ratios (median, max). zooaudit's wall includes its
quality pass (explained variance, cosine, L0, dead components) and the input scan (min,
finiteness) that scikit-learn does not do; scikit-learn's includes its final ``‖X − WH‖``. Reports wall times and ``‖X − WH‖_F``
(computed the same way for both), and their ratios; then, at the first thread budget,
the default calls end to end (each library's own NNDSVDa start and default tolerance)
and the out-of-core minibatch solver on the same data as a Dask array.

Part 2 (``--rss``): peak RSS of a child process per N running the minibatch solver on
a Dask array generated chunk by chunk (never all in RAM), codes returned lazily.

    .venv/bin/python benchmarks/bench_nmf.py --n 200000 --iters 100 --threads 1 2
    .venv/bin/python benchmarks/bench_nmf.py --rss 100000 1000000 --epochs 2
    .venv/bin/python benchmarks/bench_nmf.py --stability 20000 --n 100000 --iters 200 --threads 1 [--k 24]

Part 3 (``--stability ROWS``): seed stability (seeds 0, 1, 2) refitted on all rows vs on a
fixed random subset of ROWS rows (the factorize stage's ``stability_rows``), wall time and
the stability values of both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import dask.array as da
import numpy as np

K, D, CHUNK = 16, 512, 8192


def make_data(n: int, d: int = D, k: int = K, seed: int = 0, chunk: int = CHUNK) -> da.Array:
    """Planted ``W H + noise`` (float32, ≥ 0), generated per chunk from (seed, chunk index)."""
    H = (np.random.default_rng(seed).random((k, d)) ** 3).astype(np.float32)

    def block(block_info=None):
        (start, stop), _ = block_info[None]["array-location"]
        rng = np.random.default_rng([seed, start])
        W = rng.random((stop - start, k), dtype=np.float32) * (rng.random((stop - start, k)) < 0.3)
        return W @ H + 0.01 * rng.random((stop - start, d), dtype=np.float32)

    chunks = (tuple(min(chunk, n - s) for s in range(0, n, chunk)), (d,))
    return da.map_blocks(block, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0), np.float32))


def frobenius(X: np.ndarray, W: np.ndarray, H: np.ndarray) -> float:
    """``‖X − W H‖_F`` in float64, in row blocks."""
    total = 0.0
    for s in range(0, X.shape[0], CHUNK):
        r = X[s:s + CHUNK].astype(np.float64) - W[s:s + CHUNK].astype(np.float64) @ H.astype(np.float64)
        total += float(np.einsum("ij,ij->", r, r))
    return float(np.sqrt(total))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def zooaudit_parts(X: np.ndarray, fit) -> tuple[float, float, float]:
    """zooaudit-only work inside its wall, each timed alone (on the fitted factors of ``fit``): the
    input scan (non-negativity, finiteness, float64 Σ‖x − x̄‖²), the column-major copy of X the
    HALS loop makes (``nmf.data_products``) and the quality pass from the factors."""
    import torch

    from zooaudit.analysis.nmf import cpu_threads, scan
    from zooaudit.analysis.quality import finish_factors

    Xt = torch.from_numpy(X)
    sc, t_scan = timed(lambda: scan(X, "A", "NMF", None))
    _, t_copy = timed(lambda: Xt.T.contiguous())
    Wt = torch.from_numpy(np.ascontiguousarray(fit.codes.T, np.float32))
    Ht = torch.from_numpy(fit.components.astype(np.float32))
    with cpu_threads(Xt.device, 0):  # as nmf() runs it
        _, t_quality = timed(lambda: finish_factors("nmf", Xt, Wt, Ht, rms=float(np.sqrt(sc.ss_centred / sc.n)),
                                                    extra={}, params={}, ss_total=sc.ss_centred))
    return t_scan, t_copy, t_quality


def in_memory(n: int, iters: int, epochs: int, threads: list[int], repeats: int = 1) -> None:
    import threadpoolctl
    import torch
    from sklearn.decomposition import NMF
    from sklearn.decomposition._nmf import _initialize_nmf

    from zooaudit.analysis.factorize import nmf

    X = make_data(n).compute()
    print(f"data: {n} x {D} float32, k = {K}, {iters} iterations")
    (W0, H0), t_init = timed(lambda: _initialize_nmf(X, K, init="nndsvda", random_state=0))
    print(f"shared NNDSVDa start (scikit-learn): {t_init:.1f} s")

    def sk(**kw):
        model = NMF(K, solver="cd", random_state=0, **kw)
        init = kw.get("init")
        W = model.fit_transform(X, W=W0.copy(), H=H0.copy()) if init == "custom" else model.fit_transform(X)
        return W, model.components_, model.n_iter_

    rows = []  # (threads, label, wall, error, iterations, index of the reference row)
    pairs = {}  # threads -> [(scikit-learn wall, zooaudit wall)] of back-to-back repeats
    parts = {}  # threads -> (input scan, layout copy, quality pass) seconds
    for nt in threads:  # equal thread budgets: BLAS pools via threadpoolctl, torch's own
        torch.set_num_threads(nt)
        with threadpoolctl.threadpool_limits(nt):
            for _ in range(repeats):  # alternating, so both see the same background load
                ref = len(rows)
                (W, H, it), t = timed(lambda: sk(init="custom", max_iter=iters, tol=0))
                rows.append((nt, "scikit-learn cd, same start", t, frobenius(X, W, H), it, ref))
                f, t = timed(lambda: nmf(X, K, init=(W0, H0), solver="hals", max_iter=iters, tol=0))
                rows.append((nt, "zooaudit hals (torch), same start", t, frobenius(X, f.codes, f.components),
                             f.metrics["n_iter"], ref))
                pairs.setdefault(nt, []).append((rows[ref][2], t))
            parts[nt] = zooaudit_parts(X, f)
    nt = threads[0]
    torch.set_num_threads(nt)
    with threadpoolctl.threadpool_limits(nt):
        ref = len(rows)
        (W, H, it), t = timed(lambda: sk(init="nndsvda", max_iter=iters))
        rows.append((nt, "scikit-learn default (own nndsvda, tol 1e-4)", t, frobenius(X, W, H), it, ref))
        f, t = timed(lambda: nmf(X, K, max_iter=iters))
        rows.append((nt, "zooaudit default (own nndsvda, tol 1e-4)", t, frobenius(X, f.codes, f.components),
                     f.metrics["n_iter"], ref))
        f, t = timed(lambda: nmf(da.from_array(X, chunks=(CHUNK, -1)), K, solver="minibatch", max_epochs=epochs))
        rows.append((nt, f"zooaudit minibatch, out of core ({epochs} epochs max)", t,
                     frobenius(X, f.codes, f.components), f.metrics["n_iter"], ref))
    print(f"{'thr':>3s} {'solver':52s} {'wall s':>8s} {'‖X−WH‖':>10s} {'iters':>6s} {'time/ref':>9s} {'err/ref':>8s}")
    for nt, label, t, err, it, ref in rows:
        print(f"{nt:3d} {label:52s} {t:8.2f} {err:10.4f} {it:6d} {t / rows[ref][2]:9.3f} {err / rows[ref][3]:8.5f}")
    for nt, p in pairs.items():
        sk_t, za_t = np.array(p).T
        print(f"{nt} thread(s), {len(p)} repeats: min wall scikit-learn {sk_t.min():.2f} s, zooaudit {za_t.min():.2f} s "
              f"(ratio of minima {za_t.min() / sk_t.min():.3f}); pair ratios {np.round(za_t / sk_t, 3).tolist()}, "
              f"median {np.median(za_t / sk_t):.3f}, max {np.max(za_t / sk_t):.3f}")
        t_scan, t_copy, t_quality = parts[nt]
        print(f"  inside zooaudit's wall (timed alone): input scan {t_scan:.2f} s, column-major copy {t_copy:.2f} s, "
              f"quality pass {t_quality:.2f} s = {100 * t_scan / za_t.min():.1f} / {100 * t_copy / za_t.min():.1f} / "
              f"{100 * t_quality / za_t.min():.1f} % of its min wall")


def child(n: int, epochs: int) -> None:
    from zooaudit.analysis.factorize import nmf

    f, t = timed(lambda: nmf(make_data(n), K, solver="minibatch", max_epochs=epochs, codes="dask"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "wall_s": t, "peak_rss_mb": peak, "ev": f.metrics["explained_variance"],
                      "epochs": f.metrics["n_iter"]}))


def rss(ns: list[int], epochs: int) -> None:
    results = []
    for n in ns:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--epochs", str(epochs)],
                             check=True, capture_output=True, text=True, env={**os.environ})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"N={r['n']:>9d}  peak RSS {r['peak_rss_mb']:8.1f} MiB  wall {r['wall_s']:7.1f} s  "
              f"EV {r['ev']:.5f}  epochs {r['epochs']}")
    print(f"peak RSS ratio N={ns[-1]} / N={ns[0]}: {results[-1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.3f}")


def stability_cost(n: int, iters: int, rows: int, threads: int, k: int = K) -> None:
    """Seed stability (seeds 0, 1, 2; random starts) refitted on all N rows vs on a fixed random
    subset of ``rows`` rows (FactorizeSpec.stability_rows), both against the primary fit on all rows.
    ``k`` above the planted 16 makes some components unstable (a measurement that is not all 1s)."""
    import torch

    from zooaudit.analysis.factorize import nmf, stability
    from zooaudit.stages.common import random_subset

    torch.set_num_threads(threads)
    X = make_data(n).compute()
    primary, t_fit = timed(lambda: nmf(X, k, max_iter=iters))
    print(f"data: {n} x {D} float32 (planted rank {K}), k = {k}, max_iter {iters}, {threads} thread(s); primary fit {t_fit:.1f} s, "
          f"EV {primary.metrics['explained_variance']:.4f}")
    subset = random_subset(n, rows, 0)
    out = {}
    for label, idx in (("all rows", None), (f"subset of {rows}", subset)):
        s, t = timed(lambda idx=idx: stability("nmf", X, k, (0, 1, 2), reference=primary.components, rows=idx,
                                               max_iter=iters))
        out[label] = (s, t)
        print(f"{label:18s} rows {s.rows:>8d}  wall {t:7.1f} s  pairwise mean {s.mean:.4f} min {s.min:.4f}  "
              f"vs primary: mean {s.per_component.mean():.4f} min {s.per_component.min():.4f}")
    (_, t_full), (_, t_sub) = out.values()
    print(f"stability time subset / all: {t_sub / t_full:.3f}; whole factorization (primary + stability): "
          f"{(t_fit + t_sub) / (t_fit + t_full):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1, help="alternating scikit-learn / zooaudit pairs per thread budget")
    ap.add_argument("--rss", type=int, nargs="*")
    ap.add_argument("--child", type=int)
    ap.add_argument("--stability", type=int, metavar="ROWS", help="seed-stability cost: all rows vs ROWS")
    ap.add_argument("--k", type=int, default=K, help="components of the --stability fits")
    args = ap.parse_args()
    if args.stability:
        stability_cost(args.n, args.iters, args.stability, args.threads[0], args.k)
    elif args.child:
        child(args.child, args.epochs)
    elif args.rss:
        rss(args.rss, args.epochs)
    else:
        in_memory(args.n, args.iters, args.epochs, args.threads, args.repeats)


if __name__ == "__main__":
    main()
