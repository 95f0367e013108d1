"""WEAT (Caliskan et al. 2017) and SEAT (May et al. 2019): association tests on embeddings.

Definitions, for target sets X, Y (equal size n) and attribute sets A, B, rows are
embedding vectors:

- ``s(w, A, B) = mean_a cos(w, a) − mean_b cos(w, b)``;
- test statistic ``S = Σ_{x∈X} s(x) − Σ_{y∈Y} s(y)``;
- effect size ``d = (mean_X s − mean_Y s) / std_{X∪Y} s`` with **ddof = 1** (the
  sample standard deviation over the 2n target words, as in the SEAT reference
  code); ``ddof=0`` is accepted for comparison with implementations that use it.
  Since ddof=1 divides by a larger std, |d| < 2 always.
- p-value: **one-sided**, P[S(X', Y') ≥ S(X, Y)] over equal-size partitions (X', Y')
  of X ∪ Y — large when X is *more* associated with A than Y is. Exact enumeration
  of all C(2n, n) partitions (the observed one included, ties counted) when that
  number is ≤ ``max_exact``; otherwise Monte Carlo over ``n_permutations`` uniformly
  random partitions — each one a permutation of the 2n words without replacement,
  split in half — with p = (1 + #{S' ≥ S}) / (1 + n_permutations). (A widely used
  library resamples words *with* replacement; that is not a partition test.)
- A family of tests (:func:`weat_family`) is Holm-corrected by default.

SEAT replaces each word by sentences from "semantically bleached" templates; this
module only expands templates (:func:`seat_sentences`); the pipeline embeds them.
Word sets live in YAML/JSON files read by :func:`load_wordsets`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .multitest import adjust, at_least

MAX_EXACT = 100_000  # enumerate partitions exactly up to this many (C(18, 9) = 48,620; C(20, 10) = 184,756)
_MC_BATCH = 2000

# Semantically bleached templates (May et al. 2019 style). {word} is the word, {a} its
# indefinite article, {A} the article capitalized. Nouns and names need different frames.
SEAT_TEMPLATES = (
    "This is {a} {word}.", "That is {a} {word}.", "There is {a} {word}.", "Here is {a} {word}.",
    "The {word} is here.", "The {word} is there.", "It is {a} {word}.", "{A} {word} is a thing.",
)
SEAT_NAME_TEMPLATES = (
    "This is {word}.", "That is {word}.", "There is {word}.", "Here is {word}.",
    "{word} is here.", "{word} is there.", "{word} is a person.", "The name of this person is {word}.",
)
TEMPLATE_SETS = {"nouns": SEAT_TEMPLATES, "names": SEAT_NAME_TEMPLATES}


@dataclass
class WeatResult:
    """Result of :func:`weat`.

    Attributes:
        effect_size: d (NaN when every s(w, A, B) is equal).
        p_value: one-sided partition-test p-value.
        statistic: S = Σ_X s − Σ_Y s.
        s_X, s_Y: ``(n,)`` per-word associations s(w, A, B).
        exact: whether all partitions were enumerated.
        n_partitions: partitions evaluated (C(2n, n) if exact, else n_permutations).
        ddof: the ddof of the standard deviation in d.
    """

    effect_size: float
    p_value: float
    statistic: float
    s_X: np.ndarray
    s_Y: np.ndarray
    exact: bool
    n_partitions: int
    ddof: int = 1


def _embeddings(M, name: str) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ZooauditError(f"{name} must be an (n_words, dim) array of embeddings; got shape {M.shape}.")
    if M.shape[0] == 0:
        raise ZooauditError(f"{name} is empty: every WEAT set needs at least one word.")
    if not np.all(np.isfinite(M)):
        raise ZooauditError(f"{name} contains NaN or infinite values.")
    norms = np.linalg.norm(M, axis=1)
    if np.any(norms == 0):
        raise ZooauditError(f"{name} row {int(np.flatnonzero(norms == 0)[0])} is the zero vector: "
                            f"its cosine similarity is undefined.")
    return M / norms[:, None]


def association(W, A, B) -> np.ndarray:
    """``s(w, A, B)`` for each row of ``W (m, dim)``: ``(m,)``."""
    W, A, B = _embeddings(W, "W"), _embeddings(A, "A"), _embeddings(B, "B")
    return (W @ A.T).mean(1) - (W @ B.T).mean(1)


def _partition_sums(s: np.ndarray, n: int, *, exact: bool, n_permutations: int, rng) -> np.ndarray:
    """Σ_{X'} s over equal-size partitions: all of them, or random ones without replacement."""
    if exact:
        combos = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(2 * n), n)),
                             dtype=np.int64).reshape(-1, n)
        return s[combos].sum(1)
    out = np.empty(n_permutations)
    for start in range(0, n_permutations, _MC_BATCH):
        b = min(_MC_BATCH, n_permutations - start)
        perm = rng.permuted(np.broadcast_to(np.arange(2 * n), (b, 2 * n)), axis=1)
        out[start:start + b] = s[perm[:, :n]].sum(1)
    return out


