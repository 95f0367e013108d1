"""The statistics stage on planted activations written to a real store: every committed figure
equals a NumPy computation of its definition on the same arrays (planted dead units, a planted
massive activation, neural collapse with the model's predictions, per-group figures); a rerun
is a cache hit; NaN activations and too few samples fail with nothing committed; an unlabelled
dataset skips neural collapse with the reason recorded."""

import dataclasses

import numpy as np
import pytest
import xarray as xr

from zooaudit import layout
from zooaudit.data import load_dataset
from zooaudit.errors import ZooauditError
from zooaudit.specs import DatasetSpec, RunOptions, StatisticsSpec
from zooaudit.stages import ActivationsRef, run_statistics
from zooaudit.stages.registry import array_stage
from zooaudit.stages.statistics import nc_layer_names
from zooaudit.store import Store, commit_metadata

N, P = 120, 10


def commit_acts(store_url, layers: dict, key: str, dataset="colored-digits", n=N, logits=None, labels=None,
                chunk=32, version=""):
    spec = DatasetSpec(name=dataset, max_samples=n)
    data = load_dataset(spec)
    if labels is not None:
        data = dataclasses.replace(data, labels=labels)
    store = Store.open(store_url)
    shapes = {name: a.shape[1:] for name, a in layers.items()}
    n_out = None if logits is None else logits.shape[1]

    def write(session):
        layout.create_activation_arrays(session.store, data, data.key, shapes, n_out, chunk)
        for s in range(0, n, chunk):
            layout.write_shard(session.store, data.key, s, {k: v[s:s + chunk] for k, v in layers.items()},
                               None if logits is None else logits[s:s + chunk])

    acts_key = f"acts-{key}{version}"
    snap = store.model_repository(f"test-{key}").commit(write, message="activations",
                                                        metadata=commit_metadata("activations", acts_key, {}))
    ref = ActivationsRef(store=store.url, model_uri=f"test:{key}", model_key=f"test-{key}", model_hash="0",
                         dataset=spec, ds_key=data.key, ds_hash=data.content_hash, snapshot=snap,
                         cache_key=acts_key, layers=list(layers), shapes=shapes, pooling="mean", n_samples=n,
                         n_outputs=n_out, has_groups=bool(data.groups))
    return ref, data


def planted(data, seed=0):
    rng = np.random.default_rng(seed)
    y = data.labels
    centres = rng.normal(size=(2, P)) * 2
    embed = np.maximum(centres[y] + rng.normal(size=(len(y), P)) + 0.5, 0).astype(np.float32)
    embed[:, [1, 4]] = 0.0                       # dead units
    embed[33, 6] = 4000.0                        # a massive activation
    logits = (embed @ rng.normal(size=(P, 2))).astype(np.float32)
    return {"act1": rng.normal(size=(len(y), 6)).astype(np.float32), "embed": embed, "head": logits}, logits


def opened(ref, result, part):
    return ref.repository.open(layout.statistics_group(ref.ds_key, part), result.snapshot).load()


def n_commits(ref):
    return len(list(ref.repository.ancestry()))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    url = "file://" + str(tmp_path_factory.mktemp("stats") / "store")
    data = load_dataset(DatasetSpec(name="colored-digits", max_samples=N))
    layers, logits = planted(data)
    ref, data = commit_acts(url, layers, "planted", logits=logits)
    return ref, data, layers, logits, run_statistics(ref, StatisticsSpec(top_k=4))


def test_summary_equals_numpy_definitions(run):
    ref, data, layers, _, result = run
    s = opened(ref, result, "summary")
    assert list(s["layer"].values) == ["act1", "embed", "head"]
    for name, X in layers.items():
        active = np.abs(X.astype(np.float64)) > 0
        row = s.sel(layer=name)
        assert float(row["activation_ratio"]) == pytest.approx(active.mean(), abs=1e-12)
        assert float(row["dead_fraction"]) == (~active.any(axis=0)).mean()
        assert float(row["sample_fraction_median"]) == pytest.approx(np.median(active.mean(axis=1)))
        assert float(row["median_abs_lo"]) <= np.median(np.abs(X)) <= float(row["median_abs_hi"])
        Xc = X.astype(np.float64) - X.astype(np.float64).mean(axis=0)
        sigma = np.linalg.svd(Xc, compute_uv=False)
        lam = sigma ** 2
        lam[lam < len(lam) * np.finfo(float).eps * lam.max()] = 0
        q = np.sqrt(lam) / np.sqrt(lam).sum()
        q = q[q > 0]
        assert float(row["effective_rank"]) == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-8)
        assert float(row["stable_rank"]) == pytest.approx(lam.sum() / lam.max(), rel=1e-8)
    assert float(s.sel(layer="embed")["dead_fraction"]) == 2 / P
    assert result.summary["dead_fraction"]["embed"] == 0.2


