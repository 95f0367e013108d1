"""The bias stage's measures against the training data: bias amplification and contextual bias.

Called by :mod:`.bias` for every group attribute of a dataset with predictions. The training
side is a dataset split (``BiasSpec.train_split``, :func:`training_side`), loaded by the data
loaders — labels and group attributes only are read; no model runs. Multi-hot datasets
(:class:`~zooaudit.data.types.AuditDataset` ``label_sets`` / ``group_sets``, committed in the samples
table as ``label_sets`` (sample, class) and ``multi_<attr>``): the task side is the label sets when
``BiasSpec.multi_label`` asks for them (None: when the dataset has them), the predictions the outputs
whose sigmoid reaches ``multi_label_threshold`` (:func:`task_side`); a set-valued attribute is a
multi-hot attribute side (:func:`attribute_sides`). The training side must carry the same columns
(matched by name). Written under ``<ds>/bias/``::

    amplification/<attr>   per measure (value, CI, variance, p, BH/Holm across the run's
                           attributes × measures), per-pair tables (attribute × task / label set)
    contextual/<attr>      ranked (category, context) pairs: bias score, exclusive vs
                           co-occurring accuracy (category = the label, context = the attribute value)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr
from pydantic import ValidationError

from ..analysis.amplification import bias_amplification, multi_hot
from ..analysis.contextual import contextual_bias
from ..analysis.multitest import adjust_datasets
from ..errors import ZooauditError
from ..layout import multi_hot_var
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
    """``(n, C)`` softmax in the logits' dtype (float32 as stored), computed in place in one ``(n, C)`` array."""
    z = logits - logits.max(1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(1, keepdims=True)
    return z


_SCORE_ROWS = 65_536   # logits rows per block of :func:`own_class_scores` (bounds its (rows, C) temporary)


def own_class_scores(logits, labels: np.ndarray) -> np.ndarray:
    """``(n,)`` softmax score of each sample's own class, ``p̂(labels_i)``, in the logits' dtype.

    ``logits``: ``(n, C)``, a NumPy array or a (lazily indexed) ``DataArray`` of the stored outputs;
    read and normalised one block of rows at a time with :func:`_softmax`, so the values equal
    ``_softmax(logits)[arange(n), labels]`` exactly and neither the ``(n, C)`` scores nor the whole
    logits are held — all that contextual bias reads of a single-label sample."""
    n = int(logits.shape[0])
    out = np.empty(n, logits.dtype)    # _softmax keeps the dtype
    for start in range(0, n, _SCORE_ROWS):
        p = _softmax(np.array(logits[start:start + _SCORE_ROWS]))    # a copy: _softmax works in place on it
        out[start:start + len(p)] = p[np.arange(len(p)), labels[start:start + len(p)]]
    return out


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, np.float64)))   # = 1 / (1 + e^-x), without overflow


@dataclass
class TaskSide:
    """The task side of amplification and contextual bias.

    ``train`` ``(m,)`` class codes (single-label) or ``(m, T)`` uint8 0/1 (label sets); ``test`` and ``pred``
    ``(n,)`` / ``(n, T)``, the same forms; ``scores`` ``(n,)`` the softmax score of each sample's own class
    (single-label, in the logits' dtype: :func:`own_class_scores`) or ``(n, T)`` sigmoids (multi-label);
    ``names`` (T,). Codes, not one-hot matrices: the analysis functions take them and
    keep ``O(n)`` per side (issue 17)."""

    train: np.ndarray
    test: np.ndarray
    pred: np.ndarray
    scores: np.ndarray
    names: list[str]
    multi_label: bool


def _align(matrix: np.ndarray, names: list[str], target: list[str], field: str) -> np.ndarray:
    """``(m, len(target))``: the columns of ``matrix`` (named ``names``) placed under ``target``, 0 where a
    target name is missing; a name outside ``target`` is an error."""
    index = {v: j for j, v in enumerate(target)}
    unknown = [v for v in names if v not in index]
    if unknown:
        raise ZooauditError(f"The training side's {field} has the name(s) {unknown}, which the audit dataset's "
                            f"{field} does not have (allowed: {target}); both sides need the same columns.")
    out = np.zeros((matrix.shape[0], len(target)), np.uint8)
    out[:, [index[v] for v in names]] = matrix
    return out


def _codes(values, field: str, n_classes: int) -> np.ndarray:
    """``(n,)`` class codes, checked as :func:`multi_hot` checks them (its error), without the ``(n, C)`` matrix."""
    a = np.asarray(values)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or (a.size and (a.min() < 0 or a.max() >= n_classes)):
        multi_hot(a, field, n_classes)    # raises the error that names the bad dtype, shape or code
    return a


def _describe(train) -> str:
    return f"The training side ({train.name}, split {train.spec.get('split')!r})"


