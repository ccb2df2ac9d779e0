"""Sizes of what the LLM reads: word embeddings, image tokens, mask and position tokens (and how alike the
region tokens of one image are). A model whose region tokens dwarf the word embeddings, or are nearly parallel,
cannot tell regions apart: check this after each training stage.

    python -m bench.token_norms --model runs/builtin/stage2/final --data data/synth --split val --images 20

`--reliance N` asks whether the LLM reads its visual inputs at all, on N stage-3 category samples of the train
split: the loss with each sample's own masks, with masks shuffled between samples (same region counts), and with
images shuffled; the largest attention weight from the answer position to a `<mask>`/`<pos>` slot; and the
gradient norm of each part. A model that reads its regions loses clearly more with shuffled masks.

`--probe N` also fits a linear classifier (multinomial logistic regression, torch L-BFGS) from the region tokens
of N train images to their category names (`--probe-label color`, `texture`, ...: an attribute instead) and reports
its accuracy on the split: if even a linear probe cannot read the label from the mask and position tokens, no
amount of LLM training will.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def encoded_regions(pipe, data: Path, split: str, images: int):
    """Per category record of the split's first `images`: (record, encoded image, masks, mask tokens, pos tokens)."""
    from bench.region_eval import split_records
    from osprey.data.records import record_masks

    for record in split_records(data, split, "stage2_categories", images):
        encoded = pipe.encode_image(data / record.file_name)
        masks = record_masks(record)
        mask_tokens, pos_tokens = pipe.region_tokens(encoded, masks)
        yield record, encoded, masks, mask_tokens.detach().float(), pos_tokens.detach().float()


def token_statistics(pipe, data: Path, split: str, images: int) -> dict[str, float]:
    """Mean norms of each kind of token, and the mean pairwise cosine of the region tokens within an image."""
    norms: dict[str, list[float]] = {"mask": [], "pos": [], "image": [], "mask_cos": [], "pos_cos": []}
    for _, encoded, _, mask_tokens, pos_tokens in encoded_regions(pipe, data, split, images):
        norms["image"].append(float(encoded.tokens.float().norm(dim=-1).mean()))
        for name, tokens in (("mask", mask_tokens), ("pos", pos_tokens)):
            norms[name] += tokens.norm(dim=-1).tolist()
            if len(tokens) > 1:
                unit = torch.nn.functional.normalize(tokens, dim=-1)
                cos = unit @ unit.T
                norms[f"{name}_cos"].append(float(cos[~torch.eye(len(tokens), dtype=torch.bool)].mean()))
    words = pipe.model.get_input_embeddings().weight.detach().float().norm(dim=-1)
    result = {"word_embedding_norm": float(words.mean())}
    result.update({f"{k}_norm" if not k.endswith("cos") else f"{k}ine": float(np.mean(v)) for k, v in norms.items() if v})
    return result


PROBE_LABELS = ("category", "color", "texture", "size", "position")  # texture: "none" for composite objects


def region_tokens_and_labels(pipe, data: Path, split: str, images: int, label: str = "category"):
    """Per region: mask token, position token, the tower's features mask-pooled on every level (concatenated),
    and its label (`PROBE_LABELS`: the category name or an attribute of the generated data)."""
    from bench.region_eval import region_label_names
    from osprey.data.records import iter_records
    from osprey.mask_extractor import masked_mean_pool_batch
    from osprey.preprocess import masks_to_tensor

    referring = ({} if label == "category" else
                 {r.id: r for _, r in iter_records(data / split / "stage2_referring.json")})
    mask_rows, pos_rows, pooled_rows, labels = [], [], [], []
    for record, encoded, masks, mask_tokens, pos_tokens in encoded_regions(pipe, data, split, images):
        stack = masks_to_tensor(masks, encoded.height, encoded.width).to(pipe.device)
        pooled = [masked_mean_pool_batch(level[None].float(), [stack]) for level in encoded.levels]
        mask_rows.append(mask_tokens.cpu())
        pos_rows.append(pos_tokens.cpu())
        pooled_rows.append(torch.cat(pooled, dim=1).cpu())
        labels += region_label_names(record, referring.get(record.id), label)
    return torch.cat(mask_rows), torch.cat(pos_rows), torch.cat(pooled_rows), labels


