"""Keys derived from user input and cache keys for stages.

No user string becomes a path unchecked: :func:`slug_key` keeps a readable
slug and appends a short hash of the full original string, so two names that
slug alike still get distinct keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from . import __version__


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def slug_key(name: str, max_len: int = 40) -> str:
    """``"builtin:mlp-w64-s0@10"`` → ``"builtin-mlp-w64-s0-10-3f2a9c1b"``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:max_len] or "x"
    return f"{slug}-{short_hash(name)}"


def canonical_json(obj: Any) -> str:
    """Deterministic JSON used for hashing (sorted keys, no whitespace)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(stage: str, **parts: Any) -> str:
    """The cache key of a stage: a hash of (stage, inputs, parameters, version).

    DESIGN.md §2: every stage is a pure function of (model hash, dataset hash,
    stage parameters, zooaudit version); this tuple is its identity.
    """
    payload = {"stage": stage, "zooaudit": __version__, **parts}
    return f"{stage}-{hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:24]}"
