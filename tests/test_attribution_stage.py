"""The attribution stage on the scenes dataset: the background-shortcut model puts significantly
more of its attribution on the background than the balanced one; maps, metrics, curves and
reliance are committed with a cache key; bad input commits nothing.

Suite time: one stage run per model. The balanced model's run (ASPEC: all products, cheap IG,
sanity and bootstrap settings) serves every product test and the comparison; the shortcut
model's run (SHORTCUT_ASPEC, the same 64-sample subset) computes only the three CAMs the
comparison asserts on, without curves or the sanity check."""

import numpy as np
import pytest

from zooaudit.analysis.attribution import compare_paired
from zooaudit.errors import ZooauditError
from zooaudit.specs import AttributionSpec, AuditModelSpec, DatasetSpec
from zooaudit.stages.activations import plan_extraction
from zooaudit.layout import attribution_group
from zooaudit.stages.attribution import run_attribution
from zooaudit.zoo.builtin import scenes_sweep

SCENES = DatasetSpec(name="scenes", split="test")
# Cheap settings; 64 samples because the comparison's statistics need them (and the curves'
# first 8 of that fixed subset are the ones whose deletion beats the random order).
ASPEC = AttributionSpec(max_samples=64, ig_steps=4, curve_samples=8, curve_steps=5, n_boot=100, n_permutations=100,
                        sanity_samples=2, batch_size=64)
SHORTCUT_ASPEC = AttributionSpec(methods=["gradcam", "layercam", "scorecam"], max_samples=64, curve_samples=0,
                                 sanity_samples=0, n_boot=50, n_permutations=50, batch_size=64)


def _plan(uri, store):
    spec = AuditModelSpec(model=uri, store=store, datasets=[SCENES])
    return plan_extraction(spec, SCENES)


@pytest.fixture(scope="module")
def balanced(shared_store):
    """(plan, result) of the stage on the balanced (0.25) scene model at ASPEC."""
    plan = _plan(scenes_sweep()[0.25], shared_store)
    return plan, run_attribution(plan, ASPEC)


@pytest.fixture(scope="module")
def runs(shared_store, balanced):
    """{agreement: (plan, result)} for the shortcut and the balanced model at SHORTCUT_ASPEC."""
    sweep = scenes_sweep()
    plan = _plan(sweep[0.95], shared_store)
    return {0.95: (plan, run_attribution(plan, SHORTCUT_ASPEC)), 0.25: balanced}


def _metrics(plan, result):
    return plan.repository.open(attribution_group(plan.ds_key, "act4", "metrics"), result.snapshot).load()


def test_shortcut_model_looks_at_the_background(runs):
    (p_short, r_short), (p_bal, r_bal) = runs[0.95], runs[0.25]
    m_short, m_bal = _metrics(p_short, r_short), _metrics(p_bal, r_bal)
    np.testing.assert_array_equal(m_short["sample"].values, m_bal["sample"].values)   # the same fixed subset
    for method in ("gradcam", "layercam", "scorecam"):
        a = m_short["background_share"].sel({"method": method}).values
        b = m_bal["background_share"].sel({"method": method}).values
        paired = compare_paired(a, b, n_boot=500, n_permutations=2000, random_state=0)
        assert paired["difference"] > 0.1 and paired["ci_low"] > 0 and paired["p_value"] < 0.01, (method, paired)
    # and the balanced model's maps point at the object more often
    pg = {k: float(_metrics(*runs[k])["pointing_game"].sel({"method": "gradcam"}).mean()) for k in runs}
    assert pg[0.25] > pg[0.95]