def linear_probe_accuracy(train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str],
                          weight_decay: float = 1e-3) -> float:
    """Standardised features -> multinomial logistic regression (L-BFGS, L2) -> accuracy on the test rows."""
    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, xt = (train_x - mean) / std, (test_x - mean) / std
    y = torch.tensor([index[c] for c in train_y])
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = linear(xt).argmax(dim=1).tolist()
    return float(np.mean([classes[p] == t for p, t in zip(predicted, test_y)]))


def probe(pipe, data: Path, split: str, train_images: int, test_images: int,
          label: str = "category") -> dict[str, float | str]:
    """Accuracy of linear probes for a region label (the category, or an attribute: `PROBE_LABELS`) on mask tokens,
    position tokens, both, the tower's mask-pooled features before the extractor (all levels, and each level),
    those of the last level through the CLIP's projection head, and the majority baseline."""
    train_mask, train_pos, train_pooled, train_y = region_tokens_and_labels(pipe, data, "train", train_images, label)
    test_mask, test_pos, test_pooled, test_y = region_tokens_and_labels(pipe, data, split, test_images, label)
    majority = max(test_y.count(c) for c in set(test_y)) / len(test_y)
    return {
        "probe_label": label, "probe_regions_train": len(train_y), "probe_regions_test": len(test_y),
        "probe_majority": majority,
        "probe_mask": linear_probe_accuracy(train_mask, train_y, test_mask, test_y),
        "probe_pos": linear_probe_accuracy(train_pos, train_y, test_pos, test_y),
        "probe_both": linear_probe_accuracy(torch.cat([train_mask, train_pos], 1), train_y,
                                            torch.cat([test_mask, test_pos], 1), test_y),
        "probe_pooled_features": linear_probe_accuracy(train_pooled, train_y, test_pooled, test_y),
        **{f"probe_pooled_{name}": linear_probe_accuracy(a, train_y, b, test_y)
           for name, a, b in zip(_LEVEL_NAMES, *(_levels(pipe, x) for x in (train_pooled, test_pooled)))},
        # the CLIP's own projection head over the last level: what `osprey train clip` taught, read linearly
        "probe_clip_head": linear_probe_accuracy(_clip_head(pipe, train_pooled), train_y,
                                                 _clip_head(pipe, test_pooled), test_y),
    }


_LEVEL_NAMES = ("res2", "res3", "res4", "res5")


def _levels(pipe, pooled: torch.Tensor) -> list[torch.Tensor]:
    """Split concatenated per-level pooled features back into the levels."""
    return list(torch.split(pooled, list(pipe.model.config.vision.level_channels), dim=1))


@torch.no_grad()
def _clip_head(pipe, pooled: torch.Tensor) -> torch.Tensor:
    """The last level's pooled features as `osprey train clip` embeds regions (trunk head norm, then the CLIP
    projection); Osprey itself does not use this head."""
    from train.clip_pretrain import region_embeddings_from_pooled

    visual = pipe.model.vision_tower.vision_tower.visual
    weight = next(visual.head.parameters())
    last = _levels(pipe, pooled)[-1].to(device=weight.device, dtype=weight.dtype)
    return region_embeddings_from_pooled(visual, last).float().cpu()


RELIANCE_SAMPLES = {  # --reliance-kind -> (train record file, stage-3 sample kind)
    "category": ("train/stage2_categories.json", "task_category"),
    "short_form": ("train/stage3_short_form.json", "short_form"),
}


