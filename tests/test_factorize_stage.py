"""The factorize stage on planted activations written to a real store: concepts recovered,
heat maps per image, top samples, stability and the k sweep stored; the out-of-core path
agrees with the in-memory one; bad layers fail before anything is committed; the report
shows the galleries and the quality curve."""

from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr

from zooaudit import layout
from zooaudit.analysis import decompose
from zooaudit.analysis import factorize as fact_mod
from zooaudit.analysis.factorize import eigencam, matched_cosine
from zooaudit.data import load_dataset
from zooaudit.errors import ZooauditError
from zooaudit.specs import DatasetSpec, FactorizeSpec
from zooaudit.stages import ActivationsRef, run_factorize
from zooaudit.stages import factorize as stage_mod
from zooaudit.store import Store, commit_metadata

N, C, K = 120, 12, 3


def planted(seed=0):
    """Spatial map ``(N, C, 8, 8)`` = Σ_k mask_k ⊗ concept_k; mask 0 is the digit image itself."""
    rng = np.random.default_rng(seed)
    images = load_dataset(DatasetSpec(name="digits", max_samples=N)).inputs[:, 0]
    concepts = rng.random((K, C)) ** 4
    masks = rng.random((N, K, 8, 8)) * (rng.random((N, K, 8, 8)) < 0.25)
    masks[:, 0] = images
    return np.einsum("nkyx,kc->ncyx", masks, concepts).astype(np.float32), concepts, masks


def make_plan(store_url, layers: dict, key: str, chunk: int = 40):
    """Commit ``layers`` as the activations of a fake model on digits; return its reference."""
    spec = DatasetSpec(name="digits", max_samples=N)
    data = load_dataset(spec)
    store = Store.open(store_url)
    model_key = f"test-{key}"
    shapes = {name: a.shape[1:] for name, a in layers.items()}

    def write(session):
        layout.create_activation_arrays(session.store, data, data.key, shapes, None, chunk)
        layout.write_shard(session.store, data.key, 0, layers, None)

    acts_key = f"acts-{key}"
    snap = store.model_repository(model_key).commit(write, message="activations",
                                                    metadata=commit_metadata("activations", acts_key, {}))
    plan = ActivationsRef(store=store.url, model_uri=f"test:{key}", model_key=model_key, model_hash="0",
                          dataset=spec, ds_key=data.key, ds_hash=data.content_hash, snapshot=snap,
                          cache_key=acts_key, layers=list(layers), shapes=shapes, pooling="none", n_samples=N,
                          n_outputs=None, has_groups=False)
    return plan, snap


def opened(plan, result, layer, method):
    repo = Store(plan.store).model_repo(plan.model_key)
    return xr.open_zarr(repo.readonly_session(snapshot_id=result.snapshot).store,
                        group=layout.factors_group(plan.ds_key, layer, method), consolidated=False).load()


def n_commits(plan):
    return len(list(Store(plan.store).model_repo(plan.model_key).ancestry(branch="main")))


FSPEC = FactorizeSpec(k=K, methods=["pca", "nmf", "semi_nmf", "eigencam"], seeds=[0, 1], k_sweep=[2, 3],
                      top_n=5, max_iter=600, stability_rows=3000)  # conv: 7680 positions → seed refits on 3000


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    url = "file://" + str(tmp_path_factory.mktemp("fstage") / "store")
    acts, concepts, masks = planted()
    signed = np.random.default_rng(1).normal(size=(N, 6)).astype(np.float32)
    layers = {"conv": acts, "pooled": acts.mean(axis=(2, 3)), "signed": signed}
    plan, snap = make_plan(url, layers, "planted")
    return plan, snap, run_factorize(plan, FSPEC), concepts, masks, acts


