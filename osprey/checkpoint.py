"""Model folders: the official key layout, strict loading with a report, safetensors saving, random init.

Official layout (spec section 7): the LM's own keys at the top level (`model.*`, `lm_head.*`), the projector
under `model.mm_projector.*`, the extractor at top-level `mask_extractor.*`, the tower under
`model.vision_tower.vision_tower.visual.*`. Our module tree differs only by prefixes; `KEY_PREFIXES` is the map.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from osprey.config import OspreyConfig
from osprey.modeling import OspreyForCausalLM

logger = logging.getLogger(__name__)

# (our prefix, official prefix), most specific first. The LM's keys live at the official top level.
KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_tower.vision_tower.", "model.vision_tower.vision_tower."),
    ("mm_projector.", "model.mm_projector."),
    ("mask_extractor.", "mask_extractor."),
    ("language_model.", ""),
)
# Layer-scale parameters of timm ConvNeXt blocks are named `gamma`. Older transformers renamed `gamma` to
# `weight` while loading and then dropped it silently; files written that way carry `blocks.N.weight`.
_LEGACY_GAMMA = re.compile(r"(\.stages\.\d+\.blocks\.\d+)\.weight$")
# transformers <= 4.31 kept each layer's rotary frequencies as a persistent buffer, so the official files carry one
# per layer; newer versions derive a single one from the config. Derived data: checked against ours, then dropped.
_LEGACY_INV_FREQ = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def to_official(name: str) -> str:
    for ours, official in KEY_PREFIXES:
        if name.startswith(ours):
            return official + name[len(ours):]
    raise KeyError(f"no official name for parameter {name!r}")


def from_official(name: str) -> str:
    """Official key -> our key (explicit: tower, projector, extractor, then everything else is the LM)."""
    name = _LEGACY_GAMMA.sub(r"\1.gamma", name) if ".vision_tower." in name else name
    for ours, official in KEY_PREFIXES[:-1]:
        if name.startswith(official):
            return ours + name[len(official):]
    return "language_model." + name


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # ours, not found in the files
    unexpected: list[str] = field(default_factory=list)  # official names found but not in the model
    mismatched: list[str] = field(default_factory=list)  # "name: file shape vs model shape"
    ignored: list[str] = field(default_factory=list)  # official names checked and dropped (legacy inv_freq)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [f"missing: {len(self.missing)}, unexpected: {len(self.unexpected)}, mismatched: {len(self.mismatched)}"]
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatched", self.mismatched)):
            lines += [f"  {title}: {item}" for item in items]
        if self.ignored:
            lines.append(f"  ignored (recomputed): {len(self.ignored)} rotary inv_freq buffers ({self.ignored[0]}, ...)")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# -- building ----------------------------------------------------------------------------------------------------
def build_model(
    config: OspreyConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> OspreyForCausalLM:
    """A model with fresh weights (or empty meta tensors with device="meta"), created in `dtype` (default: torch's
    default dtype) so that a 7B model never exists in fp32 first (28 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device):
            model = OspreyForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if str(device) != "meta":
        model.mask_extractor.reset_parameters()
    return model


