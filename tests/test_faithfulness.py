"""Deletion / insertion curves (zooaudit.faithfulness) on a model whose evidence is known."""

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from zooaudit.analysis.attribution import auc
from zooaudit.errors import ZooauditError
from zooaudit.faithfulness import faithfulness_curves


class Weighted(nn.Module):
    """Logits (w·x, 0): the evidence for class 0 is exactly the pixel weights ``w``."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.as_tensor(w, dtype=torch.float32)

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_curves_endpoints_and_the_oracle_beats_random():
    rng = np.random.default_rng(0)
    w = np.zeros((1, 8, 8), np.float32)
    w[0, 2:4, 2:6] = 0.5                       # 8 pixels carry all the evidence
    x = rng.random((5, 1, 8, 8)).astype(np.float32)
    model = Weighted(w)
    maps = xr.DataArray(np.stack([np.broadcast_to(w[0], (5, 8, 8)), rng.random((5, 8, 8))], 1),
                        dims=("sample", "method", "y", "x"), coords={"method": ["oracle", "noise"]})
    out = faithfulness_curves(model, x, maps, np.zeros(5, int), steps=8, batch_size=7)
    c = out["curves"]
    assert c.dims == ("sample", "order", "kind", "step") and list(out["order"].values) == ["oracle", "noise", "random"]
    with torch.no_grad():
        p_x = torch.softmax(model(torch.from_numpy(x)), 1)[:, 0].numpy()
    p_black = 0.5                              # w·0 = 0 against 0
    np.testing.assert_allclose(c.sel(kind="deletion").isel(step=0), np.repeat(p_x[:, None], 3, 1), rtol=1e-6)
    np.testing.assert_allclose(c.sel(kind="deletion").isel(step=-1), p_black, rtol=1e-6)
    np.testing.assert_allclose(c.sel(kind="insertion").isel(step=0), p_black, rtol=1e-6)
    np.testing.assert_allclose(c.sel(kind="insertion").isel(step=-1), np.repeat(p_x[:, None], 3, 1), rtol=1e-6)
    a = auc(c.values, out["fraction"].values)                 # (sample, order, kind)
    assert (a[:, 0, 0] < a[:, 2, 0]).all() and (a[:, 0, 1] > a[:, 2, 1]).all()
    # the oracle's deletion curve reaches chance once its 8 pixels (1/8 of 64) are gone
    np.testing.assert_allclose(c.sel(kind="deletion", order="oracle").isel(step=1), p_black, rtol=1e-6)


def test_bad_maps_are_refused():
    x = np.zeros((2, 1, 4, 4), np.float32)
    maps = xr.DataArray(np.zeros((2, 1, 3, 3)), dims=("sample", "method", "y", "x"), coords={"method": ["m"]})
    with pytest.raises(ZooauditError, match="do not match inputs"):
        faithfulness_curves(Weighted(np.zeros((1, 4, 4))), x, maps, [0, 0])
