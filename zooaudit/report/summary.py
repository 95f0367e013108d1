"""Markdown summaries of runs (used as Prefect artifacts and in the CLI)."""

from __future__ import annotations


def _status(r) -> str:
    return "cached (skipped)" if r.skipped else "committed"


def _headline(r) -> str:
    s = r.summary or {}
    if r.stage == "factorize":
        ev = s.get("explained_variance", {})
        return ", ".join(f"{k}: {v:.3f}" for k, v in ev.items() if isinstance(v, float))
    if r.stage == "bias":
        return "; ".join(f"{a}: acc {v['overall_accuracy']:.3f}, worst-group {v['worst_group_accuracy']:.3f} "
                         f"({v['worst_group']})" for a, v in s.items())
    if r.stage == "activations":
        return f"{s.get('n_samples', '')} samples, layers {', '.join(s.get('layers', []))}" if s else ""
    return ""


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
               for v in r.summary.values()]
        lines.append(f"| `{a.model}` | {done} | {skip} | {', '.join(f'{w:.3f}' for w in wga) or '–'} |")
    for z in zoo_results:
        lines += ["", f"Model × model linear CKA on `{z.dataset}`: {_status(z)}, snapshot `{z.snapshot[:12]}`"]
    return "\n".join(lines)
