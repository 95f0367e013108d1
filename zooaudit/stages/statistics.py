"""Activation statistics stage (an array stage): sparsity, dead and massive activations, the
spectrum and neural collapse of every per-sample layer, from ONE streamed pass over the
committed activations (all layers read together, block of rows by block of rows; memory
independent of the number of samples). Definitions: :mod:`zooaudit.analysis.act_stats` and
:mod:`zooaudit.analysis.neural_collapse`.

Written under ``<ds>/statistics/`` (:func:`zooaudit.layout.statistics_group`)::

    summary          (layer): activation ratio, per-sample active fraction median/p10/p90, dead
                     and always-active unit fractions, median |a| (with its histogram bounds),
                     max |a| and its ratio to the median, massive units, effective rank,
                     participation ratio, stable rank, variance share of the top 1/10/100
                     components, n_units
    layers/<layer>   unit_active_fraction, unit_max_abs (unit); sample_active_fraction (sample);
                     eigenvalues (component); the top-k |a|: top_value, top_sample, top_unit,
                     top_ratio, top_massive (rank)
    collapse         (nc_layer): nc1, nc2_equinorm, nc2_equiangular, nc3 (with the classifier
                     weights stored beside the activations), nc4 (with the model's predictions),
                     n_classes
    groups/<attr>    (layer, group): activation_ratio, dead_fraction within each group;
                     (nc_layer, group): nc1 on the group's samples

Units of spatial maps (``pooling="none"``) are the flattened ``(channel, y, x)`` positions.
All-tokens layers (``pooling="tokens"``) get sparsity, massive activations and the spectrum with
every real token as a row (``token_active_fraction``, quantiles over tokens, ``top_position``),
in a pass of their own; no per-group figures and no neural collapse (no row per sample). Layers wider than
``max_spectrum_width`` with fewer rows than units take their spectrum from the ``n × n`` Gram of
their centred rows (same nonzero eigenvalues, rows kept as the pass reads them, within
``sim_span.MAX_REDUCE_BYTES`` over all such layers of a pass: the per-sample pass, then each
all-tokens layer's own, one at a time); otherwise they get none. Either is recorded. Neural collapse runs on the
``nc_layers`` (default: the penultimate layer — the stored layer that feeds the classifier where
the classifier control found one, else the last per-sample layer before the output layer) of
labelled datasets; on a dataset whose labels take fewer than two values (an
unlabelled text set stores zeros) it is skipped and the reason recorded. NC4 needs the final
class means: it reads the NC layers a second time. The covariance GEMMs run with torch on the
run's GPU when it has one (:class:`~zooaudit.analysis.sim_torch.TorchJointGram`, as the
similarity stage's moments); everything else is NumPy on the CPU.

Regression (the nightly alert's two triggers): the summary's ``regressions`` lists the layers whose
dead-unit fraction rose, or whose effective rank or NC1 moved, beyond the spec's thresholds since
the previous statistics commit of this model on this dataset (``previous_snapshot``).

Bad input — NaN/±Inf activations, an NC layer with fewer samples than classes — raises
:class:`~zooaudit.errors.ZooauditError` before anything is committed.
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from .. import layout
from ..analysis.act_stats import TOP_COMPONENTS, ActivationStats, spectrum_route, spectrum_routing
from ..analysis.neural_collapse import ClassScatter, nc_metrics, ncc_agreement
from ..analysis.sim_span import MAX_REDUCE_BYTES
from ..analysis.sim_stream import block_rows, iter_row_blocks
from ..devices import moments_device
from ..errors import ZooauditError
from ..keys import cache_key
from ..specs import StatisticsSpec
from ..store import write_datasets
from .common import commit_stage, open_matrices, skipped
from .refs import ActivationsRef, StageResult

SCALARS = ("activation_ratio", "sample_fraction_median", "sample_fraction_p10", "sample_fraction_p90",
           "dead_fraction", "always_active_fraction", "median_abs", "median_abs_lo", "median_abs_hi", "max_abs",
           "max_to_median", "n_massive_units", "effective_rank", "participation_ratio", "stable_rank",
           *(f"variance_top_{k}" for k in TOP_COMPONENTS))
log = logging.getLogger("zooaudit.stages")

NC_SCALARS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "n_classes")


def _width(target, layer: str) -> int:
    return int(np.prod(target.shapes[layer]))


def nc_layer_names(target, spec: StatisticsSpec) -> list[str]:
    """The layers whose neural collapse is computed: ``spec.nc_layers`` resolved against the
    per-sample layers of ``target`` (``penultimate``: the stored layer that feeds the classifier
    where the classifier control found one — a text classifier's ``bert.pooler`` — else the last
    one before the output layer, the output layer being the last layer when its width is the
    number of outputs)."""
    layers = list(target.sample_layers)
    fed = getattr(target, "controls", {}).get("classifier")
    fed = [name for name in (fed.layers if fed is not None else ()) if name in layers]
    out: list[str] = []
    for name in spec.nc_layers:
        if name == "*":
            out.extend(layers)
        elif name == "penultimate" and fed:
            out.extend(fed[:1])
        elif name == "penultimate":
            rest = layers[:-1] if layers and target.n_outputs is not None and \
                _width(target, layers[-1]) == target.n_outputs else layers
            out.extend(rest[-1:])
        elif name in layers:
            out.append(name)
        else:
            raise ZooauditError(f"StatisticsSpec.nc_layers names {name!r}, which is not a per-sample layer of "
                                f"{target.model_uri!r}; allowed: 'penultimate', '*', {', '.join(layers)}.")
    return list(dict.fromkeys(out))


def _classifier(ref: ActivationsRef):
    """``(weights (class, unit), input layer)`` stored beside the activations, or None."""
    control = ref.controls.get("classifier")
    if control is None or not control.provenance.get("module"):   # none, or no linear head found (empty product)
        return None
    ds = ref.repository.open(control.group, control.snapshot).load()
    return (ds["weight"].values, ds.attrs.get("input_layer")) if "weight" in ds else None


def _samples(ref: ActivationsRef, session) -> xr.Dataset:
    return xr.open_zarr(session.store, group=layout.samples_group(ref.ds_key), consolidated=False).load()


def statistics(ref: ActivationsRef, spec: StatisticsSpec) -> tuple[dict[str, xr.Dataset], dict]:
    """``({group: Dataset}, summary)`` of every per-sample layer of ``ref`` (see the module docstring)."""
    session = ref.repository.session(ref.snapshot)
    layers = list(ref.sample_layers)
    matrices = open_matrices(ref, layers, session=session)
    samples = _samples(ref, session)
    ids = samples["sample"].values
    labels = samples["label"].values.astype(np.int64)
    attrs = list(samples.attrs.get("group_attributes", []))
    codes = {a: samples[a].values.astype(np.int64) for a in attrs}
    n_codes = {a: int(codes[a].max()) + 1 if len(codes[a]) else 0 for a in attrs}
    notes: dict[str, str] = {}

    nc_names = nc_layer_names(ref, spec)
    if nc_names and len(np.unique(labels)) < 2:
        notes["collapse"] = (f"skipped: the dataset's labels take {len(np.unique(labels))} value(s) — unlabelled; "
                             "neural collapse needs at least two classes")
        nc_names = []
    n_classes = max(int(labels.max()) + 1, ref.n_outputs or 0) if len(labels) else 0
    if nc_names and len(labels) < n_classes:   # at the door, before the pass (nc_metrics says the same)
        raise ZooauditError(f"Layer {nc_names[0]!r}: neural collapse needs at least as many samples as classes; "
                            f"got {len(labels)} samples for {n_classes} classes. Audit on more samples or set "
                            "StatisticsSpec.nc_layers=[].")
    device = moments_device(ref.device)   # the covariance GEMMs on the run's GPU, when it has one
    budget = [MAX_REDUCE_BYTES]   # the Gram route's rows, over all layers of the pass
    acc = {name: _accumulator(name, len(ids), _width(ref, name), spec, device, notes, budget, groups=n_codes)
           for name in layers}
    nc = {name: ClassScatter(_width(ref, name), n_classes, name=name) for name in nc_names}
    nc_groups = {(name, a, g): ClassScatter(_width(ref, name), n_classes, name=f"{name} ({a}={g})")
                 for name in nc_names for a in attrs for g in range(n_codes[a])}

    arrays = [matrices[name] for name in layers]
    rows = block_rows(sum(_width(ref, n) for n in layers), 4)
    for start, stop, parts in iter_row_blocks(arrays, rows):
        block_codes = {a: c[start:stop] for a, c in codes.items()}
        for name, block in zip(layers, parts, strict=True):
            acc[name].update(block, start, block_codes)
            if name in nc:
                y = labels[start:stop]
                nc[name].update(block, y)
                for a in attrs:
                    for g in range(n_codes[a]):
                        rows_g = block_codes[a] == g
                        if rows_g.any():
                            nc_groups[(name, a, g)].update(block[rows_g], y[rows_g])

    results = {name: acc[name].result(spec.massive_abs_threshold, spec.massive_ratio_threshold) for name in layers}
    # The results are copies: free the per-sample layers' Gram rows and covariances before the
    # token passes, each of which may spend a whole MAX_REDUCE_BYTES of Gram rows of its own
    # (kept, the peak was twice the budget).
    acc.clear()
    token_layers = [name for name in ref.layers if name not in layers]
    tokens = {}
    for name in token_layers:   # rows are tokens: a pass of their own (another row space)
        results[name], tokens[name] = _token_layer(ref, session, name, spec, device, notes)
    all_layers = layers + token_layers
    out: dict[str, xr.Dataset] = {}
    summary_ds = xr.Dataset(
        {k: ("layer", np.array([float(results[n].get(k, np.nan)) for n in all_layers])) for k in SCALARS},
        coords={"layer": all_layers, "n_units": ("layer", [_width(ref, n) for n in all_layers]),
                "rows": ("layer", ["sample"] * len(layers) + ["token"] * len(token_layers))},
        attrs={"eps": spec.eps, "top_k": spec.top_k, "massive_abs_threshold": spec.massive_abs_threshold,
               "massive_ratio_threshold": spec.massive_ratio_threshold, "n": ref.n_samples,
               "median": "bounded float32-bit histogram, midpoint of [median_abs_lo, median_abs_hi]",
               "notes": [f"{k}: {v}" for k, v in notes.items()]})
    out[layout.statistics_group(ref.ds_key, "summary")] = summary_ds
    for name in layers:
        out[layout.statistics_group(ref.ds_key, f"layers/{name}")] = _layer_dataset(name, results[name], ids)
    for name in token_layers:
        out[layout.statistics_group(ref.ds_key, f"layers/{name}")] = _token_dataset(name, results[name], tokens[name])

    summary = {"layers": all_layers, "notes": notes, "groups": attrs, "token_layers": token_layers,
               **{k: {n: _round(results[n].get(k, np.nan)) for n in all_layers}
                  for k in ("activation_ratio", "dead_fraction", "always_active_fraction", "max_abs",
                            "max_to_median", "n_massive_units", "effective_rank")}}
    if attrs:
        for a in attrs:
            gds = _group_dataset(a, n_codes[a], samples, layers, results, codes[a])
            out[layout.statistics_group(ref.ds_key, f"groups/{a}")] = gds
    if nc_names:
        cds, group_nc1 = _collapse(ref, session, nc, nc_groups, matrices, attrs, n_codes, notes)
        out[layout.statistics_group(ref.ds_key, "collapse")] = cds
        for a in attrs:
            g = out[layout.statistics_group(ref.ds_key, f"groups/{a}")]
            g["nc1"] = (("nc_layer", "group"), group_nc1[a])
            out[layout.statistics_group(ref.ds_key, f"groups/{a}")] = g.assign_coords(nc_layer=nc_names)
        summary["collapse"] = {k: {n: _round(cds[k].sel(nc_layer=n).item()) for n in nc_names} for k in NC_SCALARS}
    return out, summary


def _round(v) -> float | int | None:
    v = float(v)
    return None if not np.isfinite(v) else round(v, 6)


def _layer_dataset(name: str, r: dict, ids: np.ndarray) -> xr.Dataset:
    ds = xr.Dataset({
        "unit_active_fraction": ("unit", r["unit_active_fraction"]),
        "unit_max_abs": ("unit", r["unit_max_abs"]),
        "sample_active_fraction": ("sample", r["sample_active_fraction"]),
        "top_value": ("rank", r["top_value"]), "top_sample": ("rank", ids[r["top_row"]]),
        "top_unit": ("rank", r["top_unit"]), "top_ratio": ("rank", r["top_ratio"]),
        "top_massive": ("rank", r["top_massive"])},
        coords={"unit": np.arange(len(r["unit_active_fraction"])), "sample": ids,
                "rank": np.arange(len(r["top_value"]))},
        attrs={"layer": name, "eps": r["eps"], "top": "largest |a| over every (sample, unit), ties by position"})
    if "eigenvalues" in r:
        ds["eigenvalues"] = ("component", r["eigenvalues"])
        ds.attrs["eigenvalues"] = "of the covariance of the centred layer (ddof 0), descending"
    return ds


def _accumulator(name: str, n: int, width: int, spec: StatisticsSpec, device, notes: dict, budget: list[int],
                 groups: dict[str, int] | None = None) -> ActivationStats:
    """An :class:`ActivationStats` for one layer, its spectrum routed by :func:`spectrum_route`
    (the route noted unless plain); ``budget[0]``: Gram-route bytes left, spent here."""
    route, why = spectrum_route(n, width, spec.max_spectrum_width, budget[0])
    if route == "gram":
        budget[0] -= n * width * 8
    if why:
        notes[f"{name}/spectrum"] = why
    return ActivationStats(width, eps=spec.eps, top_k=spec.top_k, name=name, groups=groups, device=device,
                           spectrum=route is not None, gram_rows=n if route == "gram" else None)


def _token_layer(ref: ActivationsRef, session, name: str, spec: StatisticsSpec, device, notes: dict):
    """``(result, TokenIndex)`` of an all-tokens layer: every real token is a row (the per-row
    fractions and their quantiles are over tokens)."""
    from ..analysis.blocks import iter_blocks
    from .factorize import open_token_layer

    matrix, index = open_token_layer(session.store, ref.ds_key, name)
    width = int(matrix.shape[1])
    acc = _accumulator(name, int(matrix.shape[0]), width, spec, device, notes, [MAX_REDUCE_BYTES])
    for start, _, block in iter_blocks(matrix):
        acc.update(block, start)
    return acc.result(spec.massive_abs_threshold, spec.massive_ratio_threshold), index


def _token_dataset(name: str, r: dict, index) -> xr.Dataset:
    ds = xr.Dataset({
        "unit_active_fraction": ("unit", r["unit_active_fraction"]),
        "unit_max_abs": ("unit", r["unit_max_abs"]),
        "token_active_fraction": ("token", r["sample_active_fraction"]),
        "top_value": ("rank", r["top_value"]), "top_sample": ("rank", index.sample_ids[index.owner[r["top_row"]]]),
        "top_position": ("rank", index.position[r["top_row"]]),
        "top_unit": ("rank", r["top_unit"]), "top_ratio": ("rank", r["top_ratio"]),
        "top_massive": ("rank", r["top_massive"])},
        coords={"unit": np.arange(len(r["unit_active_fraction"])), "rank": np.arange(len(r["top_value"])),
                "token_sample": ("token", index.sample_ids[index.owner]),
                "token_position": ("token", index.position)},
        attrs={"layer": name, "eps": r["eps"], "rows": "tokens",
               "top": "largest |a| over every (token, unit), ties by position"})
    if "eigenvalues" in r:
        ds["eigenvalues"] = ("component", r["eigenvalues"])
    return ds


def _group_dataset(attr: str, n_codes: int, samples: xr.Dataset, layers: list[str], results: dict,
                   codes: np.ndarray) -> xr.Dataset:
    names = (samples.attrs.get("group_names") or {}).get(attr) or [str(g) for g in range(n_codes)]
    ratio = np.full((len(layers), n_codes), np.nan)
    dead = np.full((len(layers), n_codes), np.nan)
    for i, name in enumerate(layers):
        frac = results[name]["sample_active_fraction"]
        units = results[name]["group_unit_active_fraction"][attr]
        for g in range(n_codes):
            if (codes == g).any():
                ratio[i, g] = frac[codes == g].mean()
                dead[i, g] = (units[g] == 0).mean()
    return xr.Dataset({"activation_ratio": (("layer", "group"), ratio), "dead_fraction": (("layer", "group"), dead),
                       "count": ("group", np.bincount(codes, minlength=n_codes))},
                      coords={"layer": layers, "group": list(names)[:n_codes]}, attrs={"attribute": attr})


def _collapse(ref, session, nc: dict, nc_groups: dict, matrices: dict, attrs: list[str], n_codes: dict,
              notes: dict) -> tuple[xr.Dataset, dict]:
    names = list(nc)
    classifier = _classifier(ref)
    predictions = None
    if ref.n_outputs is not None:
        predictions = xr.open_zarr(session.store, group=layout.outputs_group(ref.ds_key),
                                   consolidated=False)["prediction"].values
    else:
        notes["nc4"] = "skipped: the model has no predictions (an encoder)"
    values = {k: np.full(len(names), np.nan) for k in NC_SCALARS}
    for i, name in enumerate(names):
        W = None
        if classifier is not None and classifier[1] == name:
            W = classifier[0]
        m = nc_metrics(nc[name], classifier=W)
        for k in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "n_classes"):
            values[k][i] = m.get(k, np.nan)
        if predictions is not None:
            values["nc4"][i] = ncc_agreement(matrices[name], nc[name], predictions)
    if classifier is None:
        notes["nc3"] = "skipped: no classifier weights were stored beside the activations"
    elif classifier[1] not in names:
        notes["nc3"] = f"only for the classifier's input layer {classifier[1]!r}, not among the NC layers"
    group_nc1 = {}
    for a in attrs:
        arr = np.full((len(names), n_codes[a]), np.nan)
        for i, name in enumerate(names):
            for g in range(n_codes[a]):
                acc = nc_groups[(name, a, g)]
                if acc.n >= acc.C and (acc.count > 0).sum() >= 2:   # else NaN: too few samples in the group
                    arr[i, g] = nc_metrics(acc)["nc1"]
        group_nc1[a] = arr
    ds = xr.Dataset({k: ("nc_layer", v) for k, v in values.items()}, coords={"nc_layer": names},
                    attrs={"convention": "Papyan et al. 2020: NC1 = tr(Σ_W Σ_B⁺)/C, μ_G global mean, Σ_B "
                           "unweighted over classes; NC2 CV with ddof 1; NC4 agreement with the model's "
                           "predictions"})
    return ds, group_nc1


def previous_summary(ref: ActivationsRef, current_key: str) -> tuple[str, dict] | None:
    """``(snapshot, summary)`` of the most recent earlier statistics commit of this model on this
    dataset (another cache key: earlier activations or parameters), or None."""
    for info in ref.repository.ancestry():
        meta = info.metadata or {}
        if meta.get("stage") == "statistics" and meta.get("cache_key") != current_key and \
                meta.get("dataset") == ref.dataset_meta:
            return info.id, dict(meta.get("summary") or {})
    return None


def regressions(current: dict, previous: dict, spec: StatisticsSpec) -> list[dict]:
    """The statistics that moved beyond the spec's thresholds since ``previous`` (summaries):
    a layer's dead-unit fraction up by more than ``regression_dead_increase`` (absolute), a
    layer's effective rank or an NC layer's NC1 changed by more than
    ``regression_relative_change`` of its previous value (either way)."""
    found = []
    for layer, now in (current.get("dead_fraction") or {}).items():
        before = (previous.get("dead_fraction") or {}).get(layer)
        if now is not None and before is not None and now - before > spec.regression_dead_increase:
            found.append({"metric": "dead_fraction", "layer": layer, "previous": before, "current": now})
    pairs = [("effective_rank", current.get("effective_rank") or {}, previous.get("effective_rank") or {}),
             ("nc1", (current.get("collapse") or {}).get("nc1") or {}, (previous.get("collapse") or {}).get("nc1") or {})]
    for metric, now_all, before_all in pairs:
        for layer, now in now_all.items():
            before = before_all.get(layer)
            if now is not None and before and abs(now - before) > spec.regression_relative_change * abs(before):
                found.append({"metric": metric, "layer": layer, "previous": before, "current": now})
    return found


def statistics_key(target, spec: StatisticsSpec) -> str | None:
    """Cache key of the statistics stage of ``target`` (plan or reference); None when disabled or
    when ``target`` has no layer. Beside the activations and the spec it holds the spectrum
    routing rule (:func:`~zooaudit.analysis.act_stats.spectrum_routing`): the same activations
    and spec give the same routes only under the same rule."""
    if not spec.enabled or not target.layers:
        return None
    controls = getattr(target, "controls", {}) or {}
    classifier = controls["classifier"].cache_key if "classifier" in controls else None
    # penultimate: the rule 'penultimate' resolves by (nc_layer_names) — results of the earlier
    # rule (the last layer before the output only) are not reused under it
    return cache_key("statistics", activations=target.cache_key, classifier=classifier,
                     spectrum_routing=spectrum_routing(MAX_REDUCE_BYTES), penultimate="classifier-input",
                     **spec.model_dump())


def run_statistics(ref: ActivationsRef, spec: StatisticsSpec, run_id: str | None = None) -> StageResult | None:
    """Every statistic of every per-sample layer of ``ref``; one commit (none on error)."""
    if (key := statistics_key(ref, spec)) is None:
        return None
    if (snap := ref.repository.find(key)) is not None:
        return skipped("statistics", ref, key, snap)
    results, summary = statistics(ref, spec)
    prev = previous_summary(ref, key)
    summary["previous_snapshot"] = prev[0] if prev else None
    summary["regressions"] = regressions(summary, prev[1], spec) if prev else []
    if summary["regressions"]:
        log.warning("%s on %s: activation statistics moved since the previous audit: %s", ref.model_uri, ref.ds_key,
                    ", ".join(f"{r['metric']}:{r['layer']}" for r in summary["regressions"]))

    def write(s):   # ~80 small arrays: created and filled in one batch (byte-identical to write_dataset)
        write_datasets(s, results)

    return commit_stage(ref, "statistics", key, spec.model_dump(), write, summary, run_id)
