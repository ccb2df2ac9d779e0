"""`osprey train clip`: pretrain a preset's vision tower as a CLIP model (open_clip) on a dataset's captions.

Osprey starts from a pretrained CLIP ConvNeXt whose convolutional features already tell objects apart; the mask
extractor only pools them. A model trained from scratch has no such tower, and the built-in model showed what
follows (docs/builtin_model.md): with uninformative region tokens at the start of stage 3 the LLM learns the
language prior, stops attending to the <mask>/<pos> slots, and the gradient to the extractor vanishes. This step
supplies the missing pretrained CLIP: the preset's open_clip vision tower plus a small open_clip text tower
(reading ids of the model's own tokenizer), trained with open_clip's contrastive `ClipLoss` on image captions,
plus the same loss between regions and their referring phrases (as RegionCLIP), so the features the mask
extractor pools learn to tell regions apart. A region's embedding reads the tower as the extractor does: every
level mask-pooled, through per-level linear maps, summed (`LevelRegionHead`; `region_levels="final"` instead puts
the last map's pooled features through the image path's head, where the category then settles out of the
extractor's linear reach: docs/builtin_model.md).

Referring phrases alone teach colour and position, not shape: in a batch of ~1000 regions the colour and the
place already single out a region's phrase (measured on one H100: 1,071 steps at batch 256 left a linear
category probe on the pooled features at 20.5 % against 11.9 % for the majority class). So regions are also
contrasted with their category names, as region-level pretraining on detection labels does (RegionCLIP, GLIP):
a softmax over the batch's *distinct* names (`distinct_text_loss`), since ClipLoss would count the other
regions of the same category as negatives.

The output is an open_clip weight file (`visual.*` and the text tower) that stage configs load through
`clip_weights:`, exactly as the official recipe loads the ConvNeXt-L CLIP file.

Several GPUs: launched by `torchrun`, each process takes `batch_size / world size` images of every step; the
image-caption loss contrasts the whole step's batch (features gathered with their gradients, as open_clip's own
distributed training), the region losses each process's regions (their counts differ per process), and gradients
are averaged over processes before clipping, so one step is the same step on any number of GPUs.

    osprey train clip --data data/synth --tokenizer runs/builtin/init --out runs/builtin/clip --steps 2000
    torchrun --nproc_per_node 4 $(which osprey) train clip --data data/synth ... --batch-size 1024
    osprey train --stage 1 --config builtin_stage1 --set clip_weights=runs/builtin/clip/open_clip.safetensors
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
from torch.utils.data import DataLoader, Dataset

from train.checkpoints import checkpoint_root, latest_checkpoint, writing_checkpoint

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "open_clip.safetensors"
STATE_FILE = "clip_state.pt"  # in each checkpoint folder: model, optimizer, schedule, step, fitted horizon
REGION_LEVELS = ("all", "final")
LEVEL_HEAD = "region_level_head"  # the LevelRegionHead's module name in the CLIP: checkpointed, not exported


@dataclass(frozen=True)
class ClipPretrainConfig:
    data: str  # a generated dataset (`osprey data synth`): its stage-1 caption sub-sets are read
    tokenizer: str  # a model folder whose tokenizer encodes the captions (e.g. `osprey model init` output)
    out: str  # output folder: open_clip.safetensors, metrics.jsonl, checkpoints/ (while it runs)
    preset: str = "builtin"  # whose vision config (open_clip_config) is trained
    split: str = "train"
    steps: int = 2000
    batch_size: int = 256  # images per step over all processes (each of W processes takes batch_size / W)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    region_weight: float = 1.0  # weight of the region-phrase loss (0: image-caption CLIP only)
    category_weight: float = 1.0  # weight of the region-category-name loss (0: none)
    # Which features a region embedding reads. "all": every level res2..res5, mask-pooled, each through its own
    # linear map, summed (the shape of the mask extractor, which reads them linearly); "final": the last map
    # mask-pooled through the trunk's head norm and the CLIP projection (the image path with another pooling).
    region_levels: str = "all"
    context_length: int = 64
    text_width: int = 256
    text_heads: int = 4
    text_layers: int = 4
    num_workers: int = 4
    seed: int = 0
    save_steps: int = 500
    log_steps: int = 10
    # Seconds of training (0: no limit): the cosine's horizon is fitted to the measured pace (train.schedule.TimeBox),
    # so the rate anneals to its end within the limit; the weights are written after it. For time-boxed machines.
    time_limit: float = 0.0
    # open_clip weights to start from (an earlier run's open_clip.safetensors), e.g. to carry on a run whose
    # checkpoint (with its optimizer state) is gone; the region level head is not exported and starts fresh.
    init: str | None = None
    device: str | None = None  # default: cuda when available
    progress: bool = True

    def __post_init__(self) -> None:
        if self.region_levels not in REGION_LEVELS:
            raise ValueError(f"region_levels must be one of {REGION_LEVELS}, got {self.region_levels!r}")
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or self.context_length < 4 or self.time_limit < 0:
            raise ValueError(f"need steps >= 1, batch_size >= 2 (contrastive), lr > 0, context_length >= 4, "
                             f"time_limit >= 0; got {self.steps}, {self.batch_size}, {self.lr}, {self.context_length}, "
                             f"{self.time_limit}")


class ClipPairsDataset(Dataset):
    """Per image: (preprocessed image, caption ids, region masks (Q, H, W), phrase ids (Q, L)).

    Captions come from the caption records (every assistant turn is a pair), regions and phrases from the
    referring records (`<regionK>: phrase` descriptions, read by `osprey.data.samples.region_descriptions`, so
    phrase i goes with the mask of region K) of the same image; an image without referring records has Q = 0.
    Category names come from the category records of the same image whose regions are the referring record's
    (same annotation); `categories` holds one name per region (all pad ids where a region has none).
    """

    def __init__(self, caption_specs, referring_specs, tokenizer, vision_config, context_length: int,
                 category_specs=()) -> None:
        from osprey.data.records import iter_records
        from osprey.data.samples import region_descriptions

        self.vision_config = vision_config
        self.context_length = context_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token; the text tower pools at it")
        self.tokenizer = tokenizer
        regions: dict[Path, tuple[Any, list[tuple[int, str]]]] = {}
        for spec in referring_specs:
            for _, record in iter_records(spec.path):
                described = region_descriptions(record)
                if described:
                    regions[spec.image_root / record.file_name] = (record, described)
        names: dict[Path, dict[int, str]] = {}
        for spec in category_specs:
            for _, record in iter_records(spec.path):
                path = spec.image_root / record.file_name
                if path in regions and regions[path][0].annotation == record.annotation:
                    names[path] = dict(region_descriptions(record))
        self.items: list[tuple[Path, str, Any, list[tuple[int, str, str | None]]]] = []
        for spec in caption_specs:
            for _, record in iter_records(spec.path):
                path = spec.image_root / record.file_name
                region_record, phrases = regions.get(path, (None, []))
                labelled = [(k, text, names.get(path, {}).get(k)) for k, text in phrases]
                for turn in record.conversations or ():
                    if turn.speaker == "gpt":
                        self.items.append((path, turn.value, region_record, labelled))
        if not self.items:
            raise ValueError(f"no captions found in {[str(s.path) for s in caption_specs]}")

    def __len__(self) -> int:
        return len(self.items)

    def encode(self, text: str) -> torch.Tensor:
        """Text -> (context_length,) ids ending in eos (truncated before it if long), padded with pad_id."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.context_length - 1] + [self.eos_id]
        out = torch.full((self.context_length,), self.pad_id, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        from osprey.data.records import record_masks
        from osprey.preprocess import load_image, preprocess_image

        path, caption, region_record, described = self.items[index]
        image = load_image(path)
        if region_record is not None:
            masks = torch.from_numpy(record_masks(region_record)).to(torch.bool)[[k - 1 for k, _, _ in described]]
            phrase_ids = torch.stack([self.encode(text) for _, text, _ in described])
            no_name = torch.full((self.context_length,), self.pad_id, dtype=torch.long)
            category_ids = torch.stack([no_name if name is None else self.encode(name) for _, _, name in described])
        else:
            masks = torch.zeros((0, image.height, image.width), dtype=torch.bool)
            phrase_ids = category_ids = torch.zeros((0, self.context_length), dtype=torch.long)
        return {"image": preprocess_image(image, self.vision_config), "caption": self.encode(caption),
                "masks": masks, "phrases": phrase_ids, "categories": category_ids}


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    from osprey.data.dataset import PackedMasks

    return {"images": torch.stack([i["image"] for i in items]), "captions": torch.stack([i["caption"] for i in items]),
            "masks": PackedMasks.pack([i["masks"] for i in items]), "phrases": torch.cat([i["phrases"] for i in items]),
            "categories": torch.cat([i["categories"] for i in items])}


def distinct_text_loss(region_features: torch.Tensor, text_ids: torch.Tensor, encode_text, logit_scale: torch.Tensor,
                       pad_id: int) -> torch.Tensor | None:
    """Cross-entropy of each region over the batch's distinct texts (its own text the target; UniCL-style).

    Rows of `text_ids` that are all `pad_id` (no text) are left out; None when fewer than two distinct texts
    remain (nothing to contrast).
    """
    has_text = (text_ids != pad_id).any(dim=1)
    if not bool(has_text.any()):
        return None
    distinct, target = torch.unique(text_ids[has_text], dim=0, return_inverse=True)
    if len(distinct) < 2:
        return None
    text_features = encode_text(distinct, normalize=True)
    logits = logit_scale * region_features[has_text] @ text_features.T
    return F.cross_entropy(logits.float(), target)


class LevelRegionHead(nn.Module):
    """Region embedding from every level: sum over levels of a linear map of the level's mask-pooled features.

    The mask extractor reads each level through a linear layer and sums them, so a category that this head finds
    in the pooled levels is one the extractor can read too; through the CLIP's (MLP) projection of the last map
    alone, the tower learned it in the head, which Osprey discards (docs/builtin_model.md). Trained here, not saved
    in the weight file (as Osprey never uses the CLIP head).
    """

    def __init__(self, level_channels: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(nn.Linear(c, embed_dim, bias=i == 0) for i, c in enumerate(level_channels))

    def forward(self, pooled_levels: list[torch.Tensor]) -> torch.Tensor:
        return sum(layer(p) for layer, p in zip(self.levels, pooled_levels, strict=True))


def image_and_region_embeddings(visual, images: torch.Tensor, masks,
                                level_head: LevelRegionHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip TimmModel -> (B, E) image embeddings (its own global pooling) and (sum Q, E) region embeddings:
    with `level_head`, every level mask-pooled (`osprey.mask_extractor.masked_mean_pool_batch`) through it;
    without, the trunk's final map mask-pooled through the image path's head."""
    from osprey.mask_extractor import masked_mean_pool_batch
    from osprey.vision import trunk_levels

    trunk = visual.trunk
    levels = trunk_levels(trunk, images)
    features = trunk.norm_pre(levels[-1])  # the rest of timm's forward_features
    image_embeddings = visual.head(trunk.forward_head(features))
    if level_head is not None:
        pooled = [masked_mean_pool_batch(level, list(masks)).to(level.dtype) for level in levels]
        return image_embeddings, level_head(pooled)
    pooled = masked_mean_pool_batch(features, list(masks)).to(features.dtype)
    return image_embeddings, region_embeddings_from_pooled(visual, pooled)


def region_embeddings_from_pooled(visual, pooled: torch.Tensor) -> torch.Tensor:
    """(N, C) mask-pooled final-map features -> (N, E) region embeddings: the trunk's head norm, then the CLIP
    projection, as the global image path does with its own pooling."""
    return visual.head(visual.trunk.forward_head(pooled[:, :, None, None]))


def build_clip(vision_config, vocab_size: int, pad_id: int, eos_id: int, cfg: ClipPretrainConfig):
    """An open_clip CLIP: the preset's vision tower config and a small text tower over `vocab_size` ids."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from osprey.vision import open_clip_model_config

    clip_cfg = open_clip_model_config(vision_config)
    text_cfg = CLIPTextCfg(context_length=cfg.context_length, vocab_size=vocab_size, width=cfg.text_width,
                           heads=cfg.text_heads, layers=cfg.text_layers, pad_id=pad_id, eos_id=eos_id,
                           pool_type="eos")
    return CLIP(embed_dim=clip_cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**clip_cfg["vision_cfg"]), text_cfg=text_cfg)


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Load an exported open_clip weight file into `model`; only the (unexported) region level head may be missing."""
    from safetensors.torch import load_file

    hint = f"{path} does not fit this CLIP (same preset and text tower sizes?)"
    try:
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    except RuntimeError as error:  # shapes differ
        lines = str(error).splitlines()  # "Error(s) in loading state_dict for CLIP:", then one line per tensor
        raise ValueError(f"{hint}: {(lines[1:] or lines)[0].strip()}") from error
    missing = [k for k in missing if not k.startswith(f"{LEVEL_HEAD}.")]
    if missing or unexpected:
        raise ValueError(f"{hint}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}")
    logger.info("started from the weights of %s", path)


def in_batch_accuracy(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Share of images whose own caption is the most similar one in the batch (and vice versa), averaged."""
    logits = image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return float(((logits.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean()) / 2)


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


def clip_training_entry(weights: str | Path) -> dict[str, Any] | None:
    """The `training_data` entry (stage 0) of a weight file this command wrote, from the `clip_config.json` beside
    it; None for other files (an official CLIP), whose training data is not ours to know."""
    from osprey.data.provenance import training_entry

    config = Path(weights).with_name("clip_config.json")
    try:
        recorded = json.loads(config.read_text())
        return training_entry(recorded["data"], recorded.get("split", "train"), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def config_from_args(args: Any) -> ClipPretrainConfig:
    fields = ClipPretrainConfig.__dataclass_fields__
    return ClipPretrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
