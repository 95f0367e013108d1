"""The shard plan: contiguous sample ranges aligned to the Zarr chunks.

Shards are the chunks of a Dask array over the sample dimension, so one shard
writes whole Zarr chunks (DESIGN.md §3: writers touch distinct chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da

from ..errors import ZooauditError


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(n_samples: int, shard_size: int) -> list[Shard]:
    """Split ``range(n_samples)`` into Dask chunks of ``shard_size`` (last may be short)."""
    if n_samples <= 0:
        raise ZooauditError(f"Cannot plan shards of an empty dataset (n_samples={n_samples}); it needs ≥ 1 sample.")
    if shard_size <= 0:
        raise ZooauditError(f"shard_size must be a positive integer, got {shard_size}.")
    (chunks,) = da.empty(n_samples, chunks=shard_size).chunks
    shards, start = [], 0
    for i, size in enumerate(chunks):
        shards.append(Shard(i, start, start + size))
        start += size
    return shards
