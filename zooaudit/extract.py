"""Activation extraction: layer selection, hooks, pooling, batching, device.

One forward pass per batch records every requested layer through forward
hooks. When the model's outputs are not needed, the pass stops right after the
last requested layer has fired.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .devices import resolve_device
from .errors import ZooauditError
from .tokens import TOKEN_POOLINGS, TokenRows, pool_tokens

# torch.autocast dtypes by the names specs use (None: autocast off, plain float32).
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

POOLINGS = ("mean", "flatten", "none", "cls", "token_mean", "tokens")  # the last three: see zooaudit.tokens


def autocast_context(device_type: str, autocast: str):
    """``torch.autocast`` on ``device_type`` for a spec's ``autocast`` name (``none``: disabled,
    the forward stays float32)."""
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[autocast] or torch.float32, enabled=autocast != "none")


class _StopForward(Exception):
    """Raised from the last hook to skip the rest of the forward pass."""


def list_layers(module: torch.nn.Module) -> list[str]:
    """Every named submodule (module paths in registration order), root excluded."""
    return [name for name, _ in module.named_modules() if name]


def select_layers(module: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Resolve module paths / glob patterns to layer names, in the model's order.

    Raises a :class:`ZooauditError` that lists the valid names when a pattern
    matches nothing.
    """
    valid = list_layers(module)
    if not patterns:
        raise ZooauditError(f"No layers requested. Valid layers: {', '.join(valid)}.")
    chosen: set[str] = set()
    for pat in patterns:
        hits = [n for n in valid if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ZooauditError(
                f"Layer {pat!r} is not in the model. Valid layers (module paths; globs like "
                f"'act*' allowed): {', '.join(valid)}."
            )
        chosen.update(hits)
    return [n for n in valid if n in chosen]


def pool(t: torch.Tensor, pooling: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool one layer output ``(batch, ...)``.

    ``mean``: spatial mean for ``(b, c, y, x)`` maps, token mean for ``(b, t, d)`` (mask-aware
    when the batch has an attention ``mask (b, t)``); ``flatten``: ``(b, prod(...))``;
    ``none``: unchanged; ``cls`` / ``token_mean`` / ``tokens``: see :mod:`zooaudit.tokens`.
    2-D outputs are unchanged.
    """
    if pooling not in POOLINGS:
        raise ZooauditError(f"Unknown pooling {pooling!r}. Allowed: {', '.join(POOLINGS)}.")
    if pooling in TOKEN_POOLINGS or (pooling == "mean" and t.ndim == 3 and mask is not None):
        return pool_tokens(t, "token_mean" if pooling == "mean" else pooling, mask)
    if t.ndim <= 2 or pooling == "none":
        return t
    if pooling == "flatten":
        return t.flatten(1)
    return t.mean(dim=tuple(range(1, t.ndim - 1))) if t.ndim == 3 else t.mean(dim=tuple(range(2, t.ndim)))


def _first_tensor(out) -> torch.Tensor:
    """Hook outputs may be tuples/lists/dicts (transformers): take the hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise ZooauditError(f"A hooked layer returned {type(out).__name__}, which holds no tensor.")


def forward_batches(
    model: torch.nn.Module,
    inputs: np.ndarray,
    layers: Sequence[str],
    *,
    pooling: str = "mean",
    batch_size: int = 256,
    device: str = "cpu",
    with_outputs: bool = True,
    strict: bool = True,
    autocast: str = "none",
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Run ``inputs`` ``(n, *input_shape)`` through ``model`` in batches.

    Returns ``({layer: (n, ...) float32}, outputs (n, n_out) float32 or None)``; an
    all-tokens layer (pooling ``tokens``) gives a :class:`zooaudit.tokens.TokenRows`.

    A model that owns its preprocessing (a text encoder's tokenizer) has a ``collate``
    method: a batch of raw inputs → a dict of tensors, passed as keyword arguments; its
    ``attention_mask`` drives the mask-aware token poolings. A requested layer that never
    runs is an error (``strict``) or left out of the result.

    ``autocast`` (``none|bf16|fp16``) runs the forward under ``torch.autocast``; captured
    activations are cast back to float32. On CUDA, batches are copied from pinned host
    memory with ``non_blocking=True`` so the copy overlaps the previous batch's kernels, and the
    hooked layers' pooled outputs come back to the host together once the batch's forward is
    queued (one wait for the GPU per batch, not one per hooked layer).
    """
    dev = resolve_device(device)
    if autocast not in AUTOCAST_DTYPES:
        raise ZooauditError(f"Unknown autocast {autocast!r}. Allowed: {', '.join(AUTOCAST_DTYPES)}.")
    cuda = dev.type == "cuda"

    def to_device(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(dev, non_blocking=True) if cuda else t.to(dev)

    model = model.to(dev).eval()
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    collate = getattr(model, "collate", None)
    batch_mask: list = [None]  # the current batch's attention mask, read by the hooks
    wanted = set(layers)

    owner = threading.get_ident()

    def hook_for(name):
        def hook(_module, _inp, out):
            # A module may be shared by tasks on several threads: its hooks fire
            # for every caller, so each call records only its own forward pass.
            if threading.get_ident() != owner:
                return
            # detach + copy: a kept view would pin the whole activation buffer (and in-place ops
            # later in the forward, such as ReLU(inplace=True), would change it). The copy stays
            # on the device: copying to the host here would make a CUDA forward wait at every
            # hooked layer for the kernels queued before it (one wait per batch instead, below).
            captured[name] = pool(_first_tensor(out).detach(), pooling, batch_mask[0]).clone()
            if not with_outputs and wanted.issubset(captured):
                raise _StopForward
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    acts: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    outs: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(inputs), batch_size):
                if collate is not None:
                    batch = {k: to_device(v) for k, v in collate(inputs[start:start + batch_size]).items()}
                    batch_mask[0] = batch.get("attention_mask")
                else:
                    batch = to_device(torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size])))
                captured.clear()
                try:
                    with autocast_context(dev.type, autocast):
                        out = model(**batch) if isinstance(batch, dict) else model(batch)
                    if with_outputs:
                        outs.append(_first_tensor(out).to("cpu", torch.float32).numpy())
                except _StopForward:
                    pass
                missing = [name for name in layers if name not in captured]
                if missing and strict:
                    raise ZooauditError(f"Layers {missing} produced no output in the forward pass: the model never "
                                        "calls them (containers such as ModuleList, or modules its forward "
                                        "bypasses). Pick modules that run, e.g. the items of a ModuleList.")
                for name in layers:
                    if name in captured:
                        acts[name].append(captured[name].to("cpu", torch.float32).numpy())
    finally:
        for h in handles:
            h.remove()
    result = {name: TokenRows.concat(chunks) if isinstance(chunks[0], TokenRows) else
              np.concatenate(chunks) for name, chunks in acts.items() if chunks}
    return result, (np.concatenate(outs) if with_outputs else None)


def layer_shapes(model: torch.nn.Module, input_shape: Iterable[int], layers: Sequence[str],
                 pooling: str, *, strict: bool = True) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of each layer after pooling (one dry forward); ``(-1, unit)``
    for an all-tokens layer (a variable number of token rows per sample)."""
    dummy = getattr(model, "dummy_inputs", None)  # text encoders: a placeholder string, not zeros
    x = dummy(1) if dummy is not None else np.zeros((1, *input_shape), np.float32)
    acts, _ = forward_batches(model, x, layers, pooling=pooling, batch_size=1, with_outputs=False, strict=strict)
    return {name: (-1, a.n_units) if isinstance(a, TokenRows) else tuple(a.shape[1:]) for name, a in acts.items()}
