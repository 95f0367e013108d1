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
from .multihot import check_multi_hot, check_names

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
        label_sets: ``(sample, label)`` uint8 0/1 multi-hot label sets, or None — multi-label data
            (a sample may carry several labels). Extra to ``labels``, which stays the single label.
        label_set_names: the name of each column of ``label_sets``.
        group_sets: set-valued attributes, each ``(sample, value)`` uint8 0/1 (a sample may have
            several values, e.g. the objects in its context); extra to the single-coded ``groups``,
            and no name is both.
        group_set_names: for each of ``group_sets``, the name of each column.
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
    label_sets: np.ndarray | None = None
    label_set_names: list[str] = field(default_factory=list)
    group_sets: dict[str, np.ndarray] = field(default_factory=dict)
    group_set_names: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        if self.masks is not None:
            self.masks = check_masks(self.masks, self.inputs.shape, self.name)
        n = len(self)
        if self.label_sets is not None:
            self.label_sets = check_multi_hot(self.label_sets, "label_sets", n, self.name)
            self.label_set_names = check_names(self.label_set_names, self.label_sets.shape[1], "label_sets",
                                               self.name)
        elif self.label_set_names:
            raise ZooauditError(f"Dataset {self.name!r}: label_set_names given without label_sets.")
        both = sorted(set(self.groups) & set(self.group_sets))
        if both:
            raise ZooauditError(f"Dataset {self.name!r}: attribute(s) {both} are both single-valued groups and "
                                "multi-hot group_sets; give each attribute one form.")
        extra = sorted(set(self.group_set_names) - set(self.group_sets))
        if extra:
            raise ZooauditError(f"Dataset {self.name!r}: group_set_names for {extra}, which are not group_sets "
                                f"(those are: {sorted(self.group_sets) or 'none'}).")
        for attr in list(self.group_sets):
            what = f"group_sets[{attr!r}]"
            self.group_sets[attr] = check_multi_hot(self.group_sets[attr], what, n, self.name)
            self.group_set_names[attr] = check_names(self.group_set_names.get(attr, []),
                                                     self.group_sets[attr].shape[1], what, self.name)

    def take(self, n: int) -> None:
        """Keep only the first ``n`` samples (every per-sample column), in place."""
        self.inputs, self.labels, self.sample_ids = self.inputs[:n], self.labels[:n], self.sample_ids[:n]
        self.groups = {k: v[:n] for k, v in self.groups.items()}
        if self.masks is not None:
            self.masks = self.masks[:n]
        if self.label_sets is not None:
            self.label_sets = self.label_sets[:n]
        self.group_sets = {k: v[:n] for k, v in self.group_sets.items()}

    @property
    def multi_hot(self) -> bool:
        """Whether the dataset carries multi-hot columns (label sets or set-valued attributes)."""
        return self.label_sets is not None or bool(self.group_sets)

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
        if self.multi_hot:   # absent: the digests of datasets without multi-hot columns are unchanged
            h.update(canonical_json({"label_sets": self.label_set_names, "group_sets": self.group_set_names}).encode())
            sets = () if self.label_sets is None else (self.label_sets,)
            for arr in (*sets, *[self.group_sets[k] for k in sorted(self.group_sets)]):
                h.update(np.ascontiguousarray(arr, np.uint8).reshape(-1))
        return h.hexdigest()
