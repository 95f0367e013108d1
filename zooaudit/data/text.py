"""Text audit datasets: sentences or words from a file, with optional labels and groups.

Dataset name ``text``; ``DatasetSpec.path`` names the file (default: the example set
shipped with zooaudit, ``data/texts/example.yaml``). Inputs are a ``(sample,)`` NumPy
unicode array: the model source tokenises them (input shape ``()``).

File formats (by suffix):

- ``.txt``: one text per line; blank lines and lines starting with ``#`` are skipped.
- ``.csv``: a header row with a ``text`` column; optional ``label`` and ``id`` columns;
  every other column is a group attribute.
- ``.json`` / ``.yaml`` / ``.yml``, one of:
    - a list of strings;
    - a list of records ``{text, label?, id?, <attribute>: value, ...}``;
    - a mapping ``{group value: [text, ...]}`` — one attribute named ``group``;
    - a mapping ``{"items": <list as above>}``.

Labels: integers are kept; strings are coded in sorted order (absent: all 0). Group
attribute values are coded in sorted order of their string form; the names are kept in
``group_names``. Sample ids: the ``id`` field (integers, unique) or the row number.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import ZooauditError
from .registry import register
from .types import AuditDataset

RESERVED = ("text", "label", "id")


def example_texts_path() -> Path:
    """The example text set shipped with zooaudit."""
    return Path(__file__).resolve().parent / "texts" / "example.yaml"


def _records(path: Path) -> list[dict]:
    """Read a file into records ``{"text": str, ...}``."""
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ZooauditError(f"Text dataset {str(path)!r} is not UTF-8: byte 0x{err.object[err.start]:02x} on line "
                            f"{line} ({err.reason}). Allowed: UTF-8 text — re-save it as UTF-8, e.g. "
                            "iconv -f latin1 -t utf-8.") from None
    if suffix == ".txt":
        return [{"text": line.strip()} for line in raw.splitlines() if line.strip() and not line.startswith("#")]
    if suffix == ".csv":
        rows = list(csv.DictReader(raw.splitlines()))
        if rows and "text" not in rows[0]:
            raise ZooauditError(f"CSV file {path.name!r} needs a 'text' column; its columns are {list(rows[0])}.")
        return rows
    if suffix in (".yaml", ".yml"):
        import yaml

        doc = yaml.safe_load(raw)
    elif suffix == ".json":
        doc = json.loads(raw)
    else:
        raise ZooauditError(f"text dataset file {path.name!r} has suffix {path.suffix!r}; allowed: .txt, .csv, "
                            ".json, .yaml, .yml.")
    if isinstance(doc, dict) and set(doc) == {"items"}:
        doc = doc["items"]
    if isinstance(doc, dict):
        out = []
        for group, texts in doc.items():
            if not isinstance(texts, list):
                raise ZooauditError(f"{path.name!r}: group {group!r} must map to a list of texts; got {texts!r}.")
            out += [{"text": t, "group": str(group)} for t in texts]
        return out
    if not isinstance(doc, list):
        raise ZooauditError(f"{path.name!r} must hold a list of texts, a list of records with 'text', or a mapping "
                            f"group → texts; got {type(doc).__name__}.")
    return [r if isinstance(r, dict) else {"text": r} for r in doc]


def _codes(values: list, what: str, path: Path) -> tuple[np.ndarray, list[str]]:
    if any(v is None or v == "" for v in values):
        missing = [i for i, v in enumerate(values) if v is None or v == ""]
        raise ZooauditError(f"{path.name!r}: {what} is missing for rows {missing[:10]}; give it for every row or "
                            "for none.")
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v)] for v in values], dtype=np.int64), names


def load_texts(path, name: str = "text", spec: dict | None = None) -> AuditDataset:
    """Load a text file (formats in the module docstring) as an :class:`AuditDataset`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZooauditError(f"text dataset file {str(path)!r} does not exist.")
    records = _records(path)
    if not records:
        raise ZooauditError(f"text dataset {path.name!r} is empty: it holds no texts.")
    texts = []
    for i, r in enumerate(records):
        t = r.get("text")
        if not isinstance(t, str) or not t.strip():
            raise ZooauditError(f"{path.name!r}: row {i} has no text (a non-empty string is required); got {r!r}.")
        texts.append(t.strip())
    n = len(texts)
    if any("id" in r for r in records):
        try:
            ids = np.array([int(r["id"]) for r in records], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as err:
            raise ZooauditError(f"{path.name!r}: 'id' must be an integer on every row ({err}).") from err
        if len(np.unique(ids)) != n:
            raise ZooauditError(f"{path.name!r}: sample ids are not unique.")
    else:
        ids = np.arange(n, dtype=np.int64)
    if any("label" in r for r in records):
        raw = [r.get("label") for r in records]
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
            labels = np.array(raw, dtype=np.int64)
        else:
            labels, _ = _codes(raw, "label", path)
    else:
        labels = np.zeros(n, dtype=np.int64)
    attrs = sorted({k for r in records for k in r if k not in RESERVED})
    groups, group_names = {}, {}
    for a in attrs:
        groups[a], group_names[a] = _codes([r.get(a) for r in records], f"group attribute {a!r}", path)
    return AuditDataset(name=name, spec=dict(spec or {"name": name, "path": str(path)}), inputs=np.array(texts),
                        labels=labels, sample_ids=ids, groups=groups, group_names=group_names)


@register("text")
def text(spec) -> AuditDataset:
    path = spec.path or str(example_texts_path())
    return load_texts(path, "text", spec.model_dump())


__all__ = ["example_texts_path", "load_texts"]
