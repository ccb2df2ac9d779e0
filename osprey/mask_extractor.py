"""Mask-aware visual extractor (spec section 4): each binary mask -> a mask token and a position token.

Computed in fp32 whatever the weights' dtype, as the official code does; empty masks yield bias-only tokens.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from osprey.config import ExtractorConfig

_LEVEL_NAMES = ("res2", "res3", "res4", "res5")
# Masks are resized in chunks so that a float copy of a chunk stays under this many elements (bounded memory for
# many masks on large images); chunking changes nothing numerically.
_RESIZE_CHUNK_ELEMENTS = 64 * 1024 * 1024


class MLP(nn.Module):
    """DETR-style MLP: Linear layers with ReLU between them (keys `layers.0..n-1`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = _linear_fp32(layer, x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), layer.weight.float(), layer.bias.float() if layer.bias is not None else None)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(Q, H, W) masks (any dtype) -> (Q, h, w) fp32, bilinear, align_corners=False, no antialias (as the spec)."""
    q, h0, w0 = masks.shape
    if q == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    chunk = max(1, _RESIZE_CHUNK_ELEMENTS // max(1, h0 * w0))
    parts = [
        F.interpolate(masks[i : i + chunk, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        for i in range(0, q, chunk)
    ]
    return torch.cat(parts)


def masks_to_boxes_masks(masks: torch.Tensor) -> torch.Tensor:
    """(Q, H, W) bool -> (Q, H, W) bool filled over each mask's bounding box (ablation: box instead of mask)."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    h, w = masks.shape[1:]
    r = torch.arange(h, device=masks.device)
    c = torch.arange(w, device=masks.device)
    r_min = torch.where(rows, r, h).min(dim=1).values
    r_max = torch.where(rows, r, -1).max(dim=1).values
    c_min = torch.where(cols, c, w).min(dim=1).values
    c_max = torch.where(cols, c, -1).max(dim=1).values
    in_rows = (r[None] >= r_min[:, None]) & (r[None] <= r_max[:, None])
    in_cols = (c[None] >= c_min[:, None]) & (c[None] <= c_max[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def masked_mean_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """features (C, h, w), masks (Q, H, W) -> (Q, C): mean of features over each mask resized to (h, w) and binarised.

    Official MaskPooling: bilinear resize, `> 0`, sum(F * m) / (sum(m) + 1e-8), so an empty mask pools to zeros.
    """
    return masked_mean_pool_batch(features[None], [masks])


def resize_mask_list(masks: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """Per-image mask stacks (Q_i, H_i, W_i) -> (Q_i, h, w) fp32; stacks of one shape are resized in one call."""
    out: list[torch.Tensor | None] = [None] * len(masks)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(masks):
        groups.setdefault(tuple(m.shape[1:]), []).append(i)
    for members in groups.values():
        resized = resize_masks(torch.cat([masks[i] for i in members]), size)
        for i, part in zip(members, resized.split([masks[i].shape[0] for i in members])):
            out[i] = part
    return out


def masked_mean_pool_batch(features: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """features (B, C, h, w), masks: per image (Q_i, H_i, W_i) -> (sum Q_i, C), image 0's regions first.

    One pooling for the whole batch: each image's binarised masks are padded to the batch's largest Q with
    empty masks, pooled by one batched einsum, and the padding rows dropped.
    """
    counts = [m.shape[0] for m in masks]
    longest = max(counts, default=0)
    if longest == 0:
        return features.new_zeros((0, features.shape[1]), dtype=torch.float32)
    binary = features.new_zeros((len(masks), longest, *features.shape[-2:]), dtype=torch.float32)
    for i, resized in enumerate(resize_mask_list(masks, tuple(features.shape[-2:]))):
        binary[i, : counts[i]] = (resized > 0).float()
    weights = binary / (binary.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    pooled = torch.einsum("bchw,bqhw->bqc", features.float(), weights)
    valid = torch.arange(longest, device=features.device)[None] < torch.tensor(counts, device=features.device)[:, None]
    return pooled[valid]


class MaskExtractor(nn.Module):
    """Pools every mask over the feature levels and fuses them into one LLM-width token, plus a position token."""

    def __init__(self, config: ExtractorConfig, level_channels: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        self.config = config
        for index in config.levels:
            setattr(self, _LEVEL_NAMES[index], nn.Linear(level_channels[index], config.hidden_size))
        self.feat_linear = nn.Linear(config.hidden_size, out_dim)
        if config.use_position_token:
            self.mask_linear = MLP(config.mask_size * config.mask_size, config.hidden_size, out_dim, 3)

    def reset_parameters(self) -> None:
        """Official fresh initialisation (stage-2 start): Linear weights N(0, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(
        self, levels: list[torch.Tensor], masks: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """levels: the 4 maps (B, C_l, h_l, w_l) of a batch; masks: per image a (Q_i, H_i, W_i) stack, any size.

        Returns mask tokens (sum Q_i, D) fp32 and position tokens (sum Q_i, D) fp32 (None when the config has
        none), image 0's regions first. The whole batch goes through each step at once.
        """
        if len(masks) != levels[0].shape[0]:
            raise ValueError(f"got mask stacks for {len(masks)} images but features for {levels[0].shape[0]}")
        for m in masks:
            if m.dim() != 3:
                raise ValueError(f"masks must be (Q, H, W) per image, got shape {tuple(m.shape)}")
        device = levels[0].device
        masks = [m.to(device=device) for m in masks]
        if self.config.mask_from_box:
            masks = [masks_to_boxes_masks(m > 0) for m in masks]
        with torch.autocast(device_type=device.type, enabled=False):
            fused = None
            for index in self.config.levels:
                features = levels[index]
                pooled = masked_mean_pool_batch(features, masks)
                projected = _linear_fp32(getattr(self, _LEVEL_NAMES[index]), pooled)
                # The official code stores each level's output in the features' dtype before summing.
                projected = projected.to(features.dtype).float()
                fused = projected if fused is None else fused + projected
            mask_tokens = _linear_fp32(self.feat_linear, fused)
            pos_tokens = None
            if self.config.use_position_token:
                size = self.config.mask_size
                small = torch.cat(resize_mask_list(masks, (size, size))).reshape(-1, size * size)
                pos_tokens = self.mask_linear(small)
        return mask_tokens, pos_tokens
