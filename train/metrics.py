"""Training metrics: the JSONL log, the FLOP count behind MFU, and loss/lr curves.

MFU = model FLOPs of the step / (elapsed time x peak). Model FLOPs follow PaLM (appendix B) counted from the LM's
shapes by `LMFlops` (documented in docs/train.md), per token of a sequence of length T:
- every matrix multiply of the decoder: 6 FLOPs per weight when the LM's weights train (forward 2, backward 4:
  activation and weight gradients), 4 when they are frozen or LoRA-adapted (the backward still computes
  activation gradients through the LM to reach the projector/extractor);
- LoRA adapters: 6 per weight (they train);
- the LM head (6 or 4 per weight) only at the positions where it runs: every token, or only the trained ones with
  `trained_logits_only`;
- causal attention scores and values: 6 * layers * (heads x head dim) * (T + 1), forward and backward, the half of
  the score matrix a causal mask keeps;
- not counted: the embedding lookup (no multiply), the vision tower and extractor (< 1% at 7B), norms and
  activations, and gradient-checkpointing recompute (MFU counts useful work only).
The earlier formula, `k * N_lm` (k = 6 or 4, N_lm all LM parameters), is kept as `mfu_6n` in benchmark results so
older figures stay comparable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Dense bf16 peak per GPU (tensor cores, no sparsity): H100 SXM and H200 both 989 TFLOP/s.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class LMFlops:
    """The language model's shapes that set the FLOPs of a training step (see the module docstring)."""

    body_params: int  # weights of the decoder's matrix multiplies: the embedding and the head excluded
    head_params: int
    adapter_params: int  # LoRA A and B matrices
    layers: int
    attention_width: int  # query heads x head dim: the width of the score and value products
    weights_train: bool  # full fine-tuning (6 per weight) or a frozen / LoRA-adapted LM (4 per weight)

    @classmethod
    def of(cls, language_model: nn.Module, weights_train: bool) -> LMFlops:
        """Read the counts from a transformers causal LM, plain or wrapped by peft."""
        embedding = language_model.get_input_embeddings().weight
        head = language_model.get_output_embeddings().weight
        adapters = sum(p.numel() for n, p in language_model.named_parameters() if "lora_" in n)
        matrices = sum(p.numel() for n, p in language_model.named_parameters() if p.dim() >= 2 and "lora_" not in n)
        body = matrices - embedding.numel() - (0 if head is embedding else head.numel())
        config = language_model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(body_params=body, head_params=head.numel(), adapter_params=adapters,
                   layers=config.num_hidden_layers, attention_width=config.num_attention_heads * head_dim,
                   weights_train=weights_train)

    def breakdown(self, sequence_lengths: Sequence[int], head_positions: int) -> dict[str, float]:
        """FLOPs per part for one step over sequences of these (non-padding) lengths, the head run at
        `head_positions` positions."""
        k = 6.0 if self.weights_train else 4.0
        tokens = float(sum(sequence_lengths))
        return {
            "body": k * self.body_params * tokens,
            "head": k * self.head_params * head_positions,
            "adapters": 6.0 * self.adapter_params * tokens,
            "attention": 6.0 * self.layers * self.attention_width * float(sum(t * (t + 1) for t in sequence_lengths)),
        }

    def step(self, sequence_lengths: Sequence[int], head_positions: int) -> float:
        return sum(self.breakdown(sequence_lengths, head_positions).values())


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of the device, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"gpu_mem_gb": torch.cuda.memory_allocated(device) / 2**30,
            "gpu_peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}


class MetricsLog:
    """Append-only JSONL: one object per logged step, flushed at once (readable while training runs).

    On resume, records past the resumed step are dropped first, so the log matches an uninterrupted run.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_log(path: str | Path, out: str | Path) -> Path:
    """Loss, learning rate and throughput against step, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(path) if "loss" in r]
    if not records:
        raise ValueError(f"{path} holds no step records with a loss")
    panels = [("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens / s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    steps = [r["step"] for r in records]
    for ax, (key, title) in zip(axes, panels):
        ax.plot(steps, [r.get(key) for r in records], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(path).parent.name}/{Path(path).name}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
