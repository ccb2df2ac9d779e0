"""`osprey train clip`'s training loop: `ClipRecipe` (setup, train, checkpoints, the weight file) and the ranks.

Laid out as train.recipe.Recipe and on its machinery: checkpoints in step folders written whole (train.checkpoints),
the schedule fitted into a time limit (train.schedule.FittedHorizon), the metrics log (train.metrics.MetricsLog).
What is trained, and why, is in train.clip_pretrain.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from train.checkpoints import checkpoint_root, latest_checkpoint, writing_checkpoint
from train.clip_pretrain import (
    LEVEL_HEAD,
    WEIGHTS_FILE,
    ClipPairsDataset,
    ClipPretrainConfig,
    LevelRegionHead,
    build_clip,
    collate_pairs,
    distinct_text_loss,
    image_and_region_embeddings,
    in_batch_accuracy,
    load_init_weights,
)

logger = logging.getLogger(__name__)
STATE_FILE = "clip_state.pt"  # in each checkpoint folder: model, optimizer, schedule, step, fitted horizon


def start_ranks(cfg: ClipPretrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call opened the process group): one process as is; under a launcher
    that sets WORLD_SIZE > 1 (torchrun), a process group (nccl on GPUs, gloo on CPUs) and this rank's GPU."""
    import torch.distributed as dist

    default = "cuda" if torch.cuda.is_available() else "cpu"
    use_cuda = (cfg.device or default).startswith("cuda")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, torch.device(cfg.device or default), False
    opened = not dist.is_initialized()
    if opened:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, opened


