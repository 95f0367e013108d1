"""All-pairs linear CKA: zooaudit's one-pass joint moments vs pairwise textbook NumPy.

Both run in this process on the same data; the figure is the ratio of wall
times (machines are noisy: compare ratios, not seconds). Also checks that both
give the same matrix.

    .venv/bin/python benchmarks/bench_cka.py --n 20000
"""

from __future__ import annotations

import argparse
import time

import dask.array as da
import numpy as np

from zooaudit.analysis.similarity import similarity_matrix

WIDTHS = (64, 128, 256, 512, 1024, 64, 128, 256)


def textbook_pair(x: np.ndarray, y: np.ndarray) -> float:
    """The in-memory formula, one pair at a time: centre, then ‖XᵀY‖² / (‖XᵀX‖ ‖YᵀY‖)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(args.n, 32)).astype(np.float32)
    layers = {f"L{i}-{w}": np.maximum(base @ rng.normal(size=(32, w)).astype(np.float32)
                                      + rng.normal(size=(args.n, w)).astype(np.float32), 0) for i, w in enumerate(WIDTHS)}

    t = time.perf_counter()
    names = list(layers)
    ref = np.ones((len(names), len(names)))
    f64 = {k: v.astype(np.float64) for k, v in layers.items()}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            ref[i, j] = ref[j, i] = textbook_pair(f64[names[i]], f64[names[j]])
    t_ref = time.perf_counter() - t

    t = time.perf_counter()
    chunked = {k: da.from_array(v, chunks=(args.chunk, -1)) for k, v in layers.items()}
    got = similarity_matrix(chunked).values
    t_ours = time.perf_counter() - t

    err = float(np.abs(got - ref).max())
    print(f"N={args.n} layers={len(WIDTHS)} widths={WIDTHS}")
    print(f"pairwise NumPy (textbook, {len(names) * (len(names) - 1) // 2} pairs): {t_ref:.2f}s")
    print(f"zooaudit similarity_matrix (one streamed pass, chunks of {args.chunk}): {t_ours:.2f}s")
    print(f"speed-up: {t_ref / t_ours:.2f}x   max |difference|: {err:.2e}")


if __name__ == "__main__":
    main()