def test_massive_activation_located(run):
    ref, data, _, _, result = run
    emb = opened(ref, result, "layers/embed")
    assert (int(emb["top_sample"][0]), int(emb["top_unit"][0]), float(emb["top_value"][0])) == \
        (int(data.sample_ids[33]), 6, 4000.0)
    assert bool(emb["top_massive"][0]) and not emb["top_massive"][1:].any()
    # the spike reaches the logits too (head = embed @ W), so only act1 is free of it
    assert result.summary["n_massive_units"]["act1"] == 0 and result.summary["n_massive_units"]["embed"] == 1
    assert set(np.flatnonzero(emb["unit_active_fraction"].values == 0)) == {1, 4}


def test_collapse_equals_numpy_and_nc4_uses_predictions(run):
    ref, data, layers, logits, result = run
    assert nc_layer_names(ref, StatisticsSpec()) == ["embed"]
    c = opened(ref, result, "collapse")
    X, y = layers["embed"].astype(np.float64), data.labels
    means = np.stack([X[y == k].mean(axis=0) for k in (0, 1)])
    M = means - X.mean(axis=0)
    Sw = sum((X[y == k] - means[k]).T @ (X[y == k] - means[k]) for k in (0, 1)) / len(X)
    nc1 = np.trace(Sw @ np.linalg.pinv(M.T @ M / 2, rcond=1e-10, hermitian=True)) / 2
    assert float(c["nc1"].sel(nc_layer="embed")) == pytest.approx(nc1, rel=1e-7)
    ncc = ((X[:, None] - means[None]) ** 2).sum(axis=2).argmin(axis=1)
    assert float(c["nc4"].sel(nc_layer="embed")) == pytest.approx((ncc == logits.argmax(axis=1)).mean())
    assert np.isnan(float(c["nc3"].sel(nc_layer="embed")))          # no classifier weights stored
    assert "nc3" in result.summary["notes"]


def test_per_group_sparsity_and_nc1(run):
    ref, data, layers, _, result = run
    g = opened(ref, result, "groups/colour")
    assert list(g["group"].values) == ["red", "green"]
    X, y, colour = layers["embed"].astype(np.float64), data.labels, data.groups["colour"]
    for code, name in enumerate(["red", "green"]):
        rows = colour == code
        assert float(g["activation_ratio"].sel(layer="embed", group=name)) == \
            pytest.approx((X[rows] > 0).mean(axis=1).mean())
        Xg, yg = X[rows], y[rows]
        means = np.stack([Xg[yg == k].mean(axis=0) for k in (0, 1)])
        M = means - Xg.mean(axis=0)
        Sw = sum((Xg[yg == k] - means[k]).T @ (Xg[yg == k] - means[k]) for k in (0, 1)) / len(Xg)
        ref_nc1 = np.trace(Sw @ np.linalg.pinv(M.T @ M / 2, rcond=1e-10, hermitian=True)) / 2
        assert float(g["nc1"].sel(nc_layer="embed", group=name)) == pytest.approx(ref_nc1, rel=1e-7)


def test_rerun_is_a_cache_hit(run):
    ref, *_, result = run
    before = n_commits(ref)
    again = array_stage("statistics").run(ref, StatisticsSpec(top_k=4))
    assert again.skipped and again.snapshot == result.snapshot and n_commits(ref) == before
    assert array_stage("statistics").key(ref, StatisticsSpec(enabled=False)) is None
    assert RunOptions().statistics == StatisticsSpec()


def test_nan_activations_fail_and_commit_nothing(tmp_path):
    data = load_dataset(DatasetSpec(name="colored-digits", max_samples=N))
    layers, logits = planted(data)
    layers["embed"][70, 2] = np.nan
    ref, _ = commit_acts("file://" + str(tmp_path / "s"), layers, "nan", logits=logits)
    before = n_commits(ref)
    with pytest.raises(ZooauditError, match="'embed' contains NaN or Inf"):
        run_statistics(ref, StatisticsSpec())
    assert n_commits(ref) == before


