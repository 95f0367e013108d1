"""Deletion / insertion curves (zooaudit.faithfulness) on a model whose evidence is known."""

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from weighted_model import Weighted
from zooaudit.analysis.attribution import auc
from zooaudit.errors import ZooauditError
from zooaudit.faithfulness import confidence_change, explanation_masks, faithfulness_curves


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


def test_curves_refuse_bad_targets():
    x = np.zeros((2, 1, 4, 4), np.float32)
    maps = xr.DataArray(np.zeros((2, 1, 4, 4)), dims=("sample", "method", "y", "x"), coords={"method": ["m"]})
    model = Weighted(np.zeros((1, 4, 4)))
    with pytest.raises(ZooauditError, match=r"targets has shape \(3,\)"):
        faithfulness_curves(model, x, maps, [0, 0, 0])
    with pytest.raises(ZooauditError, match=r"class indices in \[0, 2\)"):
        faithfulness_curves(model, x, maps, [0, 2])


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_average_drop_and_increase_in_confidence_by_hand():
    # logits (w·x, 0): p(class 0) = σ(w·x), p(class 1) = σ(−w·x)
    w = np.array([[[1.0, 1.0], [-1.0, 0.0]]], np.float32)
    x = np.array([[[[1.0, 2.0], [0.5, 1.0]]], [[[0.0, 1.0], [2.0, 0.0]]]], np.float32)     # w·x = 2.5, −1
    maps = np.array([[[[2, 0], [1, -1]], [[0, 0], [0, 0]], [[0, 4], [0, 0]]],     # E = [[1,0],[.5,0]], 0, [[0,1],[0,0]]
                     [[[0, 0], [1, 0]], [[0, 0], [0, 0]], [[0, 3], [0, 0]]]], np.float32)
    maps = xr.DataArray(maps, dims=("sample", "method", "y", "x"), coords={"method": ["a", "zero", "c"]})
    out = confidence_change(Weighted(w), x, maps, [0, 1], batch_size=4)
    y = np.array([_sigmoid(2.5), _sigmoid(1.0)])
    # sample 0 (class 0): w·(x⊙E) = 1 − .25, 0, 2; sample 1 (class 1): −w·(x⊙E) = 2, 0, −1
    o = np.array([[_sigmoid(0.75), 0.5, _sigmoid(2.0)], [_sigmoid(2.0), 0.5, _sigmoid(-1.0)]])
    np.testing.assert_allclose(out["full"].values, y, rtol=1e-6)
    np.testing.assert_allclose(out["masked"].values, o, rtol=1e-6)
    drop = np.maximum(0, y[:, None] - o) / y[:, None]
    assert drop[1, 0] == 0.0 and drop[0, 0] > 0          # sample 1's map a raises the confidence
    np.testing.assert_allclose(out["average_drop"].values, 100 * drop.mean(0), rtol=1e-5)
    np.testing.assert_allclose(out["increase_in_confidence"].values, [50.0, 0.0, 0.0])
    assert out["average_drop"].dims == ("method",) and list(out["method"].values) == ["a", "zero", "c"]


def test_confidence_change_equals_pytorch_grad_cam_metrics():
    """The same numbers as pytorch-grad-cam's DropInConfidence / IncreaseInConfidence (softmax
    target, the map multiplied into the input) on a small CNN, divided by Y for the drop."""
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    rng = np.random.default_rng(5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                              nn.Linear(16, 3)).eval()
    x = rng.normal(size=(6, 3, 9, 9)).astype(np.float32)
    raw = rng.normal(size=(6, 2, 9, 9)).astype(np.float32)
    targets = rng.integers(0, 3, 6)
    maps = xr.DataArray(raw, dims=("sample", "method", "y", "x"), coords={"method": ["p", "q"]})
    out = confidence_change(model, x, maps, targets, batch_size=5)
    with torch.no_grad():
        y = torch.softmax(model(torch.from_numpy(x)), 1).numpy()[np.arange(6), targets]
    np.testing.assert_allclose(out["full"].values, y, rtol=1e-6)
    tgt = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    for j, method in enumerate(["p", "q"]):
        cams = explanation_masks(raw[:, j])
        assert cams.min() == 0.0 and np.allclose(cams.max((1, 2)), 1.0)
        ref_drop = DropInConfidence()(torch.from_numpy(x), cams, tgt, model) / y
        ref_inc = IncreaseInConfidence()(torch.from_numpy(x), cams, tgt, model)
        np.testing.assert_allclose(out["drop"].sel({"method": method}).values, ref_drop, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(out["average_drop"].sel({"method": method})), 100 * ref_drop.mean(), rtol=1e-4)
        np.testing.assert_allclose(float(out["increase_in_confidence"].sel({"method": method})), 100 * ref_inc.mean())


def test_confidence_change_refuses_bad_input():
    x = np.zeros((2, 1, 4, 4), np.float32)
    maps = xr.DataArray(np.zeros((2, 1, 4, 4)), dims=("sample", "method", "y", "x"), coords={"method": ["m"]})
    model = Weighted(np.zeros((1, 4, 4)))
    with pytest.raises(ZooauditError, match="do not match inputs"):
        confidence_change(model, x, maps.isel(y=slice(0, 3)), [0, 0])
    with pytest.raises(ZooauditError, match=r"targets has shape \(3,\)"):
        confidence_change(model, x, maps, [0, 0, 0])
    with pytest.raises(ZooauditError, match=r"class indices in \[0, 2\)"):
        confidence_change(model, x, maps, [0, 2])
