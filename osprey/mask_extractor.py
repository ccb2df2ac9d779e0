"""Mask-aware visual extractor (spec section 4): each binary mask -> a mask token and a position token.

Computed in fp32 whatever the weights' dtype, as the official code does; empty masks yield bias-only tokens.
"""

from __future__ import annotations

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
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

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
    binary = (resize_masks(masks, features.shape[-2:]) > 0).float()
    weights = binary / (binary.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("chw,qhw->qc", features.float(), weights)


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

    def forward(self, levels: list[torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """levels: 4 maps (C_l, h_l, w_l) of ONE image; masks: (Q, H0, W0) of that image, any size.

        Returns mask tokens (Q, D) fp32 and position tokens (Q, D) fp32 (None when the config has none).
        """
        if masks.dim() != 3:
            raise ValueError(f"masks must be (Q, H, W), got shape {tuple(masks.shape)}")
        masks = masks.to(device=levels[0].device)
        if self.config.mask_from_box:
            masks = masks_to_boxes_masks(masks > 0)
        with torch.autocast(device_type=masks.device.type, enabled=False):
            fused = None
            for index in self.config.levels:
                features = levels[index]
                pooled = masked_mean_pool(features, masks)
                projected = _linear_fp32(getattr(self, _LEVEL_NAMES[index]), pooled)
                # The official code stores each level's output in the features' dtype before summing.
                projected = projected.to(features.dtype).float()
                fused = projected if fused is None else fused + projected
            mask_tokens = _linear_fp32(self.feat_linear, fused)
            pos_tokens = None
            if self.config.use_position_token:
                size = self.config.mask_size
                small = resize_masks(masks, (size, size)).reshape(masks.shape[0], size * size)
                pos_tokens = self.mask_linear(small)
        return mask_tokens, pos_tokens
