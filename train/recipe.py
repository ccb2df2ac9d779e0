"""The training recipe for all three Osprey stages: `setup_model / setup_data / setup_optimizer / train / save`.

Stages differ only by configuration (which parts train, learning rate, data), never by code path. A run writes

    <output_dir>/metrics.jsonl                     one JSON object per logged optimiser step
    <output_dir>/checkpoints/step-000500/model/    a model folder (`osprey.checkpoint.load_pretrained` loads it)
    <output_dir>/checkpoints/step-000500/engine/   DeepSpeed engine state (optimizer, scheduler, fp32 weights)
    <output_dir>/checkpoints/step-000500/trainer_state.json + rng-rank*.pt   position in the data, RNG states
    <output_dir>/final/                            the final model folder: the next stage's `model:`

Each checkpoint is written under a temporary name and renamed when complete, so a killed run never leaves a
half-written checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from osprey.tokenization import trained_targets
from train import deepspeed_utils as dsu
from train.checkpoints import CHECKPOINT_DIR, checkpoint_root, latest_checkpoint, writing_checkpoint
from train.config import TrainConfig
from train.metrics import LMFlops, MetricsLog, memory_stats, peak_flops
from train.sampler import ResumableSampler
from train.schedule import FittedHorizon, cosine_schedule
from train.trainable import merge_lora_state, set_trainable

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
STATE_FILE = "trainer_state.json"
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")


@dataclass
class TrainerState:
    """Where a run stands: enough to continue exactly after a kill."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this rank consumed in `epoch`
    samples_seen: int = 0  # this rank
    truncated_samples: int = 0  # this rank
    fully_masked_samples: int = 0  # this rank: no trained token, contributed no loss
    losses: list[float] = field(default_factory=list)  # per-step mean loss (all ranks)
    horizon: int = 0  # the schedule's last step as `time_limit` fitted it (0: none; max_steps / epochs)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Recipe:
    """One training run. `Recipe(cfg).run()` or step by step: `setup(resume)`, `train()`, `save_final()`.

    `dataset` (Python API): any map-style dataset whose items `collate_fn` turns into a batch dict with
    `input_ids, attention_mask, labels (B, T)`, `pixel_values (B, 3, S, S)`, `masks: list[(Q_i, H_i, W_i) bool]`
    and optionally `truncated: (B,) bool`; `lengths` gives each sample's token count for length grouping.
    Without it, `setup_data` builds the dataset from `cfg.data` with `osprey.data`.
    """

    def __init__(self, cfg: TrainConfig, *, dataset: Dataset | None = None, collate_fn: Callable | None = None,
                 lengths: Sequence[int] | None = None) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self._dataset, self._collate_fn, self._lengths = dataset, collate_fn, lengths
        self.state = TrainerState()
        self.engine = None
        self.metrics: MetricsLog | None = None
        self.clock: Callable[[], float] = time.perf_counter  # what `time_limit` is measured with

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> None:
        if not resume and self.latest_checkpoint() is not None:
            raise FileExistsError(f"{self.checkpoint_root()} holds checkpoints of an earlier run: pass --resume to "
                                  "continue it, or choose another output_dir")
        self.rank, self.world_size, self.device = dsu.init_distributed()
        _seed_everything(self.cfg.seed + self.rank)
        if self.cfg.tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.setup_model()
        self.setup_data()
        self.setup_optimizer()
        resume_from = self.latest_checkpoint() if resume else None
        if resume and resume_from is None:
            logger.warning("--resume: no checkpoint under %s, starting from step 0", self.output_dir / CHECKPOINT_DIR)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if self.rank == 0:
            self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", resume_step=self.state.step if resume_from else None)
            (self.output_dir / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))

    def setup_model(self) -> None:
        """Load the start model, enable checkpointing, freeze per stage (the trainable set is asserted)."""
        from osprey.checkpoint import build_model, default_tokenizer_corpus, load_pretrained
        from osprey.config import OspreyConfig
        from osprey.tokenization import train_tokenizer

        cfg = self.cfg
        if Path(cfg.model).is_dir():
            model, tokenizer, report = load_pretrained(cfg.model, clip_weights=cfg.clip_weights, strict=cfg.load_strict)
            if not report.ok:
                logger.warning("loaded %s non-strictly (stage %d):\n%s", cfg.model, cfg.stage, report.summary())
        else:
            config = OspreyConfig.from_preset(cfg.model)
            logger.info("building preset %s with random weights (seed %d)", cfg.model, cfg.seed)
            torch.manual_seed(cfg.seed)
            model = build_model(config)
            tokenizer = train_tokenizer(default_tokenizer_corpus(), config.vocab_size)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model.language_model)
        self.part_counts = set_trainable(model, cfg.stage, train_vision=cfg.train_vision, lora=cfg.lora)
        if cfg.compile:
            if dsu.load_template(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0) == 3:
                raise ValueError("compile: true is not supported with ZeRO-3 (its parameter hooks break compiled graphs)")
            logger.info("compiled %d modules (regional torch.compile)", compile_regions(model))
        self.model, self.tokenizer = model, tokenizer
        self.lm_flops = LMFlops.of(model.language_model, weights_train=cfg.stage == 3 and cfg.lora is None)

    def setup_data(self) -> None:
        """Dataset, per-sample lengths, the resumable (length-grouped) sampler; the config saved models carry."""
        from osprey.data.provenance import merge_training_data, training_entry

        cfg = self.cfg
        # saved models record this run's data after the earlier stages' (osprey.data.provenance); read once.
        # A tower from `osprey train clip` brings its own (stage 0), read from the clip_config.json beside it.
        training_data = self.model.config.training_data
        if cfg.clip_weights:
            from train.clip_pretrain import clip_training_entry

            clip_entry = clip_training_entry(cfg.clip_weights)
            if clip_entry is not None:
                training_data = merge_training_data(training_data, clip_entry)
        self.saved_config = self.model.config.replace(training_data=merge_training_data(
            training_data, training_entry(cfg.data.root, cfg.data.split, cfg.stage)))
        if self._dataset is None:
            self._dataset, self._collate_fn, self._lengths = dataset_from_config(cfg, self.tokenizer, self.model.config)
        dataset = self._dataset
        lengths = list(self._lengths) if self._lengths is not None else list(dataset.lengths)
        if len(lengths) != len(dataset):
            raise ValueError(f"got {len(lengths)} lengths for a dataset of {len(dataset)} samples")
        self.dataset = dataset
        self.sampler = ResumableSampler(
            lengths, micro_batch_size=cfg.micro_batch_size, world_size=self.world_size, rank=self.rank, seed=cfg.seed,
            group_by_length=cfg.data.group_by_length,
        )
        self.accumulation = cfg.gradient_accumulation(self.world_size)
        batches = self.sampler.samples_per_rank // cfg.micro_batch_size
        self.steps_per_epoch = batches // self.accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} samples make no full global batch of {cfg.global_batch_size}")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * self.steps_per_epoch)
        self.planned_steps = self.total_steps  # `total_steps` is the schedule's horizon: a time limit moves it below this
        logger.info("data: %d samples, %d steps/epoch (global batch %d = %d x %d ranks x %d accumulation), %d steps",
                    len(dataset), self.steps_per_epoch, cfg.global_batch_size, cfg.micro_batch_size, self.world_size,
                    self.accumulation, self.total_steps)

    def loader(self) -> DataLoader:
        """The data loader for the current epoch, resuming inside it (`bench.step_profile` times it too)."""
        self.sampler.set_epoch(self.state.epoch, start=self.state.batches_in_epoch * self.cfg.micro_batch_size)
        if hasattr(self.dataset, "set_epoch"):  # osprey.data: stage-2 region order etc. are seeded per epoch
            self.dataset.set_epoch(self.state.epoch)
        workers = self.cfg.data.num_workers
        return DataLoader(
            self.dataset, batch_size=self.cfg.micro_batch_size, sampler=self.sampler, collate_fn=self._collate_fn,
            num_workers=workers, pin_memory=self.device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + self.state.epoch),
        )

    def setup_optimizer(self) -> None:
        """AdamW (no decay on biases/norms, as HF Trainer) + cosine with warm-up, wrapped by the DeepSpeed engine."""
        cfg, optim = self.cfg, self.cfg.optim
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        by_rate: dict[float, list[tuple[str, torch.nn.Parameter]]] = {optim.lr: []}  # base rate first: the log
        for n, p in trainable:  # shows param_groups[0]'s rate; `optim.part_lr` overrides `lr` for whole parts
            by_rate.setdefault(optim.part_lr.get(n.split(".", 1)[0], optim.lr), []).append((n, p))
        groups = []  # per (learning rate, decay)
        for lr, members in by_rate.items():
            groups += [
                {"params": [p for n, p in members if p.ndim >= 2], "weight_decay": optim.weight_decay, "lr": lr},
                {"params": [p for n, p in members if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
            ]
        groups = [g for g in groups if g["params"]]
        ds_config = dsu.build_ds_config(cfg, self.world_size)
        optimizer = None
        if optim.optimizer == "torch":
            fused = self.device.type == "cuda"
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused or None)
        warmup = math.ceil(optim.warmup_ratio * self.total_steps)

        def schedule(base_optimizer):  # DeepSpeed calls this with the optimizer it steps (also its own Adam)
            return cosine_schedule(base_optimizer, warmup, lambda: self.total_steps)  # time_limit may move it

        engine, optimizer, scheduler = dsu.initialize(self.model, optimizer, schedule, ds_config, param_groups=groups)
        self.engine, self.optimizer, self.scheduler = engine, optimizer, scheduler
        self.ds_config = ds_config
        logger.info("optimizer: %s lr %.3g, warm-up %d of %d steps, ZeRO stage %d, bf16 %s",
                    optim.optimizer, optim.lr, warmup, self.total_steps, dsu.zero_stage(engine), cfg.bf16)

    # -- training ----------------------------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> TrainerState:
        """Run to `total_steps` (or stop after `until_step`, as a preemption would, for tests and time boxes)."""
        from tqdm import tqdm

        cfg, engine = self.cfg, self.engine
        until = until_step if until_step is not None else math.inf
        stop = min(self.total_steps, until)
        engine.train()
        if not cfg.train_vision:
            self.model.vision_tower.eval()
        peak = peak_flops(self.device)
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc=f"stage {cfg.stage}", unit="step",
                   disable=not cfg.progress or self.rank != 0, dynamic_ncols=True)
        fitted = FittedHorizon(cfg.time_limit, self.state.step, self.planned_steps, self.device,
                               horizon=self.total_steps, clock=self.clock)
        window = _Window()
        pending: list[float] = []  # per-step losses not yet written to the log
        while self.state.step < stop:
            batches_per_epoch = self.steps_per_epoch * self.accumulation
            waited = time.perf_counter()
            for batch in self.loader():
                window.data_time += time.perf_counter() - waited
                loss = self.micro_step(batch, window)
                waited = time.perf_counter()
                window.losses.append(loss)
                self.state.batches_in_epoch += 1
                if self.state.batches_in_epoch % self.accumulation:
                    continue
                self.state.step += 1
                record = self._step_record(window, peak)
                if cfg.time_limit:
                    fitted.update(self.state.step)
                    if fitted.horizon != self.total_steps:
                        self.total_steps = self.state.horizon = bar.total = fitted.horizon
                    stop = min(self.total_steps, until)
                self.state.losses.append(record["loss"])
                window = _Window()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                pending.append(record["loss"])
                if self.metrics is not None and (self.state.step % cfg.log_steps == 0 or self.state.step == stop):
                    # loss: mean over the steps since the last record (HF Trainer style); the rest: this step
                    self.metrics.write({**record, "loss": sum(pending) / len(pending), "loss_steps": len(pending)})
                    pending = []
                epoch_done = self.state.batches_in_epoch >= batches_per_epoch
                if epoch_done:  # the rest of this loader is the epoch's trailing partial accumulation: dropped
                    self.state.epoch += 1
                    self.state.batches_in_epoch = 0
                if cfg.save_steps and self.state.step % cfg.save_steps == 0 and self.state.step < self.total_steps:
                    self.save_checkpoint()
                if epoch_done or self.state.step >= stop:
                    break
        bar.close()
        if self.state.fully_masked_samples or self.state.truncated_samples:
            logger.warning("rank %d: %d truncated samples, %d fully masked samples (no trained token: no loss)",
                           self.rank, self.state.truncated_samples, self.state.fully_masked_samples)
        return self.state

    def micro_step(self, batch: dict[str, Any], window: _Window | None = None) -> torch.Tensor:
        """Forward, backward and (at accumulation boundaries) the optimiser step of one micro-batch; returns the
        detached loss. `window` collects the step's counters for the metrics log (a throwaway one when None).

        Bookkeeping reads the batch while it is still on the CPU, so it never waits for the GPU.
        """
        window = window if window is not None else _Window()
        labels = batch["labels"]
        trained_per_sample = trained_targets(labels).sum(dim=1)
        trained = int(trained_per_sample.sum())
        self.state.fully_masked_samples += int((trained_per_sample == 0).sum())
        if "truncated" in batch:
            self.state.truncated_samples += int(torch.as_tensor(batch["truncated"]).sum())
        self.state.samples_seen += labels.shape[0]
        window.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applies (0 on step 1 of a warm-up)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        window.tokens += sum(lengths)
        window.flops += self.lm_flops.step(lengths, trained if self.cfg.trained_logits_only else sum(lengths))
        window.samples += labels.shape[0]

        inputs = {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS}
        masks = batch["masks"]
        if hasattr(masks, "to"):  # PackedMasks: one copy for the batch
            masks = list(masks.to(self.device, non_blocking=True))
        else:
            masks = [m.to(self.device, non_blocking=True) for m in masks]
        out = self.engine(**inputs, masks=masks, use_cache=False, trained_logits_only=self.cfg.trained_logits_only)
        if trained == 0:
            # Nothing to learn from this micro-batch: the model's loss is an exact zero that still reaches every
            # trainable weight, so every rank's collectives stay in step.
            logger.warning("step %d: micro-batch has no trained token (fully masked), contributes zero loss", self.state.step)
        loss = out.loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def _step_record(self, window: _Window, peak: float | None) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - window.start
        local_loss = float(torch.stack(window.losses).float().sum())  # one device sync per step
        loss_sum, tokens, samples, flops = dsu.all_reduce_sum(
            [local_loss, window.tokens, window.samples, window.flops], self.device)
        loss = loss_sum / (len(window.losses) * self.world_size)
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.state.step, "epoch": self.state.epoch + self.state.batches_in_epoch / max(1, self.steps_per_epoch * self.accumulation),
            "loss": loss, "lr": window.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed, "step_time_s": elapsed,
            "data_time_s": window.data_time,
            "tokens": int(tokens),
        }
        if peak:
            record["mfu"] = flops / elapsed / (peak * self.world_size)
        record.update(memory_stats(self.device))
        return record

    # -- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_root(self) -> Path:
        return checkpoint_root(self.output_dir)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.output_dir)

    def save_model(self, out: Path) -> None:
        """The model folder (official key names, LoRA merged) via `osprey.checkpoint.save_pretrained` (rank 0)."""
        from osprey.checkpoint import build_model, save_pretrained

        state = dsu.full_state_dict(self.engine)  # all ranks take part (ZeRO-3 gathers)
        if self.rank != 0:
            return
        if self.cfg.lora is not None:
            state = merge_lora_state(state, self.cfg.lora)
        view = build_model(self.saved_config, device="meta")  # shares the gathered tensors, no copy
        view.load_state_dict(state, strict=True, assign=True)
        save_pretrained(view, self.tokenizer, out)

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint at the current step (train.checkpoints: written whole, then renamed)."""
        with writing_checkpoint(self.output_dir, self.state.step, self.rank, self.cfg.keep_checkpoints) as tmp:
            self.save_model(tmp / "model")
            dsu.save_engine(self.engine, tmp, client_state={"trainer_state": self.state.to_dict()})
            torch.save(_rng_state(), tmp / f"rng-rank{self.rank}.pt")
            if self.rank == 0:
                (tmp / STATE_FILE).write_text(json.dumps({**self.state.to_dict(), "world_size": self.world_size},
                                                         indent=2))
        return self.checkpoint_root() / f"step-{self.state.step:06d}"

    def load_checkpoint(self, folder: Path) -> None:
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("world_size") != self.world_size:
            raise ValueError(f"checkpoint {folder} was written by {state.get('world_size')} ranks, this run has "
                             f"{self.world_size}: the data order would differ")
        dsu.load_engine(self.engine, folder)
        state.pop("world_size")
        self.state = TrainerState(**state)
        if self.state.horizon:  # a time limit had fitted the schedule: keep its shape
            self.total_steps = self.state.horizon
        rng_file = folder / f"rng-rank{self.rank}.pt"
        _set_rng_state(torch.load(rng_file, weights_only=False))
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.state.step, self.state.epoch,
                    self.state.batches_in_epoch)

    def save_final(self) -> Path:
        out = self.output_dir / FINAL_DIR
        self.save_model(out)
        dsu.barrier()
        if self.rank == 0:
            summary = {**self.state.to_dict(), "total_steps": self.total_steps, "parts": self.part_counts}
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            logger.info("final model: %s", out)
        return out

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def run(self, resume: bool = False) -> Path:
        self.setup(resume=resume)
        try:
            self.train()
            return self.save_final()
        finally:
            self.close()


@dataclass
class _Window:
    """Counters of the micro-batches of one optimiser step."""

    losses: list[torch.Tensor] = field(default_factory=list)  # detached per-micro-batch losses, on the device
    lr: float = 0.0
    tokens: int = 0
    samples: int = 0
    flops: float = 0.0  # model FLOPs of the micro-batches (train.metrics.LMFlops)
    data_time: float = 0.0  # seconds spent waiting for the data loader (a data-bound run shows it near step_time_s)
    start: float = field(default_factory=time.perf_counter)


def enable_checkpointing(language_model: torch.nn.Module) -> None:
    """Activation checkpointing of the LM's layers (non-reentrant: gradients also reach the spliced-in image and
    region tokens when the LM itself is frozen). transformers renamed the method in 5.2x; 5.17 has the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(language_model, "activation_checkpointing_enable"):
        language_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_regions(model: torch.nn.Module) -> int:
    """torch.compile the repeated blocks of the model in place: the LM's decoder layers (the classes transformers
    lists in `_no_split_modules`, LoRA-wrapped or not) and the vision tower's stages. Returns how many.

    Regional compilation: identical layers share one compiled graph, so compile time stays that of one layer,
    while the element-wise work (norms, rotary, activations, dropout) is fused into few kernels.
    """
    lm = model.language_model
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in layer_classes]
    for layer in layers:  # the sequence length varies by batch: dynamic after the first change
        layer.compile()
    stages = list(model.vision_tower.trunk.stages)
    for stage in stages:  # fixed input size; static shapes (the stages share code but differ in shape)
        stage.compile(dynamic=False)
    return len(layers) + len(stages)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dataset_from_config(cfg: TrainConfig, tokenizer, model_config):
    """(dataset, collate_fn, lengths) from `cfg.data` via `osprey.data` (stage-specific sample builders)."""
    from osprey.data.dataset import (
        RegionCollator,
        RegionDataset,
        count_fully_masked,
        manifest_subsets,
        specs_for_files,
    )

    data = cfg.data
    if data.root is None:
        raise ValueError("data.root is not set: give the dataset folder (e.g. the output of `osprey data synth`)")
    if data.files:
        specs = []
        for entry in data.files:
            entry = {"path": entry} if isinstance(entry, str) else entry
            kind = entry.get("kind")
            specs += entry.get("repeat", 1) * specs_for_files([entry["path"]], data.root, data.image_root,
                                                              stage=cfg.stage if kind else None, kind=kind)
    else:
        specs = manifest_subsets(data.root, data.split, stages=[cfg.stage], names=data.subsets)
    wrong = [f"{s.path} (stage {s.stage})" for s in specs if s.stage != cfg.stage]
    if wrong or not specs:
        raise ValueError(f"stage {cfg.stage} run: record files of other stages {wrong}" if wrong
                         else f"no stage-{cfg.stage} sub-sets found in {data.root} (split {data.split})")
    dataset = RegionDataset(specs, tokenizer, model_config.vision, max_length=data.max_length, seed=cfg.seed,
                            image_token_id=model_config.image_token_id, max_regions=data.max_regions,
                            template=data.template)
    logger.info("data: %s", ", ".join(f"{s.path.name} ({s.kind})" for s in specs))
    lengths = dataset.estimate_lengths(workers=data.num_workers)  # the loader's workers, before they are started
    if data.drop_fully_masked:
        bad = set(count_fully_masked(dataset))
        keep = [i for i in range(len(dataset)) if i not in bad]
        logger.warning("leaving out %d fully masked samples of %d", len(bad), len(dataset)) if bad else None
        lengths = [lengths[i] for i in keep]
        dataset = _EpochSubset(dataset, keep)
    return dataset, RegionCollator(tokenizer.pad_token_id), lengths


class _EpochSubset(torch.utils.data.Subset):
    """A Subset that forwards `set_epoch` (per-epoch sample randomness) to its dataset."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
