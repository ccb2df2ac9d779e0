"""The typed training configuration: one YAML file per stage run, parsed into `TrainConfig` and validated once.

Unknown keys raise an error that names them (a typo must not silently fall back to a default). Command-line
overrides (`--max-steps 10`, `--set optim.lr=2e-4`) are applied to the raw dict before validation, so the same
checks run on them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
# The model's top-level parts, by attribute name (stage tables, per-part learning rates, logging).
PARTS = ("vision_tower", "mm_projector", "mask_extractor", "language_model")
STAGES = (1, 2, 3)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the language model's linear layers (stage 3 only); merged into the base weights on save."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # Module-name suffixes inside the LM (Llama: attention and MLP projections).
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"lora.r must be >= 1 and lora.alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty")


@dataclass(frozen=True)
class DataConfig:
    """Osprey-format record files (JSON lists, spec section 9): a generated dataset's sub-sets or explicit files."""

    # Folder the record files and images are relative to; with a manifest.json (`osprey data synth`), its
    # sub-sets of the run's stage are used unless `files` is given.
    root: str | None = None
    split: str = "train"
    # Manifest sub-set names (e.g. [stage3_conversations, stage3_detailed]); default: all of the run's stage.
    subsets: tuple[str, ...] | None = None
    # Explicit record files (relative to root): a path, or {path: ..., kind: ...} for files no manifest lists
    # (kinds: osprey.data.samples.STAGE_KINDS, e.g. conversations, short_form, detailed for stage 3); `repeat: k`
    # in an entry ({path, repeat} or {path, kind, repeat}) puts its records k times in each epoch (data mixing).
    files: tuple[Any, ...] = ()
    image_root: str | None = None  # default: root
    max_regions: int = 15  # stage-3 records with more regions are skipped (official loaders)
    # Batches of similar length waste less padding (LLaVA's `group_by_modality_length`, lengths only).
    group_by_length: bool = True
    num_workers: int = 2
    # Samples longer than this are truncated (never inside the image tokens or a <mask><pos> pair); counted.
    max_length: int = 2048
    # Tokenize every sample at start and leave those without a trained token out of the epoch (reported).
    drop_fully_masked: bool = False
    # Conversation template (osprey.prompts.TEMPLATES): "train" is the official training system prompt ("curious
    # user"); "infer" is the one inference and evaluation use ("curious human"). A pretrained LLM does not mind the
    # difference; a model trained from scratch only knows the prompt it was trained with.
    template: str = "train"

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(self.files))
        if self.subsets is not None:
            object.__setattr__(self, "subsets", tuple(self.subsets))
        if self.max_length < 1 or self.num_workers < 0 or self.max_regions < 1:
            raise ValueError(f"data.max_length and data.max_regions must be >= 1 and num_workers >= 0, got "
                             f"{self.max_length}, {self.max_regions}, {self.num_workers}")
        for entry in self.files:
            if isinstance(entry, str):
                continue
            if not (isinstance(entry, dict) and "path" in entry and set(entry) <= {"path", "kind", "repeat"}):
                raise ValueError(f"data.files entries must be a path or {{path, kind, repeat}} (kind and repeat "
                                 f"optional), got {entry!r}")
            repeat = entry.get("repeat", 1)
            if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
                raise ValueError(f"data.files repeat must be an integer >= 1, got {repeat!r} in {entry!r}")
        if self.files and self.subsets is not None:
            raise ValueError("give data.files or data.subsets, not both")
        if self.template not in ("train", "infer"):
            raise ValueError(f"data.template must be 'train' or 'infer', got {self.template!r}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine schedule with linear warm-up, as LLaVA/Osprey (HF Trainer defaults otherwise)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    # HF Trainer's default `max_grad_norm` (the official runs did not change it); 0 disables clipping.
    grad_clip: float = 1.0
    # "torch": torch.optim.AdamW (fused on GPU; works everywhere, incl. DeepSpeed's CPU accelerator).
    # "deepspeed": DeepSpeed's own Adam (FusedAdam on GPU, DeepSpeedCPUAdam with ZeRO offload; compiles an op).
    optimizer: str = "torch"
    # Learning rates for some parts instead of `lr` (as LLaVA's mm_projector_lr), by part name:
    # vision_tower, mm_projector, mask_extractor, language_model. E.g. {mask_extractor: 1.0e-4}.
    part_lr: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        unknown = sorted(set(self.part_lr) - set(PARTS))
        if unknown:
            raise ValueError(f"optim.part_lr has unknown parts {unknown}; parts: {list(PARTS)}")
        try:
            object.__setattr__(self, "part_lr", {k: float(v) for k, v in self.part_lr.items()})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"optim.part_lr values must be numbers, got {self.part_lr!r}") from exc
        if any(v <= 0 for v in self.part_lr.values()):
            raise ValueError(f"optim.part_lr values must be > 0, got {self.part_lr!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ValueError(f"invalid optimiser values: lr={self.lr}, weight_decay={self.weight_decay}, eps={self.eps}, "
                             f"grad_clip={self.grad_clip}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.optimizer not in ("torch", "deepspeed"):
            raise ValueError(f"optim.optimizer must be 'torch' or 'deepspeed', got {self.optimizer!r}")


@dataclass(frozen=True)
class TrainConfig:
    stage: int
    # Model folder to start from (the previous stage's `<output_dir>/final`), or a preset name for random weights.
    model: str
    output_dir: str
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig | None = None
    # An open_clip weight file for the vision tower (official: the ConvNeXt-L CLIP file); None keeps the folder's.
    clip_weights: str | None = None
    # Also train the vision tower: only for models without pretrained CLIP weights (tiny/built-in presets).
    train_vision: bool = False
    # A stage-1 start folder may hold only a base LLM; later stages must load every key.
    strict_load: bool | None = None
    epochs: float = 1.0
    # Stop after this many optimiser steps (overrides `epochs` for the schedule length); -1 = use epochs.
    max_steps: int = -1
    # Seconds the training loop may take (0: no limit). The schedule's horizon is then fitted to the measured pace,
    # so the rate still anneals to its end within the limit and final/ is written; saving final/ comes after it.
    time_limit: float = 0.0
    micro_batch_size: int = 1  # per GPU
    global_batch_size: int = 4  # micro_batch_size x world size x gradient accumulation
    bf16: bool = True
    tf32: bool = True
    gradient_checkpointing: bool = True
    # torch.compile each LM decoder layer and each vision-tower stage (regional compilation: fused element-wise
    # kernels, fewer launches; one compiled graph serves all identical layers). ZeRO-3 is not supported with it.
    compile: bool = False
    # Run the LM head only where the next token is trained (the loss is unchanged; the (B, T, vocab) logits and their
    # fp32 copy are never built). Off: transformers' own loss over full logits.
    trained_logits_only: bool = True
    # DeepSpeed JSON: a file in train/configs/ by stem ("zero2", "zero3", "zero3_offload") or a path.
    deepspeed: str = "zero2"
    save_steps: int = 500  # 0: save only at the end
    keep_checkpoints: int = 2  # newest resumable checkpoints kept (older ones are deleted)
    log_steps: int = 1
    seed: int = 42
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.lora is not None and self.stage != 3:
            raise ValueError(f"lora is only supported in stage 3 (the only stage that trains the LLM), got stage {self.stage}")
        if self.micro_batch_size < 1 or self.global_batch_size < self.micro_batch_size:
            raise ValueError(f"need 1 <= micro_batch_size <= global_batch_size, got {self.micro_batch_size}, "
                             f"{self.global_batch_size}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.max_steps == 0 or self.max_steps < -1 or (self.max_steps == -1 and self.epochs <= 0):
            raise ValueError(f"need max_steps > 0 or epochs > 0, got max_steps={self.max_steps}, epochs={self.epochs}")
        if not self.time_limit >= 0:
            raise ValueError(f"need time_limit >= 0 (seconds; 0: none), got {self.time_limit}")
        if self.save_steps < 0 or self.log_steps < 1 or self.keep_checkpoints < 1:
            raise ValueError(f"need save_steps >= 0, log_steps >= 1, keep_checkpoints >= 1, got {self.save_steps}, "
                             f"{self.log_steps}, {self.keep_checkpoints}")

    @property
    def load_strict(self) -> bool:
        return self.strict_load if self.strict_load is not None else self.stage != 1

    def gradient_accumulation(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size x "
                             f"world size = {self.micro_batch_size} x {world_size}")
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- parsing -----------------------------------------------------------------------------------------------------
def _build(cls: type, data: Any, where: str) -> Any:
    """Recursively turn a dict into the dataclass `cls`, naming unknown keys with their dotted path."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(data).__name__}: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config keys: {[prefix + k for k in unknown]}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        nested = _dataclass_in(hints[name])
        key = f"{where}.{name}" if where else name
        kwargs[name] = _build(nested, value, key) if nested and value is not None else _coerce(hints[name], value, key)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required config keys: {[f'{where}.{m}' if where else m for m in missing]}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"invalid {where or 'config'}: {exc}") from exc


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check a scalar against its field type; YAML reads `2e-5` (no dot) as a string, so numbers in strings pass."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif hint is int and isinstance(value, int) and not isinstance(value, bool) or hint is bool and isinstance(value, bool) or hint is str and isinstance(value, str):
        return value
    elif typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    elif typing.get_origin(hint) is dict and isinstance(value, dict):
        return dict(value)
    elif hint is Any:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ValueError(f"config key {key} must be {name}, got {type(value).__name__} {value!r}")


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass inside a hint like `LoraConfig | None`, else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    out = dict(raw)
    for path, value in overrides:
        node = out
        for part in path[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[tuple[list[str], Any]] | None = None,
                raw: dict[str, Any] | None = None) -> TrainConfig:
    """A YAML file (or a raw dict) plus overrides -> validated TrainConfig. Relative data paths stay as written."""
    if raw is None:
        if path is None:
            raise ValueError("give a config file or a raw dict")
        path = resolve_config_path(path)
        raw = yaml.safe_load(Path(path).read_text()) or {}
    return _build(TrainConfig, apply_overrides(raw, overrides or []), "")


def resolve_config_path(name: str | Path) -> Path:
    """A path, or the stem of a file shipped in train/configs/ (e.g. `tiny_stage1`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {name!r} is neither a file nor a shipped config; shipped: {available}")
