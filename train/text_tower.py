"""`osprey train text-tower`: a text tower (and region head) for a model's frozen vision tower, LiT-style.

Region-text search needs text vectors in the space of the region vectors (osprey.embedding). The built-in model's
CLIP step trained a text tower, but the tower kept training in stages 1-3 after it and that text tower was not kept
(docs/builtin_model.md), so here a new one is trained against the model's vision tower as it now is, which stays
frozen (locked-image tuning, Zhai et al. 2022): regions of the dataset's training split, mask-pooled on every level,
through a LevelRegionHead (the shape of `osprey train clip`'s region head), contrasted with their texts by
`train.clip_pretrain.distinct_text_loss` (a softmax over the batch's distinct texts, so two regions of one category
are not each other's negatives). Each step contrasts one kind of text, in turn:

- `category`: the category name ("circle");
- `colour`: colour and category ("red circle");
- `name`: the referring phrase without its position ("small red striped circle").

(The whole phrase, with the position, is left out: positions are not what search asks for, and its texts are the
longest, so the slowest on a CPU.) Colour and name are read from the referring phrase, which the generator writes as `size colour [texture]
category in the <position> of the image` (data_tools/synth/texts.py); a phrase whose last name word is not the
region's category is not used for those kinds. Because the tower is frozen, every region's pooled levels are
computed once, then the text tower and head train on them: a few minutes on two CPU cores.

    osprey train text-tower --data data/synth --model osprey/assets/builtin --out runs/text_tower
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from osprey.embedding import LevelRegionHead, RegionTextConfig, TextEncoder, pool_levels, save_region_text
from train.clip_pretrain import distinct_text_loss

logger = logging.getLogger(__name__)

TEXT_KINDS = ("category", "colour", "name")
IMAGES_PER_PASS = 32  # images through the frozen tower at once while pooling


@dataclass(frozen=True)
class TextTowerTrainConfig:
    data: str  # a generated dataset (`osprey data synth`): its category and referring records
    model: str  # the model folder: its vision tower (frozen) and tokenizer
    out: str  # output folder: region_text.json + region_text.safetensors, metrics.jsonl
    split: str = "train"
    max_images: int = 500  # the first images of the split (their regions' levels are pooled once, up front)
    val_images: int = 100  # of the val split, for the accuracies logged at the end
    steps: int = 300
    batch_size: int = 128  # regions per step
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    context_length: int = 12  # names are at most 5 words, one token each in the built-in tokenizer
    text_width: int = 64
    text_heads: int = 2
    text_layers: int = 2
    name: str = "lit-v1"  # the space's name next to the model's
    seed: int = 0
    threads: int = 1  # torch threads (on the loaded 2-core dev machine 2 threads made steps slower, not faster)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or self.max_images < 1 or self.context_length < 4:
            raise ValueError(f"need steps >= 1, batch_size >= 2, lr > 0, max_images >= 1, context_length >= 4; "
                             f"got {self.steps}, {self.batch_size}, {self.lr}, {self.max_images}, {self.context_length}")


@dataclass
class RegionTable:
    """Regions of a split: pooled levels (N, sum C) and per text kind the text of each region ("" where none)."""

    pooled: torch.Tensor
    texts: dict[str, list[str]]
    level_channels: tuple[int, ...]

    def levels(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(self.pooled[rows].float(), list(self.level_channels), dim=1))


def region_texts(category: str, phrase: str | None) -> dict[str, str]:
    """The texts of a region (module docstring); "" for colour and name where the phrase does not parse."""
    texts = dict.fromkeys(TEXT_KINDS, "")
    texts["category"] = category
    if phrase:
        name = phrase.split(" in the ")[0]
        words = name.split()
        if len(words) >= 3 and words[-1] == category:
            texts.update(colour=f"{words[1]} {category}", name=name)
    return texts


@torch.no_grad()
def read_regions(data: str | Path, split: str, max_images: int, vision) -> RegionTable:
    """Pool every object region of the split's first `max_images` images on every level of the frozen tower."""
    from tqdm import tqdm

    from osprey.data.dataset import manifest_subsets
    from osprey.data.records import iter_records, record_masks
    from osprey.data.samples import region_descriptions
    from osprey.preprocess import load_image, preprocess_image

    specs = {s.kind: s for s in manifest_subsets(data, split, stages=[2])}
    if "categories" not in specs:
        raise ValueError(f"{data} has no stage-2 category records for split {split!r}")
    phrases = {}
    if "referring" in specs:
        for _, record in iter_records(specs["referring"].path):
            phrases[record.file_name] = (record.annotation, dict(region_descriptions(record)))
    pooled, texts = [], {k: [] for k in TEXT_KINDS}
    records = [r for _, (_, r) in zip(range(max_images), iter_records(specs["categories"].path))]
    root = specs["categories"].image_root
    for start in tqdm(range(0, len(records), IMAGES_PER_PASS), desc=f"pooling {split} regions", unit="batch"):
        batch = records[start : start + IMAGES_PER_PASS]
        pixels = torch.stack([preprocess_image(load_image(root / r.file_name), vision.config) for r in batch])
        levels = [level.float() for level in vision(pixels)]
        masks = [torch.from_numpy(record_masks(r)) for r in batch]
        pooled.append(torch.cat(pool_levels(levels, masks), dim=1).to(torch.bfloat16))
        for record in batch:
            annotation, described = phrases.get(record.file_name, (None, {}))
            same = annotation == record.annotation
            for k, region in enumerate(record.annotation, start=1):
                for kind, text in region_texts(region.category_name, described.get(k) if same else None).items():
                    texts[kind].append(text)
    return RegionTable(torch.cat(pooled), texts, tuple(vision.config.level_channels))


