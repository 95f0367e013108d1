"""A toy classifier whose evidence is known exactly, for the removal-curve tests
(test_faithfulness, test_road): the logits are ``(w·x, 0)``."""

import torch
from torch import nn


class Weighted(nn.Module):
    """Logits (w·x, 0): the evidence for class 0 is exactly the pixel weights ``w``.

    ``w``: ``(channel, H, W)`` (or anything that broadcasts against the input ``(n, channel, H, W)``);
    ``forward`` returns ``(n, 2)``, so ``p(class 0) = σ(w·x)``.
    """

    def __init__(self, w):
        super().__init__()
        self.w = torch.as_tensor(w, dtype=torch.float32)

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)