def weat(X, Y, A, B, *, n_permutations: int = 10_000, random_state=0, max_exact: int = MAX_EXACT,
         ddof: int = 1) -> WeatResult:
    """WEAT effect size and one-sided partition-test p-value.

    Args:
        X, Y: ``(n, dim)`` target-word embeddings, the same n (the test partitions X ∪ Y
            into equal halves).
        A, B: ``(n_a, dim)``, ``(n_b, dim)`` attribute-word embeddings (sizes may differ).
        n_permutations: random partitions when C(2n, n) > ``max_exact``.
        random_state: int, SeedSequence or Generator for the Monte Carlo partitions.
        ddof: 1 (default, sample std) or 0, for the std in the effect size.
    """
    Xn, Yn, An, Bn = (_embeddings(M, k) for M, k in ((X, "X"), (Y, "Y"), (A, "A"), (B, "B")))
    dims = {k: M.shape[1] for k, M in (("X", Xn), ("Y", Yn), ("A", An), ("B", Bn))}
    if len(set(dims.values())) != 1:
        raise ZooauditError(f"X, Y, A and B must share one embedding dimension; got {dims}.")
    if Xn.shape[0] != Yn.shape[0]:
        raise ZooauditError(f"WEAT needs target sets of equal size: |X| = {Xn.shape[0]}, |Y| = {Yn.shape[0]}. The "
                            f"permutation test splits X ∪ Y into equal halves; drop words to balance the sets.")
    if ddof not in (0, 1):
        raise ZooauditError(f"ddof must be 0 or 1; got {ddof!r}.")
    n = Xn.shape[0]
    s = np.concatenate([(W @ An.T).mean(1) - (W @ Bn.T).mean(1) for W in (Xn, Yn)])
    s_X, s_Y = s[:n], s[n:]
    sd = float(np.std(s, ddof=ddof))
    effect = float((s_X.mean() - s_Y.mean()) / sd) if sd > 0 else float("nan")
    n_total = math.comb(2 * n, n)
    exact = n_total <= max_exact
    if not exact and (not isinstance(n_permutations, (int, np.integer)) or n_permutations < 1):
        raise ZooauditError(f"n_permutations must be a positive integer when C(2n, n) = {n_total} exceeds "
                            f"max_exact = {max_exact}; got {n_permutations!r}.")
    # S(X', Y') = 2 Σ_{X'} s − Σ s, so comparing Σ_{X'} s with Σ_X s is the same test.
    sums = _partition_sums(s, n, exact=exact, n_permutations=n_permutations,
                           rng=np.random.default_rng(random_state))
    hits = np.count_nonzero(at_least(sums, float(s_X.sum())))
    p = hits / n_total if exact else (1 + hits) / (1 + n_permutations)
    return WeatResult(effect_size=effect, p_value=float(p), statistic=float(s_X.sum() - s_Y.sum()), s_X=s_X,
                      s_Y=s_Y, exact=exact, n_partitions=int(n_total if exact else n_permutations), ddof=ddof)


