"""Bias stage: prediction-level group metrics and disparities, representation-level
leakage (beside its controls) and erasure, and regression against the previous audit.

Written under ``<ds>/bias/``::

    <attr>                 per group: rates with bootstrap + Wilson intervals; cells; disparities
    adjusted               every disparity p-value of the run, BH (or Holm) adjusted together
    probes/<attr>          probe accuracy per (layer, probe): activations, shuffled labels,
                           inputs, random-init model (encoders without predictions: input
                           token embeddings instead of inputs; no other prediction-level tables)
    output_leakage/<attr>  leakage of the attribute from the logits within each true label
    weat                   text encoders: WEAT/SEAT per (method, layer, test), Holm within (method, layer)
    erasure/<attr>         LEACE erasure per (layer, stage): probe accuracy and worst-group accuracy
    amplification/<attr>   bias amplification against the training side, contextual/<attr> the
                           contextual-bias pairs (:mod:`.amplification`; ``BiasSpec.measures``), for
                           every group attribute and every set-valued (multi-hot) attribute; on
                           multi-label datasets over the label sets (``BiasSpec.multi_label``)
    shortcut/<attr>        accuracy and flip rate on counterfactual partners (:mod:`.shortcut`)

Probes and erasure run on at most ``probe_max_samples`` samples (a fixed subset). An array
stage: the random-init and input-embedding controls and the word-set embeddings are read
from the controls the model stage extracted (:mod:`.controls`); the input-level probe reads
the dataset's raw inputs.
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from .. import layout
from ..analysis import bias as bias_mod
from ..keys import cache_key
from ..specs import BiasSpec
from ..store import write_dataset
from . import amplification as amp_stage
from . import shortcut as shortcut_stage
from . import weat as weat_stage
from .common import commit_stage, control_rows, open_matrices, random_subset, shard_dataset, skipped
from .refs import ActivationsRef, StageResult

log = logging.getLogger("zooaudit.stages")


def _representation_audit(ref: ActivationsRef, matrices: dict, samples: xr.Dataset, outputs: xr.Dataset, attr: str,
                          bspec: BiasSpec) -> dict[str, xr.Dataset]:
    """Probe leakage per layer beside its controls, output leakage, and erasure per layer."""
    idx = random_subset(ref.n_samples, bspec.probe_max_samples, bspec.random_state)
    groups, labels = samples[attr].values[idx], samples["label"].values[idx]
    inputs = _input_control(ref, idx)
    random_acts, _ = control_rows(ref, "random_init", ref.sample_layers, idx, required=False)
    probes, erasures = [], []
    kw = {"cv": bspec.probe_cv, "random_state": bspec.random_state}
    for layer in ref.sample_layers:
        acts = np.asarray(matrices[layer][idx], dtype=np.float64)
        controls = dict(inputs)
        if layer in random_acts:
            controls["random_init"] = random_acts[layer]
        probes.append(bias_mod.probe_leakage(acts, groups, controls=controls, **kw).expand_dims(layer=[layer]))
        if bspec.erasure:
            erasures.append(bias_mod.erasure_diagnostic(acts, groups, labels, min_group_size=bspec.min_group_size,
                                                        **kw).expand_dims(layer=[layer]))
    out = {"probes": xr.concat(probes, dim="layer", combine_attrs="drop_conflicts"),
           "output_leakage": bias_mod.output_leakage_within_label(outputs["logits"].values[idx], labels, groups, **kw)}
    if erasures:
        out["erasure"] = xr.concat(erasures, dim="layer", combine_attrs="drop_conflicts")
    return out


def _input_control(ref: ActivationsRef, idx: np.ndarray) -> dict[str, np.ndarray]:
    """What the inputs alone carry, the probes' first control, ``{name: (len(idx), p)}``: the pixels
    of an image model; a text model's input token embeddings (mask-aware mean, the
    ``input_embeddings`` control) — texts are strings, not features — or nothing without that control."""
    inputs = shard_dataset(ref).inputs
    if inputs.dtype.kind not in "OUS":
        return {"inputs": inputs[idx].reshape(len(idx), -1)}
    if "input_embeddings" not in ref.controls:
        return {}
    (words,) = control_rows(ref, "input_embeddings", list(ref.controls["input_embeddings"].layers), idx)[0].values()
    return {"input_embeddings": words}


def _encoder_probes(ref: ActivationsRef, matrices: dict, samples: xr.Dataset, attr: str,
                    bspec: BiasSpec) -> xr.Dataset:
    """Encoders (no predictions): probe leakage of ``attr`` per layer beside shuffled labels, a
    random-init copy and the input token embeddings (mask-aware mean: what the words alone carry)."""
    idx = random_subset(ref.n_samples, bspec.probe_max_samples, bspec.random_state)
    groups = samples[attr].values[idx]
    controls: dict[str, dict] = {name: dict.fromkeys(ref.sample_layers, rows)
                                 for name, rows in _input_control(ref, idx).items()}
    if random_acts := control_rows(ref, "random_init", ref.sample_layers, idx, required=False)[0]:
        controls["random_init"] = random_acts
    probes = []
    for layer in ref.sample_layers:
        acts = np.asarray(matrices[layer][idx], dtype=np.float64)
        probes.append(bias_mod.probe_leakage(
            acts, groups, cv=bspec.probe_cv, random_state=bspec.random_state,
            controls={c: v[layer].reshape(len(idx), -1) for c, v in controls.items()}).expand_dims(layer=[layer]))
    return xr.concat(probes, dim="layer", combine_attrs="drop_conflicts")


def previous_disparities(ref: ActivationsRef, attr: str, current_key: str) -> tuple[str, xr.Dataset] | None:
    """The disparities of the most recent earlier bias audit of this model on this dataset."""
    repository = ref.repository
    for info in repository.ancestry():
        meta = info.metadata or {}
        if meta.get("stage") == "bias" and meta.get("cache_key") != current_key and \
                meta.get("dataset") == ref.dataset_meta:
            try:
                ds = repository.open(layout.bias_group(ref.ds_key, attr), info.id)
            except (FileNotFoundError, KeyError):
                return None
            return info.id, ds.load()
    return None


def regressions(current: xr.Dataset, previous: xr.Dataset) -> list[str]:
    """Disparities that got significantly worse.

    Convention: flagged when the current disparity is itself significant after
    the run's multiple-testing correction (``reject``) and exceeds the upper end
    of the previous audit's bootstrap interval of that disparity.
    """
    flagged = []
    for metric in current["metric"].values:
        if metric not in previous["metric"].values:
            continue
        cur, prev = current.sel(metric=metric), previous.sel(metric=metric)
        upper = float(prev["difference_ci"].values[-1]) if "difference_ci" in prev else float(prev["difference"])
        if bool(cur["reject"]) and float(cur["difference"]) > upper:
            flagged.append(str(metric))
    return flagged


def _bias_parts(target, bspec: BiasSpec) -> tuple[bool, bool, bool]:
    """Which parts of the bias stage apply: (association tests, prediction-level audit, encoder probes).
    ``target``: an extraction plan or an activations reference (both carry these fields)."""
    association = weat_stage.applies(target, bspec)
    predictions = (target.has_groups or getattr(target, "has_group_sets", False)) and target.n_outputs is not None
    encoder_probes = target.has_groups and target.n_outputs is None and bspec.probes and bool(target.sample_layers)
    return association, predictions, encoder_probes


def applies(target, bspec: BiasSpec) -> bool:
    """Whether the bias stage has anything to do for ``target`` (groups, or association tests)."""
    return any(_bias_parts(target, bspec))


def bias_key(target, bspec: BiasSpec) -> str | None:
    """Cache key of the bias stage of ``target`` with ``bspec``; None when the stage does not apply."""
    if not applies(target, bspec):
        return None
    params = bspec.model_dump()
    for name in ("multi_label", "multi_label_threshold"):   # at their defaults: the keys they had before
        if params[name] == BiasSpec.model_fields[name].default:
            del params[name]
    return cache_key("bias", activations=target.cache_key, **params, **weat_stage.key_params(target, bspec))


def _open_outputs(session, ref: ActivationsRef) -> xr.Dataset:
    """The stored outputs, every variable loaded but ``logits`` ``(sample, class)``: it stays lazy (xarray's
    lazily indexed backend array, no Dask: a slice reads only its chunks), read whole only by a measure that
    needs the matrix (output leakage) and by blocks for the own-class scores of contextual bias — ``O(n·C)``
    would dominate the stage at many classes."""
    ds = xr.open_zarr(session.store, group=layout.outputs_group(ref.ds_key), consolidated=False, chunks=None)
    lazy = [v for v in ("logits",) if v in ds]
    return ds.drop_vars(lazy).load().assign({v: ds[v] for v in lazy})


def run_bias(ref: ActivationsRef, bspec: BiasSpec, run_id: str | None = None) -> StageResult | None:
    """The bias audit of one model on a dataset with group attributes (and, for text
    encoders, WEAT/SEAT: :mod:`.weat`); one commit."""
    association, predictions, encoder_probes = _bias_parts(ref, bspec)
    if (key := bias_key(ref, bspec)) is None:
        return None
    if (snap := ref.repository.find(key)) is not None:
        return skipped("bias", ref, key, snap)
    session = ref.repository.session(ref.snapshot)
    matrices = open_matrices(ref, session=session)
    samples = xr.open_zarr(session.store, group=layout.samples_group(ref.ds_key), consolidated=False).load()
    outputs = _open_outputs(session, ref) if predictions else None
    groups_out: dict[str, xr.Dataset] = {}
    reports, summary, amp_tables, cf_tables = {}, {}, {}, {}
    attributes = samples.attrs.get("group_attributes", []) if predictions else []
    set_attributes = samples.attrs.get("multi_hot_attributes", []) if predictions else []
    train = amp_stage.training_side(ref, bspec)[0] if (attributes or set_attributes) and \
        bspec.train_split is not None and {"amplification", "contextual", "shortcut"} & set(bspec.measures) else None
    tasks = amp_stage.task_side(samples, outputs, bspec, train) \
        if train is not None and {"amplification", "contextual"} & set(bspec.measures) else None
    cf = shortcut_stage.counterfactual_outputs(ref) if attributes and "shortcut" in bspec.measures else None
    for attr in attributes:
        rep = bias_mod.group_metrics(
            samples["label"].values, outputs["prediction"].values, samples[attr].values,
            n_boot=bspec.n_boot, random_state=bspec.random_state, ci=bspec.ci,
            min_group_size=bspec.min_group_size, group_names=samples.attrs["group_names"].get(attr),
            n_permutations=bspec.n_permutations, correction=bspec.correction, alpha=bspec.alpha)
        reports[attr] = rep
        table = xr.merge([rep.table, rep.cells.rename({v: f"cell_{v}" for v in rep.cells.data_vars}),
                          rep.disparities.rename({v: f"disparity_{v}" for v in rep.disparities.data_vars})],
                         combine_attrs="drop")
        table.attrs.update({"attribute": attr, "overall_accuracy": rep.overall_accuracy,
                            "worst_group_accuracy": rep.worst_group_accuracy, "worst_group": rep.worst_group,
                            **bspec.model_dump()})
        groups_out[layout.bias_group(ref.ds_key, attr)] = table
        rep_ds = _representation_audit(ref, matrices, samples, outputs, attr, bspec) if bspec.probes else {}
        for name, ds in rep_ds.items():
            groups_out[f"{layout.bias_group(ref.ds_key, name)}/{attr}"] = ds
        prev = previous_disparities(ref, attr, key)
        worse = regressions(rep.disparities, prev[1].rename(
            {f"disparity_{v}": v for v in rep.disparities.data_vars if f"disparity_{v}" in prev[1]})) if prev else []
        summary[attr] = {
            "overall_accuracy": round(rep.overall_accuracy, 6),
            "worst_group_accuracy": round(rep.worst_group_accuracy, 6), "worst_group": rep.worst_group,
            "accuracy": dict(zip(rep.table["group"].values.tolist(), rep.table["accuracy"].values.round(6).tolist())),
            "disparities": {str(m): {"difference": round(float(rep.disparities["difference"].sel(metric=m)), 6),
                                     "p_adjusted": round(float(rep.disparities["p_adjusted"].sel(metric=m)), 6),
                                     "flagged": bool(rep.disparities["reject"].sel(metric=m))}
                            for m in rep.disparities["metric"].values},
            "regressions": worse, "previous_snapshot": prev[0] if prev else None,
        }
        if "probes" in rep_ds:
            summary[attr]["probe_accuracy"] = {
                str(p): dict(zip(ref.sample_layers, rep_ds["probes"]["accuracy"].sel(probe=p).values.round(4).tolist()))
                for p in rep_ds["probes"]["probe"].values}
            summary[attr]["probe_chance"] = round(float(rep_ds["probes"].attrs.get("chance", np.nan)), 4)
        if "output_leakage" in rep_ds:
            ol = rep_ds["output_leakage"].attrs
            summary[attr]["output_leakage"] = {k: round(float(ol[k]), 4) for k in ("leakage", "chance", "excess")
                                               if k in ol}
        if "erasure" in rep_ds:
            summary[attr]["erasure_delta_worst_group"] = dict(zip(
                ref.sample_layers, [round(float(v), 4) for v in
                              (rep_ds["erasure"]["worst_group_accuracy"].sel(stage="after")
                               - rep_ds["erasure"]["worst_group_accuracy"].sel(stage="before")).values]))
        if cf is not None:
            cf_tables[attr], _ = shortcut_stage.shortcut_table(samples, outputs, cf, attr, bspec, train)
            groups_out[f"{layout.bias_group(ref.ds_key, 'shortcut')}/{attr}"] = cf_tables[attr]
        if train is not None and {"amplification", "contextual"} & set(bspec.measures):
            tables, extra = amp_stage.attribute_tables(ref, samples, outputs, attr, bspec, train, tasks)
            summary[attr].update(extra)
            for name, ds in tables.items():
                groups_out[f"{layout.bias_group(ref.ds_key, name)}/{attr}"] = ds
            if "amplification" in tables:
                amp_tables[attr] = tables["amplification"]
        if worse:
            log.warning("%s on %s: disparities significantly worse than the previous audit: %s",
                        ref.model_uri, ref.ds_key, ", ".join(worse))
    for attr in set_attributes if tasks is not None else []:
        # set-valued attributes: amplification and contextual bias only (the group metrics need one group a sample)
        tables, summary[attr] = amp_stage.attribute_tables(ref, samples, outputs, attr, bspec, train, tasks)
        summary[attr]["multi_hot"] = True
        for name, ds in tables.items():
            groups_out[f"{layout.bias_group(ref.ds_key, name)}/{attr}"] = ds
        if "amplification" in tables:
            amp_tables[attr] = tables["amplification"]
    for attr, amp in amp_stage.adjust_amplification(amp_tables, bspec).items():
        summary[attr]["amplification"] = amp
        # the disparity rule on each measure: significant now and above the previous audit's interval
        prev = previous_disparities(ref, f"amplification/{attr}", key)
        worse = regressions(amp_stage.as_disparities(amp_tables[attr]), amp_stage.as_disparities(prev[1])) \
            if prev else []
        summary[attr]["measure_regressions"] = [f"amplification:{m}" for m in worse]
        if worse:
            log.warning("%s on %s: amplification of %s significantly worse than the previous audit: %s",
                        ref.model_uri, ref.ds_key, attr, ", ".join(worse))
    shortcut_stage.adjust_shortcut(cf_tables, summary, bspec)
    if reports:
        groups_out[layout.bias_group(ref.ds_key, "adjusted")] = bias_mod.adjust_run(
            reports, method=bspec.correction, alpha=bspec.alpha)
    for attr in (samples.attrs.get("group_attributes", []) if encoder_probes else []):
        probes = _encoder_probes(ref, matrices, samples, attr, bspec)
        groups_out[f"{layout.bias_group(ref.ds_key, 'probes')}/{attr}"] = probes
        summary[attr] = {"probe_accuracy": {str(p): dict(zip(ref.sample_layers, probes["accuracy"].sel(probe=p).values
                                                              .round(4).tolist())) for p in probes["probe"].values},
                         "probe_chance": round(float(probes.attrs.get("chance", np.nan)), 4)}
    if association:
        weat_ds, summary[weat_stage.SUMMARY_KEY] = weat_stage.run_weat(ref, bspec)
        groups_out[layout.bias_group(ref.ds_key, "weat")] = weat_ds

    def write(s):
        for group, ds in groups_out.items():
            write_dataset(s, ds, group)

    return commit_stage(ref, "bias", key, bspec.model_dump(), write, summary, run_id)
