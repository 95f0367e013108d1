"""Controls as extraction products (a model stage, beside the activations).

FIELD-NOTES.md: a similarity or a probe accuracy alone says little; each is reported
beside a control. The controls that need the model are extracted here, once, by the
same sharded machinery as the activations (the same Dask placement, GPU resource
included), each into its own group under its own cache key:

- ``random_init``: the model source's seeded random-initialised copy (``random_init``
  factory, seed recorded as ``random_init_seed``), run on every sample with the audit's
  pooling, for every per-sample layer → ``<ds>/controls/random_init/acts/<layer>``. Read
  by the similarity control (layer, zoo and revisions; ``SimilaritySpec.control =
  "random_init"``) and the bias probes' random-init control.
- ``input_embeddings`` (text encoders without predictions, with group attributes): the
  input token embeddings, mask-aware mean over tokens — what the words alone carry →
  ``<ds>/controls/input_embeddings/acts/<embedding module>``. Read by the encoder probes.
- ``wordsets`` (text encoders with ``BiasSpec.weat_sets``): the WEAT words and SEAT
  sentences of the word-set file embedded by every per-sample layer, pooled as the
  association tests use them → ``wordsets/<digest>/<method>/<layer>``. Read by WEAT/SEAT.
- ``counterfactual`` (models with predictions, ``shortcut`` in ``BiasSpec.measures``, datasets
  with counterfactual partners): the predictions on the partner set (same samples, the
  shortcut swapped) → ``<ds>/controls/counterfactual/outputs``. Read by the shortcut measures.
- ``tokens`` (all-tokens layers): every sample's tokens as the model's tokenizer emits
  them, with character spans → ``<ds>/controls/tokens``. Read by the factorize stage to
  name the top-activating tokens.
- ``classifier`` (models with class outputs): the weights of the last linear layer producing
  them, and which stored layer feeds it → ``<ds>/controls/classifier``. Read by the
  statistics stage for neural collapse NC3.

Controls are stored as float32 (whatever the activations' ``dtype``) and computed
without autocast: the numbers the analyses saw when they ran the copy themselves.
After this stage nothing downstream runs a forward pass (``tests/test_layout.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings

import numpy as np
import xarray as xr

from .. import layout
from ..analysis.fairness import BiasAuditWarning
from ..analysis.weat import load_wordsets, seat_sentences
from ..errors import ZooauditError
from ..extract import forward_batches, layer_shapes
from ..keys import cache_key
from ..specs import BiasSpec, RunOptions
from ..store import commit_metadata, write_dataset
from . import weat as weat_stage
from .activations import ExtractionPlan
from ..zoo.types import find_classifier
from ..tokens import is_token_shape
from ..analysis.shortcut import check_pairs
from ..data.counterfactual import counterfactual_spec
from .common import load_model, plan_dataset, shard_dataset, skipped
from .refs import ControlRef, StageResult

log = logging.getLogger("zooaudit.stages")

KINDS = ("random_init", "input_embeddings", "wordsets", "tokens", "counterfactual", "classifier")


def _needs_random_init(plan: ExtractionPlan, spec: RunOptions) -> bool:
    return bool(plan.sample_layers) and (spec.similarity.control == "random_init" or (
        plan.has_groups and spec.bias.probes))


def random_init_plan(plan: ExtractionPlan, spec: RunOptions) -> ExtractionPlan | None:
    """The plan of the random-init control of ``plan``, or None when nothing reads it.

    A model whose source cannot build a random-initialised copy is an error when the
    similarity control asks for one (naming the other controls); the bias probes go
    without it."""
    if not _needs_random_init(plan, spec):
        return None
    model = load_model(plan.model_uri, plan.store)
    if model.random_init is None:
        if spec.similarity.control == "random_init":
            raise ZooauditError(f"Model {plan.model_uri!r} cannot build a random-initialised copy (its source has "
                                "no architecture to re-initialise); use control='shuffle' or control='none'.")
        return None
    layers = plan.sample_layers
    seed = model.random_init_seed
    key = cache_key("controls-random_init", model=plan.model_hash, dataset=plan.ds_hash, seed=seed, layers=layers,
                    pooling=plan.pooling, shard_size=plan.shard_size)
    return dataclasses.replace(
        plan, layers=layers, shapes={name: plan.shapes[name] for name in layers}, n_outputs=None, dtype="float32",
        autocast="none", token_rows=0, cache_key=key, stage="controls/random_init", variant="random_init",
        root=layout.controls_root(plan.ds_key, "random_init"),
        provenance={} if seed is None else {"random_init_seed": int(seed)})


def input_embedding_layer(model) -> str | None:
    """Module path of a text encoder's input token embeddings (None when it has none)."""
    backbone = getattr(model.module, "_backbone", None)
    embed = backbone.get_input_embeddings() if backbone is not None else None
    return next((n for n, m in model.module.named_modules() if m is embed), None) if embed is not None else None


