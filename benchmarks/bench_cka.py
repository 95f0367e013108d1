"""All-pairs linear CKA: zooaudit's one streamed joint pass vs reference implementations.

Three measurements (machines are noisy and shared: compare ratios, not seconds; each
timing is the best of ``--repeat`` runs, after one untimed warm-up of both paths on
small data so one-time imports and thread-pool start-up count for neither):

``speed``   8 layers, widths (64, 128, 256, 512, 1024, 64, 128, 256), float32 activations
            in Dask chunks. Reference: the textbook in-memory formula one pair at a time
            in float64 (centre, then ‖XᵀY‖² / (‖XᵀX‖ ‖YᵀY‖)), on the same data. Also times
            zooaudit's debiased estimator (same single pass plus row-norm sums).
``memory``  writes the same layers to a Zarr store on disk chunk by chunk, then in a
            fresh subprocess per sample count reads them back lazily (``dask.array.from_zarr``,
            as the pipeline reads stored activations) and computes the biased and debiased
            matrices; reports each subprocess's peak RSS and the ratio between the largest
            and smallest N (memory independent of n ⇒ ratio ≈ 1).
``--device`` (speed only) also times the same all-pairs computation with the torch
            backend of the joint moments on that device (``cuda`` on a GPU session,
            ``cpu`` for CPU torch) and reports it as a ratio to the NumPy CPU path.
``gram``    zooaudit vs an n×n Gram-matrix implementation (HKH-centred Grams for the
            biased estimator, U-centred Grams for the debiased one, one pair at a time
            with the row layer's Gram kept), biased + debiased, all 28 pairs.

    .venv/bin/python benchmarks/bench_cka.py speed --n 100000     (default: speed)
    .venv/bin/python benchmarks/bench_cka.py speed --n 100000 --device cuda
    .venv/bin/python benchmarks/bench_cka.py memory --n 20000 200000
    .venv/bin/python benchmarks/bench_cka.py gram --n 20000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import dask.array as da
import numpy as np

from zooaudit.analysis.similarity import similarity_matrix

WIDTHS = (64, 128, 256, 512, 1024, 64, 128, 256)
LATENT = 32


def make_layers(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """ReLU layers of a shared 32-d latent plus noise, float32, in memory."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, LATENT)).astype(np.float32)
    return {f"L{i}-{w}": np.maximum(base @ rng.normal(size=(LATENT, w)).astype(np.float32)
                                    + rng.normal(size=(n, w)).astype(np.float32), 0) for i, w in enumerate(WIDTHS)}


def textbook_pair(x: np.ndarray, y: np.ndarray) -> float:
    """The in-memory formula, one pair at a time: centre, then ‖XᵀY‖² / (‖XᵀX‖ ‖YᵀY‖)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _best(fn, repeat: int):
    """(best wall time, last result) over ``repeat`` runs."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def _textbook_all_pairs(layers: dict[str, np.ndarray]) -> np.ndarray:
    names = list(layers)
    m = len(names)
    ref = np.ones((m, m))
    f64 = {k: v.astype(np.float64) for k, v in layers.items()}
    for i in range(m):
        for j in range(i + 1, m):
            ref[i, j] = ref[j, i] = textbook_pair(f64[names[i]], f64[names[j]])
    return ref


def _warm_up(chunk: int, device=None) -> None:
    small = make_layers(2048, seed=1)
    _textbook_all_pairs(small)
    chunked = {k: da.from_array(v, chunks=(chunk, -1)) for k, v in small.items()}
    for dev in (None, device) if device else (None,):
        similarity_matrix(chunked, device=dev)
        similarity_matrix(chunked, metric="linear_cka_debiased", device=dev)


