"""Sampling one scene: objects (simple shapes or composites with parts), their z-order, and exact visible masks.

A scene is a pure function of its random generator. Objects are drawn back to front; an object's visible
mask is its own silhouette minus everything drawn later. Some scenes contain a hard pair that only the mask
can tell apart: two objects of different shape, colour and texture whose visible masks have the *same*
bounding box (square under cross, circle under x, frame under diamond), or a shape nested inside a ring or
frame (same centre).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_tools.synth.render import Canvas, background, composite_parts, paint, shape_mask
from data_tools.synth.vocab import (
    BACKGROUND_COLORS,
    BACKGROUND_PATTERNS,
    COLORS,
    COMPOSITES,
    MAIN_PART,
    SHAPES,
    TEXTURES,
    position_name,
    size_class,
)

# (shape under, shape on top): the visible masks of both have the same bounding box by construction.
SAME_BOX_PAIRS = (("square", "cross"), ("circle", "x"), ("frame", "diamond"))
# (outer shape with a hole, shape drawn inside the hole).
NESTED_PAIRS = (("ring", "circle"), ("frame", "square"), ("ring", "star"), ("frame", "circle"))
MIN_VISIBLE_FRACTION = 0.35  # an object hidden more than this is re-placed or dropped
MIN_PART_PIXELS = 6


@dataclass
class Part:
    name: str
    color: str
    full: np.ndarray  # (H, W) bool, unoccluded
    visible: np.ndarray | None = None  # (H, W) bool, after occlusion by later parts and objects


@dataclass
class SceneObject:
    category: str  # a shape name or a composite name
    color: str
    texture: str
    parts: list[Part]  # a simple shape has one part named after its category
    full: np.ndarray  # (H, W) bool union of the parts, unoccluded
    filled: np.ndarray  # (H, W) bool silhouette with holes closed (for "inside")
    group: str | None = None  # "same_box" or "nested" for the hard pairs
    partner: int | None = None  # index of the other object of the pair
    visible: np.ndarray | None = None  # (H, W) bool, kept up to date while objects are added
    size: str = ""
    position: str = ""
    centroid: tuple[float, float] = (0.0, 0.0)
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x, y, w, h of the visible mask (COCO)
    occluders: list[int] = field(default_factory=list)  # objects drawn later that hide part of this one

    @property
    def is_composite(self) -> bool:
        return self.category in COMPOSITES


@dataclass
class Scene:
    size: int
    background_color: str
    background_pattern: str
    objects: list[SceneObject]  # back to front
    image: np.ndarray  # (H, W, 3) uint8


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    choices = [o for o in options if o not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _simple(canvas: Canvas, rng: np.random.Generator, shape: str, cx: int, cy: int, r: int,
            color: str, texture: str) -> SceneObject:
    aspect = float(rng.uniform(0.45, 0.7))
    mask, filled = shape_mask(canvas, shape, cx, cy, r, aspect)
    return SceneObject(shape, color, texture, [Part(shape, color, mask)], mask, filled)


def _composite(canvas: Canvas, rng: np.random.Generator, name: str, cx: int, cy: int, r: int) -> SceneObject:
    masks = composite_parts(canvas, name, cx, cy, r)
    parts: list[Part] = []
    for part_name, mask in masks.items():
        # Neighbouring parts get different colours so that every part is visible as such.
        color = _pick(rng, COLORS, exclude=[p.color for p in parts[-2:]])
        parts.append(Part(part_name, color, mask))
    full = np.logical_or.reduce([p.full for p in parts])
    main = next(p.color for p in parts if p.name == MAIN_PART[name])
    return SceneObject(name, main, "solid", parts, full, full)


def _fits(occupied: list[SceneObject], new: SceneObject) -> bool:
    """A new top object may hide at most 1 - MIN_VISIBLE_FRACTION of every object below it, and must not
    touch a hard pair (which would break its exact same-box or nesting property)."""
    if not new.full.any():
        return False
    for obj in occupied:
        if obj.group is not None and (obj.filled & new.full).any():
            return False
        covered = obj.visible & new.full
        if obj.visible.sum() - covered.sum() < MIN_VISIBLE_FRACTION * obj.full.sum():
            return False
    return True


def sample_scene(rng: np.random.Generator, size: int = 256, max_objects: int = 6) -> Scene:
    """A random scene of 2..max_objects objects (fewer when placements fail), drawn back to front."""
    canvas = Canvas(size)
    scale = size / 256
    bg_color = _pick(rng, BACKGROUND_COLORS)
    bg_pattern = _pick(rng, BACKGROUND_PATTERNS)
    target = int(rng.integers(2, max_objects + 1))
    objects: list[SceneObject] = []

    def place(make, r_low: float, r_high: float, tries: int = 20) -> SceneObject | None:
        for _ in range(tries):
            r = int(rng.integers(round(r_low * scale), round(r_high * scale) + 1))
            cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, size=2))
            candidate = make(cx, cy, r)
            if _fits(objects, candidate):
                return candidate
        return None

    def add(obj: SceneObject) -> None:
        for other in objects:
            other.visible &= ~obj.full
        obj.visible = obj.full.copy()
        objects.append(obj)

    # The hard pair first (with probability 0.6), so later objects are placed around it.
    if rng.random() < 0.6:
        kind = "same_box" if rng.random() < 0.6 else "nested"
        pairs = SAME_BOX_PAIRS if kind == "same_box" else NESTED_PAIRS
        under, top = pairs[int(rng.integers(len(pairs)))]
        c1 = _pick(rng, COLORS)
        c2 = _pick(rng, COLORS, exclude=[c1])
        t1, t2 = _pick(rng, TEXTURES), _pick(rng, TEXTURES)
        r = int(rng.integers(round(24 * scale), round(42 * scale) + 1))
        cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, size=2))
        r_top = r if kind == "same_box" else max(3, round(0.5 * r))
        a = _simple(canvas, rng, under, cx, cy, r, c1, t1)
        b = _simple(canvas, rng, top, cx, cy, r_top, c2, t2)
        a.group, b.group = kind, kind
        add(a)
        add(b)
        a.partner, b.partner = 1, 0

    while len(objects) < target:
        if rng.random() < 0.3:
            name = _pick(rng, COMPOSITES)
            obj = place(lambda cx, cy, r, n=name: _composite(canvas, rng, n, cx, cy, r), 22, 46)
        else:
            shape, color, texture = _pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, TEXTURES)
            obj = place(lambda cx, cy, r, s=shape, c=color, t=texture: _simple(canvas, rng, s, cx, cy, r, c, t), 10, 40)
        if obj is None:
            break
        add(obj)

    image = background(rng, size, bg_color, bg_pattern)
    for index, obj in enumerate(objects):
        phase = int(rng.integers(0, 12))
        for part in obj.parts:
            paint(image, part.full, part.color, obj.texture, phase)
        _finish(obj, objects[index + 1:], index, size)
    return Scene(size, bg_color, bg_pattern, objects, image)


def _finish(obj: SceneObject, later: list[SceneObject], index: int, size: int) -> None:
    """Visible part masks, occluders, size/position attributes and the COCO box."""
    hidden = np.logical_or.reduce([o.full for o in later]) if later else np.zeros_like(obj.full)
    covered_by_later_parts = np.zeros_like(obj.full)
    for part in reversed(obj.parts):
        part.visible = part.full & ~covered_by_later_parts & ~hidden
        covered_by_later_parts |= part.full
    obj.occluders = [index + 1 + k for k, o in enumerate(later) if (o.full & obj.full).any()]
    ys, xs = np.nonzero(obj.visible)
    obj.centroid = (float(xs.mean()), float(ys.mean()))
    obj.position = position_name(*obj.centroid, size, size)
    obj.size = size_class(obj.full.sum() / (size * size))
    obj.bbox = mask_bbox(obj.visible)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """COCO box (x, y, w, h) of a non-empty (H, W) bool mask, in whole pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask_bbox of an empty mask")
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def visible_parts(obj: SceneObject) -> list[Part]:
    """The parts of a composite that are visible enough to be asked about."""
    return [p for p in obj.parts if p.visible is not None and p.visible.sum() >= MIN_PART_PIXELS]