def input_embeddings_plan(plan: ExtractionPlan, spec: RunOptions) -> ExtractionPlan | None:
    """The plan of the input-embedding control of a text model's probes (encoder or classifier), or None."""
    if not (plan.has_groups and spec.bias.probes and plan.sample_layers):
        return None
    model = load_model(plan.model_uri, plan.store)
    if (name := input_embedding_layer(model)) is None:
        return None
    shapes = layer_shapes(model.module, model.input_shape, [name], "token_mean")
    key = cache_key("controls-input_embeddings", model=plan.model_hash, dataset=plan.ds_hash, layer=name,
                    pooling="token_mean", shard_size=plan.shard_size)
    return dataclasses.replace(
        plan, layers=[name], shapes=shapes, pooling="token_mean", n_outputs=None, dtype="float32", autocast="none",
        token_rows=0, cache_key=key, stage="controls/input_embeddings", variant="model",
        root=layout.controls_root(plan.ds_key, "input_embeddings"), provenance={})


def counterfactual_plan(plan: ExtractionPlan, spec: RunOptions) -> ExtractionPlan | None:
    """The plan of the counterfactual partners' predictions (``BiasSpec.measures`` has ``shortcut``,
    the model predicts, the dataset has partners: :mod:`zooaudit.data.counterfactual`), or None.

    The partner set is other inputs, so it is extracted on its own (not as a companion of the
    activations' shards): outputs only, no layers, under ``<ds>/controls/counterfactual``
    (``samples``, ``outputs``), with the audit's autocast so that each pair is predicted alike."""
    if plan.n_outputs is None or "shortcut" not in spec.bias.measures:
        return None
    if (cf_spec := counterfactual_spec(plan.dataset)) is None:
        return None
    cf_data, cf_hash = plan_dataset(cf_spec)
    base = shard_dataset(plan)
    check_pairs(base.sample_ids, cf_data.sample_ids, base.labels, cf_data.labels)
    key = cache_key("controls-counterfactual", model=plan.model_hash, dataset=cf_hash, pairs_of=plan.ds_hash,
                    shard_size=plan.shard_size, autocast=plan.autocast)
    return dataclasses.replace(
        plan, dataset=cf_spec, ds_hash=cf_hash, layers=[], shapes={}, dtype="float32", token_rows=0,
        cache_key=key, stage="controls/counterfactual", variant="model",
        root=layout.controls_root(plan.ds_key, "counterfactual"), companions=[],
        provenance={"dataset": cf_spec.model_dump(mode="json")})


def control_plans(plan: ExtractionPlan, spec: RunOptions) -> list[ExtractionPlan]:
    """The sharded controls the audit of ``plan`` with ``spec`` reads (possibly none)."""
    return [p for p in (random_init_plan(plan, spec), input_embeddings_plan(plan, spec),
                        counterfactual_plan(plan, spec)) if p is not None]


def control_ref(cplan: ExtractionPlan, result: StageResult) -> ControlRef:
    """The reference array stages get to a committed sharded control."""
    return ControlRef(kind=cplan.stage.split("/", 1)[1], group=cplan.root, cache_key=cplan.cache_key,
                      snapshot=result.snapshot, layers=tuple(cplan.layers), provenance=dict(cplan.provenance))


