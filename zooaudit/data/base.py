"""The dataset registry and the in-memory dataset container."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import unknown
from ..keys import canonical_json, short_hash


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


DATASETS: dict[str, Callable[..., AuditDataset]] = {}


def register(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def load_dataset(spec) -> AuditDataset:
    """Load a dataset from a :class:`zooaudit.specs.DatasetSpec` (or a dict)."""
    from ..specs import DatasetSpec

    if isinstance(spec, dict):
        name = spec.get("name")
        if name not in DATASETS:
            raise unknown("dataset", name, DATASETS)
        spec = DatasetSpec(**spec)
    ds = DATASETS[spec.name](spec)
    if spec.max_samples is not None and spec.max_samples < len(ds):
        n = spec.max_samples
        ds.inputs, ds.labels, ds.sample_ids = ds.inputs[:n], ds.labels[:n], ds.sample_ids[:n]
        ds.groups = {k: v[:n] for k, v in ds.groups.items()}
    return ds


# Register the builtin datasets.
from . import arrays, digits, images, text  # noqa: F401
