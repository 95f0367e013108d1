"""Seed stability of a factorization and its quality curve over k (both refit the method).

Components are compared by Hungarian matching on their cosines (:func:`matched_cosine`).
Methods are looked up by name in :mod:`.factor_methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .blocks import compute_here
from .factor_methods import factor_method
from .factorization import Factorization

__all__ = ["CURVE_METRICS", "Stability", "k_sweep", "matched_cosine", "stability", "take_rows"]


def matched_cosine(C1: np.ndarray, C2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of two component sets by cosine.

    Args:
        C1: ``(k1, D)``; C2: ``(k2, D)``.
    Returns:
        ``(cos, match)``, each ``(min(k1, k2),)``: for row ``i`` of ``C1`` (all rows when
        ``k1 ≤ k2``), the matched row ``match[i]`` of ``C2`` and their cosine. The
        assignment maximises the summed (signed) cosine; zero rows have cosine 0.
    """
    from scipy.optimize import linear_sum_assignment

    def unit(c):
        c = np.asarray(c, np.float64)
        norm = np.linalg.norm(c, axis=1, keepdims=True)
        return np.divide(c, norm, out=np.zeros_like(c), where=norm > 0)

    cos = unit(C1) @ unit(C2).T
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols], cols


@dataclass
class Stability:
    """Agreement of one method's components across seeds.

    Attributes:
        seeds: the seeds, in order.
        pairwise: ``(S, S)`` mean Hungarian-matched cosine per pair of seeds (1 on the diagonal).
        per_component: ``(k,)`` for each component of the first seed's fit (or of the
            ``reference`` passed to :func:`stability`), its matched cosine averaged over the
            other seeds (all seeds for a reference).
        mean / min: mean and minimum of the off-diagonal ``pairwise`` entries.
        rows: how many rows of ``A`` the seed fits used (all, or the ``rows`` subset).
    """

    seeds: tuple
    pairwise: np.ndarray
    per_component: np.ndarray
    mean: float
    min: float
    rows: int = 0


def _fit(method: str, A, k: int, seed: int, name: str, options: dict) -> Factorization:
    return factor_method(method, name).function(A, k, random_state=seed, name=name, **options)


def take_rows(A, rows: np.ndarray | None):
    """Rows ``rows`` (sorted indices) of ``A`` as an in-memory NumPy array; ``A`` itself when ``None``."""
    if rows is None:
        return A
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= A.shape[0]:
        raise ZooauditError(f"rows must be a non-empty 1-D array of indices in [0, {A.shape[0]}); got "
                            f"{len(rows)} indices" + (f" from {rows.min()} to {rows.max()}" if len(rows) else "") + ".")
    return np.asarray(compute_here(A[rows]))


def stability(method: str, A, k: int, seeds: Sequence[int] = (0, 1, 2), *, name: str = "A",
              reference: np.ndarray | None = None, rows: np.ndarray | None = None, **options) -> Stability:
    """Fit ``method`` once per seed and compare the component sets pairwise.

    Components are matched one-to-one by the Hungarian algorithm on their cosines
    (``scipy.optimize.linear_sum_assignment``). For ``"nmf"`` the default ``init`` here is
    ``"random"`` (the deterministic NNDSVD start would make every seed agree by
    construction); pass ``init=`` to override. PCA is deterministic: stability 1.

    Args:
        A: ``(N, D)`` NumPy or Dask. ``seeds``: at least two distinct ints.
        reference: optional ``(k, D)`` components of a fit kept elsewhere (e.g. the stored
            one); ``per_component`` is then each reference row's matched cosine averaged
            over all the seeds' fits, so it lines up with the stored components.
        rows: optional sorted row indices: every seed is fitted on these rows only (one fixed
            subset shared by all seeds, so the seeds differ only in their start). A bounded
            subset makes the ``len(seeds)`` refits cost O(len(rows)) instead of O(N) each; the
            measure is then the agreement of fits on that subset (with ``reference``: how
            well the full-data components are recovered from it).
        options: passed to the method (``max_iter``, ``solver``, ``epochs`` ...).
    """
    seeds = tuple(int(s) for s in seeds)
    if len(set(seeds)) < 2:
        raise ZooauditError(f"stability of layer {name!r} needs at least two distinct seeds; got {seeds}.")
    if method == "nmf":
        options.setdefault("init", "random")
    A = take_rows(A, rows)
    comps = [_fit(method, A, k, s, name, options).components for s in seeds]
    n = len(seeds)
    pairwise = np.eye(n)
    per = np.zeros((n - 1, comps[0].shape[0]))
    for i, j in combinations(range(n), 2):
        cos, _ = matched_cosine(comps[i], comps[j])
        pairwise[i, j] = pairwise[j, i] = float(cos.mean())
        if i == 0:
            per[j - 1] = cos
    if reference is not None:
        per = np.stack([matched_cosine(reference, c)[0] for c in comps])
    off = pairwise[~np.eye(n, dtype=bool)]
    return Stability(seeds, pairwise, per.mean(axis=0), float(off.mean()), float(off.min()), int(A.shape[0]))


CURVE_METRICS = ("explained_variance", "reconstruction_mse", "mean_cosine", "l0", "sparsity", "dead_components")


def k_sweep(A, ks: Sequence[int], method: str = "pca", *, seeds: Sequence[int] | None = None,
            random_state: int = 0, name: str = "A", stability_rows: np.ndarray | None = None,
            **options) -> xr.Dataset:
    """Quality curve over the number of components.

    Fits ``method`` once per ``k`` (plus once per seed when ``seeds`` is given, adding
    ``stability_mean`` and ``stability_min``; those seed fits use only the rows
    ``stability_rows`` when given, see :func:`stability`).

    Returns:
        ``xr.Dataset`` with dim ``k`` and variables ``explained_variance``,
        ``reconstruction_mse``, ``mean_cosine``, ``l0``, ``sparsity``, ``dead_components``;
        attrs ``method`` and ``layer``.
    """
    ks = [int(k) for k in ks]
    if not ks or len(set(ks)) != len(ks):
        raise ZooauditError(f"k_sweep of layer {name!r} needs a non-empty list of distinct k; got {ks}.")
    rows = {m: [] for m in CURVE_METRICS}
    stab = {"stability_mean": [], "stability_min": []}
    sub = take_rows(A, stability_rows) if seeds is not None else None  # read once for every k
    for k in ks:
        f = _fit(method, A, k, random_state, name, dict(options))
        for m in CURVE_METRICS:
            rows[m].append(float(f.metrics[m]))
        if seeds is not None:
            s = stability(method, sub, k, seeds, name=name, **dict(options))
            stab["stability_mean"].append(s.mean)
            stab["stability_min"].append(s.min)
    data = {m: ("k", np.asarray(v)) for m, v in rows.items()}
    if seeds is not None:
        data.update({m: ("k", np.asarray(v)) for m, v in stab.items()})
    return xr.Dataset(data, coords={"k": ks}, attrs={"method": method, "layer": name})