# -- WEAT / SEAT word sets ---------------------------------------------------------------


def wordsets_key(plan: ExtractionPlan, bspec: BiasSpec) -> str | None:
    """Cache key of the word-set embeddings of ``plan``'s model, None when WEAT does not apply."""
    if not weat_stage.applies(plan, bspec):
        return None
    return cache_key("controls-wordsets", model=plan.model_hash, layers=plan.sample_layers,
                     pooling=weat_stage.weat_pooling(plan.pooling), **weat_stage.key_params(plan, bspec))


def _embed(module, texts: list[str], layers: list[str], pooling: str, plan: ExtractionPlan) -> dict:
    """``{layer: (len(unique texts), unit) float64}`` for the unique ``texts`` (first-seen order)."""
    acts, _ = forward_batches(module, np.array(texts), layers, pooling=pooling, batch_size=plan.batch_size,
                              device=plan.device, with_outputs=False)
    return {layer: np.asarray(acts[layer], dtype=np.float64) for layer in layers}


def run_wordsets(plan: ExtractionPlan, bspec: BiasSpec, run_id: str | None = None) -> tuple[StageResult, ControlRef] | None:
    """Embed the word-set file's WEAT words and SEAT sentences with every per-sample layer;
    one commit (``wordsets/<digest>/<method>/<layer>``: ``embedding (text, unit)``). None
    when the association tests do not apply to ``plan``'s model."""
    if (key := wordsets_key(plan, bspec)) is None:
        return None
    digest = weat_stage.key_params(plan, bspec)["weat_sets_sha256"]
    root = layout.wordsets_group(digest)
    layers = plan.sample_layers
    repository = plan.repository
    if (snap := repository.find(key)) is not None:
        result = skipped("controls/wordsets", plan, key, snap)
        return result, ControlRef("wordsets", root, key, snap, tuple(layers), dict(result.summary.get("provenance", {})))
    path = weat_stage.wordsets_path(bspec.weat_sets)
    sets = load_wordsets(path)
    if not sets.tests:
        raise ZooauditError(f"word-set file {str(path)!r} defines no tests.")
    module = load_model(plan.model_uri, plan.store).module
    with warnings.catch_warnings():
        warnings.simplefilter("always", BiasAuditWarning)   # warned here, where the tokenizer runs
        unknown = weat_stage.check_tokens(module, {**sets.targets, **sets.attributes})
    pooling = weat_stage.weat_pooling(plan.pooling)
    out: dict[str, xr.Dataset] = {}
    for method, texts in weat_stage.method_texts(sets).items():
        unique = list(dict.fromkeys(s for quad in texts.values() for ws in quad for s in ws))
        emb = _embed(module, unique, layers, pooling, plan)
        for layer in layers:
            out[f"{root}/{method}/{layer}"] = xr.Dataset(
                {"embedding": (("text", "unit"), emb[layer])}, coords={"text": np.array(unique, dtype=object)},
                attrs={"layer": layer, "method": method, "pooling": pooling})
    provenance = {"weat_sets_sha256": digest, "word_sets": str(path), "unknown_words": unknown, "pooling": pooling}
    summary = {"layers": layers, "texts": {m: int(ds.sizes["text"]) for m, ds in
                                           ((g.split("/")[2], d) for g, d in out.items())}, "provenance": provenance}

    def write(s):
        for group, ds in out.items():
            write_dataset(s, ds, group)

    result = _commit_product(plan, "controls/wordsets", key, {"weat_sets": bspec.weat_sets}, write, summary,
                             "word-set embeddings", run_id)
    log.info("%s: word-set embeddings of %s committed (%d layers)", plan.model_uri, path.name, len(layers))
    return result, ControlRef("wordsets", root, key, result.snapshot, tuple(layers), provenance)


# -- token text of all-tokens layers ------------------------------------------------------------


