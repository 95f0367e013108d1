"""The bias stage's shortcut-reliance tables: predictions on counterfactual partners, pair by pair.

The partners' predictions were extracted on the model side (:func:`.controls.counterfactual_plan`,
``<ds>/controls/counterfactual``); here they are only read. Written under ``<ds>/bias/``::

    shortcut/<attr>   per group of the original: accuracy, counterfactual accuracy, flip rate
                      (Wilson), McNemar p (adjusted across the run's attributes × groups); per
                      (label × attribute) cell: accuracy on originals and partners, minority flag
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .. import layout
from ..analysis.multitest import adjust_datasets
from ..analysis.shortcut import check_pairs, shortcut_reliance
from ..data.counterfactual import counterfactual_spec
from ..errors import ZooauditError
from ..specs import BiasSpec


def counterfactual_outputs(ref) -> tuple[xr.Dataset, xr.Dataset] | None:
    """``(samples, outputs)`` of the counterfactual partners extracted beside ``ref``; None when the
    dataset has no partners (or the model no predictions); an error when they should be there."""
    control = ref.controls.get("counterfactual")
    if control is None:
        if ref.n_outputs is not None and counterfactual_spec(ref.dataset) is not None:
            raise ZooauditError(f"No counterfactual predictions were extracted for {ref.model_uri!r} on "
                                f"{ref.ds_key!r}; the model stage extracts them when BiasSpec.measures has "
                                "'shortcut'. Rerun the audit (or drop 'shortcut' from measures).")
        return None
    store = ref.repository.session(control.snapshot).store
    samples = xr.open_zarr(store, group=layout.samples_group(control.group), consolidated=False).load()
    outputs = xr.open_zarr(store, group=layout.outputs_group(control.group), consolidated=False).load()
    return samples, outputs


def shortcut_table(samples: xr.Dataset, outputs: xr.Dataset, cf: tuple[xr.Dataset, xr.Dataset], attr: str,
                   bspec: BiasSpec, train) -> tuple[xr.Dataset, dict]:
    """The shortcut table of one group attribute and its summary. ``train``: the training side
    (None: the minority cells are taken from the audit split itself)."""
    cf_samples, cf_outputs = cf
    check_pairs(samples["sample"].values, cf_samples["sample"].values, samples["label"].values,
                cf_samples["label"].values)
    names = samples.attrs["group_names"].get(attr)
    labels = samples["label"].values
    t_labels, t_groups = (np.asarray(train.labels), np.asarray(train.groups[attr])) \
        if train is not None and attr in train.groups else (labels, samples[attr].values)
    ds = shortcut_reliance(labels, outputs["prediction"].values, cf_outputs["prediction"].values,
                           samples[attr].values, cf_samples[attr].values, t_labels, t_groups, group_names=names,
                           label_names=[str(i) for i in range(int(outputs["logits"].shape[1]))], ci=bspec.ci,
                           min_group_size=bspec.min_group_size, correction=bspec.correction, alpha=bspec.alpha)
    ds.attrs.update(attribute=attr, minority_from="training side" if train is not None and attr in train.groups
                    else "audit split")
    return ds, summarize(ds)


def summarize(ds: xr.Dataset) -> dict:
    a = ds.attrs
    out = {k: round(float(a[k]), 6) for k in ("accuracy", "cf_accuracy", "flip_rate", "p_value")}
    for side in ("original", "counterfactual"):
        if f"worst_minority_{side}" in a:
            out[f"worst_minority_{side}"] = round(float(a[f"worst_minority_{side}"]), 6)
            out[f"worst_minority_{side}_cell"] = a[f"worst_minority_{side}_cell"]
    out["flip_rate_by_group"] = dict(zip(ds["group"].values.tolist(), np.round(ds["flip_rate"].values, 6).tolist()))
    out["flagged_groups"] = [str(g) for g, r in zip(ds["group"].values, ds["reject"].values) if r]
    return out


def adjust_shortcut(tables: dict[str, xr.Dataset], summary: dict, bspec: BiasSpec) -> None:
    """Adjust every group's McNemar p-value of the run together (attributes × groups), in place,
    and put each attribute's summary into ``summary[attr]["shortcut"]``."""
    adjust_datasets(list(tables.values()), "group", method=bspec.correction, alpha=bspec.alpha,
                    over="every group × attribute of the run's shortcut tables")
    for a, ds in tables.items():
        summary[a]["shortcut"] = summarize(ds)
