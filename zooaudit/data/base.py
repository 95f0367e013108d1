"""Loading a dataset from its spec (the registry is :mod:`.registry`, the container :mod:`.types`)."""

from __future__ import annotations

from ..errors import unknown
from ..specs import DatasetSpec
from .registry import DATASETS, register
from .types import AuditDataset

__all__ = ["DATASETS", "AuditDataset", "load_dataset", "register"]


def load_dataset(spec) -> AuditDataset:
    """Load a dataset from a :class:`zooaudit.specs.DatasetSpec` (or a dict)."""
    if isinstance(spec, dict):
        name = spec.get("name")
        if name not in DATASETS:
            raise unknown("dataset", name, DATASETS)
        spec = DatasetSpec(**spec)
    ds = DATASETS[spec.name](spec)
    if spec.max_samples is not None and spec.max_samples < len(ds):
        ds.take(spec.max_samples)
    return ds