def test_fewer_samples_than_classes_fails(tmp_path):
    rng = np.random.default_rng(0)
    n = 6
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    ref, _ = commit_acts("file://" + str(tmp_path / "s"), {"embed": rng.random((n, 4)).astype(np.float32),
                                                           "head": logits}, "few", dataset="digits", n=n,
                         logits=logits, chunk=4)
    before = n_commits(ref)
    with pytest.raises(ZooauditError, match="at least as many samples as classes; got 6 samples for 10 classes"):
        run_statistics(ref, StatisticsSpec())
    assert n_commits(ref) == before


def test_unlabelled_dataset_skips_collapse(tmp_path):
    rng = np.random.default_rng(1)
    ref, _ = commit_acts("file://" + str(tmp_path / "s"), {"pooled": rng.random((40, 5)).astype(np.float32)},
                         "unlabelled", dataset="digits", n=40, labels=np.zeros(40, np.int64))
    result = run_statistics(ref, StatisticsSpec(nc_layers=["*"]))
    assert "unlabelled" in result.summary["notes"]["collapse"] and "collapse" not in result.summary
    from zarr.errors import GroupNotFoundError

    with pytest.raises(GroupNotFoundError):
        opened(ref, result, "collapse")
    with pytest.raises(ZooauditError, match="not a per-sample layer"):
        nc_layer_names(ref, StatisticsSpec(nc_layers=["nope"]))


def test_report_section_renders_from_committed_results(run):
    from zooaudit.report.statistics import statistics_section

    ref, _, _, _, result = run
    files: dict = {}
    html = "".join(statistics_section(lambda g: ref.repository.open(g, result.snapshot).load(), ref, result, "b",
                                      files))
    assert "b-statistics-spectrum.png" in files and files["b-statistics-spectrum.png"][:4] == b"\x89PNG"
    for text in ("dead units", "Massive activations", "effective rank", "NC1", "By colour", "NC1 within red"):
        assert text in html, text
    assert "4000" in html   # the planted massive activation is in the table
    from zooaudit.report.statistics import statistics_table

    rows = {r["layer"]: r for r in statistics_table([result])}
    assert rows["embed"]["dead_fraction"] == 0.2 and rows["embed"]["n_massive_units"] == 1
    assert rows["embed"]["nc1"] == result.summary["collapse"]["nc1"]["embed"] and rows["act1"]["nc1"] is None
    every = run_statistics(ref, StatisticsSpec(top_k=4, nc_layers=["*"]))
    files = {}
    statistics_section(lambda g: ref.repository.open(g, every.snapshot).load(), ref, every, "c", files)
    assert files["c-statistics-collapse.png"][:4] == b"\x89PNG"   # NC by layer, three layers


def test_regression_when_dead_units_rise(tmp_path):
    from zooaudit_flows.audit_model import ModelAudit
    from zooaudit_flows.events import find_regressions

    url = "file://" + str(tmp_path / "s")
    data = load_dataset(DatasetSpec(name="colored-digits", max_samples=N))
    layers, logits = planted(data)
    ref1, _ = commit_acts(url, layers, "reg", logits=logits, version="1")
    first = run_statistics(ref1, StatisticsSpec())
    assert first.summary["regressions"] == [] and first.summary["previous_snapshot"] is None
    layers["embed"][:, [0, 2, 3]] = 0.0                        # 2 → 5 dead units of 10
    ref2, _ = commit_acts(url, layers, "reg", logits=logits, version="2")
    second = run_statistics(ref2, StatisticsSpec())
    assert second.summary["previous_snapshot"] == first.snapshot
    dead = [r for r in second.summary["regressions"] if r["metric"] == "dead_fraction"]
    assert dead == [{"metric": "dead_fraction", "layer": "embed", "previous": 0.2, "current": 0.5}]
    assert not [r for r in second.summary["regressions"] if r["layer"] == "act1"]   # act1 unchanged
    events = find_regressions.fn([ModelAudit("test:reg", [ref2], [second])], 0.1)
    assert {"model": "test:reg", "dataset": ref2.ds_key, "metric": "statistics:dead_fraction:embed"} == \
        {k: events[0][k] for k in ("model", "dataset", "metric")}
    assert events[0]["payload"]["previous_snapshot"] == first.snapshot
    # a looser threshold: no dead-unit alert
    from zooaudit.stages.statistics import regressions

    looser = regressions(second.summary, first.summary, StatisticsSpec(regression_dead_increase=0.5))
    assert not [r for r in looser if r["metric"] == "dead_fraction"]


