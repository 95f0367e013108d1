"""Audit datasets and the shard plan.

A dataset is loaded into an :class:`AuditDataset`: inputs ``(sample, *input_shape)``
float32, labels ``(sample,)``, sample ids ``(sample,)`` and group attributes
``{name: (sample,)}``. Each dataset has a content hash (the cache identity).
"""

# The builtin loaders register themselves in .registry.DATASETS when imported.
from . import arrays, digits, images, scenes, text  # noqa: F401
from .base import load_dataset
from .registry import DATASETS
from .shards import Shard, plan_shards
from .types import AuditDataset

__all__ = ["DATASETS", "AuditDataset", "Shard", "load_dataset", "plan_shards"]