def weat_family(tests: dict, *, n_permutations: int = 10_000, random_state: int = 0, correction: str = "holm",
                alpha: float = 0.05, max_exact: int = MAX_EXACT, ddof: int = 1) -> xr.Dataset:
    """Run several WEATs and correct their p-values together.

    Args:
        tests: ``{name: (X, Y, A, B)}`` embedding arrays.
        random_state: test i draws its partitions from child i of
            ``SeedSequence(random_state)``, so appending a test leaves the others unchanged.
        correction: "holm" (default) or "bh".
    Returns:
        Dataset over dim ``test``: ``effect_size``, ``p_value``, ``p_adjusted``,
        ``reject``, ``n_targets``, ``exact``.
    """
    if not tests:
        raise ZooauditError("weat_family needs at least one test; got none.")
    seeds = np.random.SeedSequence(random_state).spawn(len(tests))
    res = {k: weat(*v, n_permutations=n_permutations, random_state=seed, max_exact=max_exact, ddof=ddof)
           for (k, v), seed in zip(tests.items(), seeds)}
    p = np.array([r.p_value for r in res.values()])
    p_adj, reject = adjust(p, method=correction, alpha=alpha)
    return xr.Dataset({"effect_size": ("test", [r.effect_size for r in res.values()]), "p_value": ("test", p),
                       "p_adjusted": ("test", p_adj), "reject": ("test", reject),
                       "n_targets": ("test", [r.s_X.size for r in res.values()]),
                       "exact": ("test", [r.exact for r in res.values()])},
                      coords={"test": list(map(str, res))},
                      attrs={"correction": correction, "alpha": alpha, "ddof": ddof, "alternative": "greater",
                             "n_permutations": n_permutations, "max_exact": max_exact})


# -- word sets and SEAT templates ---------------------------------------------------------


@dataclass
class WeatTest:
    """One test of a word-set file: names of its target (X, Y) and attribute (A, B) sets."""

    name: str
    X: str
    Y: str
    A: str
    B: str
    templates: str = "nouns"  # which SEAT frames suit the words: "nouns" or "names"


@dataclass
class WordSets:
    """Named word lists (targets, attributes) and the tests that pair them."""

    targets: dict[str, list[str]]
    attributes: dict[str, list[str]]
    tests: list[WeatTest] = field(default_factory=list)

    def words(self, test: WeatTest) -> tuple[list[str], list[str], list[str], list[str]]:
        """The X, Y, A, B word lists of ``test``."""
        return (self.targets[test.X], self.targets[test.Y], self.attributes[test.A], self.attributes[test.B])


def _word_list(section: str, name: str, words) -> list[str]:
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ZooauditError(f"{section} set {name!r} must be a non-empty list of non-empty strings; got {words!r}.")
    dupes = sorted({w for w in words if words.count(w) > 1})
    if dupes:
        raise ZooauditError(f"{section} set {name!r} lists {dupes} more than once; each word must appear once.")
    return [w.strip() for w in words]