def test_empty_classifier_product_skips_nc3(run):
    from zooaudit.stages.refs import ControlRef

    ref, *_ = run
    # what the model stage hands on for a model without a linear head (e.g. an exported program):
    # an empty product, never opened
    empty = ControlRef("classifier", layout.controls_root(ref.ds_key, "classifier"), "controls-classifier-x",
                       ref.snapshot, (), {"module": "", "input_layer": ""})
    res = run_statistics(dataclasses.replace(ref, controls={"classifier": empty}), StatisticsSpec(top_k=4))
    assert "no classifier weights" in res.summary["notes"]["nc3"] and res.summary["collapse"]["nc3"]["embed"] is None


def test_section_registered_on_the_model_pages(run):
    import zooaudit.report  # noqa: F401 — registers the stage sections
    from zooaudit.report.sections import MODEL_SECTIONS, ModelContext

    ref, _, _, _, result = run
    (section,) = [s for s in MODEL_SECTIONS if s.stage == "statistics"]
    files: dict = {}
    ctx = ModelContext(store_url=ref.store, model=ref.model_uri, ref=ref, results={"statistics": result}, files=files)
    html = "".join(section.render(ctx))
    assert "Massive activations" in html and f"{ctx.base}-statistics-spectrum.png" in files
    assert section.render(ModelContext(ref.store, ref.model_uri, ref, {}, {})) == []


def test_wide_layer_spectrum_from_the_gram(tmp_path):
    # 64 units > max_spectrum_width 16 with 40 samples: the spectrum comes from the 40×40 Gram
    rng = np.random.default_rng(2)
    wide = (rng.normal(size=(40, 5)) @ rng.normal(size=(5, 64)) + 3.0).astype(np.float32)
    ref, _ = commit_acts("file://" + str(tmp_path / "s"), {"wide": wide, "tall": rng.random((40, 20)).astype(np.float32)},
                         "wide", dataset="digits", n=40, labels=np.zeros(40, np.int64), chunk=16)
    result = run_statistics(ref, StatisticsSpec(max_spectrum_width=16))
    notes = result.summary["notes"]
    assert "40×40 Gram" in notes["wide/spectrum"] and "no smaller Gram" in notes["tall/spectrum"]
    eig = opened(ref, result, "layers/wide")["eigenvalues"].values
    Xc = wide.astype(np.float64) - wide.astype(np.float64).mean(axis=0)
    lam = np.linalg.svd(Xc, compute_uv=False) ** 2 / 40
    assert eig.shape == (64,)
    np.testing.assert_allclose(eig[:40], lam, rtol=1e-6, atol=1e-9 * lam[0])
    assert np.all(eig[5:] <= 1e-9 * lam[0])                                     # rank 5
    assert "eigenvalues" not in opened(ref, result, "layers/tall")
    assert result.summary["effective_rank"]["tall"] is None and result.summary["effective_rank"]["wide"] > 1


def test_another_spectrum_rule_is_not_a_cache_hit(tmp_path, monkeypatch):
    """The same activations and spec under another routing rule (here: the Gram route's row cap
    below the layer's 40 rows, as a zooaudit before or after that cap would route it) must not be
    served the other rule's committed result: the key differs, the stage recomputes, and the
    spectrum follows the rule in force."""
    import zooaudit.analysis.act_stats as act_stats
    from zooaudit.stages.statistics import statistics_key

    rng = np.random.default_rng(3)
    wide = (rng.normal(size=(40, 5)) @ rng.normal(size=(5, 64))).astype(np.float32)
    ref, _ = commit_acts("file://" + str(tmp_path / "s"), {"wide": wide}, "rule", dataset="digits", n=40,
                         labels=np.zeros(40, np.int64), chunk=16)
    spec = StatisticsSpec(max_spectrum_width=16)
    gram = run_statistics(ref, spec)
    assert "40×40 Gram" in gram.summary["notes"]["wide/spectrum"]
    assert "eigenvalues" in opened(ref, gram, "layers/wide")
    key_gram = statistics_key(ref, spec)

    monkeypatch.setattr(act_stats, "GRAM_MAX_ROWS", 32)   # 40 rows: no Gram route under this rule
    assert statistics_key(ref, spec) != key_gram
    capped = run_statistics(ref, spec)
    assert not capped.skipped and capped.snapshot != gram.snapshot
    assert "exceed the 32 of the Gram route" in capped.summary["notes"]["wide/spectrum"]
    assert "eigenvalues" not in opened(ref, capped, "layers/wide")
    assert capped.summary["effective_rank"]["wide"] is None

    monkeypatch.undo()   # back to the rule the first run used: its commit is the cache hit
    again = run_statistics(ref, spec)
    assert again.skipped and again.snapshot == gram.snapshot


