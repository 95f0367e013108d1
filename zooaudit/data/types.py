"""The in-memory dataset container every loader returns.

A leaf of :mod:`zooaudit.data`: the loaders import it (and :mod:`.registry`), the
package imports the loaders, and nothing imports back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..keys import canonical_json, short_hash

__all__ = ["AuditDataset"]


@dataclass
class AuditDataset:
    """A loaded audit dataset.

    Attributes:
        name: registry name (``digits``, ``colored-digits``).
        spec: the JSON-able spec it was loaded from.
        inputs: ``(sample, *input_shape)`` float32.
        labels: ``(sample,)`` int64 class labels.
        sample_ids: ``(sample,)`` int64, stable ids of the samples.
        groups: protected/group attributes, each ``(sample,)`` int64.
        group_names: for each attribute, the name of each code (``{"colour": ["red", "green"]}``).
    """

    name: str
    spec: dict
    inputs: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    group_names: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def key(self) -> str:
        """Path-safe key of this dataset spec (used as the Zarr group name)."""
        return f"{self.name}-{short_hash(canonical_json(self.spec))}"

    @property
    def content_hash(self) -> str:
        """sha256 over the spec and every array: the dataset's cache identity."""
        h = hashlib.sha256(canonical_json(self.spec).encode())
        for arr in (self.inputs, self.labels, self.sample_ids, *[self.groups[k] for k in sorted(self.groups)]):
            # The array's own bytes (the same digest as .tobytes()), without a whole copy of the inputs.
            h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        return h.hexdigest()
