"""Regression alerts of the nightly audit as Prefect events.

Event ``zooaudit.audit.regression``, one per (model, metric), emitted by ``audit_zoo`` when

- the bias stage flags a disparity significantly worse than the previous audit of the model
  (``zooaudit.stages.bias.regressions``), metric ``bias:<attribute>:<disparity>``; or
- a layer's linear CKA between the model's new activations and the ones committed before
  them (the previous night's) falls below ``1 − spec.cka_drop_threshold``, metric
  ``cka_to_previous:<layer>``.
- the statistics stage finds a layer's dead-unit fraction up, or its effective rank or NC1
  moved, beyond ``StatisticsSpec``'s thresholds since the previous audit
  (``zooaudit.stages.statistics.regressions``), metric ``statistics:<statistic>:<layer>``.
- the attribution stage finds a method's mean background share at a layer up by more than
  ``AttributionSpec.regression_background_increase`` since the previous audit, with the bootstrap CI
  of the rise above 0 ("the model began looking at the background";
  ``zooaudit.stages.attribution_regression``), metric ``attribution:background_share:<layer>:<method>``.

Resource: ``zooaudit.model.<model key>`` with labels ``zooaudit.model`` (the URI),
``zooaudit.metric``, ``zooaudit.dataset`` and ``zooaudit.store``; the payload holds the numbers. Stages that
were skipped (cache hits) raise nothing: their regressions were reported when committed.
Automations react to the event (``deployments/automations.py``).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from zooaudit.stages import drift_to_previous

EVENT = "zooaudit.audit.regression"


@task(name="activation-drift", cache_policy=NO_CACHE)
def activation_drift(audits) -> dict:
    """Linear CKA of the activations committed tonight to the model's previous ones, per layer, beside
    its shuffled-sample control: ``{model: {dataset key: {"previous", "cka", "control"}}}`` (models and
    datasets whose activations were a cache hit, or audited for the first time, are left out)."""
    out: dict = {}
    for audit in audits:
        refs = {p.ds_key: p for p in audit.refs}
        for r in audit.results:
            if r.skipped or r.stage != "activations" or r.dataset not in refs:
                continue
            controls: dict = {}
            drift = drift_to_previous(refs[r.dataset], r.snapshot, controls=controls)
            if drift is not None:
                out.setdefault(audit.model, {})[r.dataset] = {"previous": drift[0], "cka": drift[1],
                                                              "control": controls}
    return out


@task(name="regression-check", cache_policy=NO_CACHE)
def find_regressions(audits, cka_drop_threshold: float, drift: dict | None = None) -> list[dict]:
    """Regressions of this run's newly committed results (plain dicts: model, metric, dataset, payload).
    ``drift``: the output of :func:`activation_drift` for these audits (computed here when None)."""
    found = []
    for audit in audits:
        refs = {p.ds_key: p for p in audit.refs}
        for r in audit.results:
            if r.skipped:
                continue
            if r.stage == "bias":
                for attr, info in (r.summary or {}).items():
                    if not isinstance(info, dict):  # e.g. "weat": the WEAT/SEAT rows of a text encoder
                        continue
                    for metric in info.get("regressions") or []:
                        found.append({"model": audit.model, "dataset": r.dataset, "metric": f"bias:{attr}:{metric}",
                                      "payload": {"kind": "bias", "attribute": attr, "disparity": metric,
                                                  "difference": info["disparities"][metric]["difference"],
                                                  "p_adjusted": info["disparities"][metric]["p_adjusted"],
                                                  "previous_snapshot": info.get("previous_snapshot"),
                                                  "snapshot": r.snapshot}})
                    for metric in info.get("measure_regressions") or []:   # amplification:<measure>
                        kind, measure = metric.split(":", 1)
                        found.append({"model": audit.model, "dataset": r.dataset, "metric": f"bias:{attr}:{metric}",
                                      "payload": {"kind": f"bias-{kind}", "attribute": attr, "measure": measure,
                                                  **(info.get(kind) or {}).get(measure, {}), "snapshot": r.snapshot}})
            elif r.stage == "statistics":
                for reg in (r.summary or {}).get("regressions") or []:
                    found.append({"model": audit.model, "dataset": r.dataset,
                                  "metric": f"statistics:{reg['metric']}:{reg['layer']}",
                                  "payload": {"kind": "statistics", **reg,
                                              "previous_snapshot": r.summary.get("previous_snapshot"),
                                              "snapshot": r.snapshot}})
            elif r.stage == "attribution":
                for layer, info in (r.summary or {}).items():
                    for reg in (info or {}).get("background_regressions") or []:
                        found.append({"model": audit.model, "dataset": r.dataset,
                                      "metric": f"attribution:background_share:{layer}:{reg['method']}",
                                      "payload": {"kind": "attribution", "layer": layer, **reg,
                                                  "previous_snapshot": info.get("previous_snapshot"),
                                                  "snapshot": r.snapshot}})
            elif r.stage == "activations" and r.dataset in refs:
                if drift is not None:
                    d = (drift.get(audit.model) or {}).get(r.dataset)
                    if d is None:
                        continue
                    previous, per_layer = d["previous"], d["cka"]
                else:
                    got = drift_to_previous(refs[r.dataset], r.snapshot)
                    if got is None:
                        continue
                    previous, per_layer = got
                for layer, cka in per_layer.items():
                    if cka < 1.0 - cka_drop_threshold:
                        found.append({"model": audit.model, "dataset": r.dataset, "metric": f"cka_to_previous:{layer}",
                                      "payload": {"kind": "cka_drop", "layer": layer, "cka": round(cka, 6),
                                                  "threshold": cka_drop_threshold, "previous_snapshot": previous,
                                                  "snapshot": r.snapshot}})
    return found


def emit_regressions(regressions: list[dict], model_keys: dict[str, str], store_url: str) -> list:
    """Emit one ``zooaudit.audit.regression`` event per regression; return the events sent.

    ``store_url`` is the store root (no credentials: they never live in the URL)."""
    sent = []
    for reg in regressions:
        key = model_keys.get(reg["model"], reg["model"])
        event = emit_event(
            event=EVENT,
            resource={"prefect.resource.id": f"zooaudit.model.{key}", "prefect.resource.name": reg["model"],
                      "zooaudit.model": reg["model"], "zooaudit.metric": reg["metric"],
                      "zooaudit.dataset": reg["dataset"], "zooaudit.store": store_url},
            payload={"model": reg["model"], "metric": reg["metric"], "dataset": reg["dataset"], **reg["payload"]},
        )
        sent.append(event)
    return sent
