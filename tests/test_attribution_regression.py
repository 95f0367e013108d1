"""Nightly regression "this model began looking at the background" (zooaudit.stages.attribution_regression):
the balanced and the shortcut scene model's committed attribution results, taken as previous / current,
fire it one way and not the other; an unchanged model audited again does not fire; through the stage
(one ``file:`` model whose weights change between two audits) it reaches the event and the badge."""

import numpy as np
import pytest

from zooaudit.layout import attribution_group
from zooaudit.specs import AttributionSpec, AuditModelSpec, DatasetSpec
from zooaudit.stages.activations import plan_extraction
from zooaudit.stages.attribution import run_attribution
from zooaudit.stages.attribution_regression import background_regressions
from zooaudit.zoo.builtin import scenes_sweep

SCENES = DatasetSpec(name="scenes", split="test")
SPEC = AttributionSpec(methods=["gradcam", "layercam"], max_samples=64, curve_samples=0, sanity_samples=0, n_boot=200,
                       n_permutations=50, batch_size=64)


def _plan(uri, store):
    return plan_extraction(AuditModelSpec(model=uri, store=store, datasets=[SCENES]), SCENES)


def _metrics(plan, result):
    return plan.repository.open(attribution_group(plan.ds_key, "act4", "metrics"), result.snapshot).load()


@pytest.fixture(scope="module")
def pair(shared_store):
    sweep = scenes_sweep()
    out = {}
    for a in (0.25, 0.95):
        plan = _plan(sweep[a], shared_store)
        out[a] = (plan, run_attribution(plan, SPEC))
    return out


def test_rule_fires_when_the_background_share_rises_and_not_the_other_way(pair):
    bal, short = _metrics(*pair[0.25]), _metrics(*pair[0.95])
    fired = background_regressions(short, bal, SPEC)
    assert [r["method"] for r in fired] == ["gradcam", "layercam"]
    for r in fired:      # hand computation on the committed per-sample shares, the same sample ids
        a = short["background_share"].sel({"method": r["method"]}).values
        b = bal["background_share"].sel({"method": r["method"]}).sel(sample=short["sample"].values).values
        ok = np.isfinite(a) & np.isfinite(b)
        assert r["test"] == "paired" and r["n_current"] == ok.sum()
        assert r["difference"] == pytest.approx((a - b)[ok].mean(), abs=1e-6)
        assert r["current"] == pytest.approx(a[ok].mean(), abs=1e-6) and r["previous"] == pytest.approx(b[ok].mean(),
                                                                                                        abs=1e-6)
        assert r["difference"] > SPEC.regression_background_increase and r["ci_low"] > 0 and r["p_value"] < 0.05
    assert background_regressions(bal, short, SPEC) == []        # the balanced model looks less at the background
    assert background_regressions(bal, bal, SPEC) == []          # unchanged: nothing rose
    # a threshold above the rise: nothing fires
    top = max(r["difference"] for r in fired)
    assert background_regressions(short, bal, SPEC.model_copy(update={"regression_background_increase": top})) == []
    # other samples in the previous audit: unpaired, previous / current as two groups
    unpaired = background_regressions(short, bal.isel(sample=slice(0, 40)), SPEC)
    assert [r["test"] for r in unpaired] == ["unpaired", "unpaired"]
    a = short["background_share"].sel({"method": "gradcam"}).values
    b = bal["background_share"].sel({"method": "gradcam"}).values[:40]
    assert unpaired[0]["difference"] == pytest.approx(np.nanmean(a) - np.nanmean(b), abs=1e-6)
    assert unpaired[0]["n_previous"] == np.isfinite(b).sum()


def test_unchanged_model_audited_again_does_not_fire(pair):
    plan, first = pair[0.25]
    again = run_attribution(plan, SPEC.model_copy(update={"n_boot": 201}))   # another key, the same model and samples
    assert not again.skipped and again.summary["act4"]["previous_snapshot"] == first.snapshot
    assert again.summary["act4"]["background_regressions"] == []
    lo, hi = again.summary["act4"]["background_share_ci"]["gradcam"]
    assert lo <= again.summary["act4"]["background_share"]["gradcam"] <= hi


def test_event_and_badge_when_a_model_starts_looking_at_the_background(pair, shared_store, tmp_path):
    """One model URI (a checkpoint file) whose weights change from the balanced to the shortcut model's."""
    from safetensors.torch import save_file

    from zooaudit.report.headline import Night, regressions_column
    from zooaudit.stages import common
    from zooaudit_flows.audit_model import ModelAudit
    from zooaudit_flows.events import find_regressions

    sweep = scenes_sweep()
    path = tmp_path / "scene.safetensors"
    uri = f"file:{path}?arch={sweep[0.25]}"
    results = []
    for a in (0.25, 0.95):
        state = common.load_model(sweep[a], shared_store).module.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        common._cached_model.cache_clear()      # a new night, a new process: the file is read again
        plan = _plan(uri, shared_store)
        results.append((plan, run_attribution(plan, SPEC)))
    (p1, r1), (p2, r2) = results
    assert p1.model_key == p2.model_key and p1.model_hash != p2.model_hash
    assert "background_regressions" not in r1.summary["act4"]                 # first audit: nothing to compare
    assert r2.summary["act4"]["previous_snapshot"] == r1.snapshot
    assert [r["method"] for r in r2.summary["act4"]["background_regressions"]] == ["gradcam", "layercam"]
    audits = [ModelAudit(uri, [], [r1]), ModelAudit(uri, [], [r2])]
    assert find_regressions.fn(audits[:1], 0.1) == []
    events = find_regressions.fn(audits[1:], 0.1)
    assert [e["metric"] for e in events] == ["attribution:background_share:act4:gradcam",
                                             "attribution:background_share:act4:layercam"]
    assert events[0]["payload"]["kind"] == "attribution" and events[0]["payload"]["previous_snapshot"] == r1.snapshot
    assert events[0]["dataset"] == p2.ds_key and events[0]["payload"]["snapshot"] == r2.snapshot
    html, n = regressions_column(audits[1], Night(events))
    assert n == 2 and "background share up: act4 gradcam" in html
