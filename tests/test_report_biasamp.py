"""The zoo page's bias-amplification table and chart: per model, BiasAmp and BiasAmp→ A→T with their
CIs, read from the bias stage's committed summaries (the report computes nothing)."""

import re
from types import SimpleNamespace

from zooaudit import stages
from zooaudit.report.bias_measures import zoo_biasamp_section
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.zoo.catalog import shortcut_sweep

FAST = {"n_boot": 40, "n_permutations": 100, "probes": False, "measures": ["amplification"]}


def _row(table: str, model: str) -> list[str]:
    row = next(r for r in table.split("<tr>") if model in r)
    return re.findall(r"<td>(.*?)</td>", row)


def test_biasamp_section_shows_the_committed_values_and_cis(shared_store):
    sweep = shortcut_sweep()
    flips = [min(sweep), max(sweep)]        # strongest and weakest colour shortcut
    audits, summaries = [], {}
    for flip in reversed(flips):           # given weakest first: the section orders by the training flip
        spec = AuditModelSpec(model=sweep[flip], store=shared_store, shard_size=100,
                              datasets=[DatasetSpec(name="colored-digits", max_samples=300)], bias=FAST)
        ref = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)[0]
        stages.run_bias(ref, spec.bias)
        committed = stages.run_bias(ref, spec.bias)     # a rerun: the summary read back from the store
        assert committed.skipped
        audits.append(SimpleNamespace(model=sweep[flip], refs=[ref], results=[committed]))
        summaries[flip] = committed.summary["colour"]["amplification"]
    files: dict = {}
    (html_,) = zoo_biasamp_section(audits, files)
    assert files["bias-amp-zoo.png"][:8] == b"\x89PNG\r\n\x1a\n" and "bias-amp-zoo.png" in html_
    assert html_.index(sweep[flips[0]]) < html_.index(sweep[flips[1]])      # ordered by the training flip
    for flip in flips:
        cells = _row(html_, sweep[flip])
        assert cells[2] == "colour" and cells[3] == f"{flip:g}"
        for cell, m in zip(cells[4:6], ("mals", "directional_at")):
            s = summaries[flip][m]
            assert s["ci"][0] <= s["value"] <= s["ci"][1]
            assert cell.startswith(f"{s['value']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]")
            assert cell.endswith("⚑") == s["flagged"]
    # the stronger shortcut amplifies more, in the committed values the table shows
    assert summaries[flips[0]]["directional_at"]["value"] > summaries[flips[1]]["directional_at"]["value"]


def test_biasamp_section_hand_summary_and_missing_ci():
    res = SimpleNamespace(stage="bias", dataset="d", summary={
        "colour": {"amplification": {"mals": {"value": 0.25, "ci": [0.2, 0.3], "flagged": True},
                                     "directional_at": {"value": -0.01, "ci": [None, None], "flagged": False}}},
        "shape": {"worst_group_accuracy": 0.5}})      # no amplification: no row
    files: dict = {}
    (html_,) = zoo_biasamp_section([SimpleNamespace(model="m1", refs=[], results=[res])], files)
    assert _row(html_, "m1") == ["m1", "d", "colour", "–", "0.250 [0.200, 0.300] ⚑", "-0.010 [–, –]"]
    assert "shape" not in html_
    assert zoo_biasamp_section([SimpleNamespace(model="m", refs=[], results=[])], {}) == []
