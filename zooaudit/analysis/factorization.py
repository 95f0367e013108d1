"""The :class:`Factorization` record every factorization returns (quality measures: :mod:`.quality`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr


@dataclass
class Factorization:
    """``A ≈ codes @ components + mean``.

    Attributes:
        method: ``"pca"``, ``"nmf"``, ``"semi_nmf"``, ``"sae"`` or ``"dff"``.
        components: ``(k, D)``, rows of unit L2 norm (a dead NMF/SAE row may be zero).
            PCA rows are orthonormal; NMF rows are ≥ 0; semi-NMF/SAE rows are signed.
        codes: ``(N, k)`` NumPy, or a lazy Dask array when asked for ``codes="dask"``.
            PCA codes are signed; NMF, semi-NMF and SAE codes are ≥ 0. For ``dff``
            the rows are spatial positions ``(N·H·W, k)`` and ``maps`` holds them
            per image.
        metrics: see the module docstring, plus per-method extras (PCA:
            ``explained_variance_ratio`` ``(k,)`` and ``explained_variance_curve``;
            iterative methods: ``n_iter``).
        mean: ``(D,)``: the data mean for PCA, the (rescaled) decoder bias for SAE,
            zeros for NMF and semi-NMF.
        maps: ``(N, k, H, W)`` per-image heat maps (DFF only), else ``None``.
        params: the solver settings that produced it (JSON-serialisable scalars).
    """

    method: str
    components: np.ndarray
    codes: np.ndarray
    metrics: dict = field(default_factory=dict)
    mean: np.ndarray | None = None
    maps: np.ndarray | None = None
    params: dict = field(default_factory=dict)

    def reconstruct(self, codes=None) -> np.ndarray:
        """``(N, D)`` reconstruction ``codes @ components + mean``."""
        codes = self.codes if codes is None else codes
        mean = 0.0 if self.mean is None else self.mean
        return np.asarray(codes) @ self.components + mean

    def to_dataset(self, sample_ids=None) -> xr.Dataset:
        """Labelled result: ``components (component, unit)``, ``codes (sample, component)``
        (``heatmaps (sample, component, y, x)`` instead for DFF), ``mean (unit)``,
        per-component metrics as variables, scalar metrics and params as attributes."""
        k, d = self.components.shape
        coords = {"component": np.arange(k), "unit": np.arange(d)}
        if sample_ids is not None:
            coords["sample"] = np.asarray(sample_ids)
        data = {"components": (("component", "unit"), self.components)}
        if self.maps is not None:
            data["heatmaps"] = (("sample", "component", "y", "x"), self.maps)
        else:
            data["codes"] = (("sample", "component"), self.codes)
        if self.mean is not None:
            data["mean"] = ("unit", np.asarray(self.mean, np.float64))
        for key, value in self.metrics.items():
            if np.ndim(value) == 1 and len(value) == k and key != "explained_variance_curve":
                data[key] = ("component", np.asarray(value))
        scalars = {key: float(v) for key, v in self.metrics.items() if np.ndim(v) == 0}
        params = {f"param_{key}": (v if isinstance(v, (int, float, str)) else str(v))
                  for key, v in self.params.items()}
        return xr.Dataset(data, coords=coords, attrs={"method": self.method, **scalars, **params})
