"""Neural collapse (Papyan, Han & Donoho 2020) of a labelled ``(sample, unit)`` layer, streamed.

:class:`ClassScatter` reads row blocks with their labels once and keeps, in float64, the
class counts ``n_c``, class means ``μ_c`` ``(C, p)`` and the within-class scatter
``S_W = Σ_c Σ_{i∈c} (hᵢ − μ_c)(hᵢ − μ_c)ᵀ`` ``(p, p)`` — each block centred on its own class
means, merged with Chan et al.'s pairwise update, so data offset far from zero loses nothing
and a collapsed layer (tiny ``S_W``) is not the difference of two large numbers. Memory
``O(p² + C·p)``, independent of ``n``.

Conventions (Papyan et al.; their reference code for the ddof of NC2):

- ``μ_G`` is the global mean over all samples; ``Σ_W = S_W / N``;
  ``Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ`` (classes weighted equally; on imbalanced data
  ``μ_G`` is then not the mean of the class means — it is the paper's definition).
- **NC1** ``= tr(Σ_W Σ_B⁺) / C``; ``Σ_B⁺`` from the SVD of the centred means ``M̃ (C, p)``,
  singular values below ``1e-8 · s_max`` treated as zero (``Σ_B`` has rank ≤ C − 1).
- **NC2** equinorm: ``std_c ‖μ_c − μ_G‖ / mean_c ‖μ_c − μ_G‖`` (std with ddof 1, as in the
  paper's code); equiangularity: ``mean_{c≠c'} |cos(μ̃_c, μ̃_c') + 1/(C−1)|``. A simplex ETF
  gives 0 for both.
- **NC3** self-duality: ``‖W/‖W‖_F − M̃/‖M̃‖_F‖_F`` with ``W (C, p)`` the classifier's weights.
- **NC4**: the fraction of samples on which the nearest class centre ``argmin_c ‖h − μ_c‖``
  agrees with the model's prediction (needs the final means: a second pass,
  :func:`ncc_agreement`).

``C`` counts the classes with at least one sample.
"""

from __future__ import annotations

import numpy as np

from ..errors import ZooauditError
from .blocks import iter_blocks

SV_RTOL = 1e-8


class ClassScatter:
    """Streamed class counts, class means and within-class scatter of a ``(n, p)`` layer."""

    def __init__(self, width: int, n_classes: int, name: str = "layer"):
        if n_classes < 1:
            raise ZooauditError(f"Neural collapse of layer {name!r} needs class labels; got {n_classes} classes.")
        self.p, self.C, self.name = int(width), int(n_classes), name
        self.count = np.zeros(self.C, np.int64)
        self.mean = np.zeros((self.C, self.p), np.float64)
        self.scatter = np.zeros((self.p, self.p), np.float64)

    def update(self, block: np.ndarray, labels: np.ndarray) -> ClassScatter:
        """Add a block ``(b, p)`` with its labels ``(b,)`` (ints in ``[0, C)``)."""
        x = np.asarray(block, dtype=np.float64).reshape(block.shape[0], -1)
        y = np.asarray(labels, np.int64)
        if len(y) != len(x):
            raise ZooauditError(f"{len(y)} labels for {len(x)} rows of layer {self.name!r}.")
        if len(y) == 0:
            return self
        if y.min() < 0 or y.max() >= self.C:
            raise ZooauditError(f"Labels of layer {self.name!r} must lie in [0, {self.C}); got {y.min()}…{y.max()}.")
        b_c = np.bincount(y, minlength=self.C)
        # (C, p) class sums as one GEMM, written xᵀ·onehot: OpenBLAS is ~10× slower on the (C, b)·(b, p) form
        sums = (x.T @ (y[:, None] == np.arange(self.C)[None, :]).astype(np.float64)).T
        present = b_c > 0
        m_b = np.zeros_like(sums)
        m_b[present] = sums[present] / b_c[present, None]
        centred = x - m_b[y]
        self.scatter += centred.T @ centred
        # Chan's merge per class, all classes in one GEMM: + n_a n_b / (n_a + n_b) δδᵀ
        n_a = self.count.astype(np.float64)
        total = n_a + b_c
        w = np.where(present, n_a * b_c / np.maximum(total, 1), 0.0)
        delta = m_b - self.mean
        D = np.sqrt(w)[:, None] * delta
        self.scatter += D.T @ D
        self.mean[present] += delta[present] * (b_c[present] / total[present])[:, None]
        self.count += b_c
        return self

    @property
    def n(self) -> int:
        return int(self.count.sum())


