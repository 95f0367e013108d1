"""Representation-level bias: linear-probe leakage with controls, output leakage, LEACE erasure.

Probe leakage alone means little — a group attribute is often linearly decodable
from the activations of biased and unbiased models alike — so every number here
comes with a reference computed by the same probe on the same folds:

- ``chance``: the majority-class rate of the attribute;
- ``shuffled_labels``: the probe refit on a permutation of the attribute (≈ chance;
  above chance means the probe overfits);
- any other arrays with the same rows (the inputs, a random-init network's
  activations), passed as ``controls``.

Conventions: the probe is ``StandardScaler → LogisticRegression(C)`` scored by
accuracy under ``StratifiedKFold(cv, shuffle=True, random_state)``; the same folds
serve every array of one call, so the numbers compare side by side. Inputs are
materialized in memory (Dask arrays are computed) as float64.

Erasure uses LEACE (Belrose et al. 2023): the least-squares affine map that makes
the cross-covariance between the erased features and the one-hot attribute zero,
which provably leaves no linear classifier better than a constant on the data it was
fit on. :func:`erasure_diagnostic` fits the eraser on each training fold only, so its
"after" numbers are out of sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .fairness import label_column

BACKENDS = ("auto", "concept-erasure", "numpy")


@dataclass
class ProbeScore:
    """Cross-validated probe result: mean accuracy, per-fold ``(cv,)`` accuracies, majority rate."""

    accuracy: float
    fold_accuracy: np.ndarray
    chance: float
    n_samples: int
    n_classes: int


def _features(X, what: str, n: int | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ZooauditError(f"{what} must be an (n_samples, n_features) array; got shape {X.shape}.")
    if n is not None and X.shape[0] != n:
        raise ZooauditError(f"{what} has {X.shape[0]} rows but the attribute has {n} labels: rows must be the same "
                            f"samples in the same order.")
    if not np.all(np.isfinite(X)):
        raise ZooauditError(f"{what} contains NaN or infinite values; probes need finite features.")
    return X


def _labels(a, what: str, n: int | None = None) -> np.ndarray:
    """Per-sample labels (:func:`.fairness.label_column`) as codes ``0..n_classes-1``."""
    return np.unique(label_column(a, what, n), return_inverse=True)[1].ravel()


def _majority(codes: np.ndarray) -> float:
    return float(np.bincount(codes).max() / codes.size)


def make_folds(strata, *, cv: int = 5, random_state: int = 0,
               what: str = "attribute class") -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled ``(train, test)`` index pairs; every stratum needs ≥ ``cv`` samples."""
    from sklearn.model_selection import StratifiedKFold

    codes = _labels(strata, "attribute")
    counts = np.bincount(codes)
    if not isinstance(cv, (int, np.integer)) or cv < 2:
        raise ZooauditError(f"cv must be an integer ≥ 2; got {cv!r}.")
    if counts.size < 2:
        raise ZooauditError("the attribute has a single value: there is nothing to probe for.")
    if counts.min() < cv:
        raise ZooauditError(f"the smallest {what} has {counts.min()} samples, fewer than cv={cv} folds; "
                            f"lower cv or drop the rare class.")
    return list(StratifiedKFold(cv, shuffle=True, random_state=random_state).split(np.zeros(codes.size), codes))


