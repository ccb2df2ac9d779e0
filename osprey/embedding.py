"""Region and text embeddings in one CLIP space: masks pooled from the vision tower through its CLIP head, texts
through a CLIP text tower (open_clip).

A text's vector is the CLIP text tower's. A region's vector comes from the vision tower's feature maps pooled
over the region's mask, through a region head; both are L2-normalised, so a dot product is a cosine.

- The official model (`region_head="clip"`): the final map (res5) mask-pooled, then the rest of the CLIP image
  path, the trunk's head norm and the CLIP projection (as FC-CLIP reads a ConvNeXt CLIP). The open_clip file of
  `laion/CLIP-convnext_large_d_320...` holds both towers: the text tower is read from it (`clip_weights=`) and
  tokenised by open_clip's tokenizer of that architecture.
- A model folder with `region_text.json` + `region_text.safetensors` (the built-in model): a small text tower,
  tokenised by the folder's tokenizer, trained by `osprey train text-tower` against the frozen vision tower
  (LiT-style). Its CLIP step embedded regions with every level mask-pooled through per-level linear maps
  (`region_head="levels"`, `LevelRegionHead`), not through the CLIP head, which only ever saw whole images and was
  not trained on after (it reads 58 % of the categories linearly, docs/search.md); that head was not kept, so the
  file carries a new one, trained with the text tower. The vision tower itself is not changed.
A model with neither has no text space: `NoTextTower`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from osprey.config import VisionConfig
from osprey.mask_extractor import masked_mean_pool_batch
from osprey.preprocess import load_image, preprocess_image
from osprey.vision import VisionTower, read_open_clip_file

logger = logging.getLogger(__name__)

REGION_TEXT_CONFIG = "region_text.json"
REGION_TEXT_WEIGHTS = "region_text.safetensors"
REGION_HEADS = ("clip", "levels")
MODEL_TOKENIZER = "model"  # RegionTextConfig.tokenizer: the model folder's own tokenizer
VISION_PREFIX = "model.vision_tower.vision_tower."  # the tower's keys in a model folder (osprey.checkpoint)


class NoTextTower(ValueError):
    """The model has no text tower: its region vectors have no text to be compared with."""


@dataclass(frozen=True)
class RegionTextConfig:
    """An open_clip text tower (`CLIPTextCfg` fields), how its input is tokenised, and the region head."""

    embed_dim: int  # the CLIP space's width: the vision head's output width
    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int
    # "model": the model folder's tokenizer (ids + eos, padded with pad_id; the tower pools at eos);
    # otherwise an open_clip model name whose tokenizer is used (the official CLIPs pool at the highest id, the eot)
    tokenizer: str = MODEL_TOKENIZER
    pool_type: str = "argmax"
    pad_id: int = 0
    eos_id: int | None = None
    name: str = "clip-text"  # names the space together with the model: "<model>:<name>"
    # "clip": res5 mask-pooled through the CLIP head; "levels": every level through a LevelRegionHead in the file
    region_head: str = "clip"

    def __post_init__(self) -> None:
        if self.region_head not in REGION_HEADS:
            raise ValueError(f"region_head must be one of {REGION_HEADS}, got {self.region_head!r}")
        if self.embed_dim < 1 or self.context_length < 2 or self.width % self.heads:
            raise ValueError(f"invalid text tower config: {self}")
        if self.pool_type == "eos" and self.eos_id is None:
            raise ValueError("a text tower pooling at eos needs eos_id")

    def build(self) -> nn.Module:
        from open_clip.model import CLIPTextCfg, _build_text_tower

        cfg = CLIPTextCfg(context_length=self.context_length, vocab_size=self.vocab_size, width=self.width,
                          heads=self.heads, layers=self.layers, pad_id=self.pad_id, pool_type=self.pool_type,
                          **({"eos_id": self.eos_id} if self.eos_id is not None else {}))
        return _build_text_tower(self.embed_dim, cfg)

    @classmethod
    def read(cls, path: str | Path) -> RegionTextConfig:
        data = json.loads(Path(path).read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def write(self, path: str | Path, **extra) -> None:
        """Written whole (a temporary file renamed), with `extra` fields (e.g. the training provenance) kept."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({**asdict(self), **extra}, indent=2) + "\n")
        tmp.replace(path)


