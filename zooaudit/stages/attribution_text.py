"""Token attributions of text models (the text side of the attribution model stage).

Runs in :func:`zooaudit.stages.attribution.run_attribution` when the model is a text model
(``sentence-transformers:`` / ``hf:``), the dataset holds texts and the spec's methods include a
text method (``grad_x_input``, ``integrated_gradients``; the CAM methods need a spatial layer and
do not apply to text). The explained output (:mod:`zooaudit.token_attribution`, which states the
conventions):

- ``AttributionSpec.text_reference`` set: the cosine similarity of each text's sentence
  embedding to the reference's (any text model);
- no reference and a sequence classifier (``hf:`` folder of a ``*ForSequenceClassification``,
  :class:`zooaudit.zoo.hf.TextClassifier`): the logit of ``AttributionSpec.target`` (predicted,
  true, a class index or a class name of the model's ``id2label``);
- no reference and an encoder: nothing to explain (not applicable, the reason logged).

Written under ``<ds>/attribution/input_embeddings/tokens`` (one commit, its own cache key) in the
ragged layout of the token-text control: per sample ``text``, ``score``, ``token_offset``,
``token_count``, ``baseline_score`` and ``ig_gap`` (Integrated Gradients), with a class output
``target``, ``predicted`` and ``label``; the dataset's group attributes ``group_<name>``; per token
``token_text``, ``special``, ``attribution (token, method)``.

The commit's summary holds, per method, the tokens with the largest mean attribution over the
mapped texts (content tokens seen at least twice), with a class output the same per target class,
the mean score, and the mean score by group.
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
from .common import attribution_target, device_module, load_model, random_subset, shard_dataset, skipped
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


def _output(plan, aspec: AttributionSpec) -> str | None:
    """What is explained: ``"similarity"`` (a reference sentence), ``"class"`` (a classifier's
    logit, no reference) or None (an encoder without a reference)."""
    if aspec.text_reference is not None:
        return "similarity"
    return "class" if plan.n_outputs is not None else None


def _applies(plan, aspec: AttributionSpec) -> tuple[bool, str]:
    if not aspec.enabled:
        return False, "disabled"
    if _output(plan, aspec) is None:
        return False, ("an encoder without a class head and no AttributionSpec.text_reference (the sentence whose "
                       "similarity is explained)")
    if not _methods(aspec):
        return False, f"no text method among {list(aspec.methods)} (text methods: {', '.join(TEXT_METHODS)})"
    return True, ""


def text_attribution_key(plan, aspec: AttributionSpec) -> str | None:
    """Cache key of the token attributions of ``plan`` (None: they do not apply)."""
    if not _applies(plan, aspec)[0]:
        return None
    # the similarity's key is the one it had before class outputs existed (earlier commits stay hits)
    explained = {"reference": aspec.text_reference} if _output(plan, aspec) == "similarity" else \
        {"output": "class", "target": aspec.target}
    return cache_key(STAGE, model=plan.model_hash, dataset=plan.ds_hash, **explained,
                     methods=_methods(aspec), ig_steps=aspec.ig_steps, max_samples=aspec.max_samples,
                     batch_size=aspec.batch_size, random_state=aspec.random_state)


def _top_tokens(ds, method: str, samples: np.ndarray | None = None) -> list[dict]:
    """Content tokens by mean attribution over their occurrences (seen at least twice), over the
    texts ``samples`` (positions; default all)."""
    sums, counts = defaultdict(float), defaultdict(int)
    values = ds["attribution"].sel({"method": method}).values
    keep = np.ones(ds.sizes["token"], bool)
    if samples is not None:
        keep[:] = False
        offsets, counts_of = ds["token_offset"].values, ds["token_count"].values
        for i in samples:
            keep[offsets[i]:offsets[i] + counts_of[i]] = True
    for text, special, value, kept in zip(ds["token_text"].values, ds["special"].values, values, keep):
        if kept and not special:
            sums[str(text)] += float(value)
            counts[str(text)] += 1
    means = [(t, sums[t] / counts[t], counts[t]) for t in sums if counts[t] >= 2]
    means.sort(key=lambda r: -r[1])
    return [{"token": t, "mean": round(m, 5), "count": c} for t, m, c in means[:TOP_TOKENS]]


def run_text_attribution(plan, aspec: AttributionSpec, run_id: str | None = None) -> StageResult | None:
    """Token attributions of one text model on one text dataset (one commit), None when they do
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
    output = _output(plan, aspec)
    class_names = list(getattr(module, "class_names", None) or data.class_names)
    if output == "class":
        explained = {"target": attribution_target(aspec.target, class_names, plan.n_outputs),
                     "labels": np.asarray(data.labels)[idx]}
    else:
        explained = {"reference": aspec.text_reference}
    ds = token_attributions(module, data.inputs[idx], methods=_methods(aspec), ig_steps=aspec.ig_steps,
                            batch_size=aspec.batch_size, device=dev, sample_ids=np.asarray(data.sample_ids)[idx],
                            **explained)
    for name, values in data.groups.items():
        ds[f"group_{name}"] = ("sample", np.asarray(values)[idx])
    summary = {"n_samples": int(ds.sizes["sample"]), "mean_score": round(float(ds["score"].mean()), 5),
               "output": output, "top_tokens": {str(m): _top_tokens(ds, m) for m in ds["method"].values}}
    if output == "class":
        summary["target"] = aspec.target
        if len(np.unique(data.labels)) > 1:   # an unlabelled text set stores zeros: no accuracy to give
            summary["accuracy"] = round(float((ds["predicted"].values == ds["label"].values).mean()), 5)
        summary["top_tokens_by_target"] = {
            (class_names[c] if c < len(class_names) else str(c)):
                {str(m): _top_tokens(ds, m, np.flatnonzero(ds["target"].values == c)) for m in ds["method"].values}
            for c in np.unique(ds["target"].values).tolist()}
    else:
        summary["reference"] = aspec.text_reference
    if "ig_gap" in ds:
        summary["mean_abs_ig_gap"] = float(np.abs(ds["ig_gap"].values).mean())
    for name, values in data.groups.items():
        g = np.asarray(values)[idx]
        values_named = data.group_names.get(name) or []
        summary.setdefault("mean_score_by_group", {})[name] = {
            (str(values_named[v]) if 0 <= v < len(values_named) else str(v)):
                round(float(ds["score"].values[g == v].mean()), 5)
            for v in np.unique(g).tolist()}
    group = attribution_group(plan.ds_key, TOKENS_LAYER, "tokens")
    meta = commit_metadata(STAGE, key, aspec.model_dump(), model=plan.model_uri, model_hash=plan.model_hash,
                           dataset=plan.dataset.model_dump(), dataset_hash=plan.ds_hash, flow_run_id=run_id,
                           summary=summary)
    snap, new = repository.commit_once(lambda session: write_dataset(session, ds, group),
                                       message=f"{STAGE} {plan.model_uri} on {plan.dataset.name}", metadata=meta)
    return StageResult(STAGE, plan.model_uri, plan.ds_key, key, snap, not new, summary)
