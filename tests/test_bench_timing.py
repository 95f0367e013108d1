"""The drift-cancelling ratio the extraction benchmarks report (benchmarks/bench_timing.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_timing import bracketed_ratios, summary


def test_linear_drift_cancels():
    # the machine slows down linearly; the measured run is always 1.1x the reference at the same moment
    refs = [1.0 + 0.2 * k for k in range(6)]                       # at t = 0, 2, 4, ...
    runs = [1.1 * (1.0 + 0.2 * (k + 0.5)) for k in range(5)]       # at t = 1, 3, 5, ...
    assert bracketed_ratios(runs, refs) == pytest.approx([1.1] * 5)
    assert summary(runs, refs)["median_bracketed"] == pytest.approx(1.1)
    assert summary(runs, refs)["min_wall"] == pytest.approx(1.1 * 1.1)   # the min ratio does not cancel it


def test_needs_one_more_reference():
    with pytest.raises(ValueError, match="one more reference"):
        bracketed_ratios([1.0, 1.0], [1.0, 1.0])
