"""TCAV: concept sensitivity against random concepts, on planted directions and a real torch model."""

import numpy as np
import pytest
import torch

from zooaudit.analysis.tcav import (
    concept_activation_vector,
    tcav,
    tcav_score,
)
from zooaudit.gradients import layer_gradients
from zooaudit.errors import ZooauditError


def _planted(seed=0, d=16, n=80):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    w /= np.linalg.norm(w)
    ortho = rng.normal(size=d)
    ortho -= (ortho @ w) * w
    ortho /= np.linalg.norm(ortho)
    grads = w + 0.8 * rng.normal(size=(n, d))       # the class logit mostly rises along w
    randoms = [rng.normal(size=(40, d)) for _ in range(10)]
    return rng, w, ortho, grads, randoms


def test_concept_along_the_gradient_is_significant_and_orthogonal_is_not():
    rng, w, ortho, grads, randoms = _planted()
    aligned = rng.normal(size=(40, w.size)) + 2.5 * w
    res = tcav(grads, aligned, randoms, random_state=0)
    assert res.score > 0.8 and res.significant and res.p_value < 1e-3
    assert np.all(res.cav_accuracy > 0.9)
    sideways = rng.normal(size=(40, w.size)) + 2.5 * ortho
    res = tcav(grads, sideways, randoms, random_state=0)
    assert 0.25 < res.score < 0.75 and not res.significant
    # The CAV points toward the concept: flipping the roles flips the orientation.
    v, _ = concept_activation_vector(aligned, randoms[0])
    assert v @ w > 0.8 and concept_activation_vector(randoms[0], aligned)[0] @ w < -0.8
    assert tcav_score(grads, w) > 0.8 and tcav_score(grads, -w) < 0.2


def test_layer_gradients_equal_the_analytic_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    g = layer_gradients(model, x, "1", target=2, batch_size=3)
    # logit_2 = W2[2] · tanh(...) + b: its gradient w.r.t. the Tanh output is W2[2] for every input.
    np.testing.assert_allclose(g, np.tile(model[2].weight[2].detach().numpy(), (10, 1)), atol=1e-6)
    g0 = layer_gradients(model, x, "0", target=0)
    h = model[0](torch.from_numpy(x))
    want = (1 - torch.tanh(h) ** 2) * model[2].weight[0]
    np.testing.assert_allclose(g0, want.detach().numpy(), atol=1e-6)


def test_bad_input():
    _, w, _, grads, randoms = _planted()
    with pytest.raises(ZooauditError, match="at least 2 random sets"):
        tcav(grads, randoms[0], randoms[:1])
    with pytest.raises(ZooauditError, match="differ in width"):
        concept_activation_vector(randoms[0], randoms[1][:, :5])
    with pytest.raises(ZooauditError, match="units but the CAV"):
        tcav_score(grads, w[:3])
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(ZooauditError, match="not in the model"):
        layer_gradients(model, np.zeros((2, 4), np.float32), "nope", target=0)
    with pytest.raises(ZooauditError, match="out of range"):
        layer_gradients(model, np.zeros((2, 4), np.float32), "0", target=5)


def test_colour_concept_drives_the_shortcut_model(shared_store):
    """The colored-digits CNN learnt colour as a shortcut for its label (colour = label 90% of the
    time in training): the concept 'green' raises the logit of class 1 (green's label), 'red' does not."""
    from zooaudit.gradients import concept_sensitivity
    from zooaudit.data import load_dataset
    from zooaudit.store import Store
    from zooaudit.zoo import resolve_model

    model = resolve_model("builtin:cnn-colored-w16-s0", Store(shared_store)).module
    data = load_dataset({"name": "colored-digits", "color_flip": 0.5})
    colour, x = data.groups["colour"], data.inputs
    class1 = x[data.labels == 1][:100]
    kw = {"n_random": 10, "random_size": 40, "random_state": 0}
    green = concept_sensitivity(model, "embed", class1, 1, x[colour == 1][:40], x, **kw)
    red = concept_sensitivity(model, "embed", class1, 1, x[colour == 0][:40], x, **kw)
    assert green.score > 0.8 and green.significant
    assert red.score < 0.2 and red.significant
