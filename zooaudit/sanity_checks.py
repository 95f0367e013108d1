"""Model-side sanity check of attribution maps: cascading randomisation (Adebayo et al. 2018).

The model's parameterised layers are re-initialised one at a time from the top (the head
first) and cumulatively — step ``k`` has the top ``k`` layers random — and every method's maps
are recomputed on the same inputs for the *same* targets as the trained model's. A method
whose maps barely change while the network they should explain is destroyed (rank correlation
with the trained maps staying high) explains the input, not the model: it is flagged.

Re-initialisation calls each layer's own ``reset_parameters()`` under a fixed torch seed
(batch-norm layers also reset their running statistics), on a deep copy; the trained model
is never modified. Two similarities with the trained maps, each on the raw maps and on their
absolute values (Adebayo et al. report both): the pixel rank correlation
(:func:`zooaudit.analysis.attribution.spearman_maps`) and the structural similarity
(:func:`zooaudit.analysis.ssim.ssim_maps`: each map min–max scaled to [0, 1], data range 1,
11 × 11 gaussian window σ = 1.5 — shrunk to the largest odd size that fits maps smaller than
11 px, recorded as ``ssim_window`` — K₁ = 0.01, K₂ = 0.03).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import xarray as xr

from .analysis.attribution import spearman_maps
from .analysis.ssim import ssim_maps
from .attribution_maps import attribution_maps
from .errors import ZooauditError

__all__ = ["cascade_layers", "randomisation_maps"]


def cascade_layers(module: torch.nn.Module) -> list[str]:
    """Leaf modules with their own parameters and ``reset_parameters``, top (last) first."""
    names = [name for name, m in module.named_modules()
             if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
             and hasattr(m, "reset_parameters")]
    return names[::-1]


def _mean(values: np.ndarray) -> float:
    """Mean over the samples where the correlation is defined; NaN when it is nowhere (every map
    constant, e.g. all-zero CAMs of a randomised network: none of the trained ranking is left)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def randomisation_maps(module: torch.nn.Module, inputs, layer: str | None, *, methods, targets, seed: int = 0,
                       max_steps: int | None = None, **map_options) -> xr.Dataset:
    """Spearman correlation and SSIM of each method's maps between the trained model and its
    cascading randomisations: ``spearman``, ``spearman_abs``, ``ssim``, ``ssim_abs``
    ``(step, method)``, means over the samples.

    ``targets (n,)``: the classes explained (the trained model's, kept fixed). ``step`` is labelled
    by the top-most randomised layer; step 0 (``none``) is the trained model itself (1 for both).
    NaN where every randomised map of a method is constant (never flagged: nothing is left).
    ``map_options`` go to :func:`zooaudit.attribution_maps.attribution_maps` (batch size, IG steps…).
    """
    layers = cascade_layers(module)
    if not layers:
        raise ZooauditError("Cascading randomisation needs layers with parameters and reset_parameters(); the model "
                            "has none.")
    layers = layers[:max_steps] if max_steps else layers
    targets = np.asarray(targets, dtype=np.int64)
    options = {**map_options, "normalise": "none"}

    def maps_of(m):
        vals = []
        for t in np.unique(targets):   # one call per target class: the targets stay the trained model's
            rows = np.flatnonzero(targets == t)
            r = attribution_maps(m, np.asarray(inputs)[rows], layer, methods=methods, target=int(t), **options)
            vals.append((rows, r["maps"].values))
        full = np.empty((len(targets), len(methods), *np.asarray(inputs).shape[2:]), np.float32)
        for rows, v in vals:
            full[rows] = v
        return full

    trained = maps_of(module)
    win = min(11, (min(trained.shape[2:]) - 1) // 2 * 2 + 1)
    stats = {name: np.ones((len(layers) + 1, len(methods))) for name in ("spearman", "spearman_abs", "ssim",
                                                                          "ssim_abs")}
    copy_ = copy.deepcopy(module).eval()
    named = dict(copy_.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for k, name in enumerate(layers, start=1):
            named[name].reset_parameters()
            if hasattr(named[name], "reset_running_stats"):
                named[name].reset_running_stats()
            randomised = maps_of(copy_)
            for j in range(len(methods)):
                t, r = trained[:, j], randomised[:, j]
                stats["spearman"][k, j] = _mean(spearman_maps(t, r))
                stats["spearman_abs"][k, j] = _mean(spearman_maps(np.abs(t), np.abs(r)))
                stats["ssim"][k, j] = _mean(ssim_maps(t, r, win_size=win))
                stats["ssim_abs"][k, j] = _mean(ssim_maps(np.abs(t), np.abs(r), win_size=win))
    return xr.Dataset(
        {name: (("step", "method"), v) for name, v in stats.items()},
        coords={"step": ["none", *layers], "method": list(methods)},
        attrs={"seed": seed, "order": "cascading from the top (head first), cumulative",
               "statistic": "pixel Spearman and SSIM with the trained model's maps, mean over samples",
               "ssim": "maps min-max scaled to [0, 1], data range 1, gaussian window sigma 1.5, K1 0.01, K2 0.03",
               "ssim_window": win},
    )
