"""The builtin zoo's catalog: which models exist, their training data, the demo zoo, the shortcut sweep.

Names and specs only (this module builds, trains and loads nothing), so specs (the default
zoo of :class:`~zooaudit.specs.AuditZooSpec`) read it without importing the training code,
which imports the datasets, which import the specs; :mod:`.builtin` builds, trains and loads
the models listed here (and re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUILTIN_ZOO", "CHECKPOINT_EPOCHS", "DEFAULT_ZOO", "SCENES_SWEEP", "SHORTCUT_SWEEP", "BuiltinSpec",
           "default_zoo", "scenes_sweep", "shortcut_sweep"]

CHECKPOINT_EPOCHS = (2, 5, 15)


@dataclass(frozen=True)
class BuiltinSpec:
    arch: str            # "mlp" | "cnn"
    width: int
    seed: int
    train_data: dict     # DatasetSpec fields of the training set
    n_classes: int
    in_channels: int
    input_size: int = 8                          # square inputs (in_channels, input_size, input_size)
    epochs: tuple[int, ...] = CHECKPOINT_EPOCHS  # the checkpoints saved (the last is builtin:<name>)


_DIGITS = {"name": "digits", "split": "train"}
_COLORED = {"name": "colored-digits", "split": "train", "color_flip": 0.1, "label_noise": 0.25}

BUILTIN_ZOO: dict[str, BuiltinSpec] = {
    "mlp-w32-s0": BuiltinSpec("mlp", 32, 0, _DIGITS, 10, 1),
    "mlp-w64-s0": BuiltinSpec("mlp", 64, 0, _DIGITS, 10, 1),
    "mlp-w64-s1": BuiltinSpec("mlp", 64, 1, _DIGITS, 10, 1),
    "cnn-w8-s0": BuiltinSpec("cnn", 8, 0, _DIGITS, 10, 1),
    "cnn-w16-s0": BuiltinSpec("cnn", 16, 0, _DIGITS, 10, 1),
    # Trained where colour agrees with the label 90% of the time but the digit
    # shape only 75% (label noise): a strong colour shortcut.
    "cnn-colored-w16-s0": BuiltinSpec("cnn", 16, 0, _COLORED, 2, 2),
}

# The shortcut sweep: one colored-digits model per colour flip probability
# (smaller flip = colour agrees with the label more often = stronger shortcut).
SHORTCUT_SWEEP: dict[float, str] = {0.1: "cnn-colored-w16-s0"}
for _flip in (0.2, 0.3, 0.5):
    _name = f"cnn-colored-f{round(_flip * 100):02d}-w16-s0"
    BUILTIN_ZOO[_name] = BuiltinSpec("cnn", 16, 0, {**_COLORED, "color_flip": _flip}, 2, 2)
    SHORTCUT_SWEEP[_flip] = _name

# The scenes sweep (zooaudit.data.scenes): a small CNN with batch norm and a global average
# pool per background–class agreement of its training set. 0.95: the background predicts the
# class as well as the shape does (the model learns the background); 0.25 = 1/B with B = 4
# kinds: the background is independent of the class (the model must use the shape).
SCENES_EPOCHS = (1, 3, 6)
SCENES_TRAIN = {"name": "scenes", "split": "train", "options": {"n_train": 1024}}
SCENES_SWEEP: dict[float, str] = {}
for _agreement in (0.95, 0.75, 0.25):
    _name = f"scene-cnn-a{round(_agreement * 100):02d}-w8-s0"
    _data = {**SCENES_TRAIN, "options": {**SCENES_TRAIN["options"], "agreement": _agreement}}
    BUILTIN_ZOO[_name] = BuiltinSpec("scene-cnn", 8, 0, _data, 4, 3, input_size=64, epochs=SCENES_EPOCHS)
    SCENES_SWEEP[_agreement] = _name

DEFAULT_ZOO = ("mlp-w32-s0", "mlp-w64-s0", "mlp-w64-s1", "cnn-w8-s0", "cnn-w16-s0", "cnn-colored-w16-s0")


def default_zoo() -> list[str]:
    """The demo's zoo: five digits classifiers and the strong-shortcut colored model."""
    return [f"builtin:{name}" for name in DEFAULT_ZOO]


def scenes_sweep() -> dict[float, str]:
    """``{training background agreement: model URI}`` of the scenes sweep, strongest shortcut first."""
    return {a: f"builtin:{name}" for a, name in sorted(SCENES_SWEEP.items(), reverse=True)}


def shortcut_sweep() -> dict[float, str]:
    """``{colour flip probability: model URI}`` of the shortcut sweep, strongest shortcut first."""
    return {flip: f"builtin:{name}" for flip, name in sorted(SHORTCUT_SWEEP.items())}
