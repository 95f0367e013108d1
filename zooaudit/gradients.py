"""Model-side TCAV: logit gradients at a layer, and concept sensitivity of a model.

These run the model (forward hooks, autograd, :func:`zooaudit.extract.forward_batches`),
so they live next to :mod:`zooaudit.extract`; the statistics on the resulting arrays are
:mod:`zooaudit.analysis.tcav`.
"""

from __future__ import annotations

import numpy as np
import torch

from .analysis.tcav import TcavResult, tcav
from .errors import ZooauditError
from .extract import _first_tensor, forward_batches

__all__ = ["concept_sensitivity", "layer_gradients"]


def layer_gradients(model, inputs, layer: str, target: int, *, batch_size: int = 64):
    """``(n, unit)`` gradients of logit ``target`` w.r.t. ``layer``'s output (flattened), one row per input.

    ``inputs``: ``(n, *input_shape)`` array (or texts for a model with ``collate``).
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ZooauditError(f"Layer {layer!r} is not in the model. Valid layers: {', '.join(n for n in modules if n)}.")
    kept: list = []
    handle = modules[layer].register_forward_hook(lambda _m, _i, out: kept.append(_first_tensor(out)))
    collate = getattr(model, "collate", None)
    rows = []
    model.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            kept.clear()
            part = inputs[start:start + batch_size]
            with torch.enable_grad():
                if collate is not None:
                    out = model(**collate(part))
                else:
                    out = model(torch.as_tensor(np.ascontiguousarray(part), dtype=torch.float32))
                logits = _first_tensor(out)
                if not 0 <= target < logits.shape[1]:
                    raise ZooauditError(f"target class {target} out of range: the model has {logits.shape[1]} outputs.")
                (grad,) = torch.autograd.grad(logits[:, target].sum(), kept[0])
            rows.append(grad.detach().reshape(grad.shape[0], -1).numpy().astype(np.float64))
    finally:
        handle.remove()
    return np.concatenate(rows)


def concept_sensitivity(module, layer: str, class_inputs, target: int, concept_inputs, random_pool, *,
                        n_random: int = 20, random_size: int | None = None, alpha: float = 0.05,
                        random_state: int = 0, batch_size: int = 256) -> TcavResult:
    """TCAV of a named concept, given as example inputs, for class ``target`` of a model.

    Args:
        module: the ``torch.nn.Module`` (a classifier: its output is ``(n, n_classes)`` logits).
        layer: module path whose output the CAVs live in (flattened per sample).
        class_inputs: ``(n, *input_shape)`` inputs of class ``target`` (the sensitivities).
        concept_inputs: ``(n_c, *input_shape)`` examples of the concept.
        random_pool: ``(m, *input_shape)`` inputs the ``n_random`` random concepts are drawn
            from (each ``random_size`` samples without replacement; default ``n_c``).
    """
    size = int(random_size or len(concept_inputs))
    if size > len(random_pool):
        raise ZooauditError(f"random_pool has {len(random_pool)} inputs; each random concept needs {size}.")
    rng = np.random.default_rng(random_state)
    draws = [rng.choice(len(random_pool), size, replace=False) for _ in range(n_random)]

    def acts(x):
        return forward_batches(module, x, [layer], pooling="flatten", batch_size=batch_size,
                               with_outputs=False)[0][layer]

    pool_acts = acts(random_pool)
    grads = layer_gradients(module, class_inputs, layer, target, batch_size=batch_size)
    return tcav(grads, acts(concept_inputs), [pool_acts[i] for i in draws], alpha=alpha, random_state=random_state)
