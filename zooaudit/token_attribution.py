"""Token attributions of text models: which input tokens an output of the model rests on.

Two outputs ``s`` can be explained, one number per text:

- **similarity** (``reference`` given; any text encoder): the cosine similarity of the text's
  sentence embedding to the embedding of a reference sentence — "why is this text close to
  *that* one". The reference embedding is computed once, without gradients.
- **class** (``reference`` None; a sequence classifier, :class:`zooaudit.zoo.hf.TextClassifier`):
  the **logit** (pre-softmax score) of the target class — ``"predicted"`` (the arg-max on the
  text itself, fixed before any perturbation, so every IG step explains the same class),
  ``"true"`` (the labels) or a class index — as Grad-CAM explains the target's logit on images
  (:func:`zooaudit.attribution_maps.resolve_targets`, shared).

Attributions are taken with respect to the **word embeddings** ``E (token, hidden)`` (the output
of the backbone's ``get_input_embeddings()``; position and token-type embeddings are added after
them inside the model, as for input ids), then summed over the hidden units, so that each token
gets one signed number:

- ``grad_x_input``: ``Σ_h E[t, h] · ∂s/∂E[t, h]`` (Shrikumar et al. 2016; the image path's
  gradient × input, :mod:`zooaudit.attribution_maps`).
- ``integrated_gradients`` (Sundararajan et al. 2017): ``Σ_h (E − B)[t, h] · mean_k ∂s/∂E
  (B + α_k (E − B))[t, h]`` with the midpoint rule ``α_k = (k + ½) / steps``. Baseline ``B``: the
  pad token's embedding at every content token, the special tokens (``[CLS]``, ``[SEP]``) kept as
  they are — the usual choice for BERT-like models (Captum's BERT tutorial) — so special tokens
  get 0. Completeness: ``Σ_t IG[t] ≈ s(E) − s(B)``; the gap is returned per text (``ig_gap``).

The attention mask is the text's own at every step (padding of a batch never enters the output).
Tokens are the tokenizer's, special tokens included and flagged, padding dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr

from .attribution_maps import resolve_targets
from .errors import ZooauditError

TEXT_METHODS = ("grad_x_input", "integrated_gradients")

__all__ = ["TEXT_METHODS", "token_attributions"]


def _check(encoder, methods: Sequence[str], steps: int) -> tuple[str, ...]:
    if not hasattr(encoder, "collate") or not hasattr(encoder, "_backbone"):
        raise ZooauditError(f"Token attributions need a text encoder (sentence-transformers: or hf: model); got "
                            f"{type(encoder).__name__}.")
    methods = tuple(methods)
    if not methods or (bad := [m for m in methods if m not in TEXT_METHODS]):
        raise ZooauditError(f"Token attribution methods {list(methods)} not allowed: choose from "
                            f"{', '.join(TEXT_METHODS)}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ZooauditError(f"ig_steps={steps!r}: Integrated Gradients needs a positive integer step count.")
    return methods


def _embed_forward(encoder, batch: dict[str, torch.Tensor]):
    """``embeds (b, token, hidden) -> output`` for this batch's mask: the sentence embedding
    ``(b, unit)`` of an encoder, the logits ``(b, class)`` of a classifier."""
    mask, types = batch["attention_mask"], batch.get("token_type_ids")
    return lambda embeds: encoder.embeds_forward(embeds, mask, types)


def _cosine(emb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(b,)`` of each row of ``emb (b, unit)`` to ``ref (unit,)``."""
    return torch.nn.functional.cosine_similarity(emb, ref.unsqueeze(0).expand_as(emb), dim=1)


def _check_output(encoder, reference, target, labels, n: int) -> None:
    if reference is not None:
        if target is not None:
            raise ZooauditError("Token attributions explain either the similarity to a reference sentence or a class "
                                f"score, not both: got reference={reference!r} and target={target!r}.")
        return
    if not getattr(encoder, "has_class_head", False):
        raise ZooauditError(f"{type(encoder).__name__} has no class head (its output is a sentence embedding): "
                            "explain its similarity to a reference sentence (reference=..., the spec's "
                            "text_reference), or audit a sequence classifier (a transformers folder whose "
                            "architecture is *ForSequenceClassification) to explain class scores.")
    if labels is not None and len(labels) != n:
        raise ZooauditError(f"{len(labels)} labels for {n} texts: give one label per text.")


