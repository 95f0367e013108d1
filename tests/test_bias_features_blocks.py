"""Component AUCs computed one column at a time (one sort per column for every target) and the stage's
column blocks read from a Zarr store equal the whole-matrix DeLong code they replaced
(``bias_reference``, 30d50b3) to 1e-12: ties, constant and NaN columns, float32 codes, tiny targets."""

import numpy as np
import pytest
import xarray as xr

from bias_reference import component_aucs as ref_aucs
from bias_reference import delong_auc as ref_delong
from zooaudit.analysis.bias_features import component_aucs, delong_auc


def _codes(n, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    t = rng.random(n) < 0.3
    X = np.stack([t + rng.normal(0, 1, n), rng.normal(0, 1, n), -3 * t + rng.normal(0, 1, n),
                  np.round(rng.normal(0, 1, n)), np.round(2 * t + rng.normal(0, 1, n)) / 2,   # many ties
                  np.full(n, 1.5), rng.exponential(1, n) * (rng.random(n) < 0.2),             # constant; zeros
                  np.where(rng.random(n) < 0.01, np.inf, rng.normal(0, 1, n))], 1)
    return X.astype(dtype), t, rng


def _close(got: xr.Dataset, want: xr.Dataset):
    assert list(got.data_vars) == list(want.data_vars)
    for name in want.data_vars:
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(np.isnan(got[name].values.astype(float)),
                                      np.isnan(want[name].values.astype(float)), err_msg=name)
    xr.testing.assert_identical(got.drop_vars(list(got.data_vars)), want.drop_vars(list(want.data_vars)))
    assert got.attrs == want.attrs


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_component_aucs_equal_the_whole_matrix_code(dtype):
    X, t, rng = _codes(700, 0, dtype)
    targets = {"t": t, "half": np.arange(700) % 2 == 0, "rare": np.arange(700) < 25, "one": np.arange(700) == 3,
               "none": np.zeros(700, bool), "all_but_one": np.arange(700) != 9, "random": rng.random(700) < 0.5}
    for kw in ({}, {"min_group_size": 30, "ci": 0.9}, {"component_names": list("abcdefgh")}):
        _close(component_aucs(X, targets, **kw), ref_aucs(X, targets, **kw))
    got = component_aucs(X, targets)
    assert got["auc"].sel(target="t").values[0] > 0.7 and got["auc"].sel(target="t").values[2] < 0.1
    assert (got["auc"].sel(target=["t", "half", "random"], component=5) == 0.5).all()     # constant column
    assert (got["p_value"].sel(target=["t", "half", "random"], component=5) == 1.0).all()


def test_delong_auc_equal_and_nan_columns():
    X, t, _ = _codes(400, 1)
    X[17, 1] = np.nan
    for target in (t, ~t, np.arange(400) < 2, np.ones(400, bool), np.arange(400) == 0):
        for got, want in zip(delong_auc(X, target), ref_delong(X, target)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(delong_auc(X, t)[0][1])


def test_large_n_ranks_and_auc_exact():
    # n = 200k: rank sums near 10¹⁰, the AUC still equal to the reference's
    rng = np.random.default_rng(3)
    n = 200_000
    t = rng.random(n) < 0.4
    X = np.stack([t * 0.3 + rng.normal(0, 1, n), np.round(rng.normal(0, 3, n))], 1)
    got, want = delong_auc(X, t), ref_delong(X, t)
    np.testing.assert_array_equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_stage_blocks_read_from_zarr_equal_the_whole_matrix(tmp_path, monkeypatch):
    import zooaudit.stages.bias_features as bf
    from zooaudit.specs import BiasSpec

    rng = np.random.default_rng(5)
    n, k = 3000, 23
    t = rng.random(n) < 0.35
    X = (rng.normal(size=(n, k)) + np.outer(t, rng.normal(0, 0.5, k))).astype(np.float32)
    X[:, 4] = np.round(X[:, 4])
    ds = xr.Dataset({"codes": (("sample", "component"), X)}, coords={"sample": np.arange(n)})
    ds.chunk({"sample": 256}).to_zarr(tmp_path / "codes.zarr", zarr_format=3, consolidated=False)
    lazy = xr.open_zarr(tmp_path / "codes.zarr", consolidated=False)["codes"]
    targets = {"g": t, "error": rng.random(n) < 0.1}
    want = ref_aucs(X.astype(np.float64), targets, min_group_size=5)
    monkeypatch.setattr(bf, "READ_BYTES", 5 * n * 4)        # 5 components per read, 4 passes + a tail of 3
    monkeypatch.setattr(bf, "ROW_BYTES", 700 * k * 4)       # rows read in runs of ~3 chunks
    got = bf._block_aucs(lazy, targets, BiasSpec(min_group_size=5))
    assert got["component"].values.tolist() == list(range(k))
    _close(got.drop_vars("component"), want.drop_vars("component"))
    assert bf._read_width(lazy) == 5