def token_spans(module, texts: list[str]) -> list[tuple[list[str], list[tuple[int, int]]]]:
    """Per text, the model's tokens (strings) and their character spans in the text, tokenised
    as extraction does (the source's tokenizer, its truncation); special tokens get ``(0, 0)``.
    Sources without a Hugging Face tokenizer give ``[]``."""
    tok = getattr(module, "tokenizer", None)
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        return [([], []) for _ in texts]
    # fast tokenizers are not thread-safe: take the lock extraction takes (zooaudit.zoo.hf)
    from ..zoo.hf import _TOKENIZE

    out = []
    with _TOKENIZE:
        for text in texts:
            kw = {"truncation": True, "max_length": getattr(module, "max_length", None)}
            try:
                enc = tok(text, return_offsets_mapping=True, **kw)
                spans = [tuple(map(int, o)) for o in enc["offset_mapping"]]
            except NotImplementedError:  # slow (Python) tokenizers have no offsets
                enc = tok(text, **kw)
                spans = [(0, 0)] * len(enc["input_ids"])
            out.append((tok.convert_ids_to_tokens(enc["input_ids"]), spans))
    return out


def token_text_key(plan: ExtractionPlan) -> str | None:
    """Cache key of the token text beside ``plan``'s all-tokens layers (None: it has none)."""
    if not any(is_token_shape(s) for s in plan.shapes.values()):
        return None
    return cache_key("controls-tokens", model=plan.model_hash, dataset=plan.ds_hash)


def run_token_text(plan: ExtractionPlan, run_id: str | None = None) -> tuple[StageResult, ControlRef] | None:
    """Store every sample's tokens as the model's tokenizer emits them, with their character
    spans, under ``<ds>/controls/tokens`` (``text (sample,)``, ``token_offset``/``token_count
    (sample,)``, ``token_text``, ``char_start``, ``char_end`` ``(token,)``), so that the
    factorize stage names the top tokens without the model. None without all-tokens layers."""
    if (key := token_text_key(plan)) is None:
        return None
    root = layout.controls_root(plan.ds_key, "tokens")
    repository = plan.repository
    if (snap := repository.find(key)) is not None:
        return skipped("controls/tokens", plan, key, snap), ControlRef("tokens", root, key, snap, ())
    data = shard_dataset(plan)
    texts = [str(t) for t in data.inputs]
    spans = token_spans(load_model(plan.model_uri, plan.store).module, texts)
    counts = np.array([len(toks) for toks, _ in spans], np.int64)
    flat = [(t, lo, hi) for toks, offs in spans for t, (lo, hi) in zip(toks, offs)]
    ds = xr.Dataset(
        {"text": ("sample", np.array(texts, dtype=object)),
         "token_offset": ("sample", np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)),
         "token_count": ("sample", counts),
         "token_text": ("token", np.array([t for t, _, _ in flat], dtype=object)),
         "char_start": ("token", np.array([lo for _, lo, _ in flat], np.int64)),
         "char_end": ("token", np.array([hi for _, _, hi in flat], np.int64))},
        coords={"sample": np.asarray(data.sample_ids)},
        attrs={"tokenizer": bool(counts.sum()) or not texts})
    summary = {"n_tokens": int(counts.sum())}
    result = _commit_product(plan, "controls/tokens", key, {}, lambda s: write_dataset(s, ds, root), summary,
                             "token text", run_id)
    return result, ControlRef("tokens", root, key, result.snapshot, ())


def _commit_product(plan: ExtractionPlan, stage: str, key: str, params: dict, write, summary: dict,
                    what: str, run_id: str | None) -> StageResult:
    """Commit one model-side product beside ``plan``'s activations, with the model and dataset
    provenance in its metadata (the model-side twin of :func:`.common.commit_stage`)."""
    meta = commit_metadata(stage, key, params, model=plan.model_uri, model_hash=plan.model_hash,
                           dataset=plan.dataset.model_dump(), dataset_hash=plan.ds_hash, flow_run_id=run_id,
                           summary=summary)
    snap, new = plan.repository.commit_once(write, message=f"{what} {plan.model_uri}", metadata=meta)
    # not new: a concurrent run committed this key first; its result is a cache hit here
    return StageResult(stage, plan.model_uri, plan.ds_key, key, snap, not new, summary)


