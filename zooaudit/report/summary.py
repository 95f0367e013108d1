"""Markdown summaries of runs (used as Prefect artifacts and in the CLI)."""

from __future__ import annotations

import math


def _status(r) -> str:
    return "cached (skipped)" if r.skipped else "committed"


def _headline(r) -> str:
    s = r.summary or {}
    if r.stage == "factorize":
        ev = s.get("explained_variance", {})
        return ", ".join(f"{k}: {v:.3f}" for k, v in ev.items() if isinstance(v, float))
    if r.stage == "bias":
        parts = [f"{a}: acc {v['overall_accuracy']:.3f}, worst-group {v['worst_group_accuracy']:.3f} "
                 f"({v['worst_group']})" for a, v in s.items() if a != "weat" and "overall_accuracy" in v]
        if s.get("weat"):
            sig = sum(r["significant"] for r in s["weat"])
            parts.append(f"WEAT/SEAT: {sig} of {len(s['weat'])} tests significant (Holm)")
        return "; ".join(parts)
    if r.stage == "similarity":
        parts = []
        for metric, v in s.items():
            if not isinstance(v, dict):
                continue
            off = _mean_offdiag(v["value"])
            ctrl = f" (control {_mean_offdiag(v['control'], diag=True):.3f})" if "control" in v else ""
            dist = " (distance)" if v.get("kind") == "distance" else ""
            parts.append(f"{metric}{dist}: mean between layers {off:.3f}{ctrl}")
        return "; ".join(parts)
    if r.stage == "activations":
        bad = {k: v for k, v in s.get("nonfinite", {}).items() if v}
        warn = f"; **NaN/Inf values: {bad}**" if bad else ""
        return f"{s.get('n_samples', '')} samples, layers {', '.join(s.get('layers', []))}{warn}" if s else ""
    return ""


def _mean_offdiag(m, diag: bool = False) -> float:
    """Mean of the off-diagonal entries (or of all entries for a control matrix)."""
    import numpy as np

    a = np.asarray(m, dtype=float)
    if diag or a.shape[0] < 2:
        return float(np.nanmean(a))
    return float(np.nanmean(a[~np.eye(a.shape[0], dtype=bool)]))


CONTROL_LABELS = {"shuffle": "shuffled samples", "random_init": "random-init copy of the second model"}


def _with_control(v, c) -> str:
    """``value (control)`` for a table cell."""
    text = "–" if v is None or math.isnan(v) else f"{v:.3f}"
    return text if c is None else f"{text} ({'–' if math.isnan(c) else f'{c:.3f}'})"


