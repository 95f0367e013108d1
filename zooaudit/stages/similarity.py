"""Similarity stage: layer × layer matrices per metric, each beside its control.

Which samples each metric sees:

- streamed metrics (linear CKA biased/debiased, CCA, SVCCA, PWCCA, Procrustes;
  ``STREAMED_METRICS``) use every sample, all of them and all layer pairs from ONE
  pass over the Zarr chunks (joint second moments of all layers, memory
  independent of the number of samples; accumulated with torch on the GPU when the
  run's device resolves to CUDA, with NumPy otherwise);
- minibatch CKA (``MINIBATCH_METRICS``) uses every sample in random minibatches of
  ``minibatch_size`` rows (kernel ``minibatch_kernel``: linear estimates debiased
  linear CKA, rbf debiased RBF CKA), the same minibatches for every pair;
- sample-pair metrics (RBF CKA, RSA, mutual k-NN; ``SAMPLE_PAIR_METRICS``) build
  n×n Grams / RDMs / neighbour searches: they use a fixed random subset of at most
  ``pairwise_max_samples`` samples (all when fewer), recorded as ``n`` in the
  result's attrs.

Controls (FIELD-NOTES.md: raw CKA/RSA between unrelated networks is high, so a
number alone says little):

- ``shuffle``: the same metric with the second representation's samples
  permuted (fixed ``random_state``) — the value for unrelated representations
  at this sample size;
- ``random_init``: the same metric against a random-initialised copy of the
  model on the same inputs (the copy is built by the model's source from a fixed
  torch seed, recorded as ``random_init_seed``, and its activations are extracted
  by the model stage: :mod:`.controls`; sources that cannot build one —
  TorchScript and exported programs — are refused with a message).

Controls are computed in memory on at most ``control_max_samples`` samples (a
fixed random subset, recorded as ``control_n``; sample-pair metrics also within
``pairwise_max_samples``).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import xarray as xr

from .. import layout
from ..analysis.similarity import (
    MINIBATCH_METRICS,
    SAMPLE_PAIR_METRICS,
    DegenerateCCAWarning,
    UndefinedSimilarityWarning,
    similarity_matrices,
)
from ..devices import moments_device
from ..keys import cache_key
from ..specs import SimilaritySpec
from ..store import write_dataset
from .common import read_rows, commit_stage, control_rows, open_matrices, random_subset, skipped
from .refs import ActivationsRef, StageResult

log = logging.getLogger("zooaudit.stages")


def metric_params(metrics: list[str], sspec: SimilaritySpec) -> dict[str, dict]:
    """Options of the chosen metrics taken from the spec (minibatch CKA: kernel, size, seed)."""
    if "minibatch_cka" not in metrics:
        return {}
    return {"minibatch_cka": {"kernel": sspec.minibatch_kernel, "batch_size": sspec.minibatch_size,
                              "random_state": sspec.random_state}}


def similarity_with_subsets(named_a: dict, named_b: dict | None, metrics: list[str], sspec: SimilaritySpec,
                            dims: tuple[str, str] = ("layer_a", "layer_b"),
                            device: str | None = None) -> tuple[dict, dict]:
    """``({metric: (len(a), len(b)) DataArray}, {metric: samples used})``.

    Streamed metrics over all rows in one joint pass (with torch on ``device`` when it
    resolves to CUDA); minibatch CKA over all rows; sample-pair metrics on a fixed
    random subset of at most ``pairwise_max_samples`` rows (the same rows for every
    representation).
    """
    first = next(iter(named_a.values()))
    n = int(first.shape[0])
    pairwise = [m for m in metrics if m in SAMPLE_PAIR_METRICS]
    every_row = [m for m in metrics if m not in SAMPLE_PAIR_METRICS]   # streamed and minibatch
    out, used = {}, {}
    if every_row:
        out.update(similarity_matrices(named_a, named_b, metrics=every_row, dims=dims,
                                       params=metric_params(every_row, sspec), device=moments_device(device)))
        used.update({m: n for m in every_row})
    if pairwise:
        idx = random_subset(n, sspec.pairwise_max_samples, sspec.random_state)
        sub_a = {k: read_rows(v, idx) for k, v in named_a.items()}
        sub_b = None if named_b is None else {k: read_rows(v, idx) for k, v in named_b.items()}
        out.update(similarity_matrices(sub_a, sub_b, metrics=pairwise, dims=dims))
        used.update({m: len(idx) for m in pairwise})
    return out, used


def control_arrays(ref: ActivationsRef, layers: dict, sspec: SimilaritySpec) -> tuple[dict, dict, int, dict]:
    """``(reference, control, n, provenance)``: the layers on the control subset, their control
    counterparts (shuffled rows, or the random-init control's rows), and what identifies the
    control (the random-init seed)."""
    rng = np.random.default_rng(sspec.random_state)
    idx = random_subset(ref.n_samples, sspec.control_max_samples, rng)
    rows = {k: read_rows(v, idx) for k, v in layers.items()}
    if sspec.control == "shuffle":
        perm = rng.permutation(len(idx))
        return rows, {k: a[perm] for k, a in rows.items()}, len(idx), {}
    other, provenance = control_rows(ref, "random_init", list(layers), idx)
    return rows, other, len(idx), provenance


def shuffled_controls(named: dict, metrics: list[str], sspec: SimilaritySpec, dims: tuple[str, str] = ("layer_a", "layer_b"),
                      named_b: dict | None = None) -> tuple[dict, dict]:
    """Every metric of every array of ``named`` against every array of ``named_b``
    (default: ``named``) with the second one's samples permuted (one fixed
    permutation, at most ``control_max_samples`` rows): ``({metric: DataArray},
    {metric: samples used})``; coordinates are the plain names."""
    named_b = named if named_b is None else named_b
    rng = np.random.default_rng(sspec.random_state)
    n = next(iter(named.values())).shape[0]
    idx = random_subset(n, sspec.control_max_samples, rng)
    perm = rng.permutation(len(idx))
    ref = {k: read_rows(v, idx) for k, v in named.items()}
    # distinct keys and arrays: the control side is a different array even under the same name
    other = {f"control:{k}": read_rows(v, idx)[perm] for k, v in named_b.items()}
    mats, used = similarity_with_subsets(ref, other, metrics, sspec, dims)
    return {m: a.assign_coords({dims[1]: list(named_b)}) for m, a in mats.items()}, used


def layer_similarity(ref: ActivationsRef, layers: dict, sspec: SimilaritySpec) -> dict[str, xr.Dataset]:
    """``{metric: Dataset(value, control (layer_a, layer_b))}`` for the model's layers.

    Every streamed metric comes from one pass over the stored activations; see the
    module docstring for the samples each metric uses.
    """
    metrics = list(sspec.metrics)
    values, used = similarity_with_subsets(layers, None, metrics, sspec, device=ref.device)
    controls, ctrl_used, provenance = {}, {}, {}
    if sspec.control != "none":
        rows, other, _, provenance = control_arrays(ref, layers, sspec)
        controls, ctrl_used = similarity_with_subsets(rows, {f"control:{k}": v for k, v in other.items()}, metrics,
                                                      sspec, device=ref.device)
    out = {}
    for metric in metrics:
        data = {"value": values[metric]}
        attrs = {"metric": metric, "control": sspec.control, "n": used[metric],
                 "kind": values[metric].attrs.get("kind", "similarity")}
        if metric in MINIBATCH_METRICS:
            attrs.update(kernel=values[metric].attrs["kernel"], batch_size=values[metric].attrs["batch_size"])
        if metric in controls:
            data["control"] = controls[metric].assign_coords(layer_b=list(layers))
            attrs.update(control_n=ctrl_used[metric], **provenance)
        out[metric] = xr.Dataset(data, attrs=attrs)
    return out


def similarity_key(target, sspec: SimilaritySpec) -> str:
    """Cache key of the (within-model) similarity stage of ``target`` (plan or reference) with ``sspec``."""
    return cache_key("similarity", activations=target.cache_key, **sspec.model_dump())


def run_similarity(ref: ActivationsRef, sspec: SimilaritySpec, run_id: str | None = None) -> StageResult:
    """Layer × layer matrices of every chosen metric, each beside its control; one commit."""
    key = similarity_key(ref, sspec)
    if (snap := ref.repository.find(key)) is not None:
        return skipped("similarity", ref, key, snap)
    layers = open_matrices(ref)
    with warnings.catch_warnings(record=True) as caught:
        # degenerate CCA (features ≥ samples − 1), undefined values (zero-variance layers):
        # recorded with the result and logged, not lost on a worker's stderr
        warnings.simplefilter("always")
        results = layer_similarity(ref, layers, sspec)
    notes = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught
                               if issubclass(w.category, (UndefinedSimilarityWarning, DegenerateCCAWarning))))
    for note in notes:
        log.warning("similarity of %s on %s: %s", ref.model_uri, ref.ds_key, note)

    def write(s):
        for metric, ds in results.items():
            write_dataset(s, ds, layout.similarity_group(ref.ds_key, metric))

    summary = {"layers": ref.sample_layers, "control": sspec.control, "warnings": notes[:20],
               **{m: {"value": ds["value"].values.round(6).tolist(), "kind": ds.attrs["kind"], "n": ds.attrs["n"],
                      **({"control": ds["control"].values.round(6).tolist()} if "control" in ds else {})}
                  for m, ds in results.items()}}
    return commit_stage(ref, "similarity", key, sspec.model_dump(), write, summary, run_id)