def task_side(samples: xr.Dataset, outputs: xr.Dataset, bspec: BiasSpec, train) -> TaskSide:
    """Single labels (class codes, argmax predictions, own-class softmax scores) or multi-hot label sets (predictions:
    sigmoid ≥ ``multi_label_threshold``), as ``BiasSpec.multi_label`` asks (None: label sets when present)."""
    logits = outputs["logits"]     # lazy where the caller left it so: single labels read it by blocks
    T = int(logits.shape[1])
    has_sets = "label_sets" in samples
    multi = has_sets if bspec.multi_label is None else bspec.multi_label
    if not multi:
        names = [str(t) for t in (train.class_names or range(T))][:T]
        names += [str(t) for t in range(len(names), T)]
        labels = _codes(samples["label"].values, "labels", T)
        return TaskSide(_codes(train.labels, "training labels", T), labels,
                        _codes(outputs["prediction"].values, "predictions", T),
                        own_class_scores(logits, labels), names, False)
    if not has_sets:
        raise ZooauditError("BiasSpec.multi_label=True, but the audit dataset has no multi-hot label sets (its labels "
                            "are single class codes). Allowed: a dataset with label_sets (see the README's "
                            "multi-hot columns), or multi_label=None/False for single labels.")
    names = [str(v) for v in samples["class"].values]
    if len(names) != T:
        raise ZooauditError(f"The audit dataset's label_sets have {len(names)} labels but the model has {T} outputs; "
                            "multi-label amplification needs one output per label, in the label_sets' order.")
    if train.label_sets is None:
        raise ZooauditError(f"{_describe(train)} has no multi-hot label_sets, but the audit side is multi-label; "
                            "set BiasSpec.train_split (or train_options) to a split that carries the same label "
                            "sets, or multi_label=False.")
    scores = _sigmoid(np.asarray(logits))
    return TaskSide(_align(train.label_sets, train.label_set_names, names, "label_sets"),
                    samples["label_sets"].values.astype(np.uint8),
                    (scores >= bspec.multi_label_threshold).astype(np.uint8), scores, names, True)


def attribute_sides(samples: xr.Dataset, attr: str, train) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(train, test, names)`` of a group attribute: single-coded as ``(m,)`` / ``(n,)`` codes (G = len(names))
    or set-valued as ``(m, G)`` / ``(n, G)`` uint8 0/1 (multi-hot, the columns of both sides matched by name:
    the audit side's names, then the training side's others)."""
    if attr in samples.attrs.get("multi_hot_attributes", []):
        var = samples[multi_hot_var(attr)]
        names = [str(v) for v in var[var.dims[1]].values]
        if attr not in train.group_sets:
            raise ZooauditError(f"{_describe(train)} has no set-valued attribute {attr!r} (it has: "
                                f"{', '.join(sorted(train.group_sets)) or 'none'}); set BiasSpec.train_split to a "
                                "split that carries the same multi-hot attribute columns.")
        train_names = train.group_set_names[attr]
        names = names + [v for v in train_names if v not in names]
        test = np.zeros((var.shape[0], len(names)), np.uint8)
        test[:, :var.shape[1]] = var.values
        return _align(train.group_sets[attr], train_names, names, f"attribute {attr!r}"), test, names
    if attr not in train.groups:
        raise ZooauditError(f"{_describe(train)} has no group attribute {attr!r} (it has: "
                            f"{', '.join(sorted(train.groups)) or 'none'}); set BiasSpec.train_split to a split "
                            "that carries it.")
    names = samples.attrs["group_names"].get(attr) or [str(v) for v in np.unique(samples[attr].values)]
    G = len(names)
    tr, te = (_codes(v, f"group attribute {attr!r}", G) for v in (train.groups[attr], samples[attr].values))
    return tr, te, names


def attribute_tables(ref, samples: xr.Dataset, outputs: xr.Dataset, attr: str, bspec: BiasSpec, train,
                     tasks: TaskSide | None = None) -> tuple[dict[str, xr.Dataset], dict]:
    """``({"amplification": ds, "contextual": ds}, summary)`` of one group attribute (those asked for);
    ``tasks``: the run's :func:`task_side` (computed here when not given)."""
    tasks = tasks or task_side(samples, outputs, bspec, train)
    attr_tr, attr_te, names = attribute_sides(samples, attr, train)
    provenance = {"attribute": attr, "train_dataset": train.key, "multi_label": tasks.multi_label,
                  "multi_hot_attribute": attr in samples.attrs.get("multi_hot_attributes", [])}
    if tasks.multi_label:
        provenance["multi_label_threshold"] = bspec.multi_label_threshold
    out, summary = {}, {}
    if "amplification" in bspec.measures:
        amp = bias_amplification(attr_tr, tasks.train, attr_te, tasks.test, tasks.pred, attr_names=names,
                                 task_names=tasks.names, max_order=bspec.max_order, n_boot=bspec.n_boot,
                                 n_permutations=bspec.n_permutations, ci=bspec.ci, random_state=bspec.random_state,
                                 correction=bspec.correction, alpha=bspec.alpha, multi_label=tasks.multi_label,
                                 n_groups=len(names), n_tasks=len(tasks.names))
        amp.attrs.update(provenance)
        out["amplification"] = amp
    if "contextual" in bspec.measures:
        ctx = contextual_bias(tasks.train, attr_tr, tasks.test, attr_te, tasks.pred, tasks.scores,
                              category_names=tasks.names, context_names=names, min_group_size=bspec.min_group_size,
                              n_boot=bspec.n_boot, ci=bspec.ci, random_state=bspec.random_state,
                              top_k=bspec.contextual_top_k, n_categories=len(tasks.names), n_contexts=len(names))
        ctx.attrs.update(provenance)
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
