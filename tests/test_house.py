"""The house rules, checked on the source (no model, no store): only the model stages run the
model; array stages, analyses and reports read arrays; stages are declared in one registry
and import no private helper of another module."""

from __future__ import annotations

import ast
from pathlib import Path

import zooaudit
from zooaudit.stages import registry

ROOT = Path(zooaudit.__file__).parent
# Where the model may run: the extraction engine, the model sources, and the model stages.
MODEL_SIDE = {"extract.py", "gradients.py", "stages/activations.py", "stages/controls.py", "stages/model.py",
              "stages/validate.py", "stages/common.py", "stages/cached.py",
              # attribution maps: the maps and the faithfulness curves run the model; their stage too
              "attribution_maps.py", "faithfulness.py", "sanity_checks.py", "road.py", "stages/attribution.py",
              # token attributions of text encoders and their stage (the attribution stage's text side)
              "token_attribution.py", "stages/attribution_text.py"}
# Names whose use means running (or building) the model.
FORWARD = {"forward_batches", "load_model", "load_random_init", "resolve_model", "random_init", "layer_gradients",
           "concept_sensitivity", "layer_shapes", "attribution_maps", "faithfulness_curves", "confidence_change",
           "randomisation_maps", "road_curves", "removal_curves",
           "token_attributions"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        yield rel, ast.parse(path.read_text(), filename=str(path))


def _imported_modules(rel: str, tree) -> set[str]:
    """Absolute names of the modules ``rel`` imports (relative imports resolved)."""
    package = ["zooaudit", *rel.removesuffix(".py").split("/")[:-1]]
    if rel.endswith("__init__.py"):
        package = ["zooaudit", *rel.split("/")[:-1]]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def _calls(tree) -> set[str]:
    """Names of the functions ``tree`` calls (``f(...)`` and ``x.f(...)``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return out


def test_nothing_outside_the_model_stages_runs_the_model():
    offenders = {}
    for rel, tree in _modules():
        if rel in MODEL_SIDE or rel.startswith(("zoo/", "data/")):
            continue
        imported = {m for m in _imported_modules(rel, tree)
                    if not m.startswith(("zooaudit.zoo.manifest", "zooaudit.zoo.catalog"))  # YAML; names only
                    if m in ("zooaudit.extract", "zooaudit.zoo", "zooaudit.gradients", "zooaudit.attribution_maps",
                             "zooaudit.faithfulness", "zooaudit.sanity_checks", "zooaudit.road")
                    or m.startswith(("zooaudit.extract.", "zooaudit.zoo.", "zooaudit.gradients.",
                                     "zooaudit.attribution_maps.", "zooaudit.faithfulness.",
                                     "zooaudit.sanity_checks.", "zooaudit.road."))}
        bad = sorted(imported | (_calls(tree) & FORWARD))
        if bad:
            offenders[rel] = bad
    assert offenders == {}, f"modules outside the model stages that reach the model: {offenders}"


def test_every_array_stage_module_is_declared_and_model_free():
    declared = {s.module for s in registry.ARRAY_STAGES} | {s.module for s in registry.ZOO_STAGES}
    assert {"zooaudit.stages.factorize", "zooaudit.stages.similarity", "zooaudit.stages.bias",
            "zooaudit.stages.zoo"} <= declared
    for module in declared:
        rel = module.removeprefix("zooaudit.").replace(".", "/") + ".py"
        assert rel not in MODEL_SIDE, module


def test_no_private_stage_helper_crosses_a_module_boundary():
    """Stages share public helpers (zooaudit.stages.common, the Repository handle), never each
    other's private ones; reports import nothing private from the stages."""
    crossings = []
    for rel, tree in _modules():
        crossings += [f"{rel}: {m}" for m in _imported_modules(rel, tree)
                      if m.startswith("zooaudit.stages.") and m.rsplit(".", 1)[-1].startswith("_")
                      and not m.rsplit(".", 1)[-1].startswith("__")]
    assert crossings == []
