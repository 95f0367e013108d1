"""The builtin zoo: small MLP and CNN classifiers trained here on scikit-learn's digits.

Training is deterministic — one thread, seeded init and shuffling, a fixed
split — so the same spec gives bitwise-identical weights and therefore the
same content hash. Weights are saved as safetensors under
``<store>/weights/builtin/<name>/epoch-<E>.safetensors`` and trained only when missing.

URIs: ``builtin:<name>`` is the final checkpoint; ``builtin:<name>@<epoch>`` an earlier one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..errors import ZooauditError, unknown
from . import LoadedModel, weights_hash

log = logging.getLogger(__name__)

CHECKPOINT_EPOCHS = (2, 5, 15)
RANDOM_INIT_SEED_OFFSET = 1_000_003  # seed of the untrained control copy = training seed + this


@dataclass(frozen=True)
class BuiltinSpec:
    arch: str            # "mlp" | "cnn"
    width: int
    seed: int
    train_data: dict     # DatasetSpec fields of the training set
    n_classes: int
    in_channels: int


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

DEFAULT_ZOO = ("mlp-w32-s0", "mlp-w64-s0", "mlp-w64-s1", "cnn-w8-s0", "cnn-w16-s0", "cnn-colored-w16-s0")


def default_zoo() -> list[str]:
    """The demo's zoo: five digits classifiers and the strong-shortcut colored model."""
    return [f"builtin:{name}" for name in DEFAULT_ZOO]


def shortcut_sweep() -> dict[float, str]:
    """``{colour flip probability: model URI}`` of the shortcut sweep, strongest shortcut first."""
    return {flip: f"builtin:{name}" for flip, name in sorted(SHORTCUT_SWEEP.items())}


class MLP(nn.Module):
    def __init__(self, in_channels: int, width: int, n_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * 64, width)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        self.embed = nn.ReLU()
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.embed(self.fc2(self.act1(self.fc1(self.flatten(x))))))


class CNN(nn.Module):
    def __init__(self, in_channels: int, width: int, n_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width * 16, 64)
        self.embed = nn.ReLU()
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):
        x = self.pool(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.head(self.embed(self.fc(self.flatten(x))))


DEFAULT_LAYERS = {"mlp": ["act1", "embed", "head"], "cnn": ["act1", "act2", "embed", "head"]}


def build(spec: BuiltinSpec) -> nn.Module:
    cls = {"mlp": MLP, "cnn": CNN}[spec.arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return cls(spec.in_channels, spec.width, spec.n_classes)


@contextlib.contextmanager
def _deterministic():
    """One thread and deterministic kernels: bitwise-reproducible CPU training."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(spec: BuiltinSpec, epochs=CHECKPOINT_EPOCHS) -> dict[int, dict[str, torch.Tensor]]:
    """Train from scratch; return ``{epoch: state_dict}`` at each checkpoint epoch."""
    from ..data import load_dataset

    data = load_dataset(spec.train_data)
    x = torch.from_numpy(data.inputs)
    y = torch.from_numpy(data.labels)
    model = build(spec)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    out: dict[int, dict[str, torch.Tensor]] = {}
    with _deterministic():
        for epoch in range(1, max(epochs) + 1):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(64):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
            if epoch in epochs:
                out[epoch] = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return out


def _parse(name: str) -> tuple[str, int]:
    base, _, epoch = name.partition("@")
    if base not in BUILTIN_ZOO:
        raise unknown("builtin model", base, BUILTIN_ZOO, hint="Use 'builtin:<name>' or 'builtin:<name>@<epoch>'.")
    if not epoch:
        return base, max(CHECKPOINT_EPOCHS)
    if not epoch.isdigit() or int(epoch) not in CHECKPOINT_EPOCHS:
        raise ZooauditError(
            f"Unknown checkpoint epoch {epoch!r} of builtin model {base!r}. "
            f"Allowed epochs: {', '.join(map(str, CHECKPOINT_EPOCHS))}."
        )
    return base, int(epoch)


def weights_file(store, base: str, epoch: int) -> str:
    return store.path("weights", "builtin", base, f"epoch-{epoch:03d}.safetensors")


def ensure_weights(store, base: str) -> None:
    """Train ``base`` and save every checkpoint unless all are already in the store."""
    fs = store.fs
    paths = {e: weights_file(store, base, e) for e in CHECKPOINT_EPOCHS}
    if all(fs.exists(p) for p in paths.values()):
        return
    with store.lock(f"weights-{base}"):
        if all(fs.exists(p) for p in paths.values()):
            return
        log.info("training builtin model %s (checkpoints at epochs %s)", base, CHECKPOINT_EPOCHS)
        for epoch, state in train(BUILTIN_ZOO[base]).items():
            tmp = paths[epoch] + ".tmp"
            with fs.open(tmp, "wb") as fh:
                fh.write(st_save(state, metadata={"model": base, "epoch": str(epoch)}))
            fs.mv(tmp, paths[epoch])


def load(name: str, *, store, uri: str) -> LoadedModel:
    base, epoch = _parse(name)
    ensure_weights(store, base)
    spec = BUILTIN_ZOO[base]
    with store.fs.open(weights_file(store, base, epoch), "rb") as fh:
        state = st_load(fh.read())
    model = build(spec)
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(
        uri=uri,
        module=model,
        content_hash=weights_hash(state),
        input_shape=(spec.in_channels, 8, 8),
        default_layers=list(DEFAULT_LAYERS[spec.arch]),
        info={"arch": spec.arch, "width": spec.width, "seed": spec.seed, "epoch": epoch,
              "train_data": spec.train_data, "n_classes": spec.n_classes},
        random_init=lambda: build(dataclasses.replace(spec, seed=spec.seed + RANDOM_INIT_SEED_OFFSET)).eval(),
        random_init_seed=spec.seed + RANDOM_INIT_SEED_OFFSET,
    )


__all__ = ["BUILTIN_ZOO", "CHECKPOINT_EPOCHS", "SHORTCUT_SWEEP", "default_zoo", "load", "shortcut_sweep", "train"]
