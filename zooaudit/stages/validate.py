"""Validation before anything is committed: bad input fails with one clear paragraph."""

from __future__ import annotations

from ..errors import ZooauditError
from ..extract import select_layers
from ..specs import AuditModelSpec
from ..store import Store
from ..zoo import LoadedModel
from . import weat as weat_stage
from .common import load_model, plan_dataset


def validate_model(spec: AuditModelSpec) -> LoadedModel:
    """Fail early, with one clear paragraph, on a bad model, layer, dataset or store."""
    store = Store.open(spec.store)
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



def validate_zoo(spec) -> None:
    """Validate every model of the zoo and the comparison layer before any audit starts."""
    if not spec.models:
        raise ZooauditError("The zoo is empty: give at least one model URI (e.g. 'builtin:mlp-w64-s0'). "
                            "Builtin models: " + ", ".join(__import__("zooaudit.zoo.builtin", fromlist=["x"])
                                                           .default_zoo()) + ".")
    layers: set[str] = set()
    for uri in spec.models:
        model = validate_model(spec.model_spec(uri))
        layers.update(select_layers(model.module, spec.layers or model.default_layers))
    missing = [layer for layer in spec.compare_layers if layer not in layers]
    if missing:
        raise ZooauditError(f"compare_layers {missing} are not among the audited layers of any zoo model. "
                            f"Allowed: {', '.join(sorted(layers))}.")
