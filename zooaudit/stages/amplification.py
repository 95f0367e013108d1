"""The bias stage's measures against the training data: bias amplification and contextual bias.

Called by :mod:`.bias` for every group attribute of a dataset with predictions. The training
side is a dataset split (``BiasSpec.train_split``, :func:`training_side`), loaded by the data
loaders — labels and group attributes only are read; no model runs. Written under ``<ds>/bias/``::

    amplification/<attr>   per measure (value, CI, variance, p, BH/Holm across the run's
                           attributes × measures), per-pair tables (attribute × task / label set)
    contextual/<attr>      ranked (category, context) pairs: bias score, exclusive vs
                           co-occurring accuracy (category = the label, context = the attribute value)
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from pydantic import ValidationError

from ..analysis.amplification import bias_amplification, multi_hot
from ..analysis.contextual import contextual_bias
from ..analysis.multitest import adjust_datasets
from ..errors import ZooauditError
from ..specs import BiasSpec, DatasetSpec
from .common import plan_dataset


def training_spec(ref, bspec: BiasSpec) -> DatasetSpec:
    """The dataset spec that stands for the model's training data (see ``BiasSpec.train_split``)."""
    recorded = ref.model_info.get("train_data")
    choice = bspec.train_split
    if choice == "model" or (choice == "auto" and recorded and recorded.get("name") == ref.dataset.name):
        if not recorded:
            raise ZooauditError(f"BiasSpec.train_split='model', but {ref.model_uri!r} records no training data; "
                                "name a split of the audit dataset instead ('train', 'test' or 'all').")
        fields = dict(recorded)
    else:
        split = "train" if choice == "auto" else choice
        fields = {**ref.dataset.model_dump(), "split": split, **bspec.train_options}
    try:
        return DatasetSpec(**fields)
    except ValidationError as err:
        raise ZooauditError(f"BiasSpec.train_options give an invalid training dataset: {err.errors()[0]['loc']} "
                            f"{err.errors()[0]['msg']}. Allowed keys: the DatasetSpec fields "
                            f"({', '.join(DatasetSpec.model_fields)}).") from None


def training_side(ref, bspec: BiasSpec):
    """``(AuditDataset, its spec)`` of the training side."""
    spec = training_spec(ref, bspec)
    return plan_dataset(spec)[0], spec


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def attribute_tables(ref, samples: xr.Dataset, outputs: xr.Dataset, attr: str, bspec: BiasSpec, train
                     ) -> tuple[dict[str, xr.Dataset], dict]:
    """``({"amplification": ds, "contextual": ds}, summary)`` of one group attribute (those asked for)."""
    if attr not in train.groups:
        raise ZooauditError(f"The training side ({train.name}, {train.spec.get('split')}) has no group attribute "
                            f"{attr!r} (it has: {', '.join(sorted(train.groups)) or 'none'}); set "
                            "BiasSpec.train_split to a split that carries it.")
    names = samples.attrs["group_names"].get(attr) or [str(v) for v in np.unique(samples[attr].values)]
    G, T = len(names), int(outputs["logits"].shape[1])
    labels, pred = samples["label"].values, outputs["prediction"].values
    attr_tr, attr_te = (multi_hot(np.asarray(v), f"group attribute {attr!r}", G)
                        for v in (train.groups[attr], samples[attr].values))
    task_tr = multi_hot(np.asarray(train.labels), "training labels", T)
    task_te, pred_te = multi_hot(labels, "labels", T), multi_hot(pred, "predictions", T)
    task_names = [str(t) for t in (train.class_names or range(T))][:T]
    task_names += [str(t) for t in range(len(task_names), T)]
    out, summary = {}, {}
    if "amplification" in bspec.measures:
        amp = bias_amplification(attr_tr, task_tr, attr_te, task_te, pred_te, attr_names=names,
                                 task_names=task_names, max_order=bspec.max_order, n_boot=bspec.n_boot,
                                 n_permutations=bspec.n_permutations, ci=bspec.ci, random_state=bspec.random_state,
                                 correction=bspec.correction, alpha=bspec.alpha)
        amp.attrs.update(attribute=attr, train_dataset=train.key)
        out["amplification"] = amp
    if "contextual" in bspec.measures:
        ctx = contextual_bias(task_tr, attr_tr, task_te, attr_te, pred_te, _softmax(outputs["logits"].values),
                              category_names=task_names, context_names=names, min_group_size=bspec.min_group_size,
                              n_boot=bspec.n_boot, ci=bspec.ci, random_state=bspec.random_state,
                              top_k=bspec.contextual_top_k)
        ctx.attrs.update(attribute=attr, train_dataset=train.key)
        out["contextual"] = ctx
        summary["contextual"] = [
            {"category": str(p["category"].values), "context": str(p["context"].values),
             "bias": round(float(p["bias"]), 4), "acc_cooccur": round(float(p["acc_cooccur"]), 4),
             "acc_exclusive": round(float(p["acc_exclusive"]), 4), "small": bool(p["small"])}
            for p in (ctx.isel(pair=i) for i in range(min(3, ctx.sizes["pair"])))]
    return out, summary


def adjust_amplification(tables: dict[str, xr.Dataset], bspec: BiasSpec) -> dict[str, dict]:
    """Adjust every amplification p-value of the run together (attributes × measures), in place;
    returns the per-attribute summary ``{attr: {measure: {value, ci, p_adjusted, flagged}}}``."""
    adjust_datasets(list(tables.values()), "measure", method=bspec.correction, alpha=bspec.alpha,
                    over="every amplification measure × group attribute of the run")
    return {a: {str(k): {"value": _r(ds["value"].sel(measure=k)),
                         "ci": [_r(v) for v in ds["value_ci"].sel(measure=k).values],
                         "p_adjusted": _r(ds["p_adjusted"].sel(measure=k)),
                         "flagged": bool(ds["reject"].sel(measure=k))} for k in ds["measure"].values}
            for a, ds in tables.items()}


def as_disparities(ds: xr.Dataset) -> xr.Dataset:
    """An amplification table in the shape :func:`.bias.regressions` reads (``metric``, ``difference``,
    ``difference_ci``, ``reject``), so that a measure is flagged by the disparities' rule."""
    return ds[["value", "value_ci", "reject"]].rename(measure="metric", value="difference",
                                                         value_ci="difference_ci")


def _r(v) -> float | None:
    v = float(v)
    return round(v, 6) if np.isfinite(v) else None
