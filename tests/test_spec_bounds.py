"""Every bounded numeric field of every spec, at and beyond its bounds (issue 18, bad input).

Driven from the specs' own declarations (pydantic ``Field(ge=…, gt=…, le=…, lt=…)``), so a field
added later is covered without editing this file: at a bound the spec validates; one step beyond
it is refused with one line naming the field's full path and what is allowed — the line the CLI
prints after ``zooaudit: error: invalid parameters —`` and the nightly schedules file quotes.
Sub-specs are validated inside the spec that carries them (``AuditZooSpec(factorize={...})``), as
a deployment parameter or a UI form sends them. ``docs/reliability.md`` lists the cases
(:func:`bound_rows`, written by ``tests/test_bad_input_table.py --write``).
"""

from __future__ import annotations

import inspect
import math

import annotated_types as at
import pytest
from pydantic import BaseModel, ValidationError

from zooaudit import specs
from zooaudit.errors import problems

# Where each spec class is validated from, and what else it needs to be valid.
PARENT = {"FactorizeSpec": "factorize", "BiasSpec": "bias", "SimilaritySpec": "similarity",
          "AttributionSpec": "attribution", "StatisticsSpec": "statistics"}
REQUIRED = {"DatasetSpec": {"name": "digits"}}

WORDS = {"ge": "greater than or equal to", "gt": "greater than", "le": "less than or equal to", "lt": "less than"}


def _spec_classes() -> list[type[BaseModel]]:
    return [c for _, c in inspect.getmembers(specs, inspect.isclass)
            if issubclass(c, BaseModel) and c.__module__ == specs.__name__]


def _numeric(annotation) -> type | None:
    """``int`` or ``float`` for ``int``, ``float`` and their optionals; None otherwise."""
    args = getattr(annotation, "__args__", None) or (annotation,)
    kinds = [a for a in args if a in (int, float)]
    return kinds[0] if kinds else None


def bound_cases() -> list[tuple[str, str, str, str, object, object]]:
    """``(class, field, kind, bound word, value at the bound, value beyond it)`` for every bounded
    numeric field; for a strict bound (gt/lt) "at" is the nearest allowed value."""
    out = []
    for cls in _spec_classes():
        for name, info in cls.model_fields.items():
            kind = _numeric(info.annotation)
            if kind is None:
                continue
            for m in info.metadata:
                for op in ("ge", "gt", "le", "lt"):
                    bound = getattr(m, op, None) if isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt)) else None
                    if bound is None:
                        continue
                    up = op in ("le", "lt")                  # an upper bound: beyond is above it
                    step = 1 if kind is int else max(abs(bound) * 1e-6, 1e-9)
                    if op in ("ge", "le"):
                        at_value, beyond = bound, bound + step if up else bound - step
                    else:
                        at_value = bound - step if up else bound + step
                        beyond = bound
                    out.append((cls.__name__, name, kind.__name__, op, kind(at_value), kind(beyond)))
    return out


def _validate(cls_name: str, field: str, value):
    """Validate ``value`` for ``field`` the way it reaches a run: sub-specs inside an AuditZooSpec."""
    if cls_name in PARENT:
        return specs.AuditZooSpec(models=["builtin:mlp-w32-s0"], **{PARENT[cls_name]: {field: value}})
    cls = getattr(specs, cls_name)
    return cls(**{**REQUIRED.get(cls_name, {}), field: value})


def _path(cls_name: str, field: str) -> str:
    return f"{PARENT[cls_name]}.{field}" if cls_name in PARENT else field


def bound_rows() -> list[list[str]]:
    """The cases as table rows for docs/reliability.md: field, bound, value tried, error line."""
    rows = []
    for cls_name, field, _, op, _, beyond in bound_cases():
        try:
            _validate(cls_name, field, beyond)
        except ValidationError as err:
            message = problems(err)
        else:   # the test below fails on this; the table says so too
            message = "(accepted)"
        rows.append([f"{cls_name}.{field}", f"{op} {_bound(cls_name, field, op)}", repr(beyond), message])
    return rows


def _bound(cls_name: str, field: str, op: str):
    info = getattr(specs, cls_name).model_fields[field]
    return next(getattr(m, op) for m in info.metadata if getattr(m, op, None) is not None)


CASES = bound_cases()


def test_the_walk_finds_the_bounded_fields_of_every_spec():
    classes = {c for c, *_ in CASES}
    assert {"DatasetSpec", "FactorizeSpec", "BiasSpec", "SimilaritySpec", "AttributionSpec", "StatisticsSpec",
            "AuditModelSpec", "AuditZooSpec", "BackfillSpec"} <= classes, classes
    assert len(CASES) >= 60
    # each sub-spec carried by the run options is validated through its parent
    carried = {n: f.annotation for n, f in specs.RunOptions.model_fields.items()}
    for cls_name, parent in PARENT.items():
        assert carried[parent] is getattr(specs, cls_name) or carried[parent] == cls_name


@pytest.mark.parametrize("cls_name,field,kind,op,at_value,beyond", CASES,
                         ids=[f"{c}.{f}-{op}" for c, f, _, op, _, _ in CASES])
def test_at_the_bound_validates_and_beyond_is_refused_naming_field_and_limit(cls_name, field, kind, op,
                                                                             at_value, beyond):
    spec = _validate(cls_name, field, at_value)
    got = getattr(getattr(spec, PARENT[cls_name]) if cls_name in PARENT else spec, field)
    assert math.isclose(got, at_value)
    with pytest.raises(ValidationError) as err:
        _validate(cls_name, field, beyond)
    line = problems(err.value)
    bound = _bound(cls_name, field, op)
    assert line.startswith(f"{_path(cls_name, field)}: "), line
    assert WORDS[op] in line and float(line.rsplit(" ", 1)[-1]) == bound, line
    assert "\n" not in line
