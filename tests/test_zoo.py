import os

import pytest

from zooaudit.errors import ZooauditError
from zooaudit.store import Store
from zooaudit.zoo import resolve_model, weights_hash
from zooaudit.zoo.builtin import (
    BUILTIN_ZOO,
    CHECKPOINT_EPOCHS,
    default_zoo,
    train,
    weights_file,
)


def test_builtin_zoo_has_at_least_six_models_with_checkpoints():
    assert len(default_zoo()) >= 6
    assert len(CHECKPOINT_EPOCHS) >= 2
    assert any(s.train_data["name"] == "colored-digits" for s in BUILTIN_ZOO.values())


def test_training_is_bitwise_deterministic():
    a = train(BUILTIN_ZOO["mlp-w32-s0"], epochs=(1, 2))
    b = train(BUILTIN_ZOO["mlp-w32-s0"], epochs=(1, 2))
    assert weights_hash(a[2]) == weights_hash(b[2])
    assert weights_hash(a[1]) != weights_hash(a[2])


def test_weights_saved_in_store_and_not_retrained(store_url):
    store = Store.open(store_url)
    m = resolve_model("builtin:mlp-w32-s0", store)
    path = weights_file(store, "mlp-w32-s0", max(CHECKPOINT_EPOCHS))
    assert os.path.exists(path)
    mtime = os.path.getmtime(path)
    again = resolve_model("builtin:mlp-w32-s0", store)
    assert os.path.getmtime(path) == mtime
    assert again.content_hash == m.content_hash
    early = resolve_model(f"builtin:mlp-w32-s0@{CHECKPOINT_EPOCHS[0]}", store)
    assert early.content_hash != m.content_hash


@pytest.mark.parametrize("uri,match", [
    ("builtin:nope", "Unknown builtin model 'nope'.*mlp-w64-s0"),
    ("hub:bert", "Unknown model scheme 'hub'.*builtin"),
    ("mlp-w64-s0", "expected '<scheme>:<name>'"),
    ("builtin:mlp-w64-s0@7", "Allowed epochs"),
])
def test_bad_model_uris(uri, match, store_url):
    with pytest.raises(ZooauditError, match=match):
        resolve_model(uri, Store.open(store_url))


def test_shortcut_sweep_worst_group_accuracy_rises_with_flip(store_url):
    """Weaker shortcut (larger colour flip) ⇒ higher worst-group accuracy on the balanced set: monotone."""
    import numpy as np
    import torch

    from zooaudit.analysis.bias import group_metrics
    from zooaudit.data import load_dataset
    from zooaudit.specs import DatasetSpec
    from zooaudit.zoo.builtin import shortcut_sweep

    test = load_dataset(DatasetSpec(name="colored-digits"))
    store = Store.open(store_url)
    wga = []
    for uri in shortcut_sweep().values():
        model = resolve_model(uri, store).module
        with torch.no_grad():
            pred = model(torch.from_numpy(test.inputs)).argmax(1).numpy()
        wga.append(group_metrics(test.labels, pred, test.groups["colour"], n_boot=0).worst_group_accuracy)
    assert list(shortcut_sweep()) == sorted(shortcut_sweep()) and len(wga) >= 4
    assert np.all(np.diff(wga) > 0), wga


def test_default_compare_layers_fall_back_to_the_deepest_shared_layer():
    from zooaudit.stages.validate import default_compare_layers

    assert default_compare_layers([["fc1", "embed", "head"], ["conv1", "embed"]]) == ["embed"]
    # a zoo of file models has no 'embed': the deepest layer every model audits
    assert default_compare_layers([["conv1", "conv2", "pool"], ["conv1", "pool", "fc"]]) == ["pool"]
    assert default_compare_layers([["conv1", "conv2", "pool"]]) == ["pool"]
    assert default_compare_layers([["a"], ["b"]]) == []
