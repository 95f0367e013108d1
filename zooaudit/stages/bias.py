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

Probes and erasure run on at most ``probe_max_samples`` samples (a fixed subset).
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from .. import layout
from ..analysis import bias as bias_mod
from ..extract import forward_batches
from ..keys import cache_key
from ..store import find_commit, write_dataset
from . import weat as weat_stage
from .common import (
    ExtractionPlan,
    StageResult,
    _commit_result,
    _read_session,
    _repo,
    load_model,
    random_init_activations,
    random_subset,
    shard_dataset,
    skipped,
)

log = logging.getLogger("zooaudit.stages")


def _representation_audit(plan: ExtractionPlan, session, samples: xr.Dataset, outputs: xr.Dataset, attr: str,
                          bspec: dict) -> dict[str, xr.Dataset]:
    """Probe leakage per layer beside its controls, output leakage, and erasure per layer."""
    idx = random_subset(plan.n_samples, bspec["probe_max_samples"], bspec["random_state"])
    groups, labels = samples[attr].values[idx], samples["label"].values[idx]
    dataset = shard_dataset(plan)
    inputs = dataset.inputs[idx].reshape(len(idx), -1)
    random_acts, _ = random_init_activations(plan, idx, plan.sample_layers, inputs=dataset.inputs[idx], required=False)
    probes, erasures = [], []
    kw = {"cv": bspec["probe_cv"], "random_state": bspec["random_state"]}
    for layer in plan.sample_layers:
        acts = np.asarray(layout.as_matrix(layout.open_activations(session.store, plan.ds_key, layer))[idx],
                          dtype=np.float64)
        controls = {"inputs": inputs}
        if layer in random_acts:
            controls["random_init"] = random_acts[layer]
        probes.append(bias_mod.probe_leakage(acts, groups, controls=controls, **kw).expand_dims(layer=[layer]))
        if bspec["erasure"]:
            erasures.append(bias_mod.erasure_diagnostic(acts, groups, labels, min_group_size=bspec["min_group_size"],
                                                        **kw).expand_dims(layer=[layer]))
    out = {"probes": xr.concat(probes, dim="layer", combine_attrs="drop_conflicts"),
           "output_leakage": bias_mod.output_leakage_within_label(outputs["logits"].values[idx], labels, groups, **kw)}
    if erasures:
        out["erasure"] = xr.concat(erasures, dim="layer", combine_attrs="drop_conflicts")
    return out


def _encoder_probes(plan: ExtractionPlan, session, samples: xr.Dataset, attr: str, bspec: dict) -> xr.Dataset:
    """Encoders (no predictions): probe leakage of ``attr`` per layer beside shuffled labels, a
    random-init copy and the input token embeddings (mask-aware mean: what the words alone carry)."""
    idx = random_subset(plan.n_samples, bspec["probe_max_samples"], bspec["random_state"])
    groups = samples[attr].values[idx]
    inputs = shard_dataset(plan).inputs[idx]
    model = load_model(plan.model_uri, plan.store)
    kw = {"pooling": "token_mean", "batch_size": plan.batch_size, "device": plan.device, "with_outputs": False}
    controls: dict[str, dict] = {}
    backbone = getattr(model.module, "_backbone", None)
    embed = backbone.get_input_embeddings() if backbone is not None else None
    name = next((n for n, m in model.module.named_modules() if m is embed), None)
    if name is not None:
        words = forward_batches(model.module, inputs, [name], **kw)[0][name]
        controls["input_embeddings"] = dict.fromkeys(plan.sample_layers, words)
    if (random_acts := random_init_activations(plan, idx, plan.sample_layers, inputs=inputs,
                                                       required=False)[0]):
        controls["random_init"] = random_acts
    probes = []
    for layer in plan.sample_layers:
        acts = np.asarray(layout.as_matrix(layout.open_activations(session.store, plan.ds_key, layer))[idx],
                          dtype=np.float64)
        probes.append(bias_mod.probe_leakage(
            acts, groups, cv=bspec["probe_cv"], random_state=bspec["random_state"],
            controls={c: v[layer].reshape(len(idx), -1) for c, v in controls.items()}).expand_dims(layer=[layer]))
    return xr.concat(probes, dim="layer", combine_attrs="drop_conflicts")


def previous_disparities(repo, plan: ExtractionPlan, attr: str, current_key: str) -> tuple[str, xr.Dataset] | None:
    """The disparities of the most recent earlier bias audit of this model on this dataset."""
    for info in repo.ancestry(branch="main"):
        meta = info.metadata or {}
        if meta.get("stage") == "bias" and meta.get("cache_key") != current_key and \
                meta.get("dataset") == plan.dataset:
            session = repo.readonly_session(snapshot_id=info.id)
            try:
                ds = xr.open_zarr(session.store, group=layout.bias_group(plan.ds_key, attr), consolidated=False)
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


def _bias_parts(plan: ExtractionPlan, bspec: dict) -> tuple[bool, bool, bool]:
    """Which parts of the bias stage apply: (association tests, prediction-level audit, encoder probes)."""
    association = weat_stage.applies(plan, bspec)
    predictions = plan.has_groups and plan.n_outputs is not None
    encoder_probes = plan.has_groups and plan.n_outputs is None and bspec["probes"] and bool(plan.sample_layers)
    return association, predictions, encoder_probes