def run_speed(args) -> None:
    layers = make_layers(args.n)
    m = len(layers)
    _warm_up(args.chunk, args.device)
    t_ref, ref = _best(lambda: _textbook_all_pairs(layers), args.repeat)
    chunked = {k: da.from_array(v, chunks=(args.chunk, -1)) for k, v in layers.items()}
    t_ours, got = _best(lambda: similarity_matrix(chunked).values, args.repeat)
    t_deb, deb = _best(lambda: similarity_matrix(chunked, metric="linear_cka_debiased").values, args.repeat)
    if args.device:
        t_dev, got_dev = _best(lambda: similarity_matrix(chunked, device=args.device).values, args.repeat)
        t_ddev, deb_dev = _best(lambda: similarity_matrix(chunked, metric="linear_cka_debiased",
                                                          device=args.device).values, args.repeat)

    err = float(np.abs(got - ref).max())
    print(f"N={args.n} layers={m} widths={WIDTHS} chunks of {args.chunk} rows, best of {args.repeat}")
    print(f"pairwise NumPy float64 (textbook, {m * (m - 1) // 2} pairs): {t_ref:.2f}s")
    print(f"zooaudit similarity_matrix linear_cka (one streamed pass): {t_ours:.2f}s")
    print(f"zooaudit similarity_matrix linear_cka_debiased (one streamed pass): {t_deb:.2f}s")
    print(f"speed-up biased: {t_ref / t_ours:.2f}x   debiased vs textbook biased: {t_ref / t_deb:.2f}x")
    print(f"max |difference| biased vs textbook: {err:.2e}   max |biased - debiased|: "
          f"{float(np.abs(got - deb).max()):.3f}")
    if args.device:
        print(f"zooaudit torch backend on {args.device}: linear_cka {t_dev:.2f}s, debiased {t_ddev:.2f}s")
        print(f"NumPy CPU path / torch {args.device}: biased {t_ours / t_dev:.2f}x, debiased {t_deb / t_ddev:.2f}x   "
              f"max |torch - NumPy|: biased {np.abs(got_dev - got).max():.1e}, "
              f"debiased {np.abs(deb_dev - deb).max():.1e}")


def write_zarr(path: str, n: int, chunk: int, seed: int = 0) -> None:
    """The ``make_layers`` construction written chunk by chunk into a Zarr v3 group, one
    array per layer, ``(n, width)`` float32 chunked ``(chunk, width)``; never all in RAM."""
    import zarr

    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=(LATENT, w)).astype(np.float32) for w in WIDTHS]
    root = zarr.open_group(path, mode="w", zarr_format=3)
    arrays = [root.create_array(f"L{i}-{w}", shape=(n, w), chunks=(chunk, w), dtype="float32")
              for i, w in enumerate(WIDTHS)]
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        base = rng.normal(size=(b, LATENT)).astype(np.float32)
        for arr, wts, w in zip(arrays, weights, WIDTHS, strict=True):
            arr[start:start + b] = np.maximum(base @ wts + rng.normal(size=(b, w)).astype(np.float32), 0)


def _child(path: str) -> None:
    import zarr

    root = zarr.open_group(path, mode="r")
    layers = {name: da.from_zarr(root[name]) for name in sorted(root.array_keys(), key=lambda k: int(k[1:].split("-")[0]))}
    n = next(iter(layers.values())).shape[0]
    t = time.perf_counter()
    b = similarity_matrix(layers).values
    d = similarity_matrix(layers, metric="linear_cka_debiased").values
    wall = time.perf_counter() - t
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "peak_rss_mib": peak_mib, "seconds": wall,
                      "cka_L0_L4": float(b[0, 4]), "debiased_L0_L4": float(d[0, 4])}))


def run_memory(args) -> None:
    import shutil
    import tempfile

    rows = []
    for n in args.n_list:
        folder = tempfile.mkdtemp(prefix="bench-cka-", dir=args.tmp)
        try:
            path = f"{folder}/acts.zarr"
            t = time.perf_counter()
            write_zarr(path, n, args.chunk)
            t_write = time.perf_counter() - t
            out = subprocess.run([sys.executable, __file__, "_child", "--path", path],
                                 capture_output=True, text=True, check=True).stdout
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"N={r['n']:>7}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.1f}s (biased + debiased, "
              f"read from Zarr; written in {t_write:.0f}s), CKA(L0, L4)={r['cka_L0_L4']:.4f}, "
              f"debiased={r['debiased_L0_L4']:.4f}")
    print(f"peak RSS ratio N={rows[-1]['n']} / N={rows[0]['n']}: {rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.3f}")


