"""Regions drawn on their image: tinted masks with outlines, a numbered badge per region, and a legend below.

Long captions would collide on the image and get cut at its edge, so the image carries only the numbers: each
badge sits at its mask's top-left corner when that is free, else at the nearest free spot inside the image, and
the legend under the image holds the full text (wrapped). `osprey describe --overlay` draws with this; the
playground page draws the same way in the browser.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .masks import mask_to_bbox

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
LEGEND_MIN_WIDTH = 360  # a narrow image still gets a legend wide enough to read


@dataclass(frozen=True)
class Box:
    """A rectangle in pixels, `x1`/`y1` exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    def overlaps(self, other: Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1


@dataclass(frozen=True)
class Overlay:
    image: Image.Image  # the image (top) and the legend (below it), RGB
    badges: list[Box]  # each region's number badge, inside the image part, none overlapping another


def colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def draw_regions(image: Image.Image, masks: np.ndarray, labels: Sequence[str], *, alpha: float = 0.35,
                 outline: int = 2) -> Overlay:
    """`masks: (Q, H, W) bool` on `image` with `labels[q]` in the legend as `q+1: label`."""
    if len(masks) != len(labels):
        raise ValueError(f"{len(masks)} masks but {len(labels)} labels")
    base = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for q, mask in enumerate(masks):
        base[mask] = (1 - alpha) * base[mask] + alpha * np.asarray(colour(q), dtype=np.float32)
    for q, mask in enumerate(masks):
        base[_edge(mask, outline)] = colour(q)
    drawn = Image.fromarray(base.round().astype(np.uint8))
    font = ImageFont.load_default(size=max(12, min(drawn.size) // 32))
    badges = _place_badges(drawn, masks, font)
    draw = ImageDraw.Draw(drawn)
    for q, badge in enumerate(badges):
        draw.rectangle((badge.x0, badge.y0, badge.x1 - 1, badge.y1 - 1), fill=colour(q), outline=(0, 0, 0))
        draw.text(((badge.x0 + badge.x1) / 2, (badge.y0 + badge.y1) / 2), str(q + 1), fill=_ink(colour(q)),
                  font=font, anchor="mm")
    return Overlay(_with_legend(drawn, labels, font), badges)


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's boundary pixels (inside pixels with an outside 4-neighbour, or on the image border), thickened
    inwards and outwards to `width` pixels."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~interior
    if width > 1:
        grown = Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * (width // 2) + 1))
        edge = np.asarray(grown) > 0
    return edge


def _place_badges(image: Image.Image, masks: np.ndarray, font: ImageFont.ImageFont) -> list[Box]:
    """One badge per mask, inside the image and overlapping no other badge: at the mask's top-left corner if free,
    else the free spot nearest to it on a grid of badge-sized steps (the image is large enough for many)."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    placed: list[Box] = []
    for q, mask in enumerate(masks):
        left, top, right, bottom = draw.textbbox((0, 0), str(q + 1), font=font)
        bw, bh = min(right - left + 8, width), min(bottom - top + 6, height)
        x, y, _, _ = mask_to_bbox(mask)
        want = (int(x), int(y))
        start = (min(max(want[0], 0), width - bw), min(max(want[1], 0), height - bh))
        gx, gy = np.meshgrid(np.arange(0, width - bw + 1, max(1, bw // 2)), np.arange(0, height - bh + 1, max(1, bh // 2)))
        order = np.argsort((gx - start[0]).ravel() ** 2 + (gy - start[1]).ravel() ** 2, kind="stable")
        for cx, cy in [start, *zip(gx.ravel()[order].tolist(), gy.ravel()[order].tolist(), strict=True)]:
            box = Box(cx, cy, cx + bw, cy + bh)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)  # more badges than fit: the last one found overlaps (a 4-pixel image with 40 regions)
    return placed


def _ink(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `background` (relative luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _with_legend(drawn: Image.Image, labels: Sequence[str], font: ImageFont.ImageFont) -> Image.Image:
    """The drawn image above a white legend: a colour swatch, the number and the wrapped label per region."""
    width = max(drawn.width, LEGEND_MIN_WIDTH)
    probe = ImageDraw.Draw(drawn)
    char_w = max(1, probe.textlength("abcdefghij", font=font) / 10)
    _, top, _, bottom = probe.textbbox((0, 0), "Ag", font=font)
    line_h = bottom - top + 4
    swatch = line_h
    chars = max(10, int((width - swatch - 16) / char_w))
    rows = [textwrap.wrap(f"{q + 1}: {label}", chars) or [f"{q + 1}:"] for q, label in enumerate(labels)]
    legend_h = sum(len(lines) for lines in rows) * line_h + 8 * len(rows) + 8
    out = Image.new("RGB", (width, drawn.height + legend_h), (255, 255, 255))
    out.paste(drawn, (0, 0))
    draw = ImageDraw.Draw(out)
    y = drawn.height + 8
    for q, lines in enumerate(rows):
        draw.rectangle((8, y, 8 + swatch - 4, y + swatch - 4), fill=colour(q), outline=(0, 0, 0))
        for line in lines:
            draw.text((8 + swatch + 4, y), line, fill=(0, 0, 0), font=font)
            y += line_h
        y += 8
    return out
