"""Training metrics: the JSONL log, the FLOP count behind MFU, and loss/lr curves.

MFU formula (documented in docs/train.md): model FLOPs per optimiser step =
`k * N_lm * tokens`, with N_lm the language model's parameter count (embeddings included, as the input/output
matrices are used once per token), tokens = non-padding tokens of the step (image and region slots included),
k = 6 when the LM's weights train (forward 2, backward 4: activation and weight gradients) and k = 4 when they
are frozen or LoRA-adapted (the backward still computes activation gradients through the LM to reach the
projector/extractor). Not counted: the vision tower and extractor (< 1% at 7B), attention score FLOPs (~3% at
1.1k tokens) and gradient-checkpointing recompute (MFU counts useful work only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak per GPU (tensor cores, no sparsity): H100 SXM and H200 both 989 TFLOP/s.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(n_lm_params: int, lm_weights_train: bool) -> float:
    return (6.0 if lm_weights_train else 4.0) * n_lm_params


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
