"""Audit datasets and the shard plan.

A dataset is loaded into an :class:`AuditDataset`: inputs ``(sample, *input_shape)``
float32, labels ``(sample,)``, sample ids ``(sample,)`` and group attributes
``{name: (sample,)}``. Each dataset has a content hash (the cache identity).
"""

from .base import DATASETS, AuditDataset, load_dataset
from .shards import Shard, plan_shards

__all__ = ["DATASETS", "AuditDataset", "Shard", "load_dataset", "plan_shards"]
