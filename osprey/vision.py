"""The frozen ConvNeXt CLIP vision tower (open_clip): multi-level features res2..res5 for the mask extractor."""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_vision_tower
from torch import nn

from osprey.config import VisionConfig

logger = logging.getLogger(__name__)


class _VisualHolder(nn.Module):
    """Gives the open_clip visual model the path `visual.*`, as in open_clip's CLIP and the official checkpoints."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual


def open_clip_model_config(config: VisionConfig) -> dict:
    """The open_clip model config (`embed_dim`, `vision_cfg`, ...) of a vision config: its own, or open_clip's by name."""
    clip_cfg = config.open_clip_config or open_clip.get_model_config(config.open_clip_model)
    if clip_cfg is None:
        raise ValueError(f"open_clip knows no model config {config.open_clip_model!r}")
    return clip_cfg


def trunk_levels(trunk: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """A timm ConvNeXt trunk's stage outputs [res2, res3, res4, res5] (stem, then each stage in turn)."""
    x = trunk.stem(pixel_values)
    levels = []
    for stage in trunk.stages:
        x = stage(x)
        levels.append(x)
    return levels


class VisionTower(nn.Module):
    """open_clip ConvNeXt: `forward(pixels (B,3,S,S)) -> [res2, res3, res4, res5]`, strides 4/8/16/32.

    Only the trunk runs; open_clip's MLP head is kept so state dicts match the official layout, but is unused.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        clip_cfg = open_clip_model_config(config)
        self.vision_tower = _VisualHolder(_build_vision_tower(clip_cfg["embed_dim"], clip_cfg["vision_cfg"]))
        channels = tuple(info["num_chs"] for info in self.trunk.feature_info)
        if channels != config.level_channels:
            raise ValueError(f"trunk channels {channels} differ from config level_channels {config.level_channels}")

    @property
    def trunk(self) -> nn.Module:
        return self.vision_tower.visual.trunk

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        dtype = self.trunk.stem[0].weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            return trunk_levels(self.trunk, pixel_values.to(dtype))

    def load_open_clip_weights(self, path: str | Path) -> tuple[list[str], list[str]]:
        """Load the `visual.*` tensors of an open_clip weight file (.bin/.pt/.safetensors); text-tower keys are ignored.

        Returns (missing, unexpected) visual keys; an official file gives two empty lists.
        """
        state = read_open_clip_file(path)
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise ValueError(f"{path} holds no 'visual.*' tensors: is it an open_clip CLIP weight file?")
        result = self.vision_tower.visual.load_state_dict(visual, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)


def read_open_clip_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an open_clip checkpoint, unwrapped from `state_dict` and `module.` prefixes as open_clip does."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}
