"""Prediction-level bias audit: per-group accuracy with bootstrap CIs, worst-group accuracy.

Delegates to fairlearn's ``MetricFrame``. Its bootstrap resamples the whole set
(unstratified) with a fixed ``random_state``, so reruns are identical. Worst-group
accuracy is the minimum accuracy over the (label × attribute) cells; cells with
fewer than ``min_group_size`` samples are reported but flagged ``small``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr
from sklearn.metrics import accuracy_score

from ..errors import ZooauditError


@dataclass
class GroupReport:
    """Results of :func:`group_metrics`.

    Attributes:
        table: Dataset over dim ``group`` (and ``ci`` = lower/upper): ``accuracy``,
            ``accuracy_ci``, ``count``, ``small``.
        cells: the same over (label × attribute) cells, dim ``cell``.
        overall_accuracy, worst_group_accuracy, worst_group: headline numbers.
    """

    table: xr.Dataset
    cells: xr.Dataset
    overall_accuracy: float
    worst_group_accuracy: float
    worst_group: str


def _frame(y_true, y_pred, features, n_boot, ci, random_state):
    from fairlearn.metrics import MetricFrame

    kwargs = {}
    if n_boot:
        kwargs = dict(n_boot=n_boot, ci_quantiles=[(1 - ci) / 2, 1 - (1 - ci) / 2], random_state=random_state)
    return MetricFrame(metrics=accuracy_score, y_true=y_true, y_pred=y_pred, sensitive_features=features, **kwargs)


def _to_dataset(mf, labels: list[str], keys: list, counts: list[int], dim: str, n_boot: int,
                min_size: int) -> xr.Dataset:
    acc = np.array([float(mf.by_group.loc[k]) for k in keys])
    counts = np.asarray(counts, dtype=np.int64)
    data = {"accuracy": (dim, acc), "count": (dim, counts), "small": (dim, counts < min_size)}
    if n_boot:
        lo, hi = mf.by_group_ci
        data["accuracy_ci"] = ((dim, "ci"), np.stack([[float(lo.loc[k]) for k in keys],
                                                      [float(hi.loc[k]) for k in keys]], axis=1))
    return xr.Dataset(data, coords={dim: labels, "ci": ["lower", "upper"]})


def group_metrics(y_true, y_pred, groups, *, n_boot: int = 200, random_state: int = 0, ci: float = 0.95,
                  min_group_size: int = 20, group_names: list[str] | None = None) -> GroupReport:
    """Accuracy per group with bootstrap CIs, and worst-group accuracy over (label × group) cells.

    Args:
        y_true, y_pred, groups: ``(n,)`` arrays (groups: integer codes or strings).
        n_boot: bootstrap resamples (0 disables CIs); ``random_state`` fixes them.
        group_names: display names for integer group codes.
    """
    y_true, y_pred, groups = (np.asarray(a) for a in (y_true, y_pred, groups))
    if not (len(y_true) == len(y_pred) == len(groups)):
        raise ZooauditError(f"y_true, y_pred and groups must have equal length: "
                            f"{len(y_true)}, {len(y_pred)}, {len(groups)}.")
    if len(y_true) == 0:
        raise ZooauditError("group_metrics needs at least one sample.")

    def name(g):
        return group_names[int(g)] if group_names is not None else str(g)

    mf = _frame(y_true, y_pred, groups, n_boot, ci, random_state)
    keys = list(mf.by_group.index)
    counts = [int((groups == k).sum()) for k in keys]
    table = _to_dataset(mf, [name(k) for k in keys], keys, counts, "group", n_boot, min_group_size)

    import pandas as pd

    cell_feats = pd.DataFrame({"label": y_true, "group": groups})
    mfc = _frame(y_true, y_pred, cell_feats, n_boot, ci, random_state)
    ckeys = list(mfc.by_group.index)
    ccounts = [int(((y_true == k[0]) & (groups == k[1])).sum()) for k in ckeys]
    cells = _to_dataset(mfc, [f"label={k[0]}|{name(k[1])}" for k in ckeys], ckeys, ccounts, "cell", n_boot,
                        min_group_size)
    worst = int(np.nanargmin(cells["accuracy"].values))
    return GroupReport(
        table=table, cells=cells,
        overall_accuracy=float(accuracy_score(y_true, y_pred)),
        worst_group_accuracy=float(cells["accuracy"].values[worst]),
        worst_group=str(cells["cell"].values[worst]),
    )
