"""WEAT / SEAT: effect size and p-value against a brute-force loop, conventions, word sets."""

import itertools
import json
import math
import statistics

import numpy as np
import pytest

from zooaudit.analysis import weat as weat_mod
from zooaudit.analysis.bias import (
    example_wordsets_path,
    holm,
    load_wordsets,
    seat_sentences,
    weat,
    weat_family,
)
from zooaudit.errors import ZooauditError


def _brute_force(X, Y, A, B, ddof=1):
    """Independent WEAT: pure-Python cosines, statistics.stdev, every partition by itertools."""
    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    def s(w):
        return statistics.mean(cos(w, a) for a in A) - statistics.mean(cos(w, b) for b in B)

    sx, sy = [s(x) for x in X], [s(y) for y in Y]
    sd = statistics.stdev(sx + sy) if ddof == 1 else statistics.pstdev(sx + sy)
    d = (statistics.mean(sx) - statistics.mean(sy)) / sd
    allw, n = sx + sy, len(X)
    observed = sum(sx) - sum(sy)
    hits = total = 0
    for part in itertools.combinations(range(2 * n), n):
        xi = sum(allw[i] for i in part)
        total += 1
        hits += (xi - (sum(allw) - xi)) >= observed - 1e-12
    return d, hits / total


def _planted(rng, n, dim=16, strength=1.0, n_attr=8):
    """X near direction u, Y near v; A near u, B near v: X associates with A."""
    u, v = rng.normal(size=dim), rng.normal(size=dim)
    noise = lambda k: rng.normal(size=(k, dim))
    return (strength * u + noise(n), strength * v + noise(n), strength * u + noise(n_attr),
            strength * v + noise(n_attr))


def test_effect_size_and_exact_p_match_brute_force():
    rng = np.random.default_rng(0)
    for strength in (0.0, 0.3, 1.0):
        X, Y, A, B = _planted(rng, 6, strength=strength, n_attr=5)
        res = weat(X, Y, A, B)
        d, p = _brute_force(X.tolist(), Y.tolist(), A.tolist(), B.tolist())
        assert res.exact and res.n_partitions == math.comb(12, 6)
        assert res.effect_size == pytest.approx(d, abs=1e-10)
        assert res.p_value == pytest.approx(p, abs=1e-12)


def test_ddof_is_one_by_default():
    rng = np.random.default_rng(1)
    X, Y, A, B = _planted(rng, 5, strength=0.5)
    r1, r0 = weat(X, Y, A, B), weat(X, Y, A, B, ddof=0)
    assert r1.ddof == 1
    assert r1.effect_size == pytest.approx(_brute_force(X, Y, A, B, ddof=1)[0], abs=1e-10)
    assert r0.effect_size == pytest.approx(_brute_force(X, Y, A, B, ddof=0)[0], abs=1e-10)
    n2 = 10  # |X ∪ Y|: std with ddof=0 is smaller by sqrt((N-1)/N)
    assert r0.effect_size == pytest.approx(r1.effect_size * math.sqrt(n2 / (n2 - 1)))


def test_planted_association_is_large_and_significant():
    rng = np.random.default_rng(2)
    X, Y, A, B = _planted(rng, 12, strength=1.5)
    res = weat(X, Y, A, B, n_permutations=5000, random_state=0)
    assert not res.exact  # C(24, 12) > 100k: Monte Carlo
    assert res.effect_size > 1.5 and res.p_value == pytest.approx(1 / 5001)
    assert abs(res.effect_size) < 2  # ddof = 1 keeps |d| < 2
    # antisymmetry: swapping targets or attributes flips the sign
    assert weat(Y, X, A, B).effect_size == pytest.approx(-res.effect_size)
    assert weat(X, Y, B, A).effect_size == pytest.approx(-res.effect_size)
    # cosine: invariant to rescaling any word
    scaled = weat(X * rng.uniform(0.1, 10, (12, 1)), Y, A, B * 3.0)
    assert scaled.effect_size == pytest.approx(res.effect_size)


def test_no_association_gives_small_effect_and_large_p():
    rng = np.random.default_rng(3)
    dim = 32
    X, Y, A, B = (rng.normal(size=(k, dim)) for k in (100, 100, 20, 20))
    res = weat(X, Y, A, B, n_permutations=2000, random_state=0)
    assert abs(res.effect_size) < 0.4 and res.p_value > 0.05


def test_exact_and_monte_carlo_agree():
    rng = np.random.default_rng(4)
    X, Y, A, B = _planted(rng, 7, strength=0.25)
    exact = weat(X, Y, A, B)
    assert exact.exact and 0.02 < exact.p_value < 0.98
    mc = weat(X, Y, A, B, max_exact=0, n_permutations=20000, random_state=1)
    assert not mc.exact and mc.n_partitions == 20000
    se = math.sqrt(exact.p_value * (1 - exact.p_value) / 20000)
    assert abs(mc.p_value - exact.p_value) < 4 * se + 1 / 20001
    assert mc.effect_size == exact.effect_size
    again = weat(X, Y, A, B, max_exact=0, n_permutations=20000, random_state=1)
    assert again.p_value == mc.p_value  # reproducible


