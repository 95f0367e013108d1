"""Model sources: a URI scheme per source, resolved to a loaded model.

``builtin:<name>[@<epoch>]`` — the project's own small digits classifiers.
``sentence-transformers:<dir-or-package>`` / ``hf:<dir-or-package>`` — local text encoders (:mod:`.hf`).
The content hash of the weights, not the name, is the model's cache identity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ZooauditError, unknown
from ..keys import slug_key


@dataclass
class LoadedModel:
    """A model ready for extraction.

    Attributes:
        uri: what the user asked for (``builtin:mlp-w64-s0@5``).
        module: the ``torch.nn.Module`` in eval mode, on the CPU.
        content_hash: sha256 of the weights (names, dtypes, shapes, bytes).
        input_shape: the shape of one input sample, e.g. ``(1, 8, 8)``.
        default_layers: layers audited when the spec names none.
        info: JSON-able description (architecture, training data, epoch).
        random_init: factory of a random-initialised copy (None if the source cannot build one).
    """

    uri: str
    module: torch.nn.Module
    content_hash: str
    input_shape: tuple[int, ...]
    default_layers: list[str]
    info: dict = field(default_factory=dict)
    # Builds an untrained copy of the architecture (fixed seed): the control
    # that similarity and probe results are reported beside.
    random_init: Callable[[], torch.nn.Module] | None = None
    # The torch seed random_init builds its copy from (recorded beside random-init controls).
    random_init_seed: int | None = None
    # False for encoders (text): forward returns an embedding, not class logits, so no
    # predictions are stored and prediction-level bias metrics do not apply.
    has_logits: bool = True

    @property
    def key(self) -> str:
        """Path-safe key of the model (name slug + short hash of the URI)."""
        return slug_key(self.uri)


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, sorted by name."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _sources():
    from . import builtin, file, hf, torchvision

    return {"builtin": builtin.load, "sentence-transformers": hf.load_sentence_transformers, "hf": hf.load_hf,
            "torchvision": torchvision.load_torchvision, "timm": torchvision.load_timm, "file": file.load}


def resolve_model(uri: str, store) -> LoadedModel:
    """Load the model named by ``uri`` (training/caching its weights in ``store`` if needed)."""
    if not isinstance(uri, str) or ":" not in uri:
        raise ZooauditError(
            f"Bad model URI {uri!r}: expected '<scheme>:<name>', e.g. 'builtin:mlp-w64-s0'. "
            f"Known schemes: {', '.join(sorted(_sources()))}."
        )
    scheme, name = uri.split(":", 1)
    sources = _sources()
    if scheme not in sources:
        raise unknown("model scheme", scheme, sources, hint=f"(in model URI {uri!r})")
    return sources[scheme](name, store=store, uri=uri)


__all__ = ["LoadedModel", "resolve_model", "weights_hash"]
