"""Bias audits — the public entry point (``zooaudit.analysis.bias``).

The work lives in small modules, re-exported here so callers import one name:

- :mod:`.fairness` — prediction level: per-group accuracy, selection rate, TPR/FPR
  with stratified-bootstrap and Wilson intervals; intersectional groups;
  worst-group accuracy over (label × group) cells.
- :mod:`.disparity` — demographic parity, equal opportunity, equalized odds and
  accuracy differences/ratios with permutation p-values; run-level adjustment.
- :mod:`.multitest` — permutation p-values, Benjamini–Hochberg and Holm.
- :mod:`.probes` — representation level: cross-validated linear probes of a group
  attribute with controls, output leakage within each true label, LEACE erasure.
- :mod:`.weat` — WEAT/SEAT effect sizes and permutation p-values, word-set loading
  and SEAT sentence templates.

Importing this module imports neither torch nor Prefect; LEACE loads the
``concept-erasure`` package (and torch) only when :func:`erase` asks for it.
"""

from __future__ import annotations

from .disparity import adjust_run
from .fairness import (
    BiasAuditWarning,
    GroupReport,
    encode_groups,
    group_metrics,
    wilson_interval,
)
from .multitest import Adjusted, adjust, bh, holm, permutation_p_value
from .probes import (
    ProbeScore,
    erase,
    erasure_diagnostic,
    leace_eraser,
    linear_probe,
    output_leakage_within_label,
    probe_leakage,
)
from .weat import (
    SEAT_TEMPLATES,
    WeatResult,
    WeatTest,
    WordSets,
    example_wordsets_path,
    load_wordsets,
    seat_sentences,
    weat,
    weat_family,
)

__all__ = [
    "SEAT_TEMPLATES", "Adjusted", "BiasAuditWarning", "GroupReport", "ProbeScore", "WeatResult", "WeatTest",
    "WordSets", "adjust", "adjust_run", "bh", "encode_groups", "erase", "erasure_diagnostic",
    "example_wordsets_path", "group_metrics", "holm", "leace_eraser", "linear_probe", "load_wordsets",
    "output_leakage_within_label", "permutation_p_value", "probe_leakage", "seat_sentences", "weat",
    "weat_family", "wilson_interval",
]
