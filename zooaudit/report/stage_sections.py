"""Sections of the stages added after the site's core ones, registered on the model pages.

Each adapter gives a stage's section renderer what it reads from :class:`.sections.ModelContext`
(an opener at the stage's snapshot, the activations reference, the result, a file prefix).
Importing this module registers them (``report/__init__`` does).
"""

from __future__ import annotations

from .attribution import attribution_section
from .bias_measures import bias_measures_section
from .sections import ModelContext, Section, register
from .statistics import statistics_section
from .token_attribution import token_attribution_section


def _attribution(ctx: ModelContext) -> list[str]:
    res = ctx.results.get("attribution")
    if res is None:
        return []
    return attribution_section(lambda g: ctx.open("attribution", g), ctx.ref, res, ctx.base, ctx.files)


def _token_attribution(ctx: ModelContext) -> list[str]:
    res = ctx.results.get("attribution-text")
    if res is None:
        return []
    return token_attribution_section(lambda g: ctx.open("attribution-text", g), ctx.ref, res)


def _bias_measures(ctx: ModelContext) -> list[str]:
    bias, features = ctx.results.get("bias"), ctx.results.get("bias-features")
    if bias is None and features is None:
        return []
    repo = ctx.ref.repository.icechunk

    def open_lazy(group: str, snapshot: str):
        import xarray as xr

        return xr.open_zarr(repo.readonly_session(snapshot_id=snapshot).store, group=group, consolidated=False,
                            zarr_format=3)

    return bias_measures_section(open_lazy, ctx.ref, bias, features, ctx.base, ctx.files)


def _statistics(ctx: ModelContext) -> list[str]:
    res = ctx.results.get("statistics")
    if res is None:
        return []
    return statistics_section(lambda g: ctx.open("statistics", g), ctx.ref, res, ctx.base, ctx.files)


register(Section("attribution", "Attribution", _attribution))
register(Section("token-attribution", "Token attributions", _token_attribution))
register(Section("bias-measures", "Bias beyond accuracy", _bias_measures))
register(Section("statistics", "Activation statistics", _statistics))
