"""Patch tokens of vision transformers as a spatial map, so the CAM family reads ViTs too.

A timm ViT / DeiT block's output is ``(sample, token, channel)``: ``P`` prefix tokens first
(``P = model.num_prefix_tokens``: CLS, DeiT's distillation token, register tokens), then the
``gy·gx`` patch tokens in row-major order of the patch grid (``model.patch_embed.grid_size``;
for a model built with ``dynamic_img_size`` the grid of the actual input,
``patch_embed.dynamic_feat_size``). :class:`PatchTokenLayout` drops the prefix tokens and
reshapes the patch tokens to ``(sample, channel, gy, gx)`` — the layout a conv layer's output
has — so Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, Layer-CAM, CF-CAM, Score-CAM and Eigen-CAM run
unchanged, and their maps explain the patches only (the prefix tokens have no place in the
image). This is pytorch-grad-cam's ``reshape_transform`` for ViTs
(``tensor[:, 1:].reshape(b, gy, gx, c)`` then channels first), generalised to any number of
prefix tokens and with the token count checked.

:func:`zooaudit.attribution_maps.attribution_maps` applies the layout itself when the model
has one (:func:`patch_token_layout`) and the chosen layer's output is ``(batch, token,
channel)``; the stored maps' attrs then say so (:meth:`PatchTokenLayout.attrs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ZooauditError

__all__ = ["PatchTokenLayout", "default_token_layer", "patch_token_layout"]


@dataclass(frozen=True)
class PatchTokenLayout:
    """``n_prefix`` prefix tokens, then a ``grid = (gy, gx)`` of patch tokens (row-major)."""

    n_prefix: int
    grid: tuple[int, int]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.grid[0] * self.grid[1]

    def to_grid(self, tokens: torch.Tensor, layer: str = "") -> torch.Tensor:
        """``(batch, token, channel)`` → ``(batch, channel, gy, gx)``, the prefix tokens dropped.

        Raises :class:`ZooauditError` when the token count is not ``n_prefix + gy·gx``."""
        if tokens.ndim != 3 or tokens.shape[1] != self.n_tokens:
            shape = tuple(tokens.shape)
            raise ZooauditError(
                f"Layer {layer!r} gives {shape}; a patch-token layer of this model is (batch, token, channel) with "
                f"{self.n_tokens} tokens = {self.n_prefix} prefix (CLS/distillation) + {self.grid[0]}×{self.grid[1]} "
                "patches. Choose a transformer block's output or its norm1 (e.g. blocks.<last>.norm1).")
        b, _, c = tokens.shape
        return tokens[:, self.n_prefix:].reshape(b, self.grid[0], self.grid[1], c).permute(0, 3, 1, 2)

    def to_tokens(self, tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``tokens`` with its patch tokens taken from ``grid`` ``(batch, channel, gy, gx)``: equal
        values, but the patch tokens now flow through ``grid`` in the autograd graph (so the
        gradient of a later score with respect to ``grid`` is the patch tokens' gradient)."""
        return torch.cat([tokens[:, :self.n_prefix], grid.flatten(2).transpose(1, 2)], 1)

    def attrs(self) -> dict:
        """What the stored maps record: the prefix tokens excluded and the patch grid."""
        return {"token_layout": "patch tokens reshaped to the patch grid; prefix tokens (CLS, distillation) "
                                "excluded from the maps",
                "prefix_tokens_excluded": int(self.n_prefix), "token_grid": [int(g) for g in self.grid]}


def patch_token_layout(module: torch.nn.Module, input_hw: tuple[int, int] | None = None) -> PatchTokenLayout | None:
    """The patch-token layout of a timm-style vision transformer, or None for any other model.

    A model has one when it exposes ``num_prefix_tokens`` (int) and ``patch_embed.grid_size``
    (timm's ``VisionTransformer`` and ``VisionTransformerDistilled``, i.e. ViT and DeiT). For a
    model built with ``dynamic_img_size`` the grid is the one of ``input_hw`` (the input's
    ``(H, W)``), from ``patch_embed.dynamic_feat_size``.
    """
    n_prefix = getattr(module, "num_prefix_tokens", None)
    embed = getattr(module, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if isinstance(n_prefix, bool) or not isinstance(n_prefix, int) or grid is None:
        return None
    if getattr(module, "dynamic_img_size", False) and input_hw is not None and hasattr(embed, "dynamic_feat_size"):
        grid = embed.dynamic_feat_size(tuple(input_hw))
    return PatchTokenLayout(n_prefix, (int(grid[0]), int(grid[1])))


def default_token_layer(module: torch.nn.Module) -> str | None:
    """The layer CAMs read on a vision transformer by default: the last block's ``norm1``.

    Why not the last block's output: a ViT classifies from the CLS token (timm's
    ``global_pool='token'``), and after the last block the patch tokens reach the head through
    nothing (the final norm is per token), so their gradient is zero and every gradient CAM
    would be empty. The last block's ``norm1`` feeds that block's attention, where the CLS
    query reads the patch tokens: it is the latest layer whose patch tokens the class score
    depends on, and the one pytorch-grad-cam's ViT example uses (``model.blocks[-1].norm1``).
    None when the model has no ``blocks`` with a ``norm1``.
    """
    blocks = getattr(module, "blocks", None)
    if blocks is None or not len(blocks) or not hasattr(blocks[-1], "norm1"):
        return None
    names = {id(m): n for n, m in module.named_modules()}
    return names.get(id(blocks[-1].norm1))
