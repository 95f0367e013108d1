"""The factorization methods, declared once: name, fit function and what each accepts.

:data:`FACTOR_METHOD_LIST` is the one declaration; :data:`FACTOR_METHODS` (the names,
in order) and :func:`factor_method` (name → declaration, with the error the refits
give for an unknown name) are derived from it. Every ``function`` is called as
``function(A (N, D), k, *, random_state=..., name=..., **options)`` and returns a
:class:`~.factorization.Factorization`. Eigen-CAM (per-image maps, no ``k``) and DFF
(spatial NMF) are not in the list: they are not refitted per seed or per ``k``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ZooauditError
from .decompose import nmf, pca, semi_nmf
from .sae import sae


@dataclass(frozen=True)
class FactorMethod:
    """One factorization method.

    Attributes:
        name: the name specs and results use.
        function: the fit (see the module docstring).
        signed_ok: fits layers with negative values (NMF refuses them).
        uses_device: runs in torch on its ``device=`` option (PCA runs in NumPy).
        seeded: the result depends on ``random_state`` (PCA is deterministic: stability 1).
    """

    name: str
    function: Callable
    signed_ok: bool
    uses_device: bool
    seeded: bool


FACTOR_METHOD_LIST: tuple[FactorMethod, ...] = (
    FactorMethod("pca", pca, signed_ok=True, uses_device=False, seeded=False),
    FactorMethod("nmf", nmf, signed_ok=False, uses_device=True, seeded=True),
    FactorMethod("semi_nmf", semi_nmf, signed_ok=True, uses_device=True, seeded=True),
    FactorMethod("sae", sae, signed_ok=True, uses_device=True, seeded=True),
)
FACTOR_METHODS: tuple[str, ...] = tuple(m.name for m in FACTOR_METHOD_LIST)
_BY_NAME = {m.name: m for m in FACTOR_METHOD_LIST}


def factor_method(method: str, name: str = "A") -> FactorMethod:
    """The declaration of ``method``; a :class:`ZooauditError` naming layer ``name`` when unknown."""
    if method not in _BY_NAME:
        raise ZooauditError(f"Unknown factorization method {method!r} for layer {name!r}. "
                            f"Allowed: {', '.join(sorted(_BY_NAME))}.")
    return _BY_NAME[method]
