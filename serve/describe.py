"""`osprey describe`: describe regions of one image in-process (no server), print a table or JSON, draw an overlay."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from osprey import masks as mask_codecs
from osprey.overlay import draw_regions

log = logging.getLogger(__name__)


class MaskFileError(ValueError):
    """A masks file that cannot be read; the message names the file and the region."""


def load_masks(paths: list[str], height: int, width: int, *, resize: bool = False) -> mask_codecs.DecodedRegions:
    """Mask files -> `(Q, H, W) bool` in file order, by osprey.masks' region decoder: PNG masks (one region
    each, nonzero or alpha = inside), or JSON: a list of regions (`{"rle"|"polygon"|"box"|"png": ...}`, bare
    COCO codec objects, or SAM entries). Errors name the file and the region."""
    fit = mask_codecs.RegionFit(resize=resize, resize_option="pass --resize-masks")
    masks: list[np.ndarray] = []
    notes: list[str] = []
    for path in paths:
        data = Path(path).read_bytes()
        try:
            if data.startswith(mask_codecs.PNG_SIGNATURE):
                masks.append(mask_codecs.fit_region(mask_codecs.decode_png(data), height, width, fit=fit, where=path))
                continue
            decoded = mask_codecs.decode_regions(_json_regions(path, data), height, width, max_regions=1 << 20,
                                                 fit=fit, where=path)
        except mask_codecs.MaskError as exc:
            raise MaskFileError(str(exc) if exc.where else f"{path}: {exc}") from None
        masks.extend(decoded.masks)
        notes.extend(decoded.notes)
    return mask_codecs.DecodedRegions(np.stack(masks), notes)


def _json_regions(path: str, data: bytes) -> list[Any]:
    try:
        regions = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MaskFileError(f"{path}: neither a PNG nor JSON ({exc})") from None
    if isinstance(regions, dict):
        regions = [regions]
    if not isinstance(regions, list):
        raise MaskFileError(f"{path}: expected a JSON list of regions, got {type(regions).__name__}")
    return regions


def save_atomic(image: Image.Image, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".png")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'#':>3}  {'area':>8}  {'box (x,y,w,h)':<22}  text"]
    for row in rows:
        box = ",".join(str(int(v)) for v in row["box"])
        lines.append(f"{row['index'] + 1:>3}  {row['area']:>8}  {box:<22}  {row['text']}")
    return "\n".join(lines)


def run(args: Any) -> int:
    """The `osprey describe` command (args from serve.cli)."""
    from .config import model_path_for

    model = model_path_for("describe", args.model)
    if model is None:
        return 2
    try:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as exc:
        print(f"osprey describe: cannot read image {args.image}: {exc}", file=sys.stderr)
        return 2
    try:
        regions = load_masks(args.masks, image.height, image.width, resize=args.resize_masks)
    except (MaskFileError, OSError) as exc:
        print(f"osprey describe: {exc}", file=sys.stderr)
        return 2
    for note in regions.notes:
        print(f"osprey describe: note: {note}", file=sys.stderr)
    masks = regions.masks

    from osprey.inference import OspreyPipeline, SamplingParams

    pipe = OspreyPipeline.from_pretrained(model, device=args.device, dtype=args.dtype)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    gens = pipe.describe(image, masks, task=args.task, params=params)
    rows = [{"index": q, "text": g.text, "raw_text": g.raw_text, "area": mask_codecs.mask_area(m),
             "box": mask_codecs.mask_to_bbox(m), "finish_reason": g.finish_reason,
             "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}
            for q, (g, m) in enumerate(zip(gens, masks, strict=True))]
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    if args.overlay:
        save_atomic(draw_regions(image, masks, [r["text"] for r in rows]).image, args.overlay)
        log.info("wrote %s", args.overlay)
    return 0
