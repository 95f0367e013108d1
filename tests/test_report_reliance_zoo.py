"""The zoo page's background-reliance ranking, read from the committed attribution and bias summaries
of the balanced and the shortcut scene model (the report computes nothing)."""

import re
from types import SimpleNamespace

from zooaudit import stages
from zooaudit.report.reliance_zoo import reliance_rows, zoo_reliance_section
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.zoo.builtin import scenes_sweep

SCENES = DatasetSpec(name="scenes", split="test")
ATTR = {"methods": ["gradcam", "layercam"], "max_samples": 64, "curve_samples": 0, "sanity_samples": 0, "n_boot": 200,
        "n_permutations": 50, "batch_size": 64}
BIAS = {"n_boot": 30, "n_permutations": 50, "probes": False, "measures": ["shortcut"]}


def _cells(html_: str, model: str, method: str) -> list[str]:
    part = html_.split(f"<h3>{method}</h3>")[1].split("<h3>")[0]
    row = next(r for r in part.split("<tr>") if model in r)
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def test_ranking_shows_the_committed_shares_cis_and_swap_drop(shared_store):
    sweep = scenes_sweep()
    audits = []
    for a in (0.25, 0.95):      # balanced first: the table ranks by share, not by the order given
        spec = AuditModelSpec(model=sweep[a], store=shared_store, datasets=[SCENES], attribution=ATTR, bias=BIAS)
        ref, model_results = stages.run_model_stages(stages.plan_extraction(spec, SCENES), spec)
        attribution = next(r for r in model_results if r.stage == "attribution")
        bias = stages.run_bias(ref, spec.bias)
        audits.append(SimpleNamespace(model=sweep[a], refs=[ref], results=[attribution, bias]))
    html_ = "".join(zoo_reliance_section(audits))
    ranked = reliance_rows(audits)
    assert set(ranked) == {"gradcam", "layercam"}
    for method in ranked:
        assert [t["model"] for t in ranked[method]] == [sweep[0.95], sweep[0.25]]   # the shortcut model first
        for audit in audits:
            att, bias = audit.results
            s = att.summary["act4"]
            cells = _cells(html_, audit.model, method)
            share, (lo, hi) = s["background_share"][method], s["background_share_ci"][method]
            assert lo <= share <= hi
            assert cells[0] == str(1 + (audit.model == sweep[0.25])) and cells[3] == "act4"
            assert cells[4] == f"{share:.3f} [{lo:.3f}, {hi:.3f}]"
            g = s["background_share_by_group"]["agrees"][method]
            assert f"agrees: {g['difference']:.3f} [{g['difference_ci'][0]:.3f}, {g['difference_ci'][1]:.3f}]" in cells[5]
            sc = bias.summary["background"]["shortcut"]
            assert cells[6].startswith(f"{sc['accuracy'] - sc['cf_accuracy']:.3f} ({sc['accuracy']:.3f} → "
                                       f"{sc['cf_accuracy']:.3f})")
    drops = {a.model: a.results[1].summary["background"]["shortcut"] for a in audits}
    # swapping the background moves the shortcut model's accuracy far more (signed: on this split its
    # accuracy rises on the partners, 0.26 → 0.74 when measured; the balanced model's barely moves)
    assert abs(drops[sweep[0.95]]["accuracy"] - drops[sweep[0.95]]["cf_accuracy"]) > \
        abs(drops[sweep[0.25]]["accuracy"] - drops[sweep[0.25]]["cf_accuracy"]) + 0.2


def test_ranking_from_hand_summaries_without_bias_or_ci():
    att = SimpleNamespace(stage="attribution", dataset="d", summary={
        "L": {"background_share": {"gradcam": 0.2, "eigencam": None}}})
    other = SimpleNamespace(stage="attribution", dataset="d", summary={
        "L": {"background_share": {"gradcam": 0.6}, "background_share_ci": {"gradcam": [0.5, 0.7]}}})
    html_ = "".join(zoo_reliance_section([SimpleNamespace(model="m1", refs=[], results=[att]),
                                          SimpleNamespace(model="m2", refs=[], results=[other])]))
    assert _cells(html_, "m2", "gradcam") == ["1", "m2", "d", "L", "0.600 [0.500, 0.700]", "–", "–"]
    assert _cells(html_, "m1", "gradcam") == ["2", "m1", "d", "L", "0.200 [–, –]", "–", "–"]
    assert "eigencam" not in html_                      # undefined share: no row
    assert zoo_reliance_section([SimpleNamespace(model="m", refs=[], results=[])]) == []
