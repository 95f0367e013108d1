"""TCAV-style concept sensitivity (Kim et al. 2018), with significance against random concepts.

For a layer with activations ``h`` (``(n, unit)``, flattened per sample):

- concept activation vector (CAV): the unit normal of a linear classifier (logistic
  regression, fixed ``random_state``) separating a concept's example activations from
  a set of random examples' activations, oriented toward the concept;
- sensitivity of an input: ``∇_h logit_k · cav`` (the directional derivative of class
  ``k``'s logit along the CAV); the TCAV score is the fraction of class-``k`` inputs
  whose sensitivity is > 0;
- significance: the concept is trained against each of R ≥ 2 random sets (R scores);
  the null is R random-vs-random CAVs (random set i against set i+1 mod R). A two-sided
  Welch t-test compares the two score lists (the paper uses a t-test over ≥ 20 random
  runs); ``p_value`` is its p-value. Use R ≥ 20 for an audit; small R only in tests.

This module reads arrays only. The gradients and the concept activations come from the
model side: :func:`zooaudit.gradients.layer_gradients` and
:func:`zooaudit.gradients.concept_sensitivity`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ZooauditError


@dataclass
class TcavResult:
    """Attributes:
        score: mean TCAV score of the concept over its R CAVs.
        scores: ``(R,)`` concept-vs-random_i scores.
        random_scores: ``(R,)`` random-vs-random scores (the null).
        p_value: two-sided Welch t-test, scores vs random_scores.
        significant: ``p_value < alpha``.
        cav_accuracy: ``(R,)`` training accuracy of each concept CAV's classifier.
    """

    score: float
    scores: np.ndarray
    random_scores: np.ndarray
    p_value: float
    significant: bool
    cav_accuracy: np.ndarray


def _matrix(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 2 or a.shape[0] < 2:
        raise ZooauditError(f"{name} must be (n_examples ≥ 2, unit...) activations; got shape {a.shape}.")
    a = a.reshape(a.shape[0], -1)
    if not np.all(np.isfinite(a)):
        raise ZooauditError(f"{name} contains NaN or infinite values.")
    return a


def concept_activation_vector(concept, random, *, random_state: int = 0) -> tuple[np.ndarray, float]:
    """Unit CAV ``(unit,)`` pointing from ``random`` toward ``concept`` activations, and the
    classifier's training accuracy."""
    from sklearn.linear_model import LogisticRegression

    C, R = _matrix(concept, "concept activations"), _matrix(random, "random activations")
    if C.shape[1] != R.shape[1]:
        raise ZooauditError(f"concept and random activations differ in width: {C.shape[1]} vs {R.shape[1]}.")
    X = np.concatenate([C, R])
    y = np.r_[np.ones(len(C)), np.zeros(len(R))]
    clf = LogisticRegression(max_iter=2000, random_state=random_state).fit(X, y)
    w = clf.coef_[0]
    norm = np.linalg.norm(w)
    if norm == 0:
        raise ZooauditError("the concept and random examples are not separable at all (zero CAV).")
    return w / norm, float(clf.score(X, y))


def tcav_score(gradients, cav) -> float:
    """Fraction of inputs whose logit gradient ``(n, unit)`` has a positive dot product with ``cav``."""
    G = _matrix(gradients, "gradients")
    cav = np.asarray(cav, dtype=np.float64).reshape(-1)
    if G.shape[1] != cav.size:
        raise ZooauditError(f"gradients have {G.shape[1]} units but the CAV has {cav.size}.")
    return float(np.mean(G @ cav > 0))


def tcav(gradients, concept, random_sets, *, alpha: float = 0.05, random_state: int = 0) -> TcavResult:
    """TCAV score of a concept for the class whose logit ``gradients`` ``(n, unit)`` were taken,
    with a t-test against random concepts.

    Args:
        gradients: ``(n, unit)`` gradients of the class logit w.r.t. the layer, one row per class input.
        concept: ``(n_c, unit)`` activations of the concept's example inputs.
        random_sets: list of R ≥ 2 arrays ``(n_r, unit)`` of random examples' activations.
    """
    from scipy import stats

    if len(random_sets) < 2:
        raise ZooauditError(f"TCAV significance needs at least 2 random sets (≥ 20 recommended); got "
                            f"{len(random_sets)}.")
    R = len(random_sets)
    cavs = [concept_activation_vector(concept, r, random_state=random_state) for r in random_sets]
    scores = np.array([tcav_score(gradients, v) for v, _ in cavs])
    null = np.array([tcav_score(gradients, concept_activation_vector(random_sets[i], random_sets[(i + 1) % R],
                                                                     random_state=random_state)[0])
                     for i in range(R)])
    if np.ptp(np.r_[scores, null]) == 0:
        p = 1.0  # identical constant score lists: no evidence either way (the t statistic is undefined)
    else:
        import warnings

        with warnings.catch_warnings():
            # A list of identical scores (e.g. every CAV gives 1.0) is legitimate; scipy warns about it.
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_ind(scores, null, equal_var=False).pvalue)
        p = 0.0 if np.isnan(p) else p  # both lists constant but different: perfectly separated
    return TcavResult(score=float(scores.mean()), scores=scores, random_scores=null, p_value=p,
                      significant=bool(p < alpha), cav_accuracy=np.array([a for _, a in cavs]))


__all__ = ["TcavResult", "concept_activation_vector", "tcav", "tcav_score"]
