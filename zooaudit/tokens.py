"""Token-level activations: poolings over ``(batch, token, unit)`` outputs and the
all-tokens storage layout.

Poolings (``mask`` is the batch's ``attention_mask`` ``(batch, token)``, 1 = real token):

- ``cls``: the first token, ``(batch, unit)``;
- ``token_mean``: the mask-aware mean over real tokens, ``(batch, unit)`` (padding never
  counts, so the result does not depend on how a batch was padded);
- ``tokens``: every real token, as :class:`TokenRows` — ``rows (n_tokens, unit)`` in
  sample-major, token order, plus ``counts (batch,)``.

All-tokens layout in a Zarr group ``<ds>/acts/<layer>`` (attrs ``storage = "tokens"``)::

    activations   (token, unit)   float; shard s owns rows [s·R, s·R + its token count),
                                  R = ``token_rows`` (attr): the largest token count of
                                  any shard, rounded up to a multiple of 64. Each shard
                                  writes exactly one chunk (chunks = (R, unit)), so shards
                                  never share a chunk. Rows past a shard's count are
                                  padding, left NaN and referenced by no sample.
    token_start   (sample,)       int64 first row of each sample (-1 until written)
    token_count   (sample,)       int64 number of real tokens of each sample
    sample        (sample,)       sample ids

Sample i's tokens are ``activations[token_start[i] : token_start[i] + token_count[i]]``
(:func:`sample_tokens`); :func:`open_token_activations` returns them without padding.
Analyses that need ``(sample, unit)`` (factorization, similarity, bias probes) skip
token layers (see ``ExtractionPlan.sample_layers``): store a ``cls`` or ``token_mean``
pooling for those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
import zarr

from .errors import ZooauditError

TOKEN_POOLINGS = ("cls", "token_mean", "tokens")
ROW_MULTIPLE = 64


@dataclass
class TokenRows:
    """All real tokens of a batch: ``rows (n_tokens, unit)``, ``counts (batch,)``.

    Duck-types the few tensor/array methods extraction uses (``to``, ``clone``,
    ``numpy``, ``astype``, ``np.asarray``) so it travels the same path as a pooled array.
    """

    rows: object
    counts: object

    def to(self, *args, **kw) -> TokenRows:
        return TokenRows(self.rows.to(*args, **kw), self.counts.to("cpu"))

    def clone(self) -> TokenRows:
        return TokenRows(self.rows.clone(), self.counts.clone())

    def numpy(self) -> TokenRows:
        return TokenRows(self.rows.numpy(), np.asarray(self.counts, dtype=np.int64))

    def astype(self, dtype) -> TokenRows:
        return TokenRows(np.asarray(self.rows).astype(dtype), self.counts)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.rows, dtype=dtype)

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def n_units(self) -> int:
        return int(self.rows.shape[1])

    @staticmethod
    def concat(parts: list[TokenRows]) -> TokenRows:
        return TokenRows(np.concatenate([np.asarray(p.rows) for p in parts]),
                         np.concatenate([np.asarray(p.counts, dtype=np.int64) for p in parts]))


def _mask(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    if tuple(mask.shape) != tuple(t.shape[:2]):
        raise ZooauditError(f"attention mask of shape {tuple(mask.shape)} does not match the layer's "
                            f"(batch, token) = {tuple(t.shape[:2])}.")
    return mask.to(t.device).bool()


def pool_tokens(t: torch.Tensor, pooling: str, mask: torch.Tensor | None = None):
    """Pool a ``(batch, token, unit)`` output; 2-D outputs pass unchanged (already per sample)."""
    if t.ndim == 2:
        return t
    if t.ndim != 3:
        raise ZooauditError(f"pooling {pooling!r} needs (batch, token, unit) or (batch, unit) outputs; got shape "
                            f"{tuple(t.shape)}. Use 'mean', 'flatten' or 'none' for spatial maps.")
    if pooling == "cls":
        return t[:, 0]
    m = _mask(t, mask)
    if pooling == "token_mean":
        w = m.to(t.dtype).unsqueeze(-1)
        return (t * w).sum(1) / w.sum(1).clamp_min(1)
    if pooling == "tokens":
        return TokenRows(t[m], m.sum(1))
    raise ZooauditError(f"Unknown token pooling {pooling!r}. Allowed: {', '.join(TOKEN_POOLINGS)}.")


def is_token_shape(shape) -> bool:
    """Per-sample shape ``(-1, unit)`` marks an all-tokens layer."""
    return len(shape) == 2 and shape[0] == -1


def token_rows_per_shard(collate, inputs, shard_size: int) -> int:
    """Rows reserved per shard: the largest real-token count of any shard, rounded up to 64."""
    most = 1
    for start in range(0, len(inputs), shard_size):
        batch = collate(inputs[start:start + shard_size])
        most = max(most, int(batch["attention_mask"].sum()))
    return -(-most // ROW_MULTIPLE) * ROW_MULTIPLE


def create_token_array(group: zarr.Group, n_samples: int, n_units: int, n_shards: int, token_rows: int,
                       chunk: int, dtype: str, ids) -> None:
    """Create the all-tokens arrays of one layer in ``group`` (layout in the module docstring)."""
    group.attrs.update({"storage": "tokens", "token_rows": int(token_rows), "sample_chunk": int(chunk)})
    group.create_array("activations", shape=(n_shards * token_rows, n_units), chunks=(token_rows, n_units),
                       dtype=dtype, dimension_names=("token", "unit"), fill_value=np.nan)
    for name in ("token_start", "token_count"):
        group.create_array(name, shape=(n_samples,), chunks=(chunk,), dtype="int64", dimension_names=("sample",),
                           fill_value=-1)
    group.create_array("sample", data=ids, dimension_names=("sample",))


def write_token_shard(group: zarr.Group, start: int, acts: TokenRows) -> None:
    """Write one shard (samples ``[start, start + len)``) into its own chunk of token rows."""
    rows, counts = np.asarray(acts.rows), np.asarray(acts.counts, dtype=np.int64)
    token_rows, chunk = int(group.attrs["token_rows"]), int(group.attrs["sample_chunk"])
    if start % chunk:
        raise ZooauditError(f"token shard starts at sample {start}, not a multiple of the shard size {chunk}.")
    if len(rows) > token_rows:
        raise ZooauditError(f"shard at sample {start} has {len(rows)} tokens but {token_rows} rows were reserved "
                            f"per shard; the dataset or tokenizer changed since the plan — rerun.")
    base = (start // chunk) * token_rows
    block = np.full((token_rows, rows.shape[1]), np.nan, dtype=group["activations"].dtype)
    block[:len(rows)] = rows
    group["activations"][base:base + token_rows] = block
    group["token_start"][start:start + len(counts)] = base + np.concatenate([[0], np.cumsum(counts)[:-1]])
    group["token_count"][start:start + len(counts)] = counts


def sample_tokens(group: zarr.Group, i: int) -> np.ndarray:
    """``(token_count[i], unit)`` activations of sample ``i``."""
    s, c = int(group["token_start"][i]), int(group["token_count"][i])
    return group["activations"][s:s + c]


def open_token_activations(store, path: str) -> xr.Dataset:
    """An all-tokens layer without padding: ``activations (token, unit)``, ``token_sample (token,)``
    (the sample index of each row), ``token_position (token,)``, and ``token_start`` /
    ``token_count`` re-based on the unpadded rows, ``(sample,)``."""
    g = zarr.open_group(store, path=path, mode="r")
    if g.attrs.get("storage") != "tokens":
        raise ZooauditError(f"{path!r} is not an all-tokens layer (it has dims (sample, ...)); "
                            "open it with zooaudit.layout.open_activations.")
    start, count = g["token_start"][:], g["token_count"][:]
    if np.any(start < 0):
        raise ZooauditError(f"{path!r}: {int((start < 0).sum())} samples have no tokens written (incomplete).")
    acts = g["activations"]
    rows = np.concatenate([acts[s:s + c] for s, c in zip(start, count)]) if len(start) else \
        np.empty((0, acts.shape[1]), acts.dtype)
    owner = np.repeat(np.arange(len(count)), count)
    position = np.concatenate([np.arange(c) for c in count]) if len(count) else np.empty(0, np.int64)
    new_start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return xr.Dataset({"activations": (("token", "unit"), rows), "token_sample": ("token", owner),
                       "token_position": ("token", position), "token_start": ("sample", new_start),
                       "token_count": ("sample", count)}, coords={"sample": g["sample"][:]},
                      attrs={"layer": g.attrs.get("layer")})


__all__ = ["TOKEN_POOLINGS", "TokenRows", "create_token_array", "is_token_shape", "open_token_activations",
           "pool_tokens", "sample_tokens", "token_rows_per_shard", "write_token_shard"]
