"""Bad input: one clear paragraph naming the bad value and what is allowed, exit 2, no commit."""

import os

import pytest

from zooaudit_infra.cli import EXIT_BAD_INPUT, main


def _no_commits(store_dir):
    return not os.path.exists(os.path.join(store_dir, "models")) and not os.path.exists(
        os.path.join(store_dir, "zoo"))


@pytest.mark.parametrize("args,expected", [
    (["audit-zoo", "--models", "builtin:nope"], ["Unknown builtin model 'nope'", "mlp-w64-s0"]),
    (["audit-zoo", "--models", "builtin:mlp-w32-s0", "--dataset", "mnist"], ["unknown dataset 'mnist'",
                                                                              "colored-digits"]),
    (["audit-zoo", "--models", "builtin:mlp-w32-s0", "--layers", "conv9"], ["'conv9' is not in the model",
                                                                             "fc1, act1, fc2, embed, head"]),
    (["audit-zoo", "--models"], ["zoo is empty", "builtin:mlp-w64-s0"]),
    (["audit-model", "builtin:mlp-w32-s0", "--dataset", "colored-digits"], ["takes inputs of shape (1, 8, 8)"]),
    (["audit-zoo", "--models", "builtin:mlp-w32-s0", "--compare-layer", "fc9"], ["compare_layers ['fc9']",
                                                                                  "embed"]),
])
def test_bad_input_exits_2_with_a_clear_message_and_commits_nothing(args, expected, tmp_path, capsys):
    store = str(tmp_path / "store")
    rc = main([*args, "--store", store, "--threads"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT
    assert err.startswith("zooaudit: error:") and err.count("\n") == 1, err
    for fragment in expected:
        assert fragment in err
    assert _no_commits(store)


def test_unknown_store_scheme(tmp_path, capsys):
    rc = main(["audit-zoo", "--models", "builtin:mlp-w32-s0", "--store", "ftp://example/x"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "Unknown store URL scheme 'ftp'" in err and "s3://bucket/prefix" in err


def test_layers_command_lists_shapes(tmp_path, capsys):
    assert main(["layers", "builtin:cnn-w8-s0", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "(8, 8, 8)" in out and "embed" in out


def test_demo_snippet_reads_the_audits_activation_refs():
    """The line `zooaudit demo` prints at the end opens the first audited model's activations."""
    from types import SimpleNamespace

    from zooaudit_infra.cli import _snippet

    ref = SimpleNamespace(model_key="builtin-m-1", ds_key="digits-2", layers=["act1", "embed"])
    audit = SimpleNamespace(models=[SimpleNamespace(refs=[]), SimpleNamespace(refs=[ref])])
    line = _snippet("file:///s", audit)
    assert "model_repo('builtin-m-1')" in line and "'digits-2/acts/act1'" in line
    assert _snippet("file:///s", SimpleNamespace(models=[])) == ""