def load_wordsets(path) -> WordSets:
    """Read a word-set file (``.yaml``/``.yml``/``.json``).

    Format::

        targets:    {name: [word, ...], ...}
        attributes: {name: [word, ...], ...}
        tests:      [{name, X, Y, A, B, templates?}, ...]   # X, Y: targets; A, B: attributes

    Every test's X and Y must have the same number of words.
    """
    path = Path(path)
    if not path.is_file():
        raise ZooauditError(f"word-set file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        doc = yaml.safe_load(text)
    elif path.suffix == ".json":
        doc = json.loads(text)
    else:
        raise ZooauditError(f"word-set file {path.name!r} has suffix {path.suffix!r}; allowed: .yaml, .yml, .json.")
    if not isinstance(doc, dict) or not {"targets", "attributes"} <= set(doc):
        raise ZooauditError(f"word-set file {path.name!r} must be a mapping with 'targets' and 'attributes' "
                            f"(and optionally 'tests'); got keys {sorted(doc) if isinstance(doc, dict) else doc!r}.")
    sets = {}
    for section in ("targets", "attributes"):
        if not isinstance(doc[section], dict) or not doc[section]:
            raise ZooauditError(f"'{section}' in {path.name!r} must map set names to word lists.")
        sets[section] = {str(k): _word_list(section, k, v) for k, v in doc[section].items()}
    tests = []
    for i, t in enumerate(doc.get("tests") or []):
        if not isinstance(t, dict) or not {"X", "Y", "A", "B"} <= set(t):
            raise ZooauditError(f"test #{i} in {path.name!r} needs keys X, Y (targets) and A, B (attributes); got {t!r}.")
        test = WeatTest(name=str(t.get("name", f"{t['X']}-{t['Y']}/{t['A']}-{t['B']}")), X=t["X"], Y=t["Y"],
                        A=t["A"], B=t["B"], templates=t.get("templates", "nouns"))
        for role, section in (("X", "targets"), ("Y", "targets"), ("A", "attributes"), ("B", "attributes")):
            if getattr(test, role) not in sets[section]:
                raise ZooauditError(f"test {test.name!r}: {role} = {getattr(test, role)!r} is not a {section} set. "
                                    f"Allowed: {', '.join(sorted(sets[section]))}.")
        nx, ny = len(sets["targets"][test.X]), len(sets["targets"][test.Y])
        if nx != ny:
            raise ZooauditError(f"test {test.name!r}: target sets {test.X!r} ({nx} words) and {test.Y!r} ({ny} words) "
                                f"differ in size; WEAT needs |X| = |Y|.")
        if test.templates not in TEMPLATE_SETS:
            raise ZooauditError(f"test {test.name!r}: templates {test.templates!r} unknown. "
                                f"Allowed: {', '.join(TEMPLATE_SETS)}.")
        tests.append(test)
    return WordSets(targets=sets["targets"], attributes=sets["attributes"], tests=tests)


def example_wordsets_path() -> Path:
    """Path of the example word-set file shipped with zooaudit."""
    return Path(__file__).resolve().parent.parent / "data" / "wordsets" / "example.yaml"


def _article(word: str) -> str:
    # Spelling heuristic; enough for bleached frames ("an hour" and "a unicorn" are rare in word sets).
    return "an" if word[:1].lower() in "aeiou" else "a"


def seat_sentences(words, templates=SEAT_TEMPLATES) -> list[str]:
    """Expand words into SEAT sentences, word-major: ``len(words) * len(templates)`` strings.

    Sentence ``i * len(templates) + j`` is template ``j`` filled with word ``i``. Templates
    use ``{word}``, and optionally ``{a}`` / ``{A}`` for the indefinite article. ``templates``
    may also be the name of a built-in set: "nouns" or "names".
    """
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ZooauditError(f"Unknown template set {templates!r}. Allowed: {', '.join(TEMPLATE_SETS)}.")
        templates = TEMPLATE_SETS[templates]
    if not templates:
        raise ZooauditError("templates is empty: give at least one template containing '{word}'.")
    for t in templates:
        fields = {f for _, f, _, _ in Formatter().parse(t) if f is not None}
        if "word" not in fields or not fields <= {"word", "a", "A"}:
            raise ZooauditError(f"template {t!r} must contain '{{word}}' and may use only {{word}}, {{a}}, {{A}}; "
                                f"it uses {sorted(fields)}.")
    if isinstance(words, str) or not words:
        raise ZooauditError(f"words must be a non-empty list of strings; got {words!r}.")
    return [t.format(word=w, a=_article(w), A=_article(w).capitalize()) for w in words for t in templates]
