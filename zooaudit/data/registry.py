"""The dataset registry: name → loader, filled by the loaders' ``@register`` decorators.

A leaf (it imports nothing): the loader modules import it to register themselves, and
:mod:`zooaudit.data` imports every builtin loader before anything else, so the table is
full once the package is imported — which Python does before any of its submodules,
this one included. :mod:`zooaudit.specs` reads the names here (its dataset validator)
without importing :func:`~zooaudit.data.load_dataset`, which builds specs.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["DATASETS", "register"]

# name → loader(spec: DatasetSpec) -> AuditDataset
DATASETS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco
