"""Bad input, as a table (issue 18): every case exits 2 with one clear paragraph — never a
traceback — and leaves the store byte-for-byte unchanged (every file hashed before and after).

The table in ``docs/reliability.md`` is generated from :data:`CASES`; regenerate it with
``.venv/bin/python tests/test_bad_input_table.py --write``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

M = "builtin:mlp-w32-s0"
R18 = "torchvision:resnet18?input_shape=3x8x8"
DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"

# (id, what is wrong, CLI arguments with {d} = the folder of bad files, fragments the error must contain)
CASES: list[tuple[str, str, list[str], list[str]]] = [
    ("model-unknown-builtin", "builtin model that does not exist", ["audit-zoo", "--models", "builtin:nope"],
     ["Unknown builtin model 'nope'", "mlp-w64-s0"]),
    ("model-unknown-scheme", "model URI scheme", ["audit-zoo", "--models", "foo:bar"],
     ["Unknown model scheme 'foo'", "torchvision"]),
    ("model-missing-file", "model file that does not exist", ["audit-zoo", "--models", "file:{d}/missing.pt2"],
     ["does not exist"]),
    ("model-truncated-safetensors", "truncated safetensors checkpoint",
     ["audit-zoo", "--models", f"file:{{d}}/trunc.safetensors?arch={M}"], ["truncated safetensors file"]),
    ("model-code-pickle", "checkpoint pickle that would run code",
     ["audit-zoo", "--models", f"file:{{d}}/evil.pt?arch={M}"], ["Refused to load", "arbitrary code"]),
    ("model-unknown-option", "unknown option in a model URI",
     ["audit-zoo", "--models", "file:{d}/trunc.safetensors?colour=red"], ["Unknown option(s) ['colour']", "arch"]),
    ("model-bad-input-shape", "input_shape that is not CxHxW",
     ["audit-zoo", "--models", "torchvision:resnet18?input_shape=3xAx3"], ["Bad input_shape '3xAx3'", "3x32x32"]),
    ("model-bad-num-classes", "num_classes that is not an integer",
     ["audit-zoo", "--models", "torchvision:resnet18?num_classes=abc"], ["num_classes='abc'", "integer"]),
    ("layer-unknown", "layer not in the model", ["audit-zoo", "--models", M, "--layers", "conv9"],
     ["'conv9' is not in the model", "embed"]),
    ("layer-compare-unknown", "compare layer no model audits",
     ["audit-zoo", "--models", M, "--compare-layer", "fc9"], ["compare_layers ['fc9']", "embed"]),
    ("zoo-empty", "empty zoo", ["audit-zoo", "--models"], ["zoo is empty"]),
    ("dataset-unknown", "dataset name", ["audit-zoo", "--models", M, "--dataset", "mnist"],
     ["unknown dataset 'mnist'", "image-folder"]),
    ("dataset-missing", "arrays file that does not exist",
     ["audit-zoo", "--models", M, "--dataset", "arrays={d}/missing.npz"], ["does not exist"]),
    ("dataset-corrupt", "arrays file that is not a .npz",
     ["audit-zoo", "--models", M, "--dataset", "arrays={d}/corrupt.npz"], ["not a valid .npy / .npz file"]),
    ("dataset-wrong-shape", "samples of another shape than the model's inputs",
     ["audit-zoo", "--models", M, "--dataset", "arrays={d}/wide.npz"], ["takes inputs of shape (1, 8, 8)"]),
    ("dataset-nan", "NaN inputs", ["audit-zoo", "--models", M, "--dataset", "arrays={d}/nan.npz"],
     ["NaN or ±Inf in 20 sample(s)", "finite inputs"]),
    ("dataset-empty", "no samples", ["audit-zoo", "--models", M, "--dataset", "arrays={d}/empty.npz"],
     ["is empty"]),
    ("dataset-label-length", "labels of another length than the inputs",
     ["audit-zoo", "--models", M, "--dataset", "arrays={d}/short.npz"], ["labels has shape (19,); expected (20,)"]),
    ("dataset-not-multi-hot", "multi-hot label sets that hold a value other than 0/1",
     ["audit-zoo", "--models", M, "--dataset", "arrays={d}/sets.npz"],
     ["label_sets is not multi-hot: row 1, column 1 holds 2", "0 or 1 only"]),
    ("dataset-object-array", "arrays that need unpickling",
     ["audit-zoo", "--models", M, "--dataset", "arrays={d}/obj.npy"], ["without unpickling"]),
    ("dataset-non-utf8", "text file that is not UTF-8", ["audit-zoo", "--models", M, "--dataset", "text={d}/latin1.txt"],
     ["is not UTF-8", "line 1"]),
    ("dataset-path-traversal", "group file naming ../../etc/passwd",
     ["audit-zoo", "--models", R18, "--dataset", "image-folder={d}/imgs"], ["has no row for 4 image(s)"]),
    ("dataset-empty-folder", "image folder without class folders",
     ["audit-zoo", "--models", R18, "--dataset", "image-folder={d}/emptydir"], ["has no class sub-folders"]),
    ("spec-max-samples-0", "max_samples at 0 (bound: ≥ 1)", ["audit-zoo", "--models", M, "--max-samples", "0"],
     ["max_samples", "greater than or equal to 1"]),
    ("spec-max-samples-negative", "max_samples below its bound", ["audit-zoo", "--models", M, "--max-samples", "-5"],
     ["max_samples", "greater than or equal to 1"]),
    ("spec-k-0", "k at 0 (bound: ≥ 1)", ["audit-zoo", "--models", M, "--k", "0"],
     ["factorize.k", "greater than or equal to 1"]),
    ("spec-k-sweep-0", "k_sweep with 0", ["audit-zoo", "--models", M, "--k-sweep", "0"],
     ["k_sweep must list distinct positive integers"]),
    ("spec-metric", "similarity metric", ["audit-zoo", "--models", M, "--metric", "nonsense"],
     ["unknown similarity metric(s) ['nonsense']", "linear_cka"]),
    ("spec-factorize", "factorization method", ["audit-zoo", "--models", M, "--factorize", "bogus"],
     ["unknown factorization method(s) ['bogus']", "nmf"]),
    ("spec-device", "device name", ["audit-zoo", "--models", M, "--device", "tpu"], ["bad device 'tpu'", "cuda:N"]),
    ("spec-device-absent", "CUDA device this machine lacks", ["audit-zoo", "--models", M, "--device", "cuda:7"],
     ["Device 'cuda:7' requested for extraction", "Allowed here"]),
    ("store-scheme", "store URL scheme", ["audit-zoo", "--models", M, "--store", "ftp://x/y"],
     ["Unknown store URL scheme 'ftp'", "s3://bucket/prefix"]),
    ("tag-bad", "tag with a space and '!'", ["audit-zoo", "--models", M, "--tag", "bad tag!"],
     ["Bad tag name 'bad tag!'", "letters, digits"]),
    ("manifest-missing", "zoo manifest that does not exist", ["audit-zoo", "--manifest", "{d}/missing.yaml"],
     ["does not exist"]),
    ("diff-unknown-version", "diff against versions that do not exist", ["diff", "seed", "nope-tag", "nope2"],
     ["Unknown version 'nope-tag'"]),
    ("history-unknown-model", "history of a model never audited", ["history", "builtin:nope"],
     ["No repository", "Models in this store"]),
    ("show-bad-group", "group path with '..'", ["show", "seed", "--group", "../../x"],
     ["Bad group path '../../x'", "inside the repository"]),
]


def make_bad_files(d: Path) -> None:
    """The bad inputs the cases name (``{d}``)."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 8, 8), dtype=np.float32)
    np.savez(d / "nan.npz", inputs=np.full_like(x, np.nan), labels=np.arange(20) % 3)
    np.savez(d / "short.npz", inputs=x, labels=np.arange(19) % 3)
    np.savez(d / "sets.npz", inputs=x, label_sets=np.eye(3, dtype=np.int64)[np.arange(20) % 3] * [[1, 2, 1]])
    np.savez(d / "empty.npz", inputs=x[:0])
    np.savez(d / "wide.npz", inputs=rng.random((20, 3, 32, 32), dtype=np.float32))
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04garbage" * 10)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (d / "evil.pt").write_bytes(pickle.dumps({"state_dict": _Evil(str(d / "PWNED"))}))
    (d / "imgs" / "cls").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / "imgs" / "cls" / f"{i}.png")
    (d / "imgs" / "groups.csv").write_text("path,site\n../../etc/passwd,a\n")
    (d / "emptydir").mkdir(exist_ok=True)