def _fit_score(X, codes, train, test, C: float, max_iter: int):
    """Standardise on the training rows, fit L2 logistic regression, score the test rows.

    Wide features (d > training rows): the penalised weights lie in the span of the
    standardised training rows (representer theorem; the intercept is not penalised), so
    the model is fitted on the rows' coordinates in an orthonormal basis V ``(d, r)`` of
    that span — the same optimum and predictions, with L-BFGS on r ≤ n instead of d
    parameters (a 16 384-wide map: 1.5 s per fit before).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X[train])
    Xtr, Xte = scaler.transform(X[train]), scaler.transform(X[test])
    if Xtr.shape[1] > Xtr.shape[0]:
        _, sv, vt = np.linalg.svd(Xtr, full_matrices=False)
        basis = vt[sv > sv.max(initial=0.0) * max(Xtr.shape) * np.finfo(np.float64).eps].T
        Xtr, Xte = Xtr @ basis, Xte @ basis
    model = LogisticRegression(C=C, max_iter=max_iter).fit(Xtr, codes[train])
    pred = model.predict(Xte)
    return float(np.mean(pred == codes[test])), pred


def linear_probe(X, attribute, *, cv: int = 5, random_state: int = 0, C: float = 1.0, max_iter: int = 1000,
                 folds=None) -> ProbeScore:
    """Cross-validated logistic-regression accuracy of ``attribute`` from ``X``.

    Args:
        X: ``(n, d)`` features (activations, inputs, random-init activations...).
        attribute: ``(n,)`` labels of the group attribute (≥ 2 classes).
        folds: optional precomputed ``(train, test)`` pairs (to share folds across arrays).
    """
    codes = _labels(attribute, "attribute")
    X = _features(X, "X", codes.size)
    folds = folds if folds is not None else make_folds(codes, cv=cv, random_state=random_state)
    accs = np.array([_fit_score(X, codes, tr, te, C, max_iter)[0] for tr, te in folds])
    return ProbeScore(float(accs.mean()), accs, _majority(codes), codes.size, int(codes.max() + 1))


def probe_leakage(acts, attribute, *, cv: int = 5, random_state: int = 0, controls: dict | None = None,
                  C: float = 1.0, max_iter: int = 1000) -> xr.Dataset:
    """Probe accuracy of ``attribute`` from ``acts``, beside its controls, on shared folds.

    Args:
        acts: ``(n, d)`` activations.
        attribute: ``(n,)`` group labels.
        controls: ``{name: (n, d_name) array}`` probed the same way (e.g. ``"input"``,
            ``"random_init"``).
    Returns:
        Dataset over dim ``probe`` = ["activations", "shuffled_labels", *controls] (and
        ``fold``): ``accuracy``, ``accuracy_std``, ``fold_accuracy`` (probe, fold),
        ``excess`` = accuracy − chance; attrs ``chance`` (majority rate), ``cv``, ...
    """
    codes = _labels(attribute, "attribute")
    arrays = {"activations": _features(acts, "acts", codes.size)}
    folds = make_folds(codes, cv=cv, random_state=random_state)
    shuffled = np.random.default_rng(random_state).permutation(codes)
    results = {"activations": linear_probe(arrays["activations"], codes, folds=folds, C=C, max_iter=max_iter),
               "shuffled_labels": linear_probe(arrays["activations"], shuffled, folds=folds, C=C,
                                               max_iter=max_iter)}
    for name, X in (controls or {}).items():
        if name in results:
            raise ZooauditError(f"control name {name!r} is reserved; use another (e.g. 'input', 'random_init').")
        results[name] = linear_probe(_features(X, f"control {name!r}", codes.size), codes, folds=folds, C=C,
                                     max_iter=max_iter)
    fold_acc = np.stack([r.fold_accuracy for r in results.values()])
    chance = _majority(codes)
    return xr.Dataset(
        {"accuracy": ("probe", fold_acc.mean(1)), "accuracy_std": ("probe", fold_acc.std(1, ddof=1)),
         "fold_accuracy": (("probe", "fold"), fold_acc), "excess": ("probe", fold_acc.mean(1) - chance)},
        coords={"probe": list(results), "fold": np.arange(len(folds))},
        attrs={"chance": chance, "cv": len(folds), "random_state": random_state, "n_samples": int(codes.size),
               "n_classes": int(codes.max() + 1), "probe": f"StandardScaler + LogisticRegression(C={C})"})


def output_leakage_within_label(logits, y_true, attribute, *, cv: int = 5, random_state: int = 0,
                                C: float = 1.0, max_iter: int = 1000) -> xr.Dataset:
    """Leakage of ``attribute`` from model outputs within each true label (Wang et al. 2019).

    Conditioning on the label removes the part of the leakage explained by a
    label–attribute correlation in the data: what remains is attribute information
    the model put in its outputs beyond the task.

    Args:
        logits: ``(n, k)`` model outputs (logits or probabilities).
        y_true: ``(n,)`` true labels; attribute: ``(n,)`` group labels.
        cv: folds per label, lowered to the smallest attribute class in that label.
    Returns:
        Dataset over dim ``label``: ``accuracy`` (NaN where the label has < 2 samples of
        some attribute class or a single class), ``chance`` (majority rate within the
        label), ``excess``, ``count``; attrs ``leakage`` and ``chance`` (count-weighted
        over labels with a score) and ``excess``.
    """
    a_codes = _labels(attribute, "attribute")
    n = a_codes.size
    _labels(y_true, "y_true", n)
    X = _features(logits, "logits", n)
    labels, y_codes = np.unique(np.asarray(y_true), return_inverse=True)
    acc, chance, count = np.full(len(labels), np.nan), np.zeros(len(labels)), np.zeros(len(labels), np.int64)
    for j in range(len(labels)):
        idx = np.flatnonzero(y_codes.ravel() == j)
        sub = np.unique(a_codes[idx], return_inverse=True)[1].ravel()
        count[j], chance[j] = idx.size, _majority(sub)
        k = int(np.bincount(sub).min()) if sub.max() > 0 else 0
        if k >= 2:  # a classifier needs two classes, and each fold one sample of each
            folds = make_folds(sub, cv=min(cv, k), random_state=random_state)
            acc[j] = linear_probe(X[idx], sub, folds=folds, C=C, max_iter=max_iter).accuracy
    ok = np.isfinite(acc)
    w = count[ok] / count[ok].sum() if ok.any() else np.array([])
    leak = float(np.sum(w * acc[ok])) if ok.any() else np.nan
    base = float(np.sum(w * chance[ok])) if ok.any() else np.nan
    return xr.Dataset({"accuracy": ("label", acc), "chance": ("label", chance), "excess": ("label", acc - chance),
                       "count": ("label", count)},
                      coords={"label": [str(v) for v in labels]},
                      attrs={"leakage": leak, "chance": base, "excess": leak - base, "cv": cv,
                             "random_state": random_state})


# -- LEACE erasure -----------------------------------------------------------------------


def _one_hot(codes: np.ndarray) -> np.ndarray:
    return np.eye(codes.max() + 1)[codes]


def _leace_numpy(X: np.ndarray, Z: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Exact LEACE from the moments of ``X (n, d)`` and ``Z (n, k)``: x ↦ x − W⁺UUᵀW(x − μ).

    W = Σ_xx^{-1/2} (pseudo-inverse square root: dropped null directions stay put),
    U = orthonormal basis of the column space of W Σ_xz.

    Wide layers (d > n): Σ_xx, W and U all live in the span of the centred training rows
    (rank ≤ n − 1), so the eraser is fitted in an orthonormal basis V ``(d, r)`` of that
    span and applied as x − ((x − μ)V) M_r Vᵀ — the same map, from an SVD of the ``(n, d)``
    rows instead of an eigendecomposition of the ``(d, d)`` covariance (a 16 384-wide
    feature map: milliseconds instead of minutes).
    """
    n, d = X.shape
    mu = X.mean(0)
    Xc, Zc = X - mu, Z - Z.mean(0)
    basis = None
    if d > n:
        _, sv, vt = np.linalg.svd(Xc, full_matrices=False)
        basis = vt[sv > sv.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps].T   # (d, r)
        Xc = Xc @ basis
    r = Xc.shape[1]
    sigma = Xc.T @ Xc / (n - 1)
    L, V = np.linalg.eigh((sigma + sigma.T) / 2)
    keep = L > L.max() * max(r, 1) * np.finfo(np.float64).eps
    W = (V[:, keep] / np.sqrt(L[keep])) @ V[:, keep].T
    W_inv = (V[:, keep] * np.sqrt(L[keep])) @ V[:, keep].T
    u, s, _ = np.linalg.svd(W @ (Xc.T @ Zc / (n - 1)), full_matrices=False)
    u = u[:, s > s.max(initial=0.0) * max(Z.shape[1], r) * np.finfo(np.float64).eps]
    # row-vector form of x − W⁺UUᵀW(x − μ) (W and W⁺ are symmetric)
    M = W @ u @ u.T @ W_inv
    if basis is None:
        return lambda x: x - (x - mu) @ M
    return lambda x: x - ((x - mu) @ basis) @ M @ basis.T


