"""The in-memory dataset container every loader returns.

A leaf of :mod:`zooaudit.data`: the loaders import it (and :mod:`.registry`), the
package imports the loaders, and nothing imports back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import ZooauditError
from ..keys import canonical_json, short_hash

__all__ = ["AuditDataset", "check_masks"]


def check_masks(masks, input_shape: tuple[int, ...], dataset: str) -> np.ndarray:
    """``masks`` as ``(sample, y, x)`` bool, checked against inputs of shape ``(sample, channel, y, x)``.

    Any non-zero value is foreground. A wrong shape is an error naming both shapes."""
    masks = np.asarray(masks)
    expected = (input_shape[0], *input_shape[-2:]) if len(input_shape) == 4 else None
    if expected is None or masks.shape != expected:
        want = f"{expected} (sample, y, x)" if expected else "image inputs (sample, channel, y, x)"
        raise ZooauditError(f"Dataset {dataset!r}: masks have shape {masks.shape}; expected {want} — one "
                            f"foreground mask per image, inputs are {tuple(input_shape)}.")
    if masks.dtype.kind not in "biuf":
        raise ZooauditError(f"Dataset {dataset!r}: masks have dtype {masks.dtype}; numeric or bool arrays only.")
    return masks.astype(bool, copy=False) if masks.dtype != bool else masks


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
        masks: ``(sample, y, x)`` bool foreground masks (True on the object), or None: datasets with
            ground-truth segmentation (``scenes``; ``image-folder`` / ``arrays`` given masks).
        class_names: the name of each label code, where the dataset has them (else empty).
    """

    name: str
    spec: dict
    inputs: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    group_names: dict[str, list[str]] = field(default_factory=dict)
    masks: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.masks is not None:
            self.masks = check_masks(self.masks, self.inputs.shape, self.name)

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
        masks = () if self.masks is None else (self.masks,)   # absent: the digest of a mask-less set is unchanged
        for arr in (self.inputs, self.labels, self.sample_ids, *[self.groups[k] for k in sorted(self.groups)], *masks):
            # The array's own bytes (the same digest as .tobytes()), without a whole copy of the inputs.
            h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        return h.hexdigest()