# -- classifier weights (neural collapse NC3) ------------------------------------------------------

CLASSIFIER_PROBE_SAMPLES = 4   # samples run to find which stored layer feeds the classifier


def classifier_key(plan: ExtractionPlan) -> str | None:
    """Cache key of the classifier weights beside ``plan`` (None: the model has no class outputs)."""
    if plan.n_outputs is None or not plan.sample_layers:
        return None
    # the dataset is part of the key: the product is stored per dataset (and its input layer is
    # found on that dataset's samples)
    return cache_key("controls-classifier", model=plan.model_hash, dataset=plan.ds_hash, layers=plan.sample_layers,
                     pooling=plan.pooling)


def classifier_input_layer(module, head: str, plan: ExtractionPlan) -> str | None:
    """The stored per-sample layer whose activations, as stored (pooled), are exactly the input of
    the classifier ``head`` on a few samples (None when none is: e.g. a flattened spatial map stored
    mean-pooled, or the forward stopping before the head)."""
    seen: list = []
    handle = dict(module.named_modules())[head].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().float().reshape(args[0].shape[0], -1).cpu().numpy()))
    try:
        inputs = shard_dataset(plan).inputs[:CLASSIFIER_PROBE_SAMPLES]
        acts, _ = forward_batches(module, inputs, plan.sample_layers, pooling=plan.pooling, batch_size=len(inputs),
                                  device=plan.device, with_outputs=False, strict=False)
    finally:
        handle.remove()
    if not seen:
        return None
    x = np.concatenate(seen)
    for layer in reversed(plan.sample_layers):
        a = acts.get(layer)
        if a is not None and np.asarray(a).reshape(len(x), -1).shape == x.shape and \
                np.array_equal(np.asarray(a, np.float32).reshape(len(x), -1), x.astype(np.float32)):
            return layer
    return None


def run_classifier(plan: ExtractionPlan, run_id: str | None = None) -> tuple[StageResult, ControlRef] | None:
    """Store the classifier's weights ``weight (class, unit)`` and ``bias (class,)`` under
    ``<ds>/controls/classifier`` with the stored layer that feeds it (attrs ``module``,
    ``input_layer``; empty when no stored layer does), so that the statistics stage computes
    NC3 (self-duality) without the model. None for models without class outputs, or without a
    linear layer producing them (an empty product is committed then)."""
    if (key := classifier_key(plan)) is None:
        return None
    root = layout.controls_root(plan.ds_key, "classifier")
    repository = plan.repository
    if (snap := repository.find(key)) is not None:
        result = skipped("controls/classifier", plan, key, snap)
        provenance = dict(result.summary.get("provenance", {}))   # the same reference as when committed
        layer = provenance.get("input_layer", "")
        return result, ControlRef("classifier", root, key, snap, (layer,) if layer else (), provenance)
    module = load_model(plan.model_uri, plan.store).module
    head = find_classifier(module, plan.n_outputs)
    if head is None:
        # committed empty, so that the product exists and a warm rerun is a whole-model cache hit
        log.info("%s: no linear layer with %d outputs; NC3 will be skipped", plan.model_uri, plan.n_outputs)
        ds, layer, shape = xr.Dataset(attrs={"module": "", "input_layer": ""}), "", []
    else:
        linear = dict(module.named_modules())[head]
        layer = classifier_input_layer(module, head, plan) or ""
        weight = linear.weight.detach().double().cpu().numpy()
        bias = linear.bias.detach().double().cpu().numpy() if linear.bias is not None else np.zeros(len(weight))
        ds = xr.Dataset({"weight": (("class", "unit"), weight), "bias": ("class", bias)},
                        attrs={"module": head, "input_layer": layer})
        shape = list(weight.shape)
    provenance = {"module": head or "", "input_layer": layer}
    summary = {"provenance": provenance, "shape": shape}
    result = _commit_product(plan, "controls/classifier", key, {}, lambda s: write_dataset(s, ds, root), summary,
                             "classifier weights", run_id)
    return result, ControlRef("classifier", root, key, result.snapshot, (layer,) if layer else (), provenance)
