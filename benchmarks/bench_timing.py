"""Ratios of wall times taken on a noisy machine (shared by the extraction benchmarks).

The dev and CI boxes are 2-core VMs whose speed drifts by ±30 % over tens of seconds
(other tenants of the host). Each measured run therefore sits between two reference
runs — ``ref[0], run[0], ref[1], run[1], ..., ref[k]`` — and is compared with their mean,
which cancels drift that is linear over the bracket; the median over the brackets drops
the runs a burst of load hit.
"""

from __future__ import annotations

import statistics


def bracketed_ratios(runs: list[float], refs: list[float]) -> list[float]:
    """``runs[i] / mean(refs[i], refs[i + 1])`` for each run (``len(refs) == len(runs) + 1``)."""
    if len(refs) != len(runs) + 1:
        raise ValueError(f"need one more reference run than measured runs, got {len(refs)} and {len(runs)}")
    return [r / ((refs[i] + refs[i + 1]) / 2) for i, r in enumerate(runs)]


def summary(runs: list[float], refs: list[float]) -> dict[str, float]:
    """``min_wall``: ratio of the minimum wall times (least disturbed run of each);
    ``median_bracketed``: median of :func:`bracketed_ratios`."""
    return {"min_wall": round(min(runs) / min(refs), 3),
            "median_bracketed": round(statistics.median(bracketed_ratios(runs, refs)), 3)}
