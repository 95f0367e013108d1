"""The builtin zoo: small MLP and CNN classifiers trained here on scikit-learn's digits, and
small CNNs trained on the generated scenes (:mod:`zooaudit.data.scenes`) at several
background–class agreements.

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

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..errors import ZooauditError, unknown
from .catalog import (  # noqa: F401 — the catalog's names, re-exported
    BUILTIN_ZOO,
    CHECKPOINT_EPOCHS,
    DEFAULT_ZOO,
    SCENES_SWEEP,
    SHORTCUT_SWEEP,
    BuiltinSpec,
    default_zoo,
    scenes_sweep,
    shortcut_sweep,
)
from .types import LoadedModel, weights_hash

log = logging.getLogger(__name__)

RANDOM_INIT_SEED_OFFSET = 1_000_003  # seed of the untrained control copy = training seed + this


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


class SceneCNN(nn.Module):
    """Four conv–BN–ReLU blocks (max-pooled by 2 between them), a global average pool and a
    linear head: at 64×64 inputs ``act4`` is the ``(4·width, 8, 8)`` map CAM methods read,
    ``embed`` the pooled ``(4·width,)`` features. Batch norm lets it learn the shapes from the
    balanced scenes within a few epochs (without it the loss stays flat for most of them)."""

    def __init__(self, in_channels: int, width: int, n_classes: int):
        super().__init__()
        chans = [in_channels, width, 2 * width, 2 * width, 4 * width]
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Conv2d(chans[i - 1], chans[i], 3, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(chans[i]))
            setattr(self, f"act{i}", nn.ReLU())
            if i < 4:
                setattr(self, f"pool{i}", nn.MaxPool2d(2))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Flatten()
        self.head = nn.Linear(chans[-1], n_classes)

    def forward(self, x):
        for i in range(1, 5):
            x = getattr(self, f"act{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i < 4:
                x = getattr(self, f"pool{i}")(x)
        return self.head(self.embed(self.gap(x)))


DEFAULT_LAYERS = {"mlp": ["act1", "embed", "head"], "cnn": ["act1", "act2", "embed", "head"],
                  "scene-cnn": ["act3", "act4", "embed", "head"]}


def build(spec: BuiltinSpec) -> nn.Module:
    cls = {"mlp": MLP, "cnn": CNN, "scene-cnn": SceneCNN}[spec.arch]
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


def train(spec: BuiltinSpec, epochs=None) -> dict[int, dict[str, torch.Tensor]]:
    """Train from scratch; return ``{epoch: state_dict}`` at each checkpoint epoch (default ``spec.epochs``)."""
    epochs = spec.epochs if epochs is None else epochs
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
    epochs = BUILTIN_ZOO[base].epochs
    if not epoch:
        return base, max(epochs)
    if not epoch.isdigit() or int(epoch) not in epochs:
        raise ZooauditError(
            f"Unknown checkpoint epoch {epoch!r} of builtin model {base!r}. "
            f"Allowed epochs: {', '.join(map(str, epochs))}."
        )
    return base, int(epoch)


def weights_file(store, base: str, epoch: int) -> str:
    return store.path("weights", "builtin", base, f"epoch-{epoch:03d}.safetensors")


def ensure_weights(store, base: str) -> None:
    """Train ``base`` and save every checkpoint unless all are already in the store."""
    fs = store.fs
    epochs = BUILTIN_ZOO[base].epochs
    paths = {e: weights_file(store, base, e) for e in epochs}
    if all(fs.exists(p) for p in paths.values()):
        return
    with store.lock(f"weights-{base}"):
        if all(fs.exists(p) for p in paths.values()):
            return
        log.info("training builtin model %s (checkpoints at epochs %s)", base, epochs)
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
        input_shape=(spec.in_channels, spec.input_size, spec.input_size),
        default_layers=list(DEFAULT_LAYERS[spec.arch]),
        info={"arch": spec.arch, "width": spec.width, "seed": spec.seed, "epoch": epoch,
              "train_data": spec.train_data, "n_classes": spec.n_classes},
        random_init=lambda: build(dataclasses.replace(spec, seed=spec.seed + RANDOM_INIT_SEED_OFFSET)).eval(),
        random_init_seed=spec.seed + RANDOM_INIT_SEED_OFFSET,
    )


__all__ = ["BUILTIN_ZOO", "CHECKPOINT_EPOCHS", "SCENES_SWEEP", "SHORTCUT_SWEEP", "default_zoo", "load", "scenes_sweep",
           "shortcut_sweep", "train"]
