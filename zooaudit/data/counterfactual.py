"""Which datasets have counterfactual partners, and the spec of the partner set.

A counterfactual set holds the same samples (same sample ids, labels and objects, in the same
order) with only the suspected shortcut changed: ``scenes`` with ``swap_background`` (the
background kind swapped, :mod:`.scenes`), ``colored-digits`` with ``swap_color`` (each digit
in the other colour, :mod:`.digits`). The model side extracts the partner set's predictions
(:mod:`zooaudit.stages.controls`); the bias stage compares them pair by pair.
"""

from __future__ import annotations

__all__ = ["COUNTERFACTUALS", "counterfactual_spec"]

# dataset name → (the option that swaps the shortcut, the group attribute it changes)
COUNTERFACTUALS = {"scenes": ("swap_background", "background"), "colored-digits": ("swap_color", "colour")}


def counterfactual_spec(spec):
    """The spec of ``spec``'s counterfactual partners (a :class:`~zooaudit.specs.DatasetSpec`), or None
    when the dataset has none. A spec that is itself swapped gets the unswapped set as partner."""
    if spec.name not in COUNTERFACTUALS:
        return None
    option, _ = COUNTERFACTUALS[spec.name]
    return spec.model_copy(update={"options": {**spec.options, option: not spec.options.get(option, False)}})
