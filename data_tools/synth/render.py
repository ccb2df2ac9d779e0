"""Rasterising shapes into exact binary masks, and painting backgrounds and textured fills.

Masks come from PIL's non-antialiased drawing on a 1-bit canvas, so every pixel is either in or out and the
painted image agrees with the masks exactly. Geometry is given as a centre (cx, cy) and a half-extent r:
every simple shape spans exactly the box [cx - r, cx + r] x [cy - r, cy + r] (ellipse: its own height),
which is what makes the same-box pairs of `scene.py` exact.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from data_tools.synth.vocab import BACKGROUND_COLORS, COLORS

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


class Canvas:
    """A reusable 1-bit drawing surface of one image size; each `draw_*` returns a fresh (H, W) bool mask."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _new(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        image = Image.new("1", (self.size, self.size), 0)
        return image, ImageDraw.Draw(image)

    @staticmethod
    def _mask(image: Image.Image) -> np.ndarray:
        return np.array(image, dtype=bool)

    def ellipse(self, box: Box, hole: Box | None = None) -> np.ndarray:
        image, draw = self._new()
        draw.ellipse(box, fill=1)
        if hole is not None:
            draw.ellipse(hole, fill=0)
        return self._mask(image)

    def rectangles(self, boxes: list[Box], hole: Box | None = None) -> np.ndarray:
        image, draw = self._new()
        for box in boxes:
            draw.rectangle(box, fill=1)
        if hole is not None:
            draw.rectangle(hole, fill=0)
        return self._mask(image)

    def polygons(self, polygons: list[list[tuple[int, int]]]) -> np.ndarray:
        image, draw = self._new()
        for points in polygons:
            draw.polygon(points, fill=1)
        return self._mask(image)