def test_spatial_layer_recovers_planted_concepts_with_heat_maps_and_top_samples(planted_run):
    plan, _, res, concepts, masks, acts = planted_run
    ds = opened(plan, res, "conv", "nmf")
    assert ds["components"].dims == ("component", "unit") and ds.sizes["unit"] == C
    assert ds["codes"].dims == ("sample", "component") and ds["heatmaps"].dims == ("sample", "component", "y", "x")
    cos, match = matched_cosine(concepts, ds["components"].values)
    assert cos.min() >= 0.99
    np.testing.assert_allclose(ds["codes"].values, ds["heatmaps"].mean(("y", "x")).values, rtol=1e-9)
    for key in ("explained_variance", "reconstruction_mse", "mean_cosine", "l0", "sparsity", "dead_components",
                "stability_mean", "stability_min"):
        assert key in ds.attrs, key
    assert ds.attrs["explained_variance"] > 0.999 and ds.attrs["rows"] == "positions"
    assert ds["stability_per_component"].dims == ("component",) and ds.attrs["stability_min"] > 0.95
    assert ds.attrs["stability_rows"] == 3000 and "of 7680 rows" in ds.attrs["stability_subset"]
    assert list(ds["k_sweep"].values) == [2, 3]
    ev = ds["sweep_explained_variance"].values
    assert ev[0] < ev[1] and "sweep_stability_mean" in ds
    # top samples: best first, ranked by the heat map's spatial maximum, their maps stored
    c0 = int(match[0])  # the stored component matched to the digit concept
    top = ds["top_sample"].values[c0]
    heat = ds["heatmaps"].sel(component=c0)
    score = heat.max(("y", "x"))
    assert np.all(np.diff(ds["top_score"].values[c0]) <= 0)
    np.testing.assert_allclose(ds["top_score"].values[c0], np.sort(score.values)[::-1][:5])
    np.testing.assert_allclose(ds["top_heatmap"].values[c0], heat.sel(sample=top).values)
    # the digit concept's heat map is the digit image (the planted mask)
    pos = {int(s): i for i, s in enumerate(ds["sample"].values)}
    for s in top:
        m = masks[pos[int(s)], 0].ravel()
        h = heat.sel(sample=s).values.ravel()
        assert np.corrcoef(m, h)[0, 1] > 0.99
    # Eigen-CAM maps per image, stored for the spatial layer only
    cam = opened(plan, res, "conv", "eigencam")
    assert cam["heatmap"].dims == ("sample", "y", "x")
    np.testing.assert_allclose(cam["heatmap"].values[7], eigencam(acts[7]), rtol=1e-5, atol=1e-6)
    assert res.summary["explained_variance"]["pooled/eigencam"].startswith("skipped: not a spatial map")


def test_pooled_and_signed_layers(planted_run):
    plan, _, res, *_ = planted_run
    pooled = opened(plan, res, "pooled", "nmf")
    assert "heatmaps" not in pooled and pooled.attrs["rows"] == "samples"
    assert pooled.attrs["stability_rows"] == N and pooled.attrs["stability_subset"] == "all rows"
    assert pooled["codes"].dims == ("sample", "component") and pooled["top_sample"].dims == ("component", "rank")
    ev = res.summary["explained_variance"]
    assert ev["signed/nmf"].startswith("skipped: minimum -") and "semi_nmf" in ev["signed/nmf"]
    semi = opened(plan, res, "signed", "semi_nmf")
    assert (semi["codes"].values >= 0).all() and (semi["components"].values < 0).any()
    pca = opened(plan, res, "signed", "pca")
    assert pca["explained_variance_curve"].dims == ("rank_curve",) and pca.attrs["stability_min"] > 0.999
    assert res.summary["k"] == {"conv": K, "pooled": K, "signed": K}


def test_rerun_is_a_cache_hit(planted_run):
    plan, snap, res, *_ = planted_run
    before = n_commits(plan)
    again = run_factorize(plan, FSPEC)
    assert again.skipped and again.snapshot == res.snapshot and n_commits(plan) == before


def test_out_of_core_path_matches_in_memory(planted_run, monkeypatch):
    """Minibatch NMF over the Zarr chunks, codes and heat maps written lazily chunk by chunk."""
    plan, _, res, concepts, _, acts = planted_run
    store_url = "file://" + plan.store.removeprefix("file://") + "-ooc"
    plan2, snap2 = make_plan(store_url, {"conv": acts}, "ooc", chunk=30)
    monkeypatch.setattr(stage_mod, "CODES_IN_MEMORY", 0)
    monkeypatch.setattr(decompose, "IN_MEMORY_BYTES", 0)  # the fits moved to analysis.decompose
    out = run_factorize(plan2, FSPEC.model_copy(update={"methods": ["nmf"], "seeds": [], "k_sweep": []}))
    ooc = opened(plan2, out, "conv", "nmf")
    mem = opened(plan, res, "conv", "nmf")
    assert ooc.attrs["param_solver"] == "minibatch" and mem.attrs["param_solver"] == "hals"
    assert matched_cosine(concepts, ooc["components"].values)[0].min() >= 0.99
    assert matched_cosine(mem["components"].values, ooc["components"].values)[0].min() >= 0.999
    assert ooc.attrs["explained_variance"] == pytest.approx(mem.attrs["explained_variance"], abs=1e-3)
    np.testing.assert_allclose(ooc["codes"].values, ooc["heatmaps"].mean(("y", "x")).values, rtol=1e-9)