def token_attributions(encoder, texts: Sequence[str], reference: str | None = None, *, target=None, labels=None,
                       methods: Sequence[str] = TEXT_METHODS, ig_steps: int = 32, batch_size: int = 16,
                       device: str | torch.device = "cpu", sample_ids=None) -> xr.Dataset:
    """Token attributions of ``texts`` for their similarity to ``reference``, or (``reference``
    None) for the logit of their ``target`` class.

    Args:
        encoder: a :class:`zooaudit.zoo.hf.TextEncoder` or :class:`~zooaudit.zoo.hf.TextClassifier`
            (on ``device``), in eval mode.
        texts: ``(sample,)`` strings.
        reference: the sentence whose similarity is explained (None: a class score).
        target: with a classifier and no reference: ``"predicted"`` (default), ``"true"`` or a class index.
        labels: ``(sample,)`` class codes (needed by ``target="true"``; stored when given).
        methods: a subset of :data:`TEXT_METHODS`.
        ig_steps: Integrated Gradients midpoint steps (each one forward and backward of the batch).
        batch_size: texts per forward/backward.
        sample_ids: ``(sample,)`` coordinate (default ``0..n-1``).

    Returns:
        A dataset in the ragged layout of the token-text control (``zooaudit.stages.controls``):
        per sample ``text``, ``score`` (the explained output), ``token_offset`` / ``token_count``
        (into the flat ``token`` dimension), with Integrated Gradients ``baseline_score`` and
        ``ig_gap = Σ_t IG − (s(E) − s(B))``, with a class output ``target`` and ``predicted``
        (and ``label`` when given); per token ``token_text``, ``special`` (bool) and
        ``attribution (token, method)`` float32, raw (not normalised: completeness holds on these).
    """
    methods = _check(encoder, methods, ig_steps)
    texts = [str(t) for t in texts]
    if not texts:
        raise ZooauditError("Token attributions of an empty list of texts: give at least one text.")
    _check_output(encoder, reference, target, labels, len(texts))
    classify = reference is None
    target = "predicted" if classify and target is None else target
    dev = torch.device(device)
    special_ids = set(getattr(encoder.tokenizer, "all_special_ids", []) or [])
    pad_id = getattr(encoder.tokenizer, "pad_token_id", None)
    if "integrated_gradients" in methods and pad_id is None:
        raise ZooauditError("Integrated Gradients' baseline is the pad token's embedding, but this tokenizer has "
                            "no pad token. Use methods=['grad_x_input'].")
    word_embeddings = encoder._backbone.get_input_embeddings()
    ref = None
    if not classify:
        with torch.no_grad():
            ref = encoder(**{k: v.to(dev) for k, v in encoder.collate([reference]).items()})[0]
    tokens, specials, scores, base_scores, gaps, counts, targets, predicted = [], [], [], [], [], [], [], []
    attributions: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        batch = {k: v.to(dev) for k, v in encoder.collate(texts[start:start + batch_size]).items()}
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        forward = _embed_forward(encoder, batch)
        with torch.no_grad():
            embeds = word_embeddings(ids)
        # one forward on the texts themselves gives the score, the targets and gradient × input's graph
        with_grad = "grad_x_input" in methods
        e = embeds.clone().requires_grad_(True) if with_grad else embeds
        with torch.set_grad_enabled(with_grad):
            out = forward(e)
        if classify:
            t = resolve_targets(target, out.detach(),
                                None if labels is None else np.asarray(labels)[start:start + len(ids)])
            targets.append(t.cpu().numpy())
            predicted.append(out.detach().argmax(1).cpu().numpy())

            def output(o: torch.Tensor, t=t) -> torch.Tensor:
                return o.gather(1, t.unsqueeze(1)).squeeze(1)   # the target's logit (b,)
        else:
            def output(o: torch.Tensor) -> torch.Tensor:
                return _cosine(o, ref)
        score = output(out)
        per_method = {}
        if with_grad:
            (grad,) = torch.autograd.grad(score.sum(), e)
            per_method["grad_x_input"] = (grad * embeds).sum(-1)
        score = score.detach()
        if "integrated_gradients" in methods:
            is_special = torch.isin(ids, torch.tensor(sorted(special_ids), device=dev)) if special_ids \
                else torch.zeros_like(mask)
            base = torch.where(is_special.unsqueeze(-1), embeds,
                               word_embeddings(torch.full_like(ids, pad_id)).detach())
            total = torch.zeros_like(embeds)
            for k in range(ig_steps):
                alpha = (k + 0.5) / ig_steps
                e = (base + alpha * (embeds - base)).requires_grad_(True)
                (grad,) = torch.autograd.grad(output(forward(e)).sum(), e)
                total += grad
            ig = ((embeds - base) * total / ig_steps).sum(-1)
            with torch.no_grad():
                at_base = output(forward(base))
            ig = ig.masked_fill(~mask, 0.0)
            per_method["integrated_gradients"] = ig
            base_scores.append(at_base.cpu().numpy())
            gaps.append((ig.sum(1) - (score - at_base)).detach().cpu().numpy())
        stacked = torch.stack([per_method[m] for m in methods], -1).detach().cpu().numpy()   # (b, token, method)
        ids_np, mask_np = ids.cpu().numpy(), mask.cpu().numpy()
        for row in range(len(ids_np)):
            keep = mask_np[row]
            row_ids = ids_np[row][keep]
            tokens.extend(encoder.tokenizer.convert_ids_to_tokens(row_ids.tolist()))
            specials.extend(int(t) in special_ids for t in row_ids)
            attributions.append(stacked[row][keep])
            counts.append(int(keep.sum()))
        scores.append(score.cpu().numpy())
    counts_np = np.array(counts, np.int64)
    n = len(texts)
    data = {"text": ("sample", np.array(texts, dtype=object)),
            "score": ("sample", np.concatenate(scores).astype(np.float64)),
            "token_offset": ("sample", np.concatenate([[0], np.cumsum(counts_np)[:-1]]).astype(np.int64)),
            "token_count": ("sample", counts_np),
            "token_text": ("token", np.array(tokens, dtype=object)),
            "special": ("token", np.array(specials, bool)),
            "attribution": (("token", "method"), np.concatenate(attributions).astype(np.float32))}
    if gaps:
        data["baseline_score"] = ("sample", np.concatenate(base_scores).astype(np.float64))
        data["ig_gap"] = ("sample", np.concatenate(gaps).astype(np.float64))
    attrs = {"wrt": "word embeddings (summed over hidden units)", "ig_steps": int(ig_steps), "ig_rule": "midpoint",
             "ig_baseline": "pad-token embedding at content tokens; special tokens kept"}
    if classify:
        data["target"] = ("sample", np.concatenate(targets).astype(np.int64))
        data["predicted"] = ("sample", np.concatenate(predicted).astype(np.int64))
        if labels is not None:
            data["label"] = ("sample", np.asarray(labels).astype(np.int64))
        attrs.update(output="logit of the target class", target=str(target),
                     class_names=list(getattr(encoder, "class_names", [])))
    else:
        attrs.update(output="cosine similarity of the sentence embedding to the reference", reference=reference)
    coords = {"sample": np.asarray(sample_ids) if sample_ids is not None else np.arange(n), "method": list(methods)}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def sample_tokens(ds: xr.Dataset, i: int) -> tuple[list[str], np.ndarray]:
    """The tokens of sample ``i`` (by position) and their attributions ``(token, method)``."""
    lo, n = int(ds["token_offset"][i]), int(ds["token_count"][i])
    sl = slice(lo, lo + n)
    return [str(t) for t in ds["token_text"].values[sl]], ds["attribution"].values[sl]
