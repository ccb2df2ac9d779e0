"""A picture of what a generated record holds: the image, its region masks, and the texts about them.

Rendered from the files on disk (not from the generator's memory), so it shows exactly what training reads:

    python -m data_tools.synth.preview DATASET_DIR OUT.png [--split test] [--id N]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from osprey.data.records import Record, read_records, record_masks

# Distinct overlay colours for region 1, 2, ... (cycled).
OVERLAY = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


def _has_same_box_pair(record: Record) -> bool:
    boxes = [tuple(r.bbox) for r in record.annotation]
    return len(set(boxes)) < len(boxes)


def _overlay(image: Image.Image, masks: np.ndarray, scale: int) -> Image.Image:
    """The image with each mask tinted in its region colour and its boundary drawn, numbered at its centroid."""
    base = np.asarray(image, dtype=np.float32).copy()
    for k, mask in enumerate(masks):
        color = np.asarray(OVERLAY[k % len(OVERLAY)], dtype=np.float32)
        base[mask] = 0.45 * base[mask] + 0.55 * color
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]
        inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        base[mask & ~inner] = color * 0.6
    out = Image.fromarray(base.astype(np.uint8)).resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=14 * scale // 2)
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        nearest = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)  # a pixel of the mask (rings: not the hole)
        x, y = (xs[nearest] + 0.5) * scale, (ys[nearest] + 0.5) * scale
        draw.text((x, y), str(k + 1), fill=(255, 255, 255), font=font, anchor="mm", stroke_width=2,
                  stroke_fill=(0, 0, 0))
    return out


def render_preview(root: str | Path, split: str = "test", image_id: int | None = None, scale: int = 2,
                   text_width: int = 620) -> Image.Image:
    """Image | masks | texts for one image of a generated dataset (by default the most crowded image with a
    same-box pair)."""
    root = Path(root)
    detailed = read_records(root / split / "stage3_detailed.json")
    if image_id is None:
        paired = [r for r in detailed if _has_same_box_pair(r)] or detailed
        record = max(paired, key=lambda r: len(r.annotation))
    else:
        record = next((r for r in detailed if r.id == image_id), None)
        if record is None:
            raise ValueError(f"no image with id {image_id} in {root / split / 'stage3_detailed.json'}")
    by_id = {name: next((r for r in read_records(root / split / f"{name}.json") if r.id == record.id), None)
             for name in ("stage1_captions", "stage3_short_form", "stage3_pos_neg")}
    image = Image.open(root / record.file_name).convert("RGB")
    masks = record_masks(record)

    lines: list[tuple[str, tuple[int, int, int]]] = []
    if by_id["stage1_captions"] is not None:
        lines.append(("Caption: " + by_id["stage1_captions"].conversations[1].value, (0, 0, 0)))
    for k, entry in enumerate(record.description or []):
        lines.append((entry, OVERLAY[k % len(OVERLAY)]))
    for name in ("stage3_pos_neg", "stage3_short_form"):
        other = by_id[name]
        if other is None or other.conversations is None:
            continue
        # Region numbers differ between records only if annotation order does; both use the same shuffled order.
        turns = other.conversations
        for q, a in list(zip(turns[::2], turns[1::2]))[:3]:
            lines.append((f"Q: {q.value}  A: {a.value}", (60, 60, 60)))

    font = ImageFont.load_default(size=13)
    wrapped: list[tuple[str, tuple[int, int, int]]] = []
    for text, color in lines:
        for i, piece in enumerate(textwrap.wrap(text, width=text_width // 7)):
            wrapped.append(((" " * 4 if i else "") + piece, color))
    side = image.width * scale
    height = max(side, 16 * len(wrapped) + 20)
    canvas = Image.new("RGB", (2 * side + text_width + 30, height), (255, 255, 255))
    canvas.paste(image.resize((side, side), Image.NEAREST), (0, 0))
    canvas.paste(_overlay(image, masks, scale), (side + 10, 0))
    draw = ImageDraw.Draw(canvas)
    y = 8
    for text, color in wrapped:
        draw.text((2 * side + 22, y), text, fill=tuple(int(c * 0.75) for c in color), font=font)
        y += 16
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="dataset folder written by `osprey data synth`")
    parser.add_argument("out", help="output PNG")
    parser.add_argument("--split", default="test")
    parser.add_argument("--id", type=int, default=None, help="image id (default: the most crowded image with a same-box pair)")
    args = parser.parse_args(argv)
    render_preview(args.root, args.split, args.id).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