def test_gram_rows_held_at_once_stay_within_the_budget(tmp_path, monkeypatch):
    """A per-sample layer and an all-tokens layer, both on the Gram route (wider than
    max_spectrum_width, fewer rows than units), each within the budget alone but not together:
    the rows held at any moment of the stage never exceed ``MAX_REDUCE_BYTES`` (the token pass
    used to run with the per-sample layers' rows still held), and both still get their spectrum."""
    import weakref

    import zooaudit.analysis.act_stats as act_stats
    import zooaudit.stages.statistics as stats_stage
    from zooaudit.stages.statistics import statistics
    from zooaudit.tokens import TokenRows

    n, p, chunk = 24, 4096, 8
    rng = np.random.default_rng(5)
    data = load_dataset(DatasetSpec(name="digits", max_samples=n))
    counts = rng.integers(2, 5, size=n)
    sample = rng.normal(size=(n, p)).astype(np.float32)
    tokens = rng.normal(size=(int(counts.sum()), p)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    store = Store.open("file://" + str(tmp_path / "s"))
    shapes = {"pooled": (p,), "tok": (-1, p)}
    per_shard = max(int(counts[s:s + chunk].sum()) for s in range(0, n, chunk))

    def write(session):
        layout.create_activation_arrays(session.store, data, data.key, shapes, None, chunk, token_rows=per_shard)
        for s in range(0, n, chunk):
            rows = TokenRows(tokens[starts[s]:starts[s + chunk]], counts[s:s + chunk])
            layout.write_shard(session.store, data.key, s, {"pooled": sample[s:s + chunk], "tok": rows}, None)

    snap = store.model_repository("test-budget").commit(write, message="activations",
                                                        metadata=commit_metadata("activations", "acts-budget", {}))
    ref = ActivationsRef(store=store.url, model_uri="test:budget", model_key="test-budget", model_hash="0",
                         dataset=DatasetSpec(name="digits", max_samples=n), ds_key=data.key,
                         ds_hash=data.content_hash, snapshot=snap, cache_key="acts-budget", layers=list(shapes),
                         shapes=shapes, pooling="tokens", n_samples=n, n_outputs=None, has_groups=False)
    sample_bytes, token_bytes = n * p * 8, len(tokens) * p * 8
    budget = max(sample_bytes, token_bytes) + 1024          # each alone fits; both together do not
    assert sample_bytes + token_bytes > budget
    monkeypatch.setattr(stats_stage, "MAX_REDUCE_BYTES", budget)

    live: list[weakref.ref] = []
    peak = [0]
    real_init, real_update = act_stats.ActivationStats.__init__, act_stats.ActivationStats.update

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        live.append(weakref.ref(self))

    def update(self, *args, **kwargs):
        held = sum(a.rows.nbytes for r in live if (a := r()) is not None and a.rows is not None)
        peak[0] = max(peak[0], held)
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(act_stats.ActivationStats, "__init__", init)
    monkeypatch.setattr(act_stats.ActivationStats, "update", update)
    out, summary = statistics(ref, StatisticsSpec(max_spectrum_width=16, nc_layers=[]))
    assert all("Gram" in summary["notes"][f"{name}/spectrum"] for name in ("pooled", "tok"))
    assert peak[0] <= budget, f"{peak[0]} bytes of Gram rows held at once, budget {budget}"
    for name, X in (("pooled", sample), ("tok", tokens)):
        eig = out[layout.statistics_group(ref.ds_key, f"layers/{name}")]["eigenvalues"].values
        Xc = X.astype(np.float64) - X.astype(np.float64).mean(axis=0)
        lam = np.linalg.svd(Xc, compute_uv=False) ** 2 / len(X)
        np.testing.assert_allclose(eig[:len(lam)], lam, rtol=1e-6, atol=1e-9 * lam[0])