def shape_mask(canvas: Canvas, shape: str, cx: int, cy: int, r: int, aspect: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """(mask, filled) of a simple shape: `filled` is the silhouette with holes closed (ring, frame),
    used for the "inside" relation. Both are (H, W) bool."""
    box = (cx - r, cy - r, cx + r, cy + r)
    inner = max(1, round(0.6 * r))
    hole = (cx - inner, cy - inner, cx + inner, cy + inner)
    if shape == "circle":
        mask = canvas.ellipse(box)
        return mask, mask
    if shape == "ellipse":
        ry = max(2, round(aspect * r))
        mask = canvas.ellipse((cx - r, cy - ry, cx + r, cy + ry))
        return mask, mask
    if shape == "square":
        mask = canvas.rectangles([box])
        return mask, mask
    if shape == "ring":
        return canvas.ellipse(box, hole=hole), canvas.ellipse(box)
    if shape == "frame":
        return canvas.rectangles([box], hole=hole), canvas.rectangles([box])
    if shape == "cross":
        w = max(1, round(0.3 * r))
        mask = canvas.rectangles([(cx - r, cy - w, cx + r, cy + w), (cx - w, cy - r, cx + w, cy + r)])
        return mask, mask
    if shape == "triangle":
        mask = canvas.polygons([[(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]])
        return mask, mask
    if shape == "diamond":
        mask = canvas.polygons([[(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]])
        return mask, mask
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        points = [(round(cx + rad * np.cos(a)), round(cy - rad * np.sin(a))) for rad, a in zip(radii, angles)]
        mask = canvas.polygons([points])
        return mask, mask
    if shape == "x":
        # Two diagonal bands clipped to the box, so the x spans the box exactly (a thick line would overshoot).
        w = max(2, round(0.45 * r))
        x0, y0, x1, y1 = box
        band1 = [(x0, y0), (x0 + w, y0), (x1, y1 - w), (x1, y1), (x1 - w, y1), (x0, y0 + w)]
        band2 = [(x1, y0), (x1, y0 + w), (x0 + w, y1), (x0, y1), (x0, y1 - w), (x1 - w, y0)]
        mask = canvas.polygons([band1, band2])
        return mask, mask
    raise ValueError(f"unknown shape {shape!r}")


def composite_parts(canvas: Canvas, name: str, cx: int, cy: int, r: int) -> dict[str, np.ndarray]:
    """Part masks of a composite object inside the box [cx - r, cx + r]^2, keyed in drawing order."""

    def rect(a: float, b: float, c: float, d: float) -> Box:
        return (round(cx + a * r), round(cy + b * r), round(cx + c * r), round(cy + d * r))

    if name == "house":
        return {
            "body": canvas.rectangles([rect(-0.7, -0.1, 0.7, 1.0)]),
            "roof": canvas.polygons([[(cx, cy - r), (round(cx + 0.95 * r), round(cy - 0.1 * r)),
                                      (round(cx - 0.95 * r), round(cy - 0.1 * r))]]),
            "door": canvas.rectangles([rect(-0.45, 0.35, -0.1, 1.0)]),
            "window": canvas.rectangles([rect(0.15, 0.15, 0.5, 0.5)]),
        }
    if name == "flower":
        head_y = cy - 0.35 * r
        petal_r, ring_r = 0.32 * r, 0.36 * r
        petals = np.zeros((canvas.size, canvas.size), dtype=bool)
        for k in range(6):
            a = k * np.pi / 3
            px, py = cx + ring_r * np.cos(a), head_y + ring_r * np.sin(a)
            petals |= canvas.ellipse((round(px - petal_r), round(py - petal_r), round(px + petal_r), round(py + petal_r)))
        c = 0.22 * r
        return {
            "stem": canvas.rectangles([rect(-0.09, 0.0, 0.09, 1.0)]),
            "petals": petals,
            "center": canvas.ellipse((round(cx - c), round(head_y - c), round(cx + c), round(head_y + c))),
        }
    if name == "robot":
        return {
            "arm": canvas.rectangles([rect(-0.85, -0.2, -0.5, 0.45), rect(0.5, -0.2, 0.85, 0.45)]),
            "leg": canvas.rectangles([rect(-0.4, 0.55, -0.1, 1.0), rect(0.1, 0.55, 0.4, 1.0)]),
            "body": canvas.rectangles([rect(-0.5, -0.3, 0.5, 0.6)]),
            "head": canvas.rectangles([rect(-0.35, -1.0, 0.35, -0.35)]),
        }
    if name == "tree":
        crown_y, cr = cy - 0.3 * r, 0.7 * r
        return {
            "trunk": canvas.rectangles([rect(-0.15, 0.0, 0.15, 1.0)]),
            "crown": canvas.ellipse((round(cx - cr), round(crown_y - cr), round(cx + cr), round(crown_y + cr))),
        }
    raise ValueError(f"unknown composite object {name!r}")


def shade(rgb: tuple[int, int, int]) -> np.ndarray:
    """The second tone of a textured fill: darker for light colours, lighter for dark ones."""
    color = np.asarray(rgb, dtype=np.float32)
    if color.mean() > 60:
        return (color * 0.55).astype(np.uint8)
    return (color + (255 - color) * 0.45).astype(np.uint8)


@lru_cache(maxsize=256)
def texture_pattern(texture: str, size: int, phase: int) -> np.ndarray:
    """(H, W) bool: where a textured fill uses its second tone. `phase` shifts the pattern per object.
    Cached (read-only): a scene paints many objects with the same few patterns."""
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "solid":
        return np.zeros((size, size), dtype=bool)
    if texture == "striped":
        return ((xx + yy + phase) // 4) % 2 == 1
    if texture == "checkered":
        return (((xx + phase) // 6) + ((yy + phase) // 6)) % 2 == 1
    if texture == "dotted":
        return (((xx + phase) % 7) - 3) ** 2 + (((yy + phase) % 7) - 3) ** 2 <= 2
    raise ValueError(f"unknown texture {texture!r}")


def paint(image: np.ndarray, mask: np.ndarray, color: str, texture: str, phase: int) -> None:
    """Fill `image` (H, W, 3) uint8 in place where `mask` (H, W) bool, with a colour and a texture."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # work on the mask's box only
    region, local = image[window], mask[window]
    rgb = COLORS[color]
    region[local] = rgb
    if texture != "solid":
        second = local & texture_pattern(texture, image.shape[0], phase)[window]
        region[second] = shade(rgb)


def background(rng: np.random.Generator, size: int, color: str, pattern: str) -> np.ndarray:
    """(H, W, 3) uint8 background of a named colour and pattern."""
    base = np.asarray(BACKGROUND_COLORS[color], dtype=np.float32)
    image = np.broadcast_to(base, (size, size, 3)).copy()
    if pattern == "gradient":
        ramp = np.linspace(-25, 25, size, dtype=np.float32)
        image += ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    elif pattern == "noisy":
        image += rng.integers(-12, 13, size=(size, size, 1), dtype=np.int16).astype(np.float32)
    elif pattern == "grid":
        step = int(rng.integers(16, 33))
        lines = np.zeros(size, dtype=bool)
        lines[::step] = True
        tone = -30 if base.mean() > 128 else 30
        image[lines, :, :] += tone
        image[:, lines, :] += tone
    elif pattern != "plain":
        raise ValueError(f"unknown background pattern {pattern!r}")
    return np.clip(image, 0, 255).astype(np.uint8)
