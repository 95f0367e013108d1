"""scikit-learn's digits (8×8) and the Colored-MNIST construction on them.

Colored digits (Arjovsky et al. 2019, FIELD-NOTES.md): binary label
``y = digit < 5`` flipped with probability ``label_noise``; colour = ``y``
flipped with probability ``color_flip``; the image is written into channel
``colour`` (0 = red, 1 = green) of a 2-channel input. ``color_flip=0.5`` makes
colour independent of the label (a balanced test set); a small ``color_flip``
makes colour a stronger shortcut than the digit shape. Option ``swap_color: true`` gives the
counterfactual set: the same samples, digits and labels, each written into the other colour.
"""

from __future__ import annotations

import numpy as np

from .registry import register
from .types import AuditDataset

TEST_FRACTION = 0.3
_SPLIT_SEED = 20261123  # fixed: train/test membership never depends on the spec


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    return images, d.target.astype(np.int64)


def _split_indices(n: int, split: str) -> np.ndarray:
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_test = round(n * TEST_FRACTION)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return {"test": test, "train": train, "all": np.arange(n)}[split]


@register("digits")
def load_digits_dataset(spec) -> AuditDataset:
    images, target = _digits()
    idx = _split_indices(len(target), spec.split)
    return AuditDataset(
        name="digits",
        spec={"name": "digits", "split": spec.split, "max_samples": spec.max_samples},
        inputs=images[idx, None, :, :],
        labels=target[idx],
        sample_ids=idx.astype(np.int64),
    )


@register("colored-digits")
def load_colored_digits(spec) -> AuditDataset:
    images, target = _digits()
    idx = _split_indices(len(target), spec.split)
    # One stream per split so train and test draws are independent.
    rng = np.random.default_rng([spec.seed, {"train": 0, "test": 1, "all": 2}[spec.split]])
    y = (target[idx] < 5).astype(np.int64)
    y = y ^ (rng.random(len(idx)) < spec.label_noise)
    colour = y ^ (rng.random(len(idx)) < spec.color_flip)
    if spec.options.get("swap_color", False):   # the counterfactual set: same digits, the other colour
        colour = 1 - colour
    x = np.zeros((len(idx), 2, 8, 8), np.float32)
    x[np.arange(len(idx)), colour] = images[idx]
    return AuditDataset(
        name="colored-digits",
        spec={k: v for k, v in spec.model_dump().items()},
        inputs=x,
        labels=y.astype(np.int64),
        sample_ids=idx.astype(np.int64),
        groups={"colour": colour.astype(np.int64)},
        group_names={"colour": ["red", "green"]},
    )