def test_monte_carlo_partitions_draw_words_without_replacement():
    # s = distinct powers of two: a sum of n of them has exactly n bits set iff no index repeats
    n = 10
    s = 2.0 ** np.arange(2 * n)
    sums = weat_mod._partition_sums(s, n, exact=False, n_permutations=3000, rng=np.random.default_rng(0))
    assert all(int(v).bit_count() == n for v in sums)
    exact = weat_mod._partition_sums(s, 4, exact=True, n_permutations=0, rng=None)
    assert len(exact) == math.comb(8, 4) == len(set(exact))  # every partition once


def test_weat_family_applies_holm():
    rng = np.random.default_rng(5)
    tests = {"planted": _planted(rng, 8, strength=1.5), "null": _planted(rng, 8, strength=0.0),
             "weak": _planted(rng, 8, strength=0.4)}
    ds = weat_family(tests, n_permutations=2000, random_state=0)
    assert ds["test"].values.tolist() == list(tests)
    np.testing.assert_allclose(ds["p_adjusted"].values, holm(ds["p_value"].values).p_adjusted)
    assert ds["reject"].sel(test="planted").item()
    for name, args in tests.items():
        assert ds["effect_size"].sel(test=name).item() == pytest.approx(weat(*args).effect_size)


@pytest.mark.parametrize("sizes,match", [
    ((5, 4, 3, 3), r"\|X\| = 5, \|Y\| = 4"),
    ((0, 0, 3, 3), "X is empty"),
    ((3, 3, 0, 3), "A is empty"),
])
def test_bad_sets_are_errors(sizes, match):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(k, 4)) for k in sizes]
    with pytest.raises(ZooauditError, match=match):
        weat(*arrays)


def test_dimension_mismatch_and_zero_vectors_are_errors():
    rng = np.random.default_rng(0)
    X, Y, A = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    with pytest.raises(ZooauditError, match="dimension"):
        weat(X, Y, A, rng.normal(size=(3, 5)))
    X[1] = 0
    with pytest.raises(ZooauditError, match="row 1 is the zero vector"):
        weat(X, Y, A, A)


def test_example_wordsets_load_and_expand():
    ws = load_wordsets(example_wordsets_path())
    assert ws.tests and all(len(ws.targets[t.X]) == len(ws.targets[t.Y]) for t in ws.tests)
    X = ws.words(ws.tests[0])[0]
    sentences = seat_sentences(X)
    k = len(weat_mod.SEAT_TEMPLATES)
    assert len(sentences) == len(X) * k
    assert sentences[0] == f"This is a {X[0]}." and sentences[k] == f"This is a {X[1]}."  # word-major
    assert seat_sentences(["apple"])[0] == "This is an apple."
    assert seat_sentences(["apple"])[7] == "An apple is a thing."
    assert seat_sentences(["Katie"], "names")[0] == "This is Katie."


def test_wordset_file_errors(tmp_path):
    good = {"targets": {"x": ["a", "b"], "y": ["c", "d"], "z": ["e"]},
            "attributes": {"p": ["f"], "q": ["g", "h"]},
            "tests": [{"X": "x", "Y": "y", "A": "p", "B": "q"}]}
    path = tmp_path / "ws.json"
    path.write_text(json.dumps(good))
    assert load_wordsets(path).tests[0].name == "x-y/p-q"
    cases = [
        ({**good, "tests": [{"X": "x", "Y": "z", "A": "p", "B": "q"}]}, "'x' \\(2 words\\) and 'z' \\(1 words\\)"),
        ({**good, "tests": [{"X": "x", "Y": "w", "A": "p", "B": "q"}]}, "Y = 'w' is not a targets set"),
        ({**good, "targets": {"x": ["a", "a"], "y": ["c", "d"]}}, "more than once"),
        ({**good, "attributes": {"p": [], "q": ["g"]}}, "non-empty list"),
        ({"targets": {}}, "'targets' and 'attributes'"),
    ]
    for doc, match in cases:
        path.write_text(json.dumps(doc))
        with pytest.raises(ZooauditError, match=match):
            load_wordsets(path)
    with pytest.raises(ZooauditError, match="suffix '.txt'"):
        (tmp_path / "ws.txt").write_text("{}")
        load_wordsets(tmp_path / "ws.txt")
    with pytest.raises(ZooauditError, match="must contain"):
        seat_sentences(["a"], ["no placeholder"])
