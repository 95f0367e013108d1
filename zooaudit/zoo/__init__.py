"""Model sources: a URI scheme per source, resolved to a loaded model.

``builtin:<name>[@<epoch>]`` — the project's own small digits classifiers.
``sentence-transformers:<dir-or-package>`` / ``hf:<dir-or-package>`` — local text encoders (:mod:`.hf`).
The content hash of the weights, not the name, is the model's cache identity.
"""

from __future__ import annotations

import functools

from ..errors import ZooauditError, unknown
from .types import LoadedModel, weights_hash


def _sources():
    from . import builtin, file, hf, torchvision

    # file: checkpoints name their architecture by another URI, resolved with the resolver handed to them
    return {"builtin": builtin.load, "sentence-transformers": hf.load_sentence_transformers, "hf": hf.load_hf,
            "torchvision": torchvision.load_torchvision, "timm": torchvision.load_timm,
            "file": functools.partial(file.load, resolve=resolve_model)}


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