def test_products_are_stored_with_their_conventions(balanced):
    plan, result = balanced
    assert result.stage == "attribution" and not result.skipped and result.cache_key.startswith("attribution-")
    repo = plan.repository
    maps = repo.open(attribution_group(plan.ds_key, "act4", "maps"), result.snapshot)
    assert maps["maps"].dims == ("sample", "method", "y", "x") and maps["maps"].dtype == np.float16
    assert maps["maps"].shape == (ASPEC.max_samples, 7, 64, 64) and list(maps["method"].values) == list(ASPEC.methods)
    assert maps.attrs["normalise"] == "max" and "bilinear" in maps.attrs["upsampling"]
    assert float(abs(maps["maps"]).max()) == 1.0
    curves = repo.open(attribution_group(plan.ds_key, "act4", "curves"), result.snapshot).load()
    assert curves["curves"].dims == ("sample", "order", "kind", "step")
    assert list(curves["order"].values)[-1] == "random"
    # a map that ranks pixels by evidence deletes the class faster than the random order
    auc = curves["auc"].mean("sample")
    assert float(auc.sel(order="gradcam", kind="deletion")) < float(auc.sel(order="random", kind="deletion"))
    rel = repo.open(attribution_group(plan.ds_key, "act4", "reliance/agrees"), result.snapshot).load()
    assert set(rel["group"].values) == {"agrees", "disagrees"} and "p_adjusted" in rel
    assert (rel["ci_low"] <= rel["mean"]).all() and (rel["mean"] <= rel["ci_high"]).all()
    agreement = repo.open(attribution_group(plan.ds_key, "act4", "agreement"), result.snapshot).load()
    np.testing.assert_allclose(np.diag(agreement["cosine"].values), 1.0, atol=1e-6)
    assert "background_share" in result.summary["act4"]
    conf = repo.open(attribution_group(plan.ds_key, "act4", "confidence"), result.snapshot).load()
    assert conf["masked"].dims == ("sample", "method") and conf.sizes["sample"] == ASPEC.max_samples
    np.testing.assert_array_equal(conf["sample"].values, maps["sample"].values)
    full, masked = conf["full"].values[:, None], conf["masked"].values
    np.testing.assert_allclose(conf["average_drop"].values, 100 * (np.maximum(0, full - masked) / full).mean(0),
                               rtol=1e-5)
    for m in ASPEC.methods:
        assert result.summary["act4"]["average_drop"][m] == round(float(conf["average_drop"].sel({"method": m})), 4)
        assert 0 <= result.summary["act4"]["increase_in_confidence"][m] <= 100
    sanity = repo.open(attribution_group(plan.ds_key, "act4", "sanity"), result.snapshot).load()
    assert sanity["spearman"].dims == ("step", "method") and "gradcam" not in sanity.attrs["flagged"]
    assert set(result.summary["act4"]["sanity_spearman_all_random"]) == set(ASPEC.methods)
    assert sanity["ssim"].dims == ("step", "method") and sanity.attrs["ssim_window"] == 11
    np.testing.assert_allclose(sanity["ssim"].isel(step=0), 1.0)
    last = sanity.isel(step=-1)
    assert sanity.attrs["flagged"] == [m for m in ASPEC.methods
                                       if last["spearman"].sel({"method": m}) >= ASPEC.sanity_threshold
                                       or last["ssim"].sel({"method": m}) >= ASPEC.sanity_ssim_threshold]
    assert set(result.summary["act4"]["sanity_ssim_all_random"]) == set(ASPEC.methods)
    assert set(result.summary["act4"]["sanity_flagged_by"]) == set(sanity.attrs["flagged"])
    np.testing.assert_allclose(np.diag(agreement["kendall"].values), 1.0)
    assert set(result.summary["act4"]["agreement_kendall"]) == set(ASPEC.methods)
    meta = repo.metadata(result.snapshot)
    assert meta["stage"] == "attribution" and meta["cache_key"] == result.cache_key


def test_rerun_is_a_cache_hit(balanced):
    plan, result = balanced
    again = run_attribution(plan, ASPEC)
    assert again.skipped and again.snapshot == result.snapshot and again.cache_key == result.cache_key


def test_bad_input_commits_nothing(balanced):
    plan, result = balanced
    tip = plan.repository.find(result.cache_key)
    before = [c.id for c in plan.repository.ancestry()]
    with pytest.raises(ZooauditError, match="out of range"):
        run_attribution(plan, ASPEC.model_copy(update={"target": "9"}))
    with pytest.raises(ZooauditError, match="Unknown attribution target 'hexagon'.*circle"):
        run_attribution(plan, ASPEC.model_copy(update={"target": "hexagon"}))
    with pytest.raises(ZooauditError, match="not spatial"):
        run_attribution(plan, ASPEC.model_copy(update={"layers": ["embed"]}))
    assert [c.id for c in plan.repository.ancestry()] == before and tip is not None


