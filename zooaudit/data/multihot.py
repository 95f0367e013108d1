"""Multi-hot columns of a dataset: label sets ``(sample, label)`` and set-valued attributes ``(sample, value)``.

A leaf beside :mod:`.types` (which validates with :func:`check_multi_hot`): the loaders turn
their own forms into the ``uint8`` 0/1 matrices here — lists of names (:func:`from_names`),
lists of class codes (:func:`from_codes`) or fixed-length 0/1 vectors (:func:`from_vectors`).
Each error names the field and the forms allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ZooauditError

__all__ = ["check_multi_hot", "check_names", "from_codes", "from_names", "from_vectors"]


def check_multi_hot(values, field: str, n: int, dataset: str) -> np.ndarray:
    """``values`` as an ``(n, C)`` uint8 0/1 matrix, ``C ≥ 1``; anything else is an error naming ``field``."""
    a = np.asarray(values)
    if a.ndim != 2 or a.shape[0] != n or a.shape[1] < 1:
        raise ZooauditError(f"Dataset {dataset!r}: {field} has shape {a.shape}; expected ({n}, n_values) — a "
                            "multi-hot matrix with one row per sample and one 0/1 column per name.")
    if a.dtype.kind not in "biuf":
        raise ZooauditError(f"Dataset {dataset!r}: {field} has dtype {a.dtype}; a multi-hot matrix holds numbers "
                            "0/1 (or bools).")
    bad = ~((a == 0) | (a == 1))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ZooauditError(f"Dataset {dataset!r}: {field} is not multi-hot: row {row}, column {col} holds "
                            f"{a[row, col].item()!r}; allowed: 0 or 1 only.")
    return a.astype(np.uint8)


def check_names(names: Sequence, width: int, field: str, dataset: str) -> list[str]:
    """One distinct name per column (default ``"0"``, ``"1"``, … when ``names`` is empty)."""
    names = [str(v) for v in names] if len(names) else [str(i) for i in range(width)]
    if len(names) != width:
        raise ZooauditError(f"Dataset {dataset!r}: {field} has {width} columns but {len(names)} names; give one "
                            "name per column.")
    if len(set(names)) != len(names):
        dup = sorted({v for v in names if names.count(v) > 1})
        raise ZooauditError(f"Dataset {dataset!r}: the names of {field} repeat {dup}; each column needs its own name.")
    return names


def from_names(rows: Sequence, field: str, dataset: str, vocabulary: Sequence | None = None
               ) -> tuple[np.ndarray, list[str]]:
    """Per-sample lists of names → ``((n, C) uint8, names)``.

    ``vocabulary``: the allowed names in column order (a name outside it is an error); None: the
    sorted union of the names seen."""
    lists = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence | np.ndarray):
            raise ZooauditError(f"Dataset {dataset!r}: {field} of sample {i} is {row!r}; expected a list of names.")
        if not all(isinstance(v, (str, int, np.str_, np.integer)) and not isinstance(v, bool) for v in row):
            raise ZooauditError(f"Dataset {dataset!r}: {field} of sample {i} is {list(row)!r}; expected a flat list "
                                "of names (strings).")
        lists.append([str(v) for v in row])
    names = [str(v) for v in vocabulary] if vocabulary is not None else sorted({v for r in lists for v in r})
    if not names:
        raise ZooauditError(f"Dataset {dataset!r}: {field} names no value in any sample; a multi-hot column needs at "
                            "least one name.")
    index = {v: j for j, v in enumerate(names)}
    out = np.zeros((len(lists), len(names)), np.uint8)
    for i, r in enumerate(lists):
        unknown = [v for v in r if v not in index]
        if unknown:
            raise ZooauditError(f"Dataset {dataset!r}: {field} of sample {i} names {unknown}, not among the allowed "
                                f"names {names}.")
        out[i, [index[v] for v in r]] = 1
    return out, names


def from_codes(rows: Sequence, field: str, dataset: str, n_classes: int) -> np.ndarray:
    """Per-sample lists of class codes in ``[0, n_classes)`` (e.g. a ``Sequence(ClassLabel)``) → ``(n, C)`` uint8."""
    out = np.zeros((len(rows), n_classes), np.uint8)
    for i, row in enumerate(rows):
        codes = np.asarray(row)
        if codes.size and (codes.dtype.kind not in "iu" or codes.min() < 0 or codes.max() >= n_classes):
            raise ZooauditError(f"Dataset {dataset!r}: {field} of sample {i} holds {codes.tolist()}; allowed: class "
                                f"codes 0..{n_classes - 1}.")
        out[i, codes.astype(np.int64)] = 1
    return out


def from_vectors(rows: Sequence, field: str, dataset: str) -> np.ndarray:
    """Per-sample 0/1 vectors of one length → ``(n, C)`` uint8; ragged rows or other values are errors."""
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        first = len(rows[0])
        other = next(i for i, r in enumerate(rows) if len(r) != first)
        raise ZooauditError(f"Dataset {dataset!r}: {field} is ragged: sample 0 has {first} entries, sample {other} "
                            f"has {len(rows[other])}; a multi-hot column has one 0/1 entry per name in every row "
                            "(lists of names need string values or a Sequence(ClassLabel) feature).")
    return check_multi_hot(np.array([list(r) for r in rows]) if rows else np.zeros((0, 0)), field, len(rows), dataset)
