"""Zoo manifests (YAML): the models of a zoo, listed or globbed, with per-family layers.

::

    layers: ["act*", embed]                 # default layer selection (optional)
    models:                                 # listed models
      - builtin:mlp-w64-s0
      - uri: torchvision:resnet18?num_classes=10&weights=/w/r18.safetensors
        family: resnets                     # takes that family's layers
    families:
      - name: resnets
        layers: ["layer?"]
        glob: /ckpts/r18/*.safetensors      # one model per checkpoint (file://, s3:// or relative
        arch: torchvision:resnet18?num_classes=10   #  to the manifest); arch for weights-only files

A glob expands, in natural order (``e2`` before ``e10``), to ``file:<checkpoint>``
URIs (``?arch=…`` added when the family names one), one model per checkpoint —
the unit the backfill walks. Layer selections: the model's own ``layers``, else
its family's, else the manifest's, else the model's default layers.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import quote, urlparse

from ..errors import ZooauditError

MANIFEST_KEYS = {"models", "families", "layers"}
MODEL_KEYS = {"uri", "family", "layers"}
FAMILY_KEYS = {"name", "layers", "glob", "arch"}


@dataclass(frozen=True)
class ZooEntry:
    """One model of a zoo: its URI, layer selection (None = its defaults) and family."""

    uri: str
    layers: tuple[str, ...] | None = None
    family: str | None = None


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _layers(value, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ZooauditError(f"{where}: 'layers' must be a non-empty list of module paths or globs; got {value!r}.")
    return tuple(value)


def _keys(obj, allowed: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise ZooauditError(f"{where} must be a mapping with keys {sorted(allowed)}; got {type(obj).__name__}.")
    bad = sorted(set(obj) - allowed)
    if bad:
        raise ZooauditError(f"{where}: unknown key(s) {bad}. Allowed: {', '.join(sorted(allowed))}.")
    return obj


def _resolve_location(pattern: str, base: str) -> str:
    """A glob relative to the manifest's folder becomes absolute (same scheme as the manifest)."""
    if urlparse(pattern).scheme in ("s3", "file") or pattern.startswith("/"):
        return pattern
    return posixpath.join(base, pattern)


def expand_glob(pattern: str) -> list[str]:
    """Checkpoint locations matching ``pattern`` (local, ``file://`` or ``s3://``), natural order."""
    from .file import _fs_and_path

    fs, path = _fs_and_path(pattern)
    hits = sorted(fs.glob(path), key=_natural)
    if urlparse(pattern).scheme == "s3":
        return [f"s3://{h}" for h in hits]
    return hits


def parse_manifest(doc, base: str = ".", where: str = "zoo manifest") -> list[ZooEntry]:
    """Entries of a parsed manifest document (see the module docstring)."""
    doc = _keys(doc, MANIFEST_KEYS, where)
    default_layers = _layers(doc.get("layers"), where)
    families: dict[str, dict] = {}
    entries: list[ZooEntry] = []
    for i, fam in enumerate(doc.get("families") or []):
        fam = _keys(fam, FAMILY_KEYS, f"{where}, families[{i}]")
        name = fam.get("name")
        if not isinstance(name, str) or not name:
            raise ZooauditError(f"{where}, families[{i}]: every family needs a 'name'.")
        if name in families:
            raise ZooauditError(f"{where}: family {name!r} is defined twice.")
        families[name] = fam
    for i, m in enumerate(doc.get("models") or []):
        m = {"uri": m} if isinstance(m, str) else _keys(m, MODEL_KEYS, f"{where}, models[{i}]")
        uri, family = m.get("uri"), m.get("family")
        if not isinstance(uri, str) or ":" not in uri:
            raise ZooauditError(f"{where}, models[{i}]: 'uri' must be a model URI '<scheme>:<name>'; got {uri!r}.")
        if family is not None and family not in families:
            raise ZooauditError(f"{where}, models[{i}]: unknown family {family!r}. Defined: {sorted(families)}.")
        layers = _layers(m.get("layers"), f"{where}, models[{i}]") or (
            _layers(families[family].get("layers"), f"{where}, family {family}") if family else None)
        entries.append(ZooEntry(uri, layers or default_layers, family))
    for name, fam in families.items():
        if "glob" not in fam:
            continue
        pattern = _resolve_location(str(fam["glob"]), base)
        hits = expand_glob(pattern)
        if not hits:
            raise ZooauditError(f"{where}, family {name!r}: glob {pattern!r} matched no checkpoints.")
        arch = fam.get("arch")
        layers = _layers(fam.get("layers"), f"{where}, family {name}") or default_layers
        for hit in hits:
            # the arch may carry its own '?a=1&b=2': quote it so it stays one option value
            uri = f"file:{hit}" + (f"?arch={quote(str(arch), safe=':')}" if arch else "")
            entries.append(ZooEntry(uri, layers, name))
    uris = [e.uri for e in entries]
    dupes = sorted({u for u in uris if uris.count(u) > 1})
    if dupes:
        raise ZooauditError(f"{where}: model(s) listed twice: {dupes}.")
    if not entries:
        raise ZooauditError(f"{where} lists no models: give 'models' or 'families' with a 'glob'.")
    return entries


def load_manifest(location: str) -> list[ZooEntry]:
    """Read and parse a YAML manifest from a local path, ``file://`` or ``s3://`` URL."""
    import yaml

    from .file import read_bytes

    text = read_bytes(location, "zoo manifest").decode("utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ZooauditError(f"Zoo manifest {location!r} is not valid YAML: {err}") from None
    parsed = urlparse(location)
    if parsed.scheme == "s3":
        base = posixpath.dirname(location)
    else:
        import os

        base = os.path.dirname(os.path.abspath(parsed.path if parsed.scheme == "file" else location))
    return parse_manifest(doc, base, f"zoo manifest {location!r}")