def _matrix_table(models, mat) -> list[str]:
    short = [m.replace("builtin:", "") for m in models]
    lines = ["| | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
    for name, row in zip(short, mat):
        lines.append(f"| {name} | " + " | ".join("–" if math.isnan(v) else f"{v:.3f}" for v in row) + " |")
    return lines


def bias_table(results) -> list[dict]:
    """Headline bias numbers as table rows (one per dataset × attribute × disparity)."""
    rows = []
    for r in results:
        if r.stage != "bias":
            continue
        for attr, s in (r.summary or {}).items():
            if attr == "weat":  # association tests: see weat_table
                continue
            for metric, d in s.get("disparities", {}).items():
                rows.append({"dataset": r.dataset, "attribute": attr, "overall_accuracy": s["overall_accuracy"],
                             "worst_group_accuracy": s["worst_group_accuracy"], "worst_group": s["worst_group"],
                             "disparity": metric, "difference": d["difference"], "p_adjusted": d["p_adjusted"],
                             "flagged": d["flagged"], "worse_than_previous": metric in s.get("regressions", [])})
    return rows


def weat_table(results) -> list[dict]:
    """WEAT/SEAT rows of text encoders' bias stages (one per dataset × method × layer × test)."""
    return [{"dataset": r.dataset, **row} for r in results if r.stage == "bias"
            for row in (r.summary or {}).get("weat", [])]


def _cell(m, i: int, j: int):
    v = None if m is None else m[i][j]
    return None if v is None or math.isnan(v) else round(float(v), 4)


def similarity_table(results) -> list[dict]:
    """Similarity beside its control as table rows: layer pairs (``similarity``),
    model pairs per compare layer (``zoo-similarity``), consecutive checkpoints per
    layer (``revision-similarity``). ``kind`` says whether larger means more alike."""
    rows = []
    for r in results:
        s = r.summary or {}
        if r.stage == "similarity":
            layers = s.get("layers", [])
            for metric, v in s.items():
                if not isinstance(v, dict) or "value" not in v:
                    continue
                for i, la in enumerate(layers):
                    for j in range(i + 1, len(layers)):
                        rows.append({"stage": r.stage, "dataset": r.dataset, "metric": metric,
                                     "kind": v.get("kind", "similarity"), "a": la, "b": layers[j],
                                     "value": _cell(v["value"], i, j), "control": _cell(v.get("control"), i, j),
                                     "n": v.get("n")})
        elif r.stage == "zoo-similarity":
            models = s.get("models", [])
            for metric in s.get("groups", {}):
                for layer, mat in s.get(metric, {}).items():
                    ctrl = s.get("control", {}).get(metric, {}).get(layer)
                    for i, ma in enumerate(models):
                        for j in range(i + 1, len(models)):
                            if _cell(mat, i, j) is None:
                                continue
                            rows.append({"stage": r.stage, "dataset": r.dataset, "metric": metric, "layer": layer,
                                         "a": ma, "b": models[j], "value": _cell(mat, i, j),
                                         "control": _cell(ctrl, i, j)})
        elif r.stage == "revision-similarity":
            for family, per_metric in s.get("families", {}).items():
                for metric, info in per_metric.items():
                    for i, step in enumerate(info["steps"]):
                        for j, layer in enumerate(info["layers"]):
                            rows.append({"stage": r.stage, "dataset": r.dataset, "metric": metric, "layer": layer,
                                         "a": family, "b": step, "value": _cell(info["value"], i, j),
                                         "control": _cell(info.get("control"), i, j)})
    return rows


def model_markdown(model: str, results) -> str:
    lines = [f"# zooaudit: `{model}`", "", "| stage | dataset | status | snapshot | headline |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.stage} | {r.dataset} | {_status(r)} | `{(r.snapshot or '')[:12]}` | {_headline(r)} |")
    return "\n".join(lines)


def zoo_markdown(audits, zoo_results, report: str) -> str:
    lines = ["# zooaudit: zoo audit", "", f"Report: [{report}]({report})", "",
             "| model | stages committed | stages skipped | worst-group accuracy |", "|---|---|---|---|"]
    for a in audits:
        done = sum(not r.skipped for r in a.results)
        skip = sum(r.skipped for r in a.results)
        wga = [v["worst_group_accuracy"] for r in a.results if r.stage == "bias" and r.summary
               for k, v in r.summary.items() if k != "weat" and "worst_group_accuracy" in v]
        lines.append(f"| `{a.model}` | {done} | {skip} | {', '.join(f'{w:.3f}' for w in wga) or '–'} |")
    for z in zoo_results:
        lines += ["", f"**{z.stage}** on `{z.dataset}`: {_status(z)}, snapshot `{z.snapshot[:12]}`"]
        s = z.summary or {}
        if z.stage == "zoo-similarity":
            for metric in s.get("groups", {}):
                for layer, mat in s[metric].items():
                    lines += ["", f"Model × model {metric}, layer `{layer}`:", ""] + _matrix_table(s["models"], mat)
                    if (ctrl := s.get("control", {}).get(metric, {}).get(layer)) is not None:
                        label = CONTROL_LABELS.get(s.get("control_kind", "shuffle"), "control")
                        lines += ["", f"Control ({label}), {metric}, layer `{layer}`:", ""]
                        lines += _matrix_table(s["models"], ctrl)
        elif z.stage == "revision-similarity":
            for family, per_metric in s.get("families", {}).items():
                for metric, info in per_metric.items():
                    lines += ["", (f"`{family}` {metric} between consecutive checkpoints "
                                   f"(rows: {', '.join(info['steps'])}; columns: {', '.join(info['layers'])}"
                                   + (f"; in brackets: control, "
                                      f"{CONTROL_LABELS.get(info.get('control_kind', 'shuffle'), 'control')}"
                                      if info.get('control') else '') + "):"), ""]
                    lines += ["| step | " + " | ".join(info["layers"]) + " |", "|---" * (len(info["layers"]) + 1) + "|"]
                    ctrl = info.get("control") or [[None] * len(info["layers"])] * len(info["steps"])
                    lines += [f"| {st} | " + " | ".join(_with_control(v, c) for v, c in zip(row, crow)) + " |"
                              for st, row, crow in zip(info["steps"], info["value"], ctrl)]
    return "\n".join(lines)
