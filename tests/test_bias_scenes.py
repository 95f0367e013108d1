"""The bias measures end to end on the generated scenes: a small CNN trained where the background
agrees with the class 95% of the time (torch.export program, a ``file:`` model), audited on the
balanced test split with its background-swapped counterfactual partners."""

import pytest
import torch
from torch import nn

from zooaudit import stages
from zooaudit.data import load_dataset
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.stages.registry import array_stage

pytestmark = pytest.mark.slow

OPTIONS = {"image_size": 16, "n_train": 1024, "n_test": 300, "classes": 2, "backgrounds": 2}


def _train(path):
    train = load_dataset(DatasetSpec(name="scenes", split="train", options=OPTIONS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # deterministic
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        x, y = torch.tensor(train.inputs), torch.tensor(train.labels)
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(15):
            for idx in torch.randperm(len(x), generator=g).split(128):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
        torch.export.save(torch.export.export(net.eval(), (x[:2],), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)),
                          str(path))
    finally:
        torch.set_num_threads(threads)


def test_background_shortcut_on_scenes(tmp_path):
    _train(tmp_path / "net.pt2")
    spec = AuditModelSpec(model=f"file:{tmp_path / 'net.pt2'}", store=f"file://{tmp_path / 'store'}", shard_size=100,
                          datasets=[DatasetSpec(name="scenes", options=OPTIONS)],
                          factorize={"k": 4, "methods": ["pca"], "seeds": [0]},
                          bias={"n_boot": 30, "n_permutations": 100, "probes": False})
    ref, _ = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)
    assert "counterfactual" in ref.controls          # swap_background partners, predicted on the model side
    bias = stages.run_bias(ref, spec.bias).summary
    bg = bias["background"]
    # trained on agreement 0.95 (the scenes train default: the 'auto' training side), audited where it is 1/2
    assert bg["amplification"]["directional_at"]["value"] > 0.2 and bg["amplification"]["directional_at"]["flagged"]
    top = bg["contextual"][0]
    assert top["bias"] > 2 and top["acc_exclusive"] < top["acc_cooccur"]
    assert bg["shortcut"]["flip_rate"] > 0.5
    assert bias["agrees"]["shortcut"]["flagged_groups"]                 # McNemar: the swap changes accuracy
    stages.run_factorize(ref, spec.factorize)
    stage = array_stage("bias-features")
    top_bg = stage.run(ref, stage.spec_of(spec)).summary["top_components"]["background=checks"][0]
    assert abs(top_bg["auc"] - 0.5) > 0.3 and top_bg["flagged"]       # the background is in the features