class _Evil:
    """Unpickling this would create a file: the checkpoint loader must never do it."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def store_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A store holding committed results and trained builtin weights, and the bad files."""
    from zooaudit.store import Store
    from zooaudit_infra.cli import main

    tmp = tmp_path_factory.mktemp("bad-input")
    store = tmp / "store"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["layers", M, "--store", str(store)]) == 0        # trains and stores the weights
    import zarr

    def write(session):
        zarr.create_array(session.store, name="seed/values", data=np.arange(10.0))
    Store.open(str(store)).model_repository("seed").commit(write, message="seed", metadata={"stage": "seed"})
    make_bad_files(tmp / "files")
    return store, tmp / "files"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_the_problem_and_changes_nothing(case, seeded, capsys):
    from zooaudit_infra.cli import EXIT_BAD_INPUT, main

    store, files = seeded
    _, _, args, expected = case
    args = [a.replace("{d}", str(files)) for a in args]
    if "--store" not in args:
        args += ["--store", str(store)]
    if args[0].startswith("audit"):
        args.append("--threads")
    before = store_digest(store)
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_BAD_INPUT, err
    assert err.startswith("zooaudit: error:") and "Traceback" not in err, err
    for fragment in expected:
        assert fragment in err, err
    assert store_digest(store) == before
    assert not (files / "PWNED").exists()