def _gram(x: np.ndarray, unbiased: bool) -> np.ndarray:
    x = x.astype(np.float64)
    n = x.shape[0]
    # Row blocks: NumPy's BLAS segfaults on a single x @ x.T with a 20k × 20k result
    # here (a symmetric-rank-k call); block GEMMs give the same Gram.
    K = np.empty((n, n))
    for s in range(0, n, 4096):
        np.matmul(x[s:s + 4096], x.T, out=K[s:s + 4096])
    if unbiased:                      # U-centring: ⟨K*, L*⟩ / (n(n−3)) is Song et al.'s HSIC₁
        np.fill_diagonal(K, 0.0)
        r = K.sum(0)
        K -= r[None, :] / (n - 2)
        K -= r[:, None] / (n - 2)
        K += r.sum() / ((n - 1) * (n - 2))
        np.fill_diagonal(K, 0.0)
    else:                             # H K H
        r = K.mean(0)
        K -= r[None, :]
        K -= r[:, None]
        K += r.mean()
    return K


def gram_all_pairs(layers: dict[str, np.ndarray], unbiased: bool) -> np.ndarray:
    names = list(layers)
    m = len(names)
    out = np.ones((m, m))
    norms = {}
    for i in range(m):
        Ki = _gram(layers[names[i]], unbiased)
        norms[i] = np.sqrt(np.vdot(Ki, Ki))
        for j in range(i + 1, m):
            Kj = _gram(layers[names[j]], unbiased)
            norms[j] = np.sqrt(np.vdot(Kj, Kj))
            out[i, j] = out[j, i] = np.vdot(Ki, Kj) / (norms[i] * norms[j])
            del Kj
        del Ki
    return out


def run_gram(args) -> None:
    layers = make_layers(args.n)
    _warm_up(args.chunk)
    t = time.perf_counter()
    ref_b = gram_all_pairs(layers, unbiased=False)
    ref_d = gram_all_pairs(layers, unbiased=True)
    t_ref = time.perf_counter() - t          # minutes: timed once
    chunked = {k: da.from_array(v, chunks=(args.chunk, -1)) for k, v in layers.items()}
    t_ours, (b, d) = _best(lambda: (similarity_matrix(chunked).values,
                                    similarity_matrix(chunked, metric="linear_cka_debiased").values), args.repeat)
    print(f"N={args.n} layers={len(layers)} widths={WIDTHS}")
    print(f"n×n Gram implementation (biased + debiased, 28 pairs each): {t_ref:.1f}s")
    print(f"zooaudit similarity_matrix (biased + debiased, two streamed passes): {t_ours:.2f}s")
    print(f"speed-up: {t_ref / t_ours:.1f}x   max |diff| biased {np.abs(b - ref_b).max():.2e}, "
          f"debiased {np.abs(d - ref_d).max():.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="speed", choices=["speed", "memory", "gram", "_child"])
    ap.add_argument("--n", type=int, nargs="+", help="sample count(s); memory takes two or more "
                    "(default: speed 100000, gram 20000, memory 20000 200000)")
    ap.add_argument("--chunk", type=int, default=4096, help="rows per Dask / Zarr chunk")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per implementation (best is reported)")
    ap.add_argument("--device", default=None, help="speed: also time the torch backend of the joint moments on "
                    "this torch device (cuda, cuda:1, cpu) as a ratio to the NumPy CPU path")
    ap.add_argument("--tmp", default=None, help="folder for the memory benchmark's Zarr stores (default: $TMPDIR)")
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    defaults = {"speed": [100_000], "gram": [20_000], "memory": [20_000, 200_000], "_child": [0]}
    args.n_list = args.n or defaults[args.what]
    args.n = args.n_list[0]
    {"speed": run_speed, "memory": run_memory, "gram": run_gram,
     "_child": lambda a: _child(a.path)}[args.what](args)


if __name__ == "__main__":
    main()
