"""What a model source hands back: :class:`LoadedModel`, and the weights hash that is its identity.

A leaf of :mod:`zooaudit.zoo`: the source modules (builtin, file, hf, torchvision) import it,
and the package's :func:`~zooaudit.zoo.resolve_model` imports them, so nothing imports back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..keys import slug_key

__all__ = ["LoadedModel", "find_classifier", "weights_hash"]


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


def find_classifier(module: torch.nn.Module, n_outputs: int) -> str | None:
    """Module path of the classifier: the last ``nn.Linear`` with ``n_outputs`` outputs (None if none)."""
    found = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == n_outputs]
    return found[-1] if found else None