class TextEncoder(nn.Module):
    """A text tower and its tokenizer: `forward(texts) -> (N, E)` normalised embeddings."""

    def __init__(self, config: RegionTextConfig, tower: nn.Module, tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.tower = tower
        self.tokenizer = tokenizer  # a transformers tokenizer for MODEL_TOKENIZER; else open_clip's (by name)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(N, context_length) ids. Own tokenizer: ids then eos (cut before it when long), padded with pad_id."""
        cfg = self.config
        if cfg.tokenizer != MODEL_TOKENIZER:
            import open_clip

            return open_clip.get_tokenizer(cfg.tokenizer)(texts, context_length=cfg.context_length)
        out = torch.full((len(texts), cfg.context_length), cfg.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: cfg.context_length - 1] + [cfg.eos_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        device = next(self.tower.parameters()).device
        return F.normalize(self.tower(ids.to(device)).float(), dim=-1)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(texts))


class LevelRegionHead(nn.Module):
    """Region embedding from every level: the sum over levels of a linear map of the level's mask-pooled features.

    The mask extractor reads each level through a linear layer and sums them, so a category this head finds in the
    pooled levels is one the extractor reads too (`osprey train clip` trains regions through it; docs/train.md).
    """

    def __init__(self, level_channels: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(nn.Linear(c, embed_dim, bias=i == 0) for i, c in enumerate(level_channels))

    def forward(self, pooled_levels: list[torch.Tensor]) -> torch.Tensor:
        return sum(layer(p) for layer, p in zip(self.levels, pooled_levels, strict=True))


def pool_levels(levels: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every level (B, C_l, h_l, w_l) mask-pooled -> per level (sum Q_i, C_l) fp32 (`masked_mean_pool_batch`)."""
    return [masked_mean_pool_batch(level, masks) for level in levels]


def region_embeddings(visual: nn.Module, final_level: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """open_clip TimmModel, res5 maps (B, C, h, w), per image (Q_i, H_i, W_i) masks -> (sum Q_i, E) unnormalised:
    the trunk's final map mask-pooled (`masked_mean_pool_batch`) through `region_embeddings_from_pooled`."""
    features = visual.trunk.norm_pre(final_level)
    return region_embeddings_from_pooled(visual, masked_mean_pool_batch(features, masks).to(features.dtype))


def region_embeddings_from_pooled(visual: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """(N, C) mask-pooled final-map features -> (N, E) region embeddings: the trunk's head norm, then the CLIP
    projection, as the global image path does with its own pooling."""
    return visual.head(visual.trunk.forward_head(pooled[:, :, None, None]))


@dataclass
class RegionText:
    """What a model folder's region_text files hold: the text encoder, and the level head where the config has one."""

    text: TextEncoder
    level_head: LevelRegionHead | None


def load_region_text(model_dir: str | Path, level_channels: tuple[int, ...]) -> RegionText:
    """A model folder's `region_text.json` + `region_text.safetensors` (keys `text.*`, `region_head.*`), strictly."""
    from safetensors.torch import load_file

    from osprey.tokenization import load_tokenizer

    model_dir = Path(model_dir)
    config_path, weights = model_dir / REGION_TEXT_CONFIG, model_dir / REGION_TEXT_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise NoTextTower(f"{model_dir} has no text tower ({REGION_TEXT_CONFIG} + {REGION_TEXT_WEIGHTS}): train one "
                          "with `osprey train text-tower`, or give an open_clip file that holds one (--clip-weights)")
    config = RegionTextConfig.read(config_path)
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    text = TextEncoder(config, config.build(), load_tokenizer(model_dir) if config.tokenizer == MODEL_TOKENIZER else None)
    level_head = LevelRegionHead(level_channels, config.embed_dim) if config.region_head == "levels" else None
    parts = nn.ModuleDict({"text": text.tower, **({"region_head": level_head} if level_head is not None else {})})
    _load_strict(parts, state, str(weights))
    return RegionText(text.eval(), level_head.eval() if level_head is not None else None)


def save_region_text(out_dir: str | Path, text: TextEncoder, level_head: LevelRegionHead | None, **extra) -> Path:
    """Write `region_text.safetensors` (bf16) and `region_text.json` (the config and `extra`), each written whole."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"text.{k}": v for k, v in text.tower.state_dict().items()}
    if level_head is not None:
        state.update({f"region_head.{k}": v for k, v in level_head.state_dict().items()})
    weights = out_dir / REGION_TEXT_WEIGHTS
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file({k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in state.items()}, str(tmp))
    tmp.replace(weights)
    text.config.write(out_dir / REGION_TEXT_CONFIG, **extra)
    return weights


def text_tower_from_open_clip(path: str | Path, open_clip_model: str) -> TextEncoder:
    """The text tower of an open_clip CLIP weight file (e.g. the official convnext_large_d_320 file), its
    architecture from open_clip's config of that name, loaded strictly; open_clip's tokenizer of that name."""
    import open_clip

    clip_cfg = open_clip.get_model_config(open_clip_model)
    if clip_cfg is None or "text_cfg" not in clip_cfg:
        raise NoTextTower(f"open_clip knows no text tower for {open_clip_model!r}")
    text_cfg = clip_cfg["text_cfg"]
    config = RegionTextConfig(embed_dim=clip_cfg["embed_dim"], context_length=text_cfg.get("context_length", 77),
                              vocab_size=text_cfg.get("vocab_size", 49408), width=text_cfg.get("width", 512),
                              heads=text_cfg.get("heads", 8), layers=text_cfg.get("layers", 12),
                              tokenizer=open_clip_model, pool_type=text_cfg.get("pool_type", "argmax"),
                              name=f"{open_clip_model}-text", region_head="clip")
    tower = config.build()
    state = {k: v.float() for k, v in read_open_clip_file(path).items()
             if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias", "attn_mask")}
    if not state:
        raise NoTextTower(f"{path} holds no text tower (only 'visual.*' tensors)")
    _load_strict(tower, state, str(path))
    return TextEncoder(config, tower.eval())


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes differ
        raise ValueError(f"{source} does not fit the text tower: {str(error).splitlines()[-1].strip()}") from error
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source} does not fit the text tower: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


def load_vision_tower(model_dir: str | Path, config: VisionConfig) -> VisionTower:
    """Only the vision tower of a model folder (its `model.vision_tower.vision_tower.*` tensors), fp32, loaded
    strictly: the embeddings need neither the LLM nor the extractor."""
    from safetensors import safe_open

    from osprey.checkpoint import _weight_files

    tower = VisionTower(config)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(model_dir)):
        if file.suffix != ".safetensors":
            state.update({k: v for k, v in torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()
                          if k.startswith(VISION_PREFIX)})
            continue
        with safe_open(str(file), framework="pt") as handle:
            state.update({k: handle.get_tensor(k) for k in handle.keys() if k.startswith(VISION_PREFIX)})  # noqa: SIM118
    ours = {"vision_tower." + k[len(VISION_PREFIX):]: v.float() for k, v in state.items()}
    result = tower.load_state_dict(ours, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the vision tower of {model_dir} does not load: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return tower.eval()


class RegionTextEmbedder:
    """Region vectors and text vectors of one model in one space (named `space`), each (N, dim) float32, L2-normal."""

    def __init__(self, vision: VisionTower, text: TextEncoder, model_name: str, device: str | torch.device = "cpu",
                 level_head: LevelRegionHead | None = None) -> None:
        if (level_head is None) != (text.config.region_head == "clip"):
            raise ValueError(f"region_head {text.config.region_head!r} needs "
                             f"{'no' if text.config.region_head == 'clip' else 'a'} level head")
        self.device = torch.device(device)
        self.vision = vision.to(self.device).eval()
        self.text = text.to(self.device).eval()
        self.level_head = level_head.to(self.device).eval() if level_head is not None else None
        self.model_name = model_name
        self.dim = text.config.embed_dim
        with torch.no_grad():  # the region head's output width, read by running it once on one empty region
            levels = [torch.zeros(1, c, 1, 1, device=self.device) for c in vision.config.level_channels]
            head_dim = self._regions(levels, [torch.ones(1, 1, 1, device=self.device)]).shape[-1]
        if head_dim != self.dim:
            raise ValueError(f"the region head writes {head_dim}-d vectors, the text tower {self.dim}-d")

    @property
    def space(self) -> str:
        """The space's name: vectors of two embedders compare only where these are equal."""
        return f"{self.model_name}:{self.text.config.name}"

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, clip_weights: str | Path | None = None,
                        device: str | torch.device = "cpu", model_name: str | None = None) -> RegionTextEmbedder:
        """A model folder's vision tower and its text tower: the folder's own (`region_text.json`), else the one in
        `clip_weights` (an open_clip file of the folder's CLIP architecture); `NoTextTower` without either."""
        from osprey.checkpoint import read_config

        config = read_config(model_dir)
        if (Path(model_dir) / REGION_TEXT_CONFIG).is_file() or clip_weights is None:
            loaded = load_region_text(model_dir, config.vision.level_channels)
        else:
            loaded = RegionText(text_tower_from_open_clip(clip_weights, config.vision.open_clip_model), None)
        vision = load_vision_tower(model_dir, config.vision)
        return cls(vision, loaded.text, model_name or config.name or Path(model_dir).name, device, loaded.level_head)

    def _regions(self, levels: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        if self.level_head is not None:
            return self.level_head(pool_levels(levels, masks))
        return region_embeddings(self.vision.vision_tower.visual, levels[-1], masks)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.text(list(texts)).cpu().numpy()

    @torch.no_grad()
    def embed_regions(self, image: Image.Image | str | Path, masks: np.ndarray) -> np.ndarray:
        """masks (Q, H, W) bool at the image's size -> (Q, dim); an empty mask has no vector (ValueError)."""
        image = load_image(image)
        if masks.ndim != 3 or masks.shape[1:] != (image.height, image.width):
            raise ValueError(f"masks must be (Q, {image.height}, {image.width}) for this image, got {masks.shape}")
        if len(masks) == 0:
            return np.zeros((0, self.dim), np.float32)
        empty = np.flatnonzero(~masks.reshape(len(masks), -1).any(axis=1))
        if len(empty):
            raise ValueError(f"masks {empty.tolist()} are empty: an empty region has no embedding")
        pixels = preprocess_image(image, self.vision.config, self.device)
        levels = [level.float() for level in self.vision(pixels[None])]
        vectors = self._regions(levels, [torch.from_numpy(np.ascontiguousarray(masks)).to(self.device)])
        return F.normalize(vectors.float(), dim=-1).cpu().numpy()