def reliance(model_dir: str, data: Path, samples: int, clip_weights: str | None = None, kind: str = "category",
             template: str = "train") -> dict[str, float]:
    """Loss with own / shuffled masks / shuffled images, attention to the region slots, gradient norm per part."""
    from osprey.checkpoint import load_pretrained
    from osprey.tokenization import IGNORE_INDEX
    from train.config import PARTS, load_config
    from train.recipe import dataset_from_config

    model, tokenizer, _ = load_pretrained(model_dir, clip_weights=clip_weights)
    model.float()
    path, sample_kind = RELIANCE_SAMPLES[kind]
    cfg = load_config(raw={"stage": 3, "model": model_dir, "output_dir": "unused", "data": {
        "root": str(data), "template": template, "files": [{"path": path, "kind": sample_kind}]}})
    dataset, collate, _ = dataset_from_config(cfg, tokenizer, model.config)
    batch = collate([dataset[i] for i in range(min(samples, len(dataset)))])
    masks = list(batch["masks"])
    gen = torch.Generator().manual_seed(0)
    shuffled = list(masks)
    for count in {m.shape[0] for m in masks}:  # permute among samples with as many regions
        rows = [i for i, m in enumerate(masks) if m.shape[0] == count]
        for i, j in zip(rows, [rows[k] for k in torch.randperm(len(rows), generator=gen).tolist()]):
            shuffled[i] = masks[j]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    model.language_model.config._attn_implementation = "eager"  # attention weights are returned
    model.eval()
    with torch.no_grad():
        own = model(**inputs, pixel_values=batch["pixel_values"], masks=masks, output_attentions=True)
        loss_shuffled_masks = float(model(**inputs, pixel_values=batch["pixel_values"], masks=shuffled).loss)
        loss_shuffled_images = float(model(**inputs, pixel_values=batch["pixel_values"].roll(1, 0), masks=masks).loss)
    ids, labels = batch["input_ids"], batch["labels"]
    region_slots = (ids == model.config.mask_token_id) | (ids == model.config.pos_token_id)
    answer = (labels != IGNORE_INDEX).int().argmax(dim=1) - 1  # the position that predicts the first answer token
    rows = torch.arange(len(ids))
    attention = max(float((layer[rows, :, answer] * region_slots[:, None]).max()) for layer in own.attentions)
    model.train()
    model.zero_grad()
    model(**inputs, pixel_values=batch["pixel_values"], masks=masks).loss.backward()
    grads = {part: float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in getattr(model, part).parameters()
                                        if p.grad is not None)))
             for part in PARTS}
    return {"reliance_samples": len(ids), "reliance_kind": kind, "reliance_template": template, "loss_own_masks": float(own.loss), "loss_shuffled_masks": loss_shuffled_masks,
            "loss_shuffled_images": loss_shuffled_images, "max_attention_to_region_slots": attention,
            **{f"grad_norm_{part}": value for part, value in grads.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path, help="an `osprey data synth` folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--device", default=None)
    parser.add_argument("--probe", type=int, default=0, metavar="N",
                        help="also fit linear probes on the region tokens of N train images (0: no probe)")
    parser.add_argument("--probe-label", choices=PROBE_LABELS, default="category",
                        help="what the probes read: the category (default) or an attribute of the generated data")
    parser.add_argument("--reliance", type=int, default=0, metavar="N",
                        help="also measure how much the loss depends on masks and images over N samples (0: no)")
    parser.add_argument("--reliance-kind", choices=sorted(RELIANCE_SAMPLES), default="category",
                        help="samples for --reliance: single-region category questions or multi-region short answers")
    parser.add_argument("--template", choices=["train", "infer"], default="train",
                        help="system prompt of the --reliance samples (the one the model was trained with)")
    parser.add_argument("--clip-weights", help="an open_clip weight file for the tower (e.g. `osprey train clip` output)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    from osprey.inference import OspreyPipeline

    pipe = OspreyPipeline.from_pretrained(args.model, device=args.device, clip_weights=args.clip_weights)
    result = token_statistics(pipe, args.data, args.split, args.images)
    if args.probe:
        result.update(probe(pipe, args.data, args.split, args.probe, max(args.images, 100), args.probe_label))
    if args.reliance:
        result.update(reliance(args.model, args.data, args.reliance, args.clip_weights, args.reliance_kind,
                               args.template))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from bench.eval_all import write_atomic

        write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