def test_not_applicable_without_masks(shared_store):
    digits = DatasetSpec(name="digits")
    plan = plan_extraction(AuditModelSpec(model="builtin:cnn-w8-s0", store=shared_store, datasets=[digits]), digits)
    assert run_attribution(plan, ASPEC) is None
    assert run_attribution(plan, ASPEC.model_copy(update={"enabled": False})) is None


def test_spec_refuses_unknown_methods():
    with pytest.raises(ValueError, match="attribution methods"):
        AttributionSpec(methods=["gradcam", "cf-cam"])


def test_report_section_renders_from_committed_results(balanced, tmp_path):
    from PIL import Image

    from zooaudit.report.attribution import attribution_section

    plan, result = balanced
    files: dict[str, bytes] = {}
    html = attribution_section(lambda g: plan.repository.open(g, result.snapshot).load(), plan, result, "m-ds", files)
    text = "".join(html)
    assert "Attribution maps at act4" in text and "random order (control)" in text and "adjusted p" in text
    assert "average drop %" in text and "Kendall" in text
    assert {n for n in files} >= {"m-ds-attribution-act4-gallery.png", "m-ds-attribution-act4-reliance-agrees.png",
                                  "m-ds-attribution-act4-deletion.png", "m-ds-attribution-act4-agreement.png",
                                  "m-ds-attribution-act4-sanity.png"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert Image.open(tmp_path / name).size[0] > 100, name
        assert name in text


def test_road_curves_are_committed_behind_their_switch(balanced):
    """ROAD (road_samples > 0): its own product beside the deletion curves; off by default, so the
    default spec's cache key is the one it had before ROAD existed."""
    from zooaudit.stages.attribution import attribution_key

    plan, _ = balanced
    road_spec = SHORTCUT_ASPEC.model_copy(update={"methods": ["gradcam", "grad_x_input"], "road_samples": 6,
                                                  "curve_steps": 4})
    assert attribution_key(plan, SHORTCUT_ASPEC) != attribution_key(plan, road_spec)
    assert attribution_key(plan, road_spec) != attribution_key(plan, road_spec.model_copy(update={"road_sigma": 0.02}))
    result = run_attribution(plan, road_spec)
    road = plan.repository.open(attribution_group(plan.ds_key, "act4", "road"), result.snapshot).load()
    assert road["curves"].dims == ("sample", "order", "kind", "step") and road["curves"].shape == (6, 3, 2, 5)
    assert list(road["order"].values) == ["gradcam", "grad_x_input", "random"]
    assert list(road["kind"].values) == ["morf", "lerf"]
    np.testing.assert_allclose(road["fraction"].values, [0, 0.25, 0.5, 0.75, 1])
    curves = road["curves"].values
    # nothing removed at step 0: every order and kind scores the untouched image alike
    np.testing.assert_allclose(curves[..., 0], curves[:, :1, :1, 0].repeat(3, 1).repeat(2, 2), rtol=1e-5)
    # every pixel removed at the last step: morf and lerf remove the same set (noise aside)
    np.testing.assert_allclose(curves[:, :, 0, -1], curves[:, :, 1, -1], atol=0.05)
    assert ((curves >= 0) & (curves <= 1)).all()
    # auc by the trapezoid rule over the fractions
    np.testing.assert_allclose(road["auc"].values, np.trapezoid(curves, road["fraction"].values, axis=-1), rtol=1e-5)
    auc = road["auc"].mean("sample")
    summary = result.summary["act4"]
    assert set(summary["road_auc"]) == {"morf", "lerf"}
    assert summary["road_auc"]["morf"]["gradcam"] == pytest.approx(float(auc.sel(kind="morf", order="gradcam")),
                                                                   abs=1e-4)
    # the report shows the ROAD table and both curves from these committed results
    from zooaudit.report.attribution import attribution_section

    files: dict[str, bytes] = {}
    text = "".join(attribution_section(lambda g: plan.repository.open(g, result.snapshot).load(), plan, result,
                                       "m-ds", files))
    assert "ROAD MoRF AUC" in text and "ROAD (Rong et al. 2022)" in text
    assert {"m-ds-attribution-act4-road-morf.png", "m-ds-attribution-act4-road-lerf.png"} <= set(files)


def test_smooth_gradcampp_is_opt_in_and_reaches_every_product(balanced):
    """Smooth Grad-CAM++ is not a default method and its fields leave the default key as it was
    (the key below was computed on main before the method existed); asked for, it goes through
    the maps, agreement, confidence, curves and sanity check like any other method."""
    from zooaudit.keys import cache_key
    from zooaudit.stages.attribution import attribution_key, key_params

    default = AttributionSpec()
    assert "smoothgradcam++" not in default.methods and not {"smooth_samples", "smooth_sigma"} & set(
        key_params(default))
    assert cache_key("attribution", model="m", dataset="d", resolved_layers=["act4"],
                     **key_params(default)) == "attribution-1836ea9c8ea1fd3ff3e7ae5d"
    plan, _ = balanced
    spec = AttributionSpec(methods=["gradcam++", "smoothgradcam++"], layers=["act3"], max_samples=8, curve_samples=4,
                           curve_steps=3, sanity_samples=2, smooth_samples=2, n_boot=20, n_permutations=20,
                           batch_size=64)
    assert attribution_key(plan, spec) != attribution_key(plan, spec.model_copy(update={"smooth_sigma": 0.3}))
    assert attribution_key(plan, spec) != attribution_key(plan, spec.model_copy(update={"smooth_samples": 3}))
    result = run_attribution(plan, spec)
    load = lambda part: plan.repository.open(attribution_group(plan.ds_key, "act3", part), result.snapshot).load()
    maps = load("maps")
    assert list(maps["method"].values) == spec.methods and maps.attrs["smooth_samples"] == 2
    assert maps.attrs["smooth_sigma"] == 0.15
    assert not np.allclose(maps["maps"].sel({"method": "smoothgradcam++"}), maps["maps"].sel({"method": "gradcam++"}))
    assert list(load("agreement")["method"].values) == spec.methods
    assert list(load("curves")["order"].values) == [*spec.methods, "random"]
    assert list(load("sanity")["method"].values) == spec.methods
    summary = result.summary["act3"]
    assert set(summary["average_drop"]) == set(summary["sanity_spearman_all_random"]) == set(spec.methods)


def test_cfcam_is_opt_in_and_reaches_every_product(balanced, tmp_path):
    """CF-CAM is not a default method (the default key above is unchanged by it); asked for, it goes
    through the maps, agreement, curves, sanity check and the report like any other CAM."""
    from zooaudit.report.attribution import attribution_section

    assert "cfcam" not in AttributionSpec().methods
    plan, _ = balanced
    spec = AttributionSpec(methods=["gradcam", "cfcam"], layers=["act3"], max_samples=8, curve_samples=4,
                           curve_steps=3, sanity_samples=2, n_boot=20, n_permutations=20, batch_size=64)
    result = run_attribution(plan, spec)
    load = lambda part: plan.repository.open(attribution_group(plan.ds_key, "act3", part), result.snapshot).load()
    maps = load("maps")
    assert list(maps["method"].values) == spec.methods
    cf = maps["maps"].sel({"method": "cfcam"}).values.astype(np.float64)
    assert np.isfinite(cf).all() and cf.max() > 0 and not np.allclose(cf, maps["maps"].sel({"method": "gradcam"}))
    assert list(load("agreement")["method"].values) == spec.methods
    assert list(load("curves")["order"].values) == [*spec.methods, "random"]
    assert list(load("sanity")["method"].values) == spec.methods
    assert set(result.summary["act3"]["average_drop"]) == set(spec.methods)
    text = "".join(attribution_section(lambda g: plan.repository.open(g, result.snapshot).load(), plan, result,
                                       "m-ds", {}))
    assert "cfcam" in text
