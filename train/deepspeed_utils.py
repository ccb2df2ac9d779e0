"""Everything DeepSpeed-specific: process-group setup (also single-process on CPU), the JSON config, the engine,
engine checkpoints and gathering a full state dict (ZeRO-3 shards included).

The shipped JSONs (train/configs/zero*.json) hold only ZeRO settings and no "auto" values; batch sizes,
clipping and precision are filled in from the YAML at launch, so one source of truth decides each number.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from train.config import CONFIG_DIR, TrainConfig

logger = logging.getLogger(__name__)

_FILLED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


def ensure_distributed_env() -> None:
    """Make a plain `python` process a 1-rank world (as the `deepspeed`/`torchrun` launchers would), and select
    DeepSpeed's CPU accelerator when there is no GPU. Must run before `import deepspeed`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Port 0: rank 0's store binds a port the OS picks and keeps it. Picking a free port, closing it and binding it
    # again later raced with any other process doing the same. A one-rank world has nobody who must know the port;
    # launchers of larger worlds (torchrun, deepspeed) set MASTER_PORT themselves.
    os.environ.setdefault("MASTER_PORT", "0")


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group once (gloo on CPU, nccl on GPU) -> (rank, world_size, device)."""
    ensure_distributed_env()
    import deepspeed
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def load_template(name: str) -> dict[str, Any]:
    """A shipped DeepSpeed JSON by stem (`zero2`, `zero3`, `zero3_offload`) or a path; refuses "auto" values."""
    path = Path(name)
    if not path.is_file():
        path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("zero*.json"))
        raise FileNotFoundError(f"DeepSpeed config {name!r} is neither a file nor one of {shipped}")
    data = json.loads(path.read_text())
    autos = [k for k, v in _walk(data) if v == "auto"]
    if autos:
        raise ValueError(f"{path}: 'auto' values are not resolved here, give explicit numbers for {autos}")
    clashes = [k for k in _FILLED_KEYS if k in data]
    if clashes:
        raise ValueError(f"{path}: {clashes} come from the training YAML; remove them from the DeepSpeed JSON")
    return data


def _walk(data: Any, prefix: str = ""):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), data


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The full DeepSpeed config of a run: the ZeRO template + values from the YAML."""
    ds = load_template(cfg.deepspeed)
    accumulation = cfg.gradient_accumulation(world_size)
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.micro_batch_size * accumulation * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.bf16},
    })
    if cfg.optim.optimizer == "deepspeed":
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay}}
    else:
        # A torch optimizer under ZeRO: allowed explicitly (DeepSpeed's CPU Adam needs a ~70 s op build).
        ds["zero_allow_untested_optimizer"] = True
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def initialize(model: torch.nn.Module, optimizer, scheduler, ds_config: dict[str, Any], param_groups=None):
    """-> (engine, optimizer, scheduler). With `optimizer=None` DeepSpeed builds the one in `ds_config` over
    `param_groups`; `scheduler` may be a callable that DeepSpeed calls with the optimizer it steps."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        model_parameters=param_groups if optimizer is None else None, config=ds_config,
    )
    return engine, optimizer, scheduler


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole module's state dict on CPU, on rank 0 (None elsewhere). ZeRO-3 shards are gathered."""
    import torch.distributed as dist

    if zero_stage(engine) == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if dist.get_rank() == 0 else None
    if state is None:
        return None
    return {k: v.detach().cpu() for k, v in state.items()}


def save_engine(engine, folder: Path, client_state: dict[str, Any]) -> None:
    """Optimizer, scheduler, fp32 master weights and `client_state` (all ranks must call)."""
    engine.save_checkpoint(str(folder), tag="engine", client_state=client_state)


def load_engine(engine, folder: Path) -> dict[str, Any]:
    path, client_state = engine.load_checkpoint(str(folder), tag="engine", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed engine state under {folder}")
    return client_state


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum small counters over ranks (tokens, samples) for throughput figures."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_from_rank0(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's integers on every rank (decisions that must agree, such as when to stop)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()
