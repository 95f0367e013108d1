"""WEAT / SEAT inside the bias stage, for text encoders (FIELD-NOTES.md, Bias audits).

When the audited model is a text encoder (``model_info["modality"] == "text"``) and
``BiasSpec.weat_sets`` names a word-set file (``"example"`` = the set shipped with
zooaudit), every test of the file is run on every per-sample layer of the audit:

- ``weat``: each word is embedded on its own;
- ``seat``: each word is expanded into sentences from bleached templates
  (:func:`zooaudit.analysis.weat.seat_sentences`), and every sentence is one element of
  its set (so |X| = |Y| still holds: both sets get the same templates).

The embeddings are extracted by the model stage (:func:`zooaudit.stages.controls.run_wordsets`,
``wordsets/<digest>/<method>/<layer>``); this module reads them. They are the layer's pooled
output with the audit's pooling (``cls``,
``token_mean``/``mean``); an all-tokens audit (``tokens``) uses the mask-aware token
mean. Effect size ddof = 1; one-sided partition-test p-values (exact when C(2n, n) ≤
100,000, else Monte Carlo with ``weat_permutations``); **Holm within a family**, a family
being the tests of the file for one (method, layer).

Bad input: a word the tokenizer maps to no token at all is an error naming the word
and its set (its embedding would be that of an empty string); a word made only of
unknown-token pieces is kept with a :class:`~zooaudit.analysis.fairness.BiasAuditWarning`
and listed in the result's ``unknown_words`` attribute. Target sets of unequal size
are refused by :func:`zooaudit.analysis.weat.load_wordsets`.

Stored under ``<ds>/bias/weat``: ``effect_size``, ``p_value``, ``p_adjusted``,
``reject``, ``n_targets``, ``exact`` over dims ``(kind, layer, test)``.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from ..analysis.fairness import BiasAuditWarning
from ..analysis.weat import (
    example_wordsets_path,
    load_wordsets,
    seat_sentences,
    weat_family,
)
from ..errors import ZooauditError
from ..specs import BiasSpec

log = logging.getLogger("zooaudit.stages")

METHODS = ("weat", "seat")
SUMMARY_KEY = "weat"  # key of the association tests in the bias stage's summary (beside the attributes)


def wordsets_path(weat_sets: str | None) -> Path | None:
    """``"example"`` → the shipped file; None/"" → None (no association tests); else the path."""
    if not weat_sets:
        return None
    return example_wordsets_path() if weat_sets == "example" else Path(weat_sets).expanduser()


def applies(target, bspec: BiasSpec) -> bool:
    """Association tests run for text encoders when a word-set file is configured
    (``target``: an extraction plan or an activations reference)."""
    return target.model_info.get("modality") == "text" and wordsets_path(bspec.weat_sets) is not None


def weat_pooling(pooling: str) -> str:
    """Pooling of the association tests' embeddings: the audit's per-sample pooling; an
    all-tokens audit uses the mask-aware token mean."""
    return pooling if pooling in ("cls", "token_mean", "mean") else "token_mean"


def method_texts(sets) -> dict[str, dict[str, tuple]]:
    """Per method, per test, the four text lists (words, or their SEAT sentences)."""
    return {"weat": {t.name: sets.words(t) for t in sets.tests},
            "seat": {t.name: tuple(seat_sentences(w, t.templates) for w in sets.words(t)) for t in sets.tests}}


def key_params(target, bspec: BiasSpec) -> dict:
    """Cache-key part: the word-set file's content (not just its name), when the tests apply."""
    if not applies(target, bspec):
        return {}
    path = wordsets_path(bspec.weat_sets)
    if not path.is_file():
        raise ZooauditError(f"word-set file {str(path)!r} (BiasSpec.weat_sets) does not exist.")
    return {"weat_sets_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def check_tokens(module, named_words: dict[str, list[str]]) -> list[str]:
    """Refuse words the tokenizer maps to nothing; return (and warn about) all-unknown words."""
    unk = getattr(module, "unk_token_id", None)
    empty, unknown = [], []
    for set_name, words in named_words.items():
        for word, ids in zip(words, module.content_tokens(words)):
            if not ids:
                empty.append(f"{word!r} (set {set_name!r})")
            elif unk is not None and all(i == unk for i in ids):
                unknown.append(word)
    if empty:
        raise ZooauditError(f"The tokenizer maps these words to no token at all: {', '.join(empty)}. Their "
                            "embeddings would be those of an empty text; remove or respell them.")
    if unknown:
        warnings.warn(f"Words the tokenizer only knows as its unknown token (their embeddings are all alike): "
                      f"{sorted(set(unknown))}.", BiasAuditWarning, stacklevel=2)
    return sorted(set(unknown))


def validate(model, bspec: BiasSpec) -> None:
    """Before anything is committed: the file parses, target sets are balanced, every word tokenises."""
    if model.info.get("modality") != "text" or (path := wordsets_path(bspec.weat_sets)) is None:
        return
    sets = load_wordsets(path)
    if not sets.tests:
        raise ZooauditError(f"word-set file {str(path)!r} defines no tests; add a 'tests' list of "
                            "{name, X, Y, A, B}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasAuditWarning)  # warned once, when the stage runs
        check_tokens(model.module, {**sets.targets, **sets.attributes})


def _embeddings(ref, method: str, layer: str) -> dict[str, np.ndarray]:
    """``{text: (unit,) float64}`` of one method's texts at one layer, from the word-set control."""
    control = ref.controls.get("wordsets")
    if control is None:
        raise ZooauditError(f"The word-set embeddings of {ref.model_uri!r} were not extracted; run the model "
                            "stage (activations and controls) with this BiasSpec first.")
    ds = ref.repository.open(f"{control.group}/{method}/{layer}", control.snapshot).load()
    return dict(zip(ds["text"].values.tolist(), ds["embedding"].values))


def run_weat(ref, bspec: BiasSpec) -> tuple[xr.Dataset, list[dict]]:
    """Every test of the word-set file, by method and layer; Holm within each (method, layer)."""
    path = wordsets_path(bspec.weat_sets)
    sets = load_wordsets(path)
    if not sets.tests:
        raise ZooauditError(f"word-set file {str(path)!r} defines no tests.")
    provenance = ref.controls["wordsets"].provenance if "wordsets" in ref.controls else {}
    unknown = list(provenance.get("unknown_words", []))
    if unknown:
        warnings.warn(f"Words the tokenizer only knows as its unknown token (their embeddings are all alike): "
                      f"{unknown}.", BiasAuditWarning, stacklevel=2)
    layers = ref.sample_layers
    pooling = weat_pooling(ref.pooling)
    texts = method_texts(sets)
    per_method = []
    for method in METHODS:
        per_layer = []
        for layer in layers:
            emb = _embeddings(ref, method, layer)
            tests = {name: tuple(np.stack([emb[s] for s in ws]) for ws in quad)
                     for name, quad in texts[method].items()}
            fam = weat_family(tests, n_permutations=bspec.weat_permutations, random_state=bspec.random_state,
                              correction="holm", alpha=bspec.alpha)
            per_layer.append(fam.expand_dims(layer=[layer]))
        per_method.append(xr.concat(per_layer, dim="layer", combine_attrs="override").expand_dims(kind=[method]))
    ds = xr.concat(per_method, dim="kind", combine_attrs="override")
    ds.attrs.update({"word_sets": str(path), "pooling": pooling, "family": "tests of one (method, layer)",
                     "unknown_words": unknown, "effect_size_ddof": 1,
                     "seat_templates": {t.name: t.templates for t in sets.tests}})
    rows = [{"method": str(m), "layer": str(layer), "test": str(t),
             "effect_size": round(float(ds["effect_size"].sel(kind=m, layer=layer, test=t)), 6),
             "p_value": round(float(ds["p_value"].sel(kind=m, layer=layer, test=t)), 6),
             "p_adjusted": round(float(ds["p_adjusted"].sel(kind=m, layer=layer, test=t)), 6),
             "significant": bool(ds["reject"].sel(kind=m, layer=layer, test=t)),
             "n_targets": int(ds["n_targets"].sel(kind=m, layer=layer, test=t))}
            for m in ds["kind"].values for layer in ds["layer"].values for t in ds["test"].values]
    log.info("%s: WEAT/SEAT on %d tests × %d layers (%s)", ref.model_uri, len(sets.tests), len(layers), path.name)
    return ds, rows


__all__ = ["METHODS", "SUMMARY_KEY", "applies", "check_tokens", "key_params", "method_texts", "run_weat",
           "validate", "weat_pooling", "wordsets_path"]
