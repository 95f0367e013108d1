"""PCA of activations stored in the store (Icechunk/Zarr): passes over the data and peak RSS.

For each N a child process (fresh RSS accounting) writes an ``N × 512`` float32 array
into an Icechunk repository of a zooaudit store chunk by chunk (never all in RAM), then,
in a second child, opens it lazily with xarray and runs ``pca(A, k=16)`` with lazy codes.
A counter wrapped around the chunk reads reports how many passes each call took:
``codes="none"`` is the fit alone (the covariance solver reads every chunk once; explained
variance and MSE come from the spectrum), ``codes="dask"`` adds the streamed quality pass
(cosine, L0, dead components need the per-sample codes). Peak RSS of the PCA child is compared across N.
At the smallest N the components are checked against an in-memory reference (NumPy
``eigh`` of the centred covariance) and timed against scikit-learn's ``PCA``.

    .venv/bin/python benchmarks/bench_pca.py --n 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

D, K, CHUNK = 512, 16, 8192
ROOT = os.environ.get("BENCH_PCA_DIR", "/tmp/zooaudit-bench-pca")


def _rows(seed: int, start: int, stop: int) -> np.ndarray:
    """Deterministic low-rank-plus-noise rows, offset from zero (as post-ReLU features are)."""
    basis = np.random.default_rng(seed).normal(size=(32, D)).astype(np.float32)
    rng = np.random.default_rng([seed, start])
    z = rng.normal(size=(stop - start, 32)).astype(np.float32) * np.linspace(3, 0.1, 32, dtype=np.float32)
    return z @ basis + 5.0 + 0.1 * rng.normal(size=(stop - start, D)).astype(np.float32)


def write(n: int) -> None:
    import zarr

    from zooaudit.store import Store

    shutil.rmtree(f"{ROOT}/{n}", ignore_errors=True)
    store = Store.open(f"file://{ROOT}/{n}")
    repo = store.model_repo("bench")
    session = repo.writable_session("main")
    arr = zarr.create_array(session.store, name="acts", shape=(n, D), chunks=(CHUNK, D), dtype="float32",
                            dimension_names=("sample", "unit"))
    for s in range(0, n, CHUNK):
        arr[s:min(s + CHUNK, n)] = _rows(0, s, min(s + CHUNK, n))
    print(json.dumps({"snapshot": session.commit("bench data")}))


def run(n: int, snapshot: str) -> None:
    import xarray as xr

    from zooaudit.analysis.factorize import pca
    from zooaudit.store import Store

    repo = Store.open(f"file://{ROOT}/{n}").model_repo("bench")
    A = xr.open_zarr(repo.readonly_session(snapshot_id=snapshot).store, consolidated=False)["acts"].data
    reads = []

    def counted(block, block_info=None):
        reads.append(block_info[0]["chunk-location"][0] if block_info else None)
        return block

    A = A.map_blocks(counted, dtype=A.dtype)
    n_chunks = A.numblocks[0]
    t = time.perf_counter()
    one = pca(A, K, solver="covariance", codes="none")  # the fit alone: one pass
    out = {"n": n, "one_pass_wall_s": time.perf_counter() - t,
           "one_pass_passes": len([r for r in reads if r is not None]) / n_chunks,
           "one_pass_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "one_pass_explained_variance": one.metrics["explained_variance"]}
    reads.clear()
    t = time.perf_counter()
    f = pca(A, K, solver="covariance", codes="dask")  # + the streamed quality pass (cosine, L0, ...)
    wall = time.perf_counter() - t
    out.update({"wall_s": wall, "passes": len([r for r in reads if r is not None]) / n_chunks,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "explained_variance": f.metrics["explained_variance"]})
    if n <= 200_000:  # in-memory references at the small N
        from sklearn.decomposition import PCA

        X = A.compute().astype(np.float64)
        Xc = X - X.mean(0)
        _, vecs = np.linalg.eigh(Xc.T @ Xc)
        ref = vecs[:, ::-1][:, :K].T
        out["max_component_error"] = float(np.max(1 - np.abs(np.sum(ref * f.components, axis=1))))
        X32 = X.astype(np.float32)
        t = time.perf_counter()
        PCA(K, svd_solver="covariance_eigh").fit(X32)
        out["sklearn_in_memory_s"] = time.perf_counter() - t
    print(json.dumps(out))


def child(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--write", type=int)
    ap.add_argument("--run", nargs=2)
    args = ap.parse_args()
    if args.write:
        return write(args.write)
    if args.run:
        return run(int(args.run[0]), args.run[1])
    results = []
    for n in args.n:
        t = time.perf_counter()
        snap = child(["--write", str(n)])["snapshot"]
        print(f"N={n}: wrote {n} x {D} float32 to the store in {time.perf_counter() - t:.1f} s", flush=True)
        r = child(["--run", str(n), snap])
        results.append(r)
        extra = ""
        if "max_component_error" in r:
            extra = (f"  max(1-|cos|) vs in-memory eigh {r['max_component_error']:.2e}  "
                     f"sklearn PCA in memory {r['sklearn_in_memory_s']:.1f} s")
        print(f"N={n:>9d}  fit only (codes='none'): passes {r['one_pass_passes']:.2f}  peak RSS "
              f"{r['one_pass_peak_rss_mb']:8.1f} MiB  wall {r['one_pass_wall_s']:7.1f} s  EV "
              f"{r['one_pass_explained_variance']:.5f}", flush=True)
        print(f"N={n:>9d}  with quality pass:  passes {r['passes']:.2f}  peak RSS {r['peak_rss_mb']:8.1f} MiB  wall {r['wall_s']:7.1f} s"
              f"  EV {r['explained_variance']:.5f}{extra}", flush=True)
        shutil.rmtree(f"{ROOT}/{n}", ignore_errors=True)
    if len(results) > 1:
        for key, what in (("one_pass_peak_rss_mb", "fit only"), ("peak_rss_mb", "with quality pass")):
            print(f"peak RSS ratio N={results[-1]['n']} / N={results[0]['n']} ({what}): "
                  f"{results[-1][key] / results[0][key]:.3f}")


if __name__ == "__main__":
    main()