@pytest.mark.parametrize("layer, fspec, match", [
    ("nan", {}, r"Layer 'nan' contains NaN or Inf activations \(1 values\)"),
    ("signed", {"on_negative": "error"}, r"layer 'signed' has minimum -\d.*semi_nmf.*shift"),
    ("narrow", {"k": 3, "k_above_features": "error"}, r"k=3 .*layer 'narrow', which has 2 features"),
])
def test_bad_layers_fail_before_any_commit(tmp_path, layer, fspec, match):
    rng = np.random.default_rng(2)
    good = rng.random((N, 4)).astype(np.float32)
    bad = {"nan": good.copy(), "signed": rng.normal(size=(N, 4)).astype(np.float32),
           "narrow": rng.random((N, 2)).astype(np.float32)}[layer]
    if layer == "nan":
        bad[3, 1] = np.nan
    plan, snap = make_plan("file://" + str(tmp_path / "store"), {"good": good, layer: bad}, "bad")
    before = n_commits(plan)
    with pytest.raises(ZooauditError, match=match):
        run_factorize(plan, FactorizeSpec(**{"k": 2, "methods": ["pca", "nmf"], **fspec}))
    assert n_commits(plan) == before


def test_k_above_features_is_clipped_and_recorded(tmp_path):
    layers = {"narrow": np.random.default_rng(3).random((N, 2)).astype(np.float32)}
    plan, snap = make_plan("file://" + str(tmp_path / "store"), layers, "clip")
    res = run_factorize(plan, FactorizeSpec(k=5, methods=["pca"], seeds=[]))
    ds = opened(plan, res, "narrow", "pca")
    assert ds.attrs["k"] == 2 and ds.attrs["k_requested"] == 5 and ds.sizes["component"] == 2


def test_report_shows_galleries_with_heat_maps_and_the_quality_curve(planted_run):
    from zooaudit.report import build_report

    plan, _, res, *_ = planted_run
    audit = SimpleNamespace(model=plan.model_uri, refs=[plan], results=[res])
    index = build_report(plan.store, {"test": True}, [audit], [], run_id="fstage")
    folder = index.rsplit("/", 1)[0]
    with open(index) as fh:   # the summary links to the model's page, where its figures are
        assert f"href='model-{plan.model_key}.html'" in fh.read()
    with open(f"{folder}/model-{plan.model_key}.html") as fh:
        page = fh.read()
    base = f"{plan.model_key}-{plan.ds_key}"
    for name in (f"{base}-gallery-conv-nmf.png", f"{base}-gallery-pooled-nmf.png", f"{base}-sweep-nmf.png",
                 f"{base}-eigencam-conv.png", f"{base}-pca.png"):
        assert f"src='{name}'" in page
        with open(f"{folder}/{name}", "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # heat maps where positions exist; one note naming the pooled layers, whose galleries show images only
    assert "heat map of the concept overlaid" in page and page.count("Layers stored pooled have no positions") == 1
    note = page.split("Layers stored pooled have no positions", 1)[1].split("</p>", 1)[0]
    assert "pooled" in note.split(":", 1)[1] and "conv" not in note
    assert "seed stability" in page and "skipped: minimum" in page


def test_text_datasets_get_the_top_sentences_instead_of_a_gallery():
    from zooaudit.data.base import AuditDataset
    from zooaudit.report.factorize import _gallery, _Images

    texts = np.array(["the cat sat", "a dog ran", "<b>bold</b> claim", "quiet night"])
    data = AuditDataset("text", {}, texts, np.array([0, 1, 0, 1]), np.array([10, 11, 12, 13]))
    images = _Images({})
    images._data = (data, {10: 0, 11: 1, 12: 2, 13: 3})
    ds = xr.Dataset({"top_sample": (("component", "rank"), np.array([[12, 10], [13, 11]])),
                     "top_score": (("component", "rank"), np.array([[2.0, 1.0], [0.5, -np.inf]]))})
    files = {}
    (cell,) = _gallery(ds, images, "x.png", files, "layer/nmf: concepts")
    assert not files and "&lt;b&gt;bold&lt;/b&gt; claim" in cell and "the cat sat" in cell
    assert cell.index("bold") < cell.index("the cat sat") and "a dog ran" not in cell  # -inf = no sample


def test_eigencam_commits_under_a_distributed_default_scheduler(tmp_path):
    # Regression (issue 18): inside a Dask worker the default scheduler is the distributed
    # client; the lazy Eigen-CAM maps were shipped to it with a local lambda and the writable
    # Icechunk session ("Can't pickle local object", "opt-in to pickle writable sessions").
    distributed = pytest.importorskip("distributed")
    acts = planted()[0]
    plan, _ = make_plan("file://" + str(tmp_path / "store"), {"conv": acts}, "dist")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None):
        res = run_factorize(plan, FactorizeSpec(k=K, methods=["eigencam"], seeds=[0], k_sweep=[], top_n=3))
    cam = opened(plan, res, "conv", "eigencam")
    np.testing.assert_allclose(cam["heatmap"].values[3], eigencam(acts[3]), rtol=1e-5, atol=1e-6)