def share_rank0_weights(model: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers (the same seed gives the same init; a resumed or
    `--init` run loads the same file, but this makes it certain)."""
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Mean of every parameter's gradient over the ranks, in one flat all-reduce (a rank where a parameter got no
    gradient, e.g. no regions in its share of the batch, counts zeros for it)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world_size)
    for param, grad in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        param.grad = grad


def train_clip(cfg: ClipPretrainConfig, resume: bool = False) -> Path:
    """Train, checkpoint every `save_steps` (train.checkpoints; `resume` continues from the latest), write the weight
    file. Under torchrun, every rank runs this; rank 0 logs and writes the files."""
    if latest_checkpoint(cfg.out) is not None and not resume:
        raise FileExistsError(f"{checkpoint_root(cfg.out)} holds checkpoints of an earlier run: pass --resume to "
                              "continue it, or choose another --out")
    rank, world_size, device, opened_group = start_ranks(cfg)
    try:
        recipe = ClipRecipe(cfg, rank, world_size, device)
        recipe.setup(resume)
        recipe.train()
        return recipe.save_weights()
    finally:
        if opened_group:
            import torch.distributed as dist

            dist.destroy_process_group()


@dataclass
class _Losses:
    """One step's loss terms (the region terms None where a step had too few regions)."""

    total: torch.Tensor
    image: torch.Tensor
    region: torch.Tensor | None
    category: torch.Tensor | None
    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    regions: int


class ClipRecipe:
    """One CLIP pretraining run, laid out as train.recipe.Recipe: `setup` (data, model, optimizer, resume), `train`,
    `save_weights`; checkpoints, the time limit and the metrics log are that recipe's (train.checkpoints,
    train.schedule.FittedHorizon, train.metrics.MetricsLog)."""

    def __init__(self, cfg: ClipPretrainConfig, rank: int, world_size: int, device: torch.device) -> None:
        if cfg.batch_size % world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world_size} processes")
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.local_batch = cfg.batch_size // world_size
        self.out = Path(cfg.out)
        self.is_main = rank == 0
        self.step = 0
        self.level_head: LevelRegionHead | None = None

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self, resume: bool) -> None:
        from train.metrics import MetricsLog
        from train.schedule import FittedHorizon

        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.cfg.seed)
        self.setup_data()
        self.setup_model()
        self.fitted = FittedHorizon(self.cfg.time_limit, 0, self.cfg.steps, self.device)  # the cosine reads it
        self.setup_optimizer()
        horizon = self.load_checkpoint() if resume else None
        # the time box measures from here (a resumed run: from its step, with the horizon it had fitted)
        self.fitted = FittedHorizon(self.cfg.time_limit, self.step, self.cfg.steps, self.device, horizon=horizon)
        if self.world_size > 1:
            share_rank0_weights(self.model)
        if self.is_main:
            (self.out / "clip_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if resume else None) \
            if self.is_main else None
        logger.info("CLIP pretraining: %d captions, %d steps of %d (%d processes of %d), %s", len(self.dataset),
                    self.cfg.steps, self.cfg.batch_size, self.world_size, self.local_batch, self.device)

    def setup_data(self) -> None:
        from osprey.config import OspreyConfig
        from osprey.data.dataset import manifest_subsets
        from osprey.tokenization import load_tokenizer

        cfg = self.cfg
        self.vision_config = OspreyConfig.from_preset(cfg.preset).vision
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        specs = manifest_subsets(cfg.data, cfg.split)
        captions = [s for s in specs if s.kind == "captions"]
        self.wants_regions = cfg.region_weight > 0 or cfg.category_weight > 0
        referring = [s for s in specs if s.kind == "referring"] if self.wants_regions else []
        categories = [s for s in specs if s.kind == "categories"] if cfg.category_weight > 0 else []
        if not captions:
            raise ValueError(f"{cfg.data} has no caption sub-set for split {cfg.split!r}")
        self.dataset = ClipPairsDataset(captions, referring, self.tokenizer, self.vision_config, cfg.context_length,
                                        categories)
        if len(self.dataset) < cfg.batch_size:
            raise ValueError(f"{len(self.dataset)} captions make no full batch of {cfg.batch_size}: lower --batch-size")

    def setup_model(self) -> None:
        from open_clip.loss import ClipLoss

        from osprey.vision import open_clip_model_config

        cfg = self.cfg
        self.model = build_clip(self.vision_config, len(self.tokenizer), self.dataset.pad_id, self.dataset.eos_id,
                                cfg).to(self.device)
        if cfg.region_levels == "all" and self.wants_regions:
            embed_dim = open_clip_model_config(self.vision_config)["embed_dim"]
            self.level_head = LevelRegionHead(self.vision_config.level_channels, embed_dim).to(self.device)
            self.model.add_module(LEVEL_HEAD, self.level_head)
        if cfg.init:
            load_init_weights(self.model, cfg.init)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.region_loss_fn = ClipLoss()  # each rank's own regions: their number differs between ranks
        # Image-caption pairs: the whole step's batch, gathered with gradients (a plain ClipLoss on one process).
        self.image_loss_fn = (ClipLoss(gather_with_grad=True, rank=self.rank, world_size=self.world_size)
                              if self.world_size > 1 else ClipLoss())

    def setup_optimizer(self) -> None:
        from train.schedule import cosine_schedule

        cfg, named = self.cfg, list(self.model.named_parameters())
        decay = [p for n, p in named if p.ndim >= 2 and "logit_scale" not in n]
        no_decay = [p for n, p in named if p.ndim < 2 or "logit_scale" in n]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        # the cosine reads the horizon at every step: the time limit may move it
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup_steps, lambda: self.fitted.horizon)

    # -- training ----------------------------------------------------------------------------------------------
    def train(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.fitted.horizon, initial=self.step, desc="clip", unit="step", dynamic_ncols=True,
                   disable=not (self.cfg.progress and self.is_main))
        self.model.train()
        window = {"start": time.perf_counter(), "samples": 0, "regions": 0}
        for batch in self._batches() if self.step < self.fitted.horizon else ():
            losses = self.train_step(batch)
            self.step += 1
            window["samples"] += len(batch["images"])
            window["regions"] += losses.regions
            bar.update(1)
            out_of_time = self.fitted.update(self.step)
            bar.total = self.fitted.horizon
            done = self.step >= self.fitted.horizon or out_of_time
            if self.step % self.cfg.log_steps == 0 or done:
                self._log(losses, window, bar)
                window = {"start": time.perf_counter(), "samples": 0, "regions": 0}
            if self.cfg.save_steps and self.step % self.cfg.save_steps == 0 and not done:
                self.save_checkpoint()
            if done:
                break
        bar.close()

    def _batches(self):
        """Batches until the schedule ends, epoch after epoch, from one loader for the run: its workers persist, each
        epoch draws a new order, the same on every rank, which takes its own share; a resumed run seeds it from its
        step, so it draws a fresh order rather than replaying the first epochs."""
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.cfg.seed * 100_003 + self.step, drop_last=True)
        loader = DataLoader(self.dataset, batch_size=self.local_batch, sampler=sampler, drop_last=True,
                            num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0,
                            pin_memory=self.device.type == "cuda", collate_fn=collate_pairs)
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            epoch += 1
            yield from loader

    def train_step(self, batch: dict[str, Any]) -> _Losses:
        """Forward, backward (gradients averaged over ranks), clip, optimiser and schedule step."""
        losses = self._losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        if self.world_size > 1:
            average_gradients(self.params, self.world_size)
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, 1.0))
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop
        return losses

    def _losses(self, batch: dict[str, Any]) -> _Losses:
        """The image-caption loss, plus the region-phrase and region-category terms where a batch has regions."""
        cfg, model, device = self.cfg, self.model, self.device
        images = batch["images"].to(device, non_blocking=True)
        masks = batch["masks"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            image_embeddings, region_embeddings = image_and_region_embeddings(model.visual, images, masks,
                                                                              self.level_head)
            image_features = F.normalize(image_embeddings, dim=-1)
            text_features = model.encode_text(batch["captions"].to(device), normalize=True)
            logit_scale = model.logit_scale.exp()
            total = image_loss = self.image_loss_fn(image_features, text_features, logit_scale)
            region_loss = category_loss = None
            region_features = F.normalize(region_embeddings, dim=-1)
            if cfg.region_weight > 0 and len(region_embeddings) > 1:
                phrase_features = model.encode_text(batch["phrases"].to(device), normalize=True)
                region_loss = self.region_loss_fn(region_features, phrase_features, logit_scale)
                total = total + cfg.region_weight * region_loss
            if cfg.category_weight > 0 and len(region_embeddings) > 1:
                category_loss = distinct_text_loss(region_features, batch["categories"].to(device),
                                                   model.encode_text, logit_scale, self.dataset.pad_id)
                if category_loss is not None:
                    total = total + cfg.category_weight * category_loss
        return _Losses(total, image_loss, region_loss, category_loss, image_features, text_features, logit_scale,
                       len(region_embeddings))

    def _log(self, losses: _Losses, window: dict[str, float], bar) -> None:
        """One metrics record (rank 0), with the throughput of all ranks since the last one."""
        from train.deepspeed_utils import all_reduce_sum

        elapsed = time.perf_counter() - window["start"]
        samples, regions = all_reduce_sum([window["samples"], window["regions"]], self.device)
        if self.metrics is None:
            return

        def value(loss: torch.Tensor | None) -> float | None:
            return None if loss is None else float(loss.detach())

        record = {"step": self.step, "loss": value(losses.total), "image_loss": value(losses.image),
                  "region_loss": value(losses.region), "category_loss": value(losses.category),
                  "regions_per_step": regions / self.cfg.log_steps, "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": self.grad_norm, "logit_scale": value(losses.logit_scale),
                  "in_batch_accuracy": in_batch_accuracy(losses.image_features.float(), losses.text_features.float()),
                  "samples_per_s": samples / elapsed}
        self.metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['in_batch_accuracy']:.2f}")

    # -- checkpoints and the weight file -----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        with writing_checkpoint(self.out, self.step, self.rank, keep=1) as folder:
            if self.is_main:
                torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict(), "step": self.step,
                            "horizon": self.fitted.horizon}, folder / STATE_FILE)

    def load_checkpoint(self) -> int | None:
        """Continue from the latest checkpoint (every rank reads it); returns its fitted horizon."""
        folder = latest_checkpoint(self.out)
        if folder is None:
            logger.warning("--resume: no checkpoint under %s, starting from step 0", checkpoint_root(self.out))
            return None
        state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        logger.info("resumed %s at step %d", folder, self.step)
        return state["horizon"]

    def save_weights(self) -> Path:
        """The open_clip weight file (without the region level head), then the checkpoints go: the file is the
        run's product, and a next run carries it on with --init."""
        from safetensors.torch import save_file

        from train.deepspeed_utils import barrier

        weights = self.out / WEIGHTS_FILE
        if self.is_main:
            self.metrics.close()
            tmp = weights.with_name(f".{weights.name}.tmp")
            exported = {k: v for k, v in self.model.state_dict().items() if not k.startswith(f"{LEVEL_HEAD}.")}
            save_file({k: v.detach().contiguous().cpu() for k, v in exported.items()}, str(tmp))
            tmp.replace(weights)
            shutil.rmtree(checkpoint_root(self.out), ignore_errors=True)
            logger.info("wrote %s", weights)
        barrier()  # no rank returns before the weights exist
        return weights