def bias_key(plan: ExtractionPlan, bspec: dict) -> str | None:
    """Cache key of the bias stage of ``plan`` with ``bspec``; None when the stage does not apply."""
    if not any(_bias_parts(plan, bspec)):
        return None
    return cache_key("bias", activations=plan.cache_key, **bspec, **weat_stage.key_params(plan, bspec))


def run_bias(plan: ExtractionPlan, acts_snapshot: str, bspec: dict, run_id: str | None = None) -> StageResult | None:
    """The bias audit of one model on a dataset with group attributes (and, for text
    encoders, WEAT/SEAT: :mod:`.weat`); one commit."""
    association, predictions, encoder_probes = _bias_parts(plan, bspec)
    if (key := bias_key(plan, bspec)) is None:
        return None
    _, _, repo = _repo(plan)
    if (snap := find_commit(repo, key)) is not None:
        return skipped("bias", plan, key, snap)
    session = _read_session(plan, acts_snapshot)
    samples = xr.open_zarr(session.store, group=layout.samples_group(plan.ds_key), consolidated=False).load()
    outputs = xr.open_zarr(session.store, group=layout.outputs_group(plan.ds_key), consolidated=False).load() \
        if predictions else None
    groups_out: dict[str, xr.Dataset] = {}
    reports, summary = {}, {}
    for attr in (samples.attrs.get("group_attributes", []) if predictions else []):
        rep = bias_mod.group_metrics(
            samples["label"].values, outputs["prediction"].values, samples[attr].values,
            n_boot=bspec["n_boot"], random_state=bspec["random_state"], ci=bspec["ci"],
            min_group_size=bspec["min_group_size"], group_names=samples.attrs["group_names"].get(attr),
            n_permutations=bspec["n_permutations"], correction=bspec["correction"], alpha=bspec["alpha"])
        reports[attr] = rep
        table = xr.merge([rep.table, rep.cells.rename({v: f"cell_{v}" for v in rep.cells.data_vars}),
                          rep.disparities.rename({v: f"disparity_{v}" for v in rep.disparities.data_vars})],
                         combine_attrs="drop")
        table.attrs.update({"attribute": attr, "overall_accuracy": rep.overall_accuracy,
                            "worst_group_accuracy": rep.worst_group_accuracy, "worst_group": rep.worst_group,
                            **bspec})
        groups_out[layout.bias_group(plan.ds_key, attr)] = table
        rep_ds = _representation_audit(plan, session, samples, outputs, attr, bspec) if bspec["probes"] else {}
        for name, ds in rep_ds.items():
            groups_out[f"{layout.bias_group(plan.ds_key, name)}/{attr}"] = ds
        prev = previous_disparities(repo, plan, attr, key)
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
                str(p): dict(zip(plan.sample_layers, rep_ds["probes"]["accuracy"].sel(probe=p).values.round(4).tolist()))
                for p in rep_ds["probes"]["probe"].values}
            summary[attr]["probe_chance"] = round(float(rep_ds["probes"].attrs.get("chance", np.nan)), 4)
        if "output_leakage" in rep_ds:
            ol = rep_ds["output_leakage"].attrs
            summary[attr]["output_leakage"] = {k: round(float(ol[k]), 4) for k in ("leakage", "chance", "excess")
                                               if k in ol}
        if "erasure" in rep_ds:
            summary[attr]["erasure_delta_worst_group"] = dict(zip(
                plan.sample_layers, [round(float(v), 4) for v in
                              (rep_ds["erasure"]["worst_group_accuracy"].sel(stage="after")
                               - rep_ds["erasure"]["worst_group_accuracy"].sel(stage="before")).values]))
        if worse:
            log.warning("%s on %s: disparities significantly worse than the previous audit: %s",
                        plan.model_uri, plan.ds_key, ", ".join(worse))
    if reports:
        groups_out[layout.bias_group(plan.ds_key, "adjusted")] = bias_mod.adjust_run(
            reports, method=bspec["correction"], alpha=bspec["alpha"])
    for attr in (samples.attrs.get("group_attributes", []) if encoder_probes else []):
        probes = _encoder_probes(plan, session, samples, attr, bspec)
        groups_out[f"{layout.bias_group(plan.ds_key, 'probes')}/{attr}"] = probes
        summary[attr] = {"probe_accuracy": {str(p): dict(zip(plan.sample_layers, probes["accuracy"].sel(probe=p).values
                                                              .round(4).tolist())) for p in probes["probe"].values},
                         "probe_chance": round(float(probes.attrs.get("chance", np.nan)), 4)}
    if association:
        weat_ds, summary[weat_stage.SUMMARY_KEY] = weat_stage.run_weat(plan, bspec)
        groups_out[layout.bias_group(plan.ds_key, "weat")] = weat_ds

    def write(s):
        for group, ds in groups_out.items():
            write_dataset(s, ds, group)

    return _commit_result(plan, "bias", key, bspec, write, summary, run_id)
