"""Which parameters each training stage updates: one declared table, one function that applies it, and LoRA.

Stage parts (spec section 8): 1 = projector; 2 = mask extractor; 3 = language model (embeddings and head
included) + projector + extractor. The vision tower stays frozen unless asked for (models without pretrained
CLIP weights). With LoRA (stage 3), the LM's base weights stay frozen and only the adapters train.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from train.config import PARTS, LoraConfig

logger = logging.getLogger(__name__)

STAGE_PARTS: dict[int, tuple[str, ...]] = {
    1: ("mm_projector",),
    2: ("mask_extractor",),
    3: ("language_model", "mm_projector", "mask_extractor"),
}
LORA_KEY = re.compile(r"\.lora_(A|B|dropout|embedding_A|embedding_B)\.")


def trainable_parts(stage: int, train_vision: bool = False) -> tuple[str, ...]:
    if stage not in STAGE_PARTS:
        raise ValueError(f"unknown stage {stage!r}; stages: {sorted(STAGE_PARTS)}")
    return STAGE_PARTS[stage] + (("vision_tower",) if train_vision else ())


def set_trainable(model: nn.Module, stage: int, train_vision: bool = False, lora: LoraConfig | None = None) -> dict[str, tuple[int, int]]:
    """Freeze everything, then unfreeze the stage's parts (LoRA: adapters instead of the LM's base weights).

    Frozen towers are put in eval mode. Returns {part: (trainable, total)} parameter counts, also logged, and
    asserts that exactly the declared parts train.
    """
    parts = trainable_parts(stage, train_vision)
    if lora is not None:
        if stage != 3:
            raise ValueError(f"LoRA applies to the language model, which only stage 3 trains (got stage {stage})")
        apply_lora(model, lora)
    model.requires_grad_(False)
    for part in parts:
        module = getattr(model, part)
        if part == "language_model" and lora is not None:
            for name, param in module.named_parameters():
                param.requires_grad_(bool(LORA_KEY.search("." + name)))
        else:
            module.requires_grad_(True)
    if "vision_tower" not in parts:
        model.vision_tower.eval()  # frozen: no dropout / drop-path randomness, as the official tower
    counts = {part: _counts(getattr(model, part)) for part in PARTS}
    for part, (trainable, total) in counts.items():
        names = [n for n, p in getattr(model, part).named_parameters() if p.requires_grad]
        logger.info("stage %d %-15s trainable %12s / %12s parameters in %d tensors", stage, part, f"{trainable:,}",
                    f"{total:,}", len(names))
        logger.debug("stage %d %s trainable tensors: %s", stage, part, names)
    check_trainable(model, stage, train_vision, lora is not None)
    return counts


def _counts(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def check_trainable(model: nn.Module, stage: int, train_vision: bool, lora: bool) -> None:
    """Raise if any parameter's requires_grad disagrees with the stage's declaration (names the first few)."""
    parts = trainable_parts(stage, train_vision)
    wrong = []
    for name, param in model.named_parameters():
        part = name.split(".", 1)[0]
        expected = part in parts and (not lora or part != "language_model" or bool(LORA_KEY.search("." + name)))
        if param.requires_grad != expected:
            wrong.append(f"{name} (requires_grad={param.requires_grad}, expected {expected})")
    if wrong:
        raise RuntimeError(f"stage {stage} trainable set differs from its declaration in {len(wrong)} tensors: {wrong[:5]}")
    if not any(p.requires_grad for p in model.parameters()):
        raise RuntimeError(f"stage {stage}: nothing to train")


# -- LoRA --------------------------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, lora: LoraConfig) -> None:
    """Wrap `model.language_model` with peft LoRA adapters (base weights frozen by peft)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none", task_type="CAUSAL_LM",
    )
    model.language_model = get_peft_model(model.language_model, peft_config)


def merge_lora_state(state: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """A peft-wrapped model's state dict -> the plain model's, with each adapter folded into its base weight:
    W = W0 + (alpha / r) * B @ A (peft's default scaling), computed in fp32 and cast back to W0's dtype.

    Works on any full state dict (also ZeRO-3's gathered one), so merging never touches the live model.
    """
    prefix = "language_model.base_model.model."
    scaling = lora.alpha / lora.r
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if LORA_KEY.search(name):
            continue
        if not name.startswith(prefix):
            merged[name] = tensor
            continue
        plain = "language_model." + name[len(prefix):].replace(".base_layer.", ".")
        if ".base_layer.weight" in name:
            stem = name[: -len(".base_layer.weight")]
            a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
            tensor = (tensor.float() + scaling * (b.float() @ a.float())).to(tensor.dtype)
        merged[plain] = tensor
    return merged
