"""Similarity stage: layer × layer matrices per metric, each beside its control.

Controls (FIELD-NOTES.md: raw CKA/RSA between unrelated networks is high, so a
number alone says little):

- ``shuffle``: the same metric with the second representation's samples
  permuted (fixed ``random_state``) — the value for unrelated representations
  at this sample size;
- ``random_init``: the same metric against a random-initialised copy of the
  model on the same inputs.

Controls are computed in memory on at most ``control_max_samples`` samples (a
fixed random subset, recorded as ``control_n``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .. import layout
from ..analysis.similarity import similarity_matrix
from ..data import load_dataset
from ..errors import ZooauditError
from ..extract import forward_batches
from ..keys import cache_key
from ..store import find_commit, write_dataset
from .common import ExtractionPlan, StageResult, _commit_result, _read_session, _repo, load_model, skipped


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


def control_arrays(plan: ExtractionPlan, layers: dict, sspec: dict) -> tuple[dict, dict, int]:
    """``(reference, control, n)``: the layers on the control subset and their control counterparts."""
    rng = np.random.default_rng(sspec["random_state"])
    n = plan.n_samples
    idx = np.sort(rng.choice(n, sspec["control_max_samples"], replace=False)) if n > sspec[
        "control_max_samples"] else np.arange(n)
    ref = {k: np.asarray(v[idx] if len(idx) < n else v, dtype=np.float64) for k, v in layers.items()}
    if sspec["control"] == "shuffle":
        perm = rng.permutation(len(idx))
        return ref, {k: a[perm] for k, a in ref.items()}, len(idx)
    model = load_model(plan.model_uri, plan.store)
    if model.random_init is None:
        raise ZooauditError(f"Model {plan.model_uri!r} cannot build a random-initialised copy; "
                            "use control='shuffle' or control='none'.")
    inputs = load_dataset(plan.dataset).inputs[idx]
    acts, _ = forward_batches(model.random_init(), inputs, plan.sample_layers, pooling=plan.pooling,
                              batch_size=plan.batch_size, device=plan.device, with_outputs=False)
    return ref, {k: _flat(acts[k]).astype(np.float64) for k in layers}, len(idx)


def shuffled_control(named: dict, metric: str, sspec: dict, dims: tuple[str, str] = ("layer_a", "layer_b"),
                     named_b: dict | None = None) -> tuple[xr.DataArray, int]:
    """``metric`` of every array of ``named`` against every array of ``named_b``
    (default: ``named``) with the second one's samples permuted (one fixed
    permutation, at most ``control_max_samples`` rows)."""
    named_b = named if named_b is None else named_b
    rng = np.random.default_rng(sspec["random_state"])
    n = next(iter(named.values())).shape[0]
    cap = sspec["control_max_samples"]
    idx = np.sort(rng.choice(n, cap, replace=False)) if n > cap else np.arange(n)

    def subset(d):
        return {k: np.asarray(v[idx] if len(idx) < n else v, dtype=np.float64) for k, v in d.items()}

    perm = rng.permutation(len(idx))
    other = {f"control:{k}": a[perm] for k, a in subset(named_b).items()}
    mat = similarity_matrix(subset(named), other, metric=metric, dims=dims)
    return mat.assign_coords({dims[1]: list(named_b)}), len(idx)


def layer_similarity(plan: ExtractionPlan, layers: dict, sspec: dict) -> dict[str, xr.Dataset]:
    """``{metric: Dataset(value, control (layer_a, layer_b))}`` for the model's layers."""
    out = {}
    ctrl = control_arrays(plan, layers, sspec) if sspec["control"] != "none" else None
    for metric in sspec["metrics"]:
        value = similarity_matrix(layers, metric=metric)
        data = {"value": value}
        attrs = {"metric": metric, "control": sspec["control"]}
        if ctrl is not None:
            ref, other, n_ctrl = ctrl
            # distinct keys: the control side is a different array under the same layer name
            c = similarity_matrix(ref, {f"control:{k}": v for k, v in other.items()}, metric=metric)
            data["control"] = c.assign_coords(layer_b=list(layers))
            attrs["control_n"] = n_ctrl
        out[metric] = xr.Dataset(data, attrs=attrs)
    return out


def run_similarity(plan: ExtractionPlan, acts_snapshot: str, sspec: dict, run_id: str | None = None) -> StageResult:
    """Layer × layer matrices of every chosen metric, each beside its control; one commit."""
    key = cache_key("similarity", activations=plan.cache_key, **sspec)
    _, _, repo = _repo(plan)
    if (snap := find_commit(repo, key)) is not None:
        return skipped("similarity", plan, key, snap)
    session = _read_session(plan, acts_snapshot)
    layers = {l: layout.as_matrix(layout.open_activations(session.store, plan.ds_key, l)) for l in plan.sample_layers}
    results = layer_similarity(plan, layers, sspec)

    def write(s):
        for metric, ds in results.items():
            write_dataset(s, ds, layout.similarity_group(plan.ds_key, metric))

    summary = {"layers": plan.sample_layers, "control": sspec["control"],
               **{m: {"value": ds["value"].values.round(6).tolist(),
                      **({"control": ds["control"].values.round(6).tolist()} if "control" in ds else {})}
                  for m, ds in results.items()}}
    return _commit_result(plan, "similarity", key, sspec, write, summary, run_id)
