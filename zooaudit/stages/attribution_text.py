"""Token attributions of text encoders (the text side of the attribution model stage).

Runs in :func:`zooaudit.stages.attribution.run_attribution` when the model is a text encoder
(``sentence-transformers:`` / ``hf:``), the dataset holds texts, ``AttributionSpec.text_reference``
names a reference sentence and the spec's methods include a text method (``grad_x_input``,
``integrated_gradients``; the CAM methods need a spatial layer and do not apply to text). The
explained output is the cosine similarity of each text's sentence embedding to the reference's
(:mod:`zooaudit.token_attribution`, which states the conventions).

Written under ``<ds>/attribution/input_embeddings/tokens`` (one commit, its own cache key) in the
ragged layout of the token-text control: per sample ``text``, ``score``, ``token_offset``,
``token_count``, ``baseline_score`` and ``ig_gap`` (Integrated Gradients), the dataset's group
attributes ``group_<name>``; per token ``token_text``, ``special``, ``attribution (token, method)``.

The commit's summary holds, per method, the tokens with the largest mean attribution over the
mapped texts (content tokens seen at least twice), the mean score, and the mean score by group.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from ..keys import cache_key
from ..layout import attribution_group
from ..specs import AttributionSpec
from ..store import commit_metadata, write_dataset
from ..token_attribution import TEXT_METHODS, token_attributions
from .common import device_module, load_model, random_subset, shard_dataset, skipped
from .refs import StageResult

log = logging.getLogger("zooaudit.stages")

__all__ = ["STAGE", "TOKENS_LAYER", "is_text_plan", "text_attribution_key", "run_text_attribution"]

STAGE = "attribution-text"
TOKENS_LAYER = "input_embeddings"
TOP_TOKENS = 10


def is_text_plan(plan) -> bool:
    """Whether ``plan`` audits a text encoder on texts (the attribution stage's text side)."""
    data = shard_dataset(plan)
    if data.inputs.ndim != 1 or data.inputs.dtype.kind not in "OUS":
        return False
    module = load_model(plan.model_uri, plan.store).module
    return hasattr(module, "collate") and hasattr(module, "_backbone")


def _methods(aspec: AttributionSpec) -> list[str]:
    return [m for m in aspec.methods if m in TEXT_METHODS]


def _applies(plan, aspec: AttributionSpec) -> tuple[bool, str]:
    if not aspec.enabled:
        return False, "disabled"
    if aspec.text_reference is None:
        return False, "no AttributionSpec.text_reference (the sentence whose similarity is explained)"
    if not _methods(aspec):
        return False, f"no text method among {list(aspec.methods)} (text methods: {', '.join(TEXT_METHODS)})"
    return True, ""


def text_attribution_key(plan, aspec: AttributionSpec) -> str | None:
    """Cache key of the token attributions of ``plan`` (None: they do not apply)."""
    if not _applies(plan, aspec)[0]:
        return None
    return cache_key(STAGE, model=plan.model_hash, dataset=plan.ds_hash, reference=aspec.text_reference,
                     methods=_methods(aspec), ig_steps=aspec.ig_steps, max_samples=aspec.max_samples,
                     batch_size=aspec.batch_size, random_state=aspec.random_state)


def _top_tokens(ds, method: str) -> list[dict]:
    """Content tokens by mean attribution over their occurrences (seen at least twice)."""
    sums, counts = defaultdict(float), defaultdict(int)
    values = ds["attribution"].sel({"method": method}).values
    for text, special, value in zip(ds["token_text"].values, ds["special"].values, values):
        if not special:
            sums[str(text)] += float(value)
            counts[str(text)] += 1
    means = [(t, sums[t] / counts[t], counts[t]) for t in sums if counts[t] >= 2]
    means.sort(key=lambda r: -r[1])
    return [{"token": t, "mean": round(m, 5), "count": c} for t, m, c in means[:TOP_TOKENS]]


def run_text_attribution(plan, aspec: AttributionSpec, run_id: str | None = None) -> StageResult | None:
    """Token attributions of one text encoder on one text dataset (one commit), None when they do
    not apply; a cache hit when the key is already on ``main``."""
    ok, why = _applies(plan, aspec)
    if not ok:
        log.info("token attribution of %s on %s: not applicable (%s)", plan.model_uri, plan.ds_key, why)
        return None
    key = text_attribution_key(plan, aspec)
    repository = plan.repository
    if (snap := repository.find(key)) is not None:
        return skipped(STAGE, plan, key, snap)
    data = shard_dataset(plan)
    idx = random_subset(len(data), aspec.max_samples, aspec.random_state)
    module, dev = device_module(load_model(plan.model_uri, plan.store).module, plan.device,
                                " for the attribution stage")
    ds = token_attributions(module, data.inputs[idx], aspec.text_reference, methods=_methods(aspec),
                            ig_steps=aspec.ig_steps, batch_size=aspec.batch_size, device=dev,
                            sample_ids=np.asarray(data.sample_ids)[idx])
    for name, values in data.groups.items():
        ds[f"group_{name}"] = ("sample", np.asarray(values)[idx])
    summary = {"n_samples": int(ds.sizes["sample"]), "mean_score": round(float(ds["score"].mean()), 5),
               "reference": aspec.text_reference,
               "top_tokens": {m: _top_tokens(ds, m) for m in ds["method"].values}}
    if "ig_gap" in ds:
        summary["mean_abs_ig_gap"] = float(np.abs(ds["ig_gap"].values).mean())
    for name, values in data.groups.items():
        g = np.asarray(values)[idx]
        summary.setdefault("mean_score_by_group", {})[name] = {
            str(v): round(float(ds["score"].values[g == v].mean()), 5) for v in np.unique(g)}
    group = attribution_group(plan.ds_key, TOKENS_LAYER, "tokens")
    meta = commit_metadata(STAGE, key, aspec.model_dump(), model=plan.model_uri, model_hash=plan.model_hash,
                           dataset=plan.dataset.model_dump(), dataset_hash=plan.ds_hash, flow_run_id=run_id,
                           summary=summary)
    snap, new = repository.commit_once(lambda session: write_dataset(session, ds, group),
                                       message=f"{STAGE} {plan.model_uri} on {plan.dataset.name}", metadata=meta)
    return StageResult(STAGE, plan.model_uri, plan.ds_key, key, snap, not new, summary)