class TextTowerRecipe:
    """One run: `setup` (frozen tower, region table, text tower, head, optimizer), `train`, `evaluate`, `save`."""

    def __init__(self, cfg: TextTowerTrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)

    def setup(self) -> None:
        from osprey.checkpoint import read_config
        from osprey.embedding import load_vision_tower
        from osprey.tokenization import load_tokenizer
        from osprey.vision import open_clip_model_config
        from train.schedule import cosine_schedule

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        config = read_config(cfg.model)
        vision = load_vision_tower(cfg.model, config.vision)
        for p in vision.parameters():
            p.requires_grad_(False)  # locked image tower
        self.train_table = read_regions(cfg.data, cfg.split, cfg.max_images, vision)
        self.val_table = read_regions(cfg.data, "val", cfg.val_images, vision) if cfg.val_images else None
        tokenizer = load_tokenizer(cfg.model)
        embed_dim = open_clip_model_config(config.vision)["embed_dim"]
        text_config = RegionTextConfig(
            embed_dim=embed_dim, context_length=cfg.context_length, vocab_size=len(tokenizer), width=cfg.text_width,
            heads=cfg.text_heads, layers=cfg.text_layers, pad_id=tokenizer.pad_token_id or 0,
            eos_id=tokenizer.eos_token_id, pool_type="eos", name=cfg.name, region_head="levels")
        self.text = TextEncoder(text_config, text_config.build(), tokenizer)
        self.head = LevelRegionHead(config.vision.level_channels, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.ids = {kind: self.text.tokenize(texts) for kind, texts in self.train_table.texts.items()}
        params = [*self.text.parameters(), *self.head.parameters()]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2] + [self.logit_scale]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup_steps, lambda: cfg.steps)
        logger.info("text tower: %d train regions, %d parameters (text %d, head %d)", len(self.train_table.pooled),
                    sum(p.numel() for p in params), sum(p.numel() for p in self.text.parameters()),
                    sum(p.numel() for p in self.head.parameters()))

    def train(self) -> None:
        from tqdm import tqdm

        from train.metrics import MetricsLog

        cfg, table = self.cfg, self.train_table
        generator = random.Random(cfg.seed)
        metrics = MetricsLog(self.out / "metrics.jsonl")
        self.text.train()
        self.head.train()
        start = time.perf_counter()
        for step in tqdm(range(1, cfg.steps + 1), desc="text tower", unit="step"):
            kind = TEXT_KINDS[step % len(TEXT_KINDS)]
            rows = torch.tensor(generator.sample(range(len(table.pooled)), min(cfg.batch_size, len(table.pooled))))
            regions = F.normalize(self.head(table.levels(rows)), dim=-1)
            loss = distinct_text_loss(regions, self.ids[kind][rows], self._encode, self.logit_scale.exp(),
                                      self.text.config.pad_id)
            if loss is None:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*self.text.parameters(), *self.head.parameters()], 1.0)
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                self.logit_scale.clamp_(0, math.log(100))
            if step % 50 == 0 or step == cfg.steps:
                metrics.write({"step": step, "kind": kind, "loss": float(loss.detach()),
                               "lr": self.scheduler.get_last_lr()[0], "logit_scale": float(self.logit_scale.detach().exp()),
                               "seconds": time.perf_counter() - start})
        metrics.close()
        self.text.eval()
        self.head.eval()

    def _encode(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.text.encode_ids(ids)

    @torch.no_grad()
    def evaluate(self, table: RegionTable) -> dict[str, float]:
        """Per text kind with few texts (category, colour): the share of regions whose own text is the nearest of
        all that kind's distinct texts in the table."""
        regions = F.normalize(self.head(table.levels(torch.arange(len(table.pooled)))), dim=-1)
        out = {"regions": len(regions)}
        for kind in ("category", "colour"):
            has = [i for i, t in enumerate(table.texts[kind]) if t]
            vocabulary = sorted({table.texts[kind][i] for i in has})
            index = {t: j for j, t in enumerate(vocabulary)}
            nearest = (regions[has] @ self.text(vocabulary).T).argmax(dim=1)
            target = torch.tensor([index[table.texts[kind][i]] for i in has])
            out[f"{kind}_accuracy"] = float((nearest == target).float().mean())
        return out

    def save(self, scores: dict[str, float]) -> Path:
        from osprey.data.provenance import training_entry

        return save_region_text(self.out, self.text, self.head, trained_with=asdict(self.cfg),
                                training_data=training_entry(self.cfg.data, self.cfg.split, 0), val=scores)


def train_text_tower(cfg: TextTowerTrainConfig) -> Path:
    recipe = TextTowerRecipe(cfg)
    recipe.setup()
    recipe.train()
    scores = recipe.evaluate(recipe.val_table) if recipe.val_table is not None else {}
    logger.info("val: %s", json.dumps(scores))
    return recipe.save(scores)


def config_from_args(args) -> TextTowerTrainConfig:
    fields = TextTowerTrainConfig.__dataclass_fields__
    return TextTowerTrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
