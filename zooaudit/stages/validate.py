"""Validation before anything is committed: bad input fails with one clear paragraph."""

from __future__ import annotations

from ..devices import resolve_device
from ..errors import ZooauditError
from ..extract import select_layers
from ..specs import AuditModelSpec, AuditZooSpec
from ..store import Store
from ..zoo import LoadedModel
from . import weat as weat_stage
from .common import load_model, plan_dataset


def validate_model(spec: AuditModelSpec) -> LoadedModel:
    """Fail early, with one clear paragraph, on a bad model, layer, dataset or store."""
    store = Store.open(spec.store)
    if spec.dask_address is None and spec.device not in ("auto", "cpu"):
        # a local run extracts here: an absent CUDA device is an error now, not after planning
        # (an external cluster's workers may have GPUs this process does not see)
        resolve_device(spec.device, what=" for extraction")
    model = load_model(spec.model, store.url)
    select_layers(model.module, spec.layers or model.default_layers)
    fits = [d.name for d in spec.datasets if plan_dataset(d)[0].input_shape == tuple(model.input_shape)]
    if not fits:
        names = ", ".join(d.name for d in spec.datasets) or "(none)"
        raise ZooauditError(
            f"Model {spec.model!r} takes inputs of shape {tuple(model.input_shape)}, but none of the requested "
            f"datasets ({names}) has that shape. Allowed: datasets whose samples have shape "
            f"{tuple(model.input_shape)} (builtin digits models: 'digits'; colored models: 'colored-digits'; "
            "text encoders, input shape (): 'text')."
        )
    weat_stage.validate(model, spec.bias)  # word sets of text encoders, before any commit
    return model



def validate_zoo(spec: AuditZooSpec) -> AuditZooSpec:
    """Validate every model of the zoo and the comparison layers before any audit starts;
    return the spec with its compare layers resolved.

    Compare layers given by the user must be audited by some zoo model. Left at the default,
    they are ``['embed']`` when a model audits ``embed`` (the builtin zoo's embedding), else
    the deepest layer every zoo model audits (by the first model's layer order), else none
    (the model × model comparison is then skipped, as for a zoo of one model).
    """
    if not spec.models:
        raise ZooauditError("The zoo is empty: give at least one model URI (e.g. 'builtin:mlp-w64-s0'). "
                            "Builtin models: " + ", ".join(__import__("zooaudit.zoo.builtin", fromlist=["x"])
                                                           .default_zoo()) + ".")
    per_model: list[list[str]] = []
    for uri in spec.models:
        model = validate_model(spec.model_spec(uri))
        per_model.append(select_layers(model.module, spec.layers or model.default_layers))
    layers = {layer for selected in per_model for layer in selected}
    if spec.compare_layers is None:
        return spec.model_copy(update={"compare_layers": default_compare_layers(per_model)})
    missing = [layer for layer in spec.compare_layers if layer not in layers]
    if missing:
        raise ZooauditError(f"compare_layers {missing} are not among the audited layers of any zoo model. "
                            f"Allowed: {', '.join(sorted(layers))}.")
    return spec


def default_compare_layers(per_model: list[list[str]]) -> list[str]:
    """``['embed']`` if any model audits it, else the deepest layer all models audit, else ``[]``.
    ``per_model``: each model's audited layers in module order."""
    if any("embed" in selected for selected in per_model):
        return ["embed"]
    common = [layer for layer in per_model[0] if all(layer in selected for selected in per_model[1:])]
    return common[-1:]
