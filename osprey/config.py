"""The one configuration tree that fixes an Osprey architecture: vision tower, mask extractor, language model.

Defaults reproduce the official Osprey-7B; presets are JSON files in `osprey/presets/`. Configs are frozen and
validated on construction: nothing mutates a config after the model is built.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"

# Vicuna-7B v1.5 (Llama-2 7B shape). Any transformers causal-LM config dict works here (`model_type` picks the class).
VICUNA_7B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class VisionConfig:
    # open_clip model config name; only the architecture is taken from it, weights come from a local file.
    open_clip_model: str = "convnext_large_d_320"
    # An explicit open_clip model config ({"embed_dim", "vision_cfg"}) for towers open_clip doesn't list (tiny presets).
    open_clip_config: dict[str, Any] | None = None
    # Side of the square input (spec: 512); the projector reads level `image_token_level` at stride 16.
    image_size: int = 512
    # Channels of res2..res5 (stride 4, 8, 16, 32); checked against the trunk when the model is built.
    level_channels: tuple[int, ...] = (192, 384, 768, 1536)
    # Which level becomes the LLM's image tokens (2 = res4: 32 x 32 = 1024 tokens at 512 px).
    image_token_level: int = 2
    # CLIP normalisation constants (OpenAI CLIP), applied in preprocessing.
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_channels", tuple(self.level_channels))
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        if len(self.level_channels) != 4:
            raise ValueError(f"level_channels must list 4 levels (res2..res5), got {self.level_channels}")
        if not 0 <= self.image_token_level < 4:
            raise ValueError(f"image_token_level must be 0..3, got {self.image_token_level}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (the res5 stride), got {self.image_size}")

    @property
    def level_strides(self) -> tuple[int, ...]:
        return (4, 8, 16, 32)

    @property
    def num_image_tokens(self) -> int:
        side = self.image_size // self.level_strides[self.image_token_level]
        return side * side

    @property
    def image_token_channels(self) -> int:
        return self.level_channels[self.image_token_level]


@dataclass(frozen=True)
class ExtractorConfig:
    # Width each level is projected to before the levels are summed (spec: 1024).
    hidden_size: int = 1024
    # Side the binary mask is resized to for the position token (spec: 112 -> 12544 inputs).
    mask_size: int = 112
    # Levels pooled for the mask token (indices into res2..res5). Ablation "res4 only" = (2,).
    levels: tuple[int, ...] = (0, 1, 2, 3)
    # Ablation switches: emit no position token; pool over the region's box instead of its mask.
    use_position_token: bool = True
    mask_from_box: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        if not self.levels or any(not 0 <= lvl < 4 for lvl in self.levels) or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"extractor levels must be distinct indices in 0..3, got {self.levels}")
        if self.mask_size < 1 or self.hidden_size < 1:
            raise ValueError(f"mask_size and hidden_size must be positive, got {self.mask_size}, {self.hidden_size}")


@dataclass(frozen=True)
class OspreyConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    # transformers config kwargs of the causal LM; `model_type` selects the architecture.
    text: dict[str, Any] = field(default_factory=lambda: dict(VICUNA_7B))
    projector_type: str = "mlp2x_gelu"
    # Added special tokens; they sit at or past the end of the embedding table and never reach the lookup.
    mask_token_id: int = 32000
    pos_token_id: int = 32001
    # LLaVA's image placeholder id (-200): expanded to `num_image_tokens` slots before the model sees the ids.
    image_token_id: int = -200
    name: str = "osprey-7b"
    # Where the weights were trained (written by `osprey train`, one entry per dataset and split; see
    # osprey.data.provenance), so an evaluation can tell when its test images are training images.
    training_data: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "training_data", tuple(dict(entry) for entry in self.training_data))
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionConfig(**self.vision))
        if isinstance(self.extractor, dict):
            object.__setattr__(self, "extractor", ExtractorConfig(**self.extractor))
        if "model_type" not in self.text or "hidden_size" not in self.text or "vocab_size" not in self.text:
            raise ValueError("text config needs at least model_type, hidden_size and vocab_size")
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"unsupported projector_type {self.projector_type!r} (Osprey uses 'mlp2x_gelu')")
        vocab = self.text["vocab_size"]
        for name in ("mask_token_id", "pos_token_id"):
            if getattr(self, name) < vocab:
                raise ValueError(f"{name}={getattr(self, name)} lies inside the embedding table (vocab {vocab})")
        if self.mask_token_id == self.pos_token_id:
            raise ValueError("mask_token_id and pos_token_id must differ")
        if self.image_token_id >= 0:
            raise ValueError(f"image_token_id must be negative (a placeholder), got {self.image_token_id}")

    @property
    def hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OspreyConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown OspreyConfig fields: {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> OspreyConfig:
        """A new config with some fields changed (e.g. an ablation); the original is untouched."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name_or_path: str | Path) -> OspreyConfig:
        """A preset by name (`osprey-7b`, `tiny`, ...) or a JSON file path."""
        path = Path(name_or_path)
        if path.suffix != ".json":
            path = PRESET_DIR / f"{name_or_path}.json"
        if not path.is_file():
            available = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
            raise ValueError(f"unknown preset {name_or_path!r}; available: {available} or a path to a JSON file")
        return cls.from_dict(json.loads(path.read_text()))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))