def official_state_dict_shapes(config: OspreyConfig, official_names: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, built on the meta device (no memory)."""
    model = build_model(config, device="meta")
    return [(to_official(k) if official_names else k, tuple(v.shape)) for k, v in model.state_dict().items()]


def parameter_counts(config: OspreyConfig) -> dict[str, int]:
    model = build_model(config, device="meta")
    parts = {
        "language_model": model.language_model,
        "mm_projector": model.mm_projector,
        "mask_extractor": model.mask_extractor,
        "vision_tower": model.vision_tower,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(counts.values())
    return counts


# -- saving ------------------------------------------------------------------------------------------------------
def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A view into a larger storage (the engine's merged projections hold q/k/v and gate/up so) as a tensor of its
    own: safetensors refuses tensors that share memory. Other tensors pass as they are (no copy)."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def save_pretrained(model: OspreyForCausalLM, tokenizer, out_dir: str | Path, max_shard_bytes: int = 5 << 30) -> Path:
    """Write config.json, safetensors weights (official key names, sharded with an index past max_shard_bytes)
    and the tokenizer, atomically: the folder appears complete or not at all."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        state = {to_official(k): v.detach().contiguous() for k, v in model.state_dict().items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = _own_storage(tensor.cpu())
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (tmp / CONFIG_FILE).write_text(json.dumps(_config_json(model.config, model.dtype), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out_dir, backup)
            os.replace(tmp, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _config_json(config: OspreyConfig, dtype: torch.dtype) -> dict:
    """The official config.json fields (LM config at the top level) plus our full config under `osprey`."""
    return {
        **config.text,
        "architectures": ["OspreyLlamaForCausalLM"],
        "model_type": "osprey",
        "text_model_type": config.text["model_type"],
        "mm_projector_type": config.projector_type,
        "mm_vision_tower": config.vision.open_clip_model,
        "mm_hidden_size": config.vision.image_token_channels,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "osprey": config.to_dict(),
    }


def read_config(model_dir: str | Path) -> OspreyConfig:
    """Our config.json, or an official one (LM fields at the top level; tower and extractor are Osprey-7B's)."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {CONFIG_FILE}: is it a model folder?")
    data = json.loads(path.read_text())
    if "osprey" in data:
        return OspreyConfig.from_dict(data["osprey"])
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta", "rope_scaling", "attention_bias")
    default = OspreyConfig()
    text = {"model_type": "llama", **{k: data[k] for k in text_keys if k in data and data[k] is not None}}
    vocab = int(text["vocab_size"])
    return OspreyConfig(
        text={**default.text, **text},
        mask_token_id=max(vocab, default.mask_token_id),
        pos_token_id=max(vocab + 1, default.pos_token_id),
        name=Path(model_dir).name,
    )


# -- loading -----------------------------------------------------------------------------------------------------
def _weight_files(model_dir: Path) -> list[Path]:
    for index_name in (WEIGHTS_INDEX, "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / f for f in files]
    for single in (WEIGHTS_FILE, "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise FileNotFoundError(f"no weights in {model_dir} (looked for *.safetensors / pytorch_model*.bin and indexes)")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_state(model: OspreyForCausalLM, model_dir: str | Path, skip_prefixes: tuple[str, ...] = ()) -> LoadReport:
    """Copy every official tensor of a folder into `model` (built on the meta device or not); report all misses."""
    report = LoadReport()
    expected = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(model_dir)):
        for name, tensor in _read_tensors(file).items():
            if _LEGACY_INV_FREQ.match(name):
                _check_inv_freq(model, name, tensor)
                report.ignored.append(name)
                continue
            ours = from_official(name)
            if ours.startswith(skip_prefixes):
                continue
            if ours not in expected:
                report.unexpected.append(name)
            elif tuple(tensor.shape) != tuple(expected[ours].shape):
                report.mismatched.append(f"{name}: {tuple(tensor.shape)} vs {tuple(expected[ours].shape)}")
            else:
                loaded[ours] = tensor
    report.missing = [k for k in expected if k not in loaded and not k.startswith(skip_prefixes)]
    model.load_state_dict(loaded, strict=False, assign=True)
    return report


def _check_inv_freq(model: OspreyForCausalLM, name: str, saved: torch.Tensor) -> None:
    """A legacy per-layer `inv_freq` must equal the frequencies our rotary embedding computes from the config
    (rounded to the file's dtype, as 4.31 cast buffers with the model); otherwise the checkpoint was trained
    with another rope setting and would load into silently wrong positions."""
    rotary = model.language_model.model.rotary_emb
    with torch.device("cpu"):
        expected = type(rotary)(rotary.config).inv_freq  # rotary.inv_freq may sit on the meta device
    lm = rotary.config
    setting = (f"rope_theta={lm.rope_parameters.get('rope_theta')}, rope_type={lm.rope_parameters.get('rope_type')}, "
               f"head_dim={getattr(lm, 'head_dim', None) or lm.hidden_size // lm.num_attention_heads}")
    if tuple(saved.shape) != tuple(expected.shape):
        raise ValueError(f"{name} has shape {tuple(saved.shape)} but this config ({setting}) gives "
                         f"{tuple(expected.shape)}: the checkpoint was made for another head size or rope setting")
    expected = expected.to(saved.dtype).float()
    tolerance = torch.finfo(saved.dtype).eps if saved.is_floating_point() else 0.0
    error = ((saved.float() - expected).abs() / expected.abs()).max().item()
    if error > tolerance:
        raise ValueError(f"{name} differs from the rotary frequencies of this config ({setting}) by {error:.3g} "
                         "(relative): the checkpoint was trained with another rope setting; set rope_theta / "
                         "rope_scaling in its config.json to the values it was trained with")


def load_pretrained(
    model_dir: str | Path,
    *,
    clip_weights: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    config: OspreyConfig | None = None,
):
    """Load a model folder (ours or an official Osprey checkpoint) -> (model, tokenizer, LoadReport).

    `clip_weights`: an open_clip weight file whose `visual.*` tensors replace the tower, as the official code
    reloads the tower from `mm_vision_tower`. With `strict`, any missing/unexpected/mismatched key raises.
    `config` overrides the architecture read from config.json (an official folder is read as Osprey-7B).
    """
    from osprey.tokenization import load_tokenizer

    model_dir = Path(model_dir)
    config = config or read_config(model_dir)
    model = build_model(config, device="meta")
    skip = ("vision_tower.",) if clip_weights else ()
    report = load_state(model, model_dir, skip_prefixes=skip)
    if clip_weights:
        model.vision_tower.to_empty(device="cpu")
        missing, unexpected = model.vision_tower.load_open_clip_weights(clip_weights)
        report.missing += [f"vision_tower.vision_tower.visual.{k}" for k in missing]
        report.unexpected += [f"visual.{k} (in {clip_weights})" for k in unexpected]
        report.notes.append(f"vision tower loaded from {clip_weights}")
    if strict and not report.ok:
        raise ValueError(f"checkpoint {model_dir} does not match the model:\n{report.summary()}")
    _materialise_missing(model, report)
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device)
    model.eval()
    tokenizer = load_tokenizer(model_dir)
    return model, tokenizer, report


def _materialise_missing(model: OspreyForCausalLM, report: LoadReport) -> None:
    """After a meta-device build: recompute unsaved buffers (rotary frequencies) and, for a non-strict load,
    give missing parameters their fresh initialisation (noted in the report)."""
    for name, module in model.named_modules():
        meta_params = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
        meta_buffers = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if meta_buffers and not meta_params and hasattr(module, "config"):
            fresh = type(module)(module.config)  # e.g. LlamaRotaryEmbedding: buffers derive from the config
            for buffer_name in meta_buffers:
                setattr(module, buffer_name, getattr(fresh, buffer_name))
            continue
        if meta_params or meta_buffers:
            if not hasattr(module, "reset_parameters"):
                raise ValueError(f"cannot initialise missing tensors {meta_params + meta_buffers} of {name}")
            module.to_empty(device="cpu", recurse=False)
            module.reset_parameters()
            report.notes.append(f"{name}: freshly initialised ({', '.join(meta_params + meta_buffers)})")
    if any(k.startswith("mask_extractor.") for k in report.missing):
        model.mask_extractor.reset_parameters()


# -- random model folders ----------------------------------------------------------------------------------------
def default_tokenizer_corpus() -> list[str]:
    """Text for training a small tokenizer offline: the templates, prompts and a region vocabulary."""
    from osprey.prompts import TASK_PROMPTS, TEMPLATES, multi_region_prefix

    colours = "red green blue yellow orange purple pink brown black white gray cyan".split()
    shapes = "circle square triangle star ring ellipse cross heart diamond hexagon house flower robot tree car".split()
    words = "small large medium striped dotted solid checkered left right top bottom center above below inside".split()
    lines = [t.system for t in TEMPLATES.values()] + list(TASK_PROMPTS.values())
    lines += [multi_region_prefix(n) for n in range(1, 6)]
    lines += [f"a {s} {c} {w}" for c in colours for w in words for s in shapes]
    lines += ["USER: ASSISTANT: Yes, it is. No, it is not. There is a", "What is in region1? Answer the question using a single word or phrase."]
    return lines


def synthetic_tokenizer_corpus(vocab_size: int) -> list[str]:
    """Text for a tokenizer of `vocab_size` tokens when no real one is at hand: the project's prompts and, for
    Llama-sized vocabularies (over 4096), numbered filler words that give BPE enough distinct merges. Random-weight
    benchmark models need the real vocabulary size (embedding and LM-head work), not meaningful tokens."""
    if vocab_size <= 4096:
        return default_tokenizer_corpus()
    return default_tokenizer_corpus() * 4 + [f"token{i} word{i * 7} item{i * 13}" for i in range(40000)]


def corpus_from_files(paths) -> list[str]:
    """Texts of Osprey-format record files (.json/.jsonl) and plain text files, for training a tokenizer."""
    from osprey.data.records import iter_records

    texts: list[str] = []
    for path in map(Path, paths):
        if path.suffix in (".json", ".jsonl"):
            texts += [text for _, record in iter_records(path) for text in record.texts()]
        else:
            texts += path.read_text().splitlines()
    return texts


def init_model_folder(
    preset: str | OspreyConfig,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer=None,
    corpus: list[str] | None = None,
) -> Path:
    """Write a complete random-initialised model folder that every command accepts as `--model DIR`.

    Without a tokenizer, one of the config's vocabulary size is trained offline (seconds, also for the 32,000
    tokens of osprey-7b) on `corpus` plus `synthetic_tokenizer_corpus`: a byte-level BPE, not Vicuna's
    SentencePiece, so such a folder has the real shapes and amount of work but no real text. The weights are
    created directly in `dtype` (osprey-7b in bfloat16: 14 GB of memory and disk).
    """
    from osprey.tokenization import train_tokenizer

    config = preset if isinstance(preset, OspreyConfig) else OspreyConfig.from_preset(preset)
    if tokenizer is None:
        tokenizer = train_tokenizer(synthetic_tokenizer_corpus(config.vocab_size) + list(corpus or []),
                                    config.vocab_size)
    ids = (tokenizer.convert_tokens_to_ids("<mask>"), tokenizer.convert_tokens_to_ids("<pos>"))
    if ids != (config.mask_token_id, config.pos_token_id):
        raise ValueError(f"tokenizer ids of <mask>/<pos> {ids} differ from the config's "
                         f"{(config.mask_token_id, config.pos_token_id)}")
    torch.manual_seed(seed)
    model = build_model(config, dtype=getattr(torch, dtype))
    return save_pretrained(model, tokenizer, out_dir)


def derive_model_folder(src: str | Path, out_dir: str | Path, *, extractor: dict, seed: int = 0,
                        keep_extractor: bool = False) -> Path:
    """Copy a model folder with another mask-extractor architecture, every other weight kept.

    By default the extractor is freshly initialised: the paper's ablations start stage 2 from one shared stage-1
    model this way. `keep_extractor` keeps each extractor weight the new architecture still has (same name and
    shape), for ablations that fine-tune a trained model (a box-pooling variant keeps every weight; res4-only
    drops the other levels' projections)."""
    import dataclasses

    model, tokenizer, _ = load_pretrained(src)
    config = model.config.replace(extractor=dataclasses.replace(model.config.extractor, **extractor))
    torch.manual_seed(seed)
    derived = build_model(config).to(model.dtype)
    target = derived.state_dict()
    kept = {k: v for k, v in model.state_dict().items()
            if not k.startswith("mask_extractor.")
            or (keep_extractor and k in target and target[k].shape == v.shape)}
    result = derived.load_state_dict(kept, strict=False)
    unexpected_or_missing = list(result.unexpected_keys) + [k for k in result.missing_keys if not k.startswith("mask_extractor.")]
    if unexpected_or_missing:
        raise ValueError(f"deriving {src} left keys unmatched: {unexpected_or_missing}")
    return save_pretrained(derived, tokenizer, out_dir)
