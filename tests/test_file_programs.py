"""The four kinds of model file a user brings, audited end to end (issue 18).

One two-convolution CNN (3×32×32 inputs, 3 classes) saved as a ``torch.export`` program
with a dynamic batch, a scripted and a traced TorchScript archive, plus a torchvision
ResNet-18 checkpoint (safetensors) named with ``?arch=``; audited as one zoo under a real
(temporary) Prefect server on an ``arrays`` ``.npz`` and an ``image-folder``, both with a
group attribute, unpooled (Eigen-CAM maps), every stage run. The three programs of the one
network must store the same activations.
"""

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file
from torch import nn

from zooaudit import layout
from zooaudit.specs import AuditZooSpec, DatasetSpec
from zooaudit.store import Store

pytestmark = pytest.mark.slow

N = 40


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def prefect(local_stack):
    """The session stack's Prefect server: one server for the whole suite rather than a
    temporary one per module (each costs ~15 s to start on the 2-core CI box)."""
    yield local_stack


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image
    from torchvision.models import resnet18

    tmp = tmp_path_factory.mktemp("programs")
    torch.manual_seed(0)
    net, x = TwoConv().eval(), torch.randn(4, 3, 32, 32)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)),
                      tmp / "net.pt2")
    torch.jit.save(torch.jit.script(net), str(tmp / "scripted.ts"))
    torch.jit.save(torch.jit.trace(net, x), str(tmp / "traced.ts"))
    save_file(resnet18(num_classes=3).state_dict(), str(tmp / "r18.safetensors"))
    rng = np.random.default_rng(0)
    images = rng.random((N, 3, 32, 32), dtype=np.float32)
    np.savez(tmp / "x.npz", inputs=images, labels=rng.integers(0, 3, N), group_background=rng.integers(0, 2, N))
    rows = ["path,site"]
    for i, img in enumerate((images * 255).astype(np.uint8)):
        cls = ("cat", "dog")[i % 2]
        (tmp / "imgs" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(tmp / "imgs" / cls / f"im{i}.png")
        rows.append(f"{cls}/im{i}.png,{'ab'[i % 3 == 0]}")
    (tmp / "imgs" / "groups.csv").write_text("\n".join(rows) + "\n")
    shape = "input_shape=3x32x32"
    models = {"export": f"file:{tmp / 'net.pt2'}", "scripted": f"file:{tmp / 'scripted.ts'}?{shape}",
              "traced": f"file:{tmp / 'traced.ts'}?{shape}",
              "checkpoint": f"file:{tmp / 'r18.safetensors'}?arch=torchvision:resnet18%3Fnum_classes%3D3%26{shape}"}
    return tmp, models


def test_four_program_kinds_audited_on_arrays_and_an_image_folder(prefect, files, tmp_path):
    from zooaudit_flows.audit_zoo import audit_zoo

    tmp, models = files
    store_url = f"file://{tmp_path / 'store'}"
    cnn_layers = ["conv1", "conv2", "pool"]
    spec = AuditZooSpec(
        models=list(models.values()), store=store_url, task_runner="threads", shard_size=20, batch_size=16,
        pooling="none", compare_layers=["pool"],
        model_layers={**{models[k]: cnn_layers for k in ("export", "scripted", "traced")},
                      models["checkpoint"]: ["layer4", "avgpool"]},
        datasets=[DatasetSpec(name="arrays", path=str(tmp / "x.npz")),
                  DatasetSpec(name="image-folder", path=str(tmp / "imgs"))],
        factorize={"methods": ["pca", "eigencam"], "k": 3, "k_sweep": [2], "seeds": [0]},
        similarity={"control": "shuffle"},   # the random-init control is covered by test_flows
        bias={"n_boot": 20, "probe_cv": 3})
    result = audit_zoo(spec)

    store = Store.open(store_url)
    by_model = {a.model: a for a in result.models}
    assert set(by_model) == set(models.values())
    acts = {}
    for kind, uri in models.items():
        audit = by_model[uri]
        stages = {(r.stage, r.dataset) for r in audit.results}
        assert {s for s, _ in stages} >= {"activations", "factorize", "similarity", "bias"}, (kind, stages)
        assert {ref.dataset.name for ref in audit.refs} == {"arrays", "image-folder"}
        for ref in audit.refs:
            bias = next(r for r in audit.results if r.stage == "bias" and r.dataset == ref.ds_key)
            attr = "background" if ref.dataset.name == "arrays" else "site"
            assert attr in str(bias.summary), (kind, bias.summary)
            session = store.model_repository(ref.model_key).session(ref.snapshot)
            if kind != "checkpoint":
                acts[(kind, ref.dataset.name)] = layout.open_activations(session.store, ref.ds_key, "conv2").values
                fac = next(r for r in audit.results if r.stage == "factorize" and r.dataset == ref.ds_key)
                repo = store.model_repository(ref.model_key)
                cam = xr.open_zarr(repo.session(fac.snapshot).store, consolidated=False,
                                   group=layout.factors_group(ref.ds_key, "conv2", "eigencam"))
                assert cam["heatmap"].shape == (N, 32, 32) and np.isfinite(cam["heatmap"].values).all()
    for name in ("arrays", "image-folder"):
        ref = acts[("export", name)]
        assert ref.shape == (N, 8, 32, 32)
        for kind in ("scripted", "traced"):
            np.testing.assert_allclose(acts[(kind, name)], ref, rtol=1e-5, atol=1e-6)
    # the three programs of one network are one representation: CKA 1 at the compare layer
    zoo = [r for r in result.zoo_results if r.stage == "zoo-similarity"]
    assert len(zoo) == 2
    for r in zoo:
        cka = np.asarray(r.summary["linear_cka"]["pool"])
        assert cka.shape == (3, 3)
        np.testing.assert_allclose(cka, 1.0, atol=1e-6)