def render() -> str:
    rows = "\n".join(f"| {i} | `{cid}` | {what} | `zooaudit {' '.join(args)}` | {'; '.join(f'“{e}”' for e in exp)} |"
                     for i, (cid, what, args, exp) in enumerate(CASES, 1))
    from test_spec_bounds import bound_rows

    bounds = "\n".join(f"| `{field}` | {bound} | `{value}` | {message} |" for field, bound, value, message in bound_rows())
    return f"""# Reliability: bad input

Generated from `tests/test_bad_input_table.py` (`.venv/bin/python tests/test_bad_input_table.py --write`);
do not edit by hand. Every case below is run by the test suite against a store that holds
committed results and trained weights: the command exits with code 2, prints one paragraph
starting `zooaudit: error:` that contains the quoted fragments (what is wrong and what is
allowed) and no traceback, and every file of the store is byte-for-byte the same afterwards
(SHA-256 of each file before and after). `{{d}}` is a folder of bad files the test writes.
The checkpoint pickle that would create a file when unpickled is refused, and the file is
never created.

| # | case | what is wrong | command | the error says |
| --- | --- | --- | --- | --- |
{rows}

### Spec fields at and beyond their bounds

Generated from the specs' own declarations by `tests/test_spec_bounds.py`: every bounded numeric
field of every spec validates at its bound, and one step beyond it is refused with the line below
(what the CLI prints after `zooaudit: error: invalid parameters —`; a deployment run or a UI
form gets the same validation). Sub-specs are validated inside the audit spec that carries them.

| field | bound | value tried | the error says |
| --- | --- | --- | --- |
{bounds}
"""


def _hand_written(text: str) -> str:
    """The sections after the generated table (``## ...``: the fault-injection figures), kept by --write."""
    return text[i:] if (i := text.find("\n## ")) >= 0 else ""


def test_reliability_doc_is_generated_from_the_cases():
    text = DOC.read_text()
    assert text == render() + _hand_written(text), "regenerate: .venv/bin/python tests/test_bad_input_table.py --write"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(render() + _hand_written(DOC.read_text()))
        print(f"wrote {os.path.relpath(DOC)}")