def _leace_package(X: np.ndarray, Z: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation noise on import
        import torch
        from concept_erasure import LeaceEraser

    eraser = LeaceEraser.fit(torch.from_numpy(X), torch.from_numpy(Z))
    return lambda x: eraser(torch.from_numpy(np.asarray(x, np.float64))).numpy()


def _resolve_backend(backend: str, shape: tuple[int, int] | None = None) -> str:
    """The backend that fits an eraser on rows of ``shape`` ``(n, d)``.

    ``auto``: the package when installed and ``d ≤ n``; a wide layer (``d > n``) uses the
    exact NumPy LEACE in the span of the rows — the package eigendecomposes its shrunk
    ``(d, d)`` covariance, O(d³): 52 minutes for one 16 384-wide map on 60 samples.
    """
    if backend not in BACKENDS:
        raise ZooauditError(f"Unknown erasure backend {backend!r}. Allowed: {', '.join(BACKENDS)}.")
    if backend == "auto":
        import importlib.util

        if shape is not None and shape[1] > shape[0]:
            return "numpy"
        return "concept-erasure" if importlib.util.find_spec("concept_erasure") else "numpy"
    return backend


def leace_eraser(acts, attribute, *, backend: str = "auto") -> Callable[[np.ndarray], np.ndarray]:
    """Fit LEACE on ``acts (n, d)`` against the one-hot ``attribute (n,)``; return x ↦ erased x.

    backend: "concept-erasure" (the package: float64, its defaults — optimal linear
    shrinkage of Σ_xx, trace constraint, svd_tol=0.01), "numpy" (exact LEACE from the
    sample moments, no shrinkage), or "auto" (the package when installed, except for
    layers wider than their rows: see :func:`_resolve_backend`).
    """
    codes = _labels(attribute, "attribute")
    X = _features(acts, "acts", codes.size)
    if codes.max() < 1:
        raise ZooauditError("the attribute has a single value: there is nothing to erase.")
    fit = _leace_package if _resolve_backend(backend, X.shape) == "concept-erasure" else _leace_numpy
    return fit(X, _one_hot(codes))


def erase(acts, attribute, *, backend: str = "auto") -> np.ndarray:
    """LEACE-erase ``attribute`` from ``acts``, fitting and applying on the same rows; ``(n, d)``."""
    X = _features(acts, "acts")
    return leace_eraser(X, attribute, backend=backend)(X)


def _worst_cell(y, a, pred, min_size: int, y_names, a_names) -> tuple[float, str]:
    """Lowest accuracy over (label × attribute) cells with ≥ min_size samples (all cells if none)."""
    cells = {}
    for yv in np.unique(y):
        for av in np.unique(a):
            m = (y == yv) & (a == av)
            if m.any():
                cells[f"label={y_names[yv]}|{a_names[av]}"] = (float(np.mean(pred[m] == y[m])), int(m.sum()))
    big = {k: v for k, v in cells.items() if v[1] >= min_size} or cells
    name = min(big, key=lambda k: big[k][0])
    return big[name][0], name


def erasure_diagnostic(acts, attribute, y, *, cv: int = 5, random_state: int = 0, backend: str = "auto",
                       min_group_size: int = 20, C: float = 1.0, max_iter: int = 1000) -> xr.Dataset:
    """Probe accuracy of ``attribute`` and worst-group accuracy of a refit readout, before/after LEACE.

    In each fold the eraser is fit on the training rows only and applied to both; the
    attribute probe and a linear readout of ``y`` are refit on the (erased) training rows.

    Args:
        acts: ``(n, d)`` activations; attribute, y: ``(n,)`` group and task labels.
        min_group_size: (label × attribute) cells smaller than this do not count for
            the worst group (unless all are small).
    Returns:
        Dataset over dim ``stage`` = ["before", "after"]: ``probe_accuracy``,
        ``readout_accuracy``, ``worst_group_accuracy``, ``worst_group``; attrs
        ``chance``, ``delta_probe_accuracy``, ``delta_worst_group_accuracy`` (after − before).
    """
    a = _labels(attribute, "attribute")
    yc = _labels(y, "y", a.size)
    X = _features(acts, "acts", a.size)
    # the fold's training rows decide a wide layer's backend (see _resolve_backend)
    backend = _resolve_backend(backend, (X.shape[0] - X.shape[0] // max(cv, 1), X.shape[1]))
    # stratify on (attribute, label) so every fold sees every cell
    folds = make_folds(a * (yc.max() + 1) + yc, cv=cv, random_state=random_state, what="(attribute × label) cell")
    probe = {"before": [], "after": []}
    pred = {"before": np.empty_like(yc), "after": np.empty_like(yc)}
    for tr, te in folds:
        eraser = leace_eraser(X[tr], a[tr], backend=backend)
        erased = np.empty_like(X)
        erased[tr], erased[te] = eraser(X[tr]), eraser(X[te])
        for stage, Z in (("before", X), ("after", erased)):
            probe[stage].append(_fit_score(Z, a, tr, te, C, max_iter)[0])
            pred[stage][te] = _fit_score(Z, yc, tr, te, C, max_iter)[1]
    stages = ["before", "after"]
    names = np.unique(np.asarray(y)), np.unique(np.asarray(attribute))
    worst = [_worst_cell(yc, a, pred[s], min_group_size, *names) for s in stages]
    ds = xr.Dataset({"probe_accuracy": ("stage", [np.mean(probe[s]) for s in stages]),
                     "readout_accuracy": ("stage", [np.mean(pred[s] == yc) for s in stages]),
                     "worst_group_accuracy": ("stage", [w[0] for w in worst]),
                     "worst_group": ("stage", [w[1] for w in worst])},
                    coords={"stage": stages},
                    attrs={"chance": _majority(a), "cv": len(folds), "random_state": random_state,
                           "backend": backend, "min_group_size": min_group_size})
    ds.attrs["delta_probe_accuracy"] = float(ds["probe_accuracy"][1] - ds["probe_accuracy"][0])
    ds.attrs["delta_worst_group_accuracy"] = float(ds["worst_group_accuracy"][1] - ds["worst_group_accuracy"][0])
    return ds