def nc_metrics(acc: ClassScatter, classifier: np.ndarray | None = None) -> dict[str, float]:
    """NC1, NC2 (equinorm CV, equiangularity) and, with ``classifier (C, p)``, NC3 of ``acc``.

    Raises :class:`~zooaudit.errors.ZooauditError` when the layer has fewer samples than
    classes, or fewer than two classes with samples (collapse is undefined)."""
    n, present = acc.n, acc.count > 0
    C = int(present.sum())
    if n < acc.C:
        raise ZooauditError(f"Layer {acc.name!r}: neural collapse needs at least as many samples as classes; "
                            f"got {n} samples for {acc.C} classes. Audit on more samples or drop the NC layer.")
    if C < 2:
        raise ZooauditError(f"Layer {acc.name!r}: neural collapse needs samples of at least two classes; "
                            f"got {C}.")
    means, counts = acc.mean[present], acc.count[present].astype(np.float64)
    mu_g = (counts[:, None] * means).sum(axis=0) / n
    M = means - mu_g                                   # (C, p) centred class means
    sigma_w = acc.scatter / n
    _, s, vt = np.linalg.svd(M, full_matrices=False)
    keep = s > SV_RTOL * s.max() if s.max() > 0 else np.zeros_like(s, bool)
    # Σ_B = Mᵀ M / C = V diag(s²/C) Vᵀ ⇒ tr(Σ_W Σ_B⁺) = Σ_k (C / s_k²) v_kᵀ Σ_W v_k
    v = vt[keep]
    nc1 = float(np.einsum("kp,pq,kq->k", v, sigma_w, v) @ (C / s[keep] ** 2) / C) if keep.any() else np.inf
    norms = np.linalg.norm(M, axis=1)
    unit = M / np.where(norms > 0, norms, 1.0)[:, None]
    cos = unit @ unit.T
    off = ~np.eye(C, dtype=bool)
    out = {"nc1": nc1,
           "nc2_equinorm": float(norms.std(ddof=1) / norms.mean()) if norms.mean() > 0 else np.nan,
           "nc2_equiangular": float(np.abs(cos[off] + 1.0 / (C - 1)).mean()),
           "n_classes": C, "within_trace": float(np.trace(sigma_w)),
           "between_trace": float((s ** 2).sum() / C)}
    if classifier is not None:
        Wc = np.asarray(classifier, np.float64)
        if Wc.shape != (acc.C, acc.p):
            raise ZooauditError(f"Classifier weights for layer {acc.name!r} have shape {Wc.shape}; NC3 needs "
                                f"({acc.C}, {acc.p}) (classes, units).")
        Wc = Wc[present]
        out["nc3"] = float(np.linalg.norm(Wc / np.linalg.norm(Wc) - M / np.linalg.norm(M)))
    return out


def nearest_centre(block: np.ndarray, means: np.ndarray) -> np.ndarray:
    """``(b,)`` index of the nearest of ``means (C, p)`` to each row of ``block (b, p)`` (Euclidean)."""
    x = np.asarray(block, np.float64).reshape(block.shape[0], -1)
    d = (means ** 2).sum(axis=1)[None, :] - 2.0 * x @ means.T   # ‖x‖² is the same for every centre
    return d.argmin(axis=1)


def ncc_agreement(A, acc: ClassScatter, predictions: np.ndarray) -> float:
    """NC4: fraction of rows of ``A (n, p)`` whose nearest class centre (of ``acc``, classes with
    samples only) is the model's prediction ``(n,)``; one streamed pass over ``A``."""
    present = np.flatnonzero(acc.count > 0)
    means = acc.mean[present]
    pred = np.asarray(predictions, np.int64)
    agree = 0
    for start, stop, block in iter_blocks(A):
        agree += int((present[nearest_centre(block, means)] == pred[start:stop]).sum())
    return agree / max(len(pred), 1)
