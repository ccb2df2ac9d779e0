"""Mask geometry: COCO polygons and boxes rasterised the way pycocotools does, and measures of a mask.

Rasterisation is pycocotools' (the official Osprey data loader and the COCO/LVIS evals use it), so our masks
are bit-identical to theirs. Boxes are COCO `[x, y, w, h]`, rasterised as the rectangle polygon like the
official Ferret-Bench eval: integer boxes cover columns x..x+w-1 and rows y..y+h-1 exactly; fractional edges
snap to the nearest pixel boundary (x=1.4 -> 1, x=1.5 -> 2, x+w=3.6 -> 4 exclusive).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .errors import MaskError, MaskWarning

# ---------------------------------------------------------------------------------------------- polygons


def decode_polygons(
    polygons: Sequence[Sequence[float]] | Sequence[float], height: int, width: int, *, strict: bool = False
) -> np.ndarray:
    """COCO polygons (list of flat xy lists, or one flat list) -> union mask `(height, width) bool`.

    Raises MaskError for odd-length or < 3-point polygons, non-finite coordinates and zero-area polygons;
    self-intersecting ones raise only with `strict`, otherwise they warn (MaskWarning).
    """
    check_size(height, width)
    return mask_utils.decode(polygons_to_coco(polygons, height, width, strict)).astype(bool)


def polygons_to_coco(polygons: Any, height: int, width: int, strict: bool) -> dict[str, Any]:
    if len(polygons) > 0 and all(is_number(v) for v in polygons):
        polygons = [polygons]  # one flat polygon
    if len(polygons) == 0:
        raise MaskError("polygon list is empty")
    flat: list[list[float]] = []
    for i, poly in enumerate(polygons):
        if not isinstance(poly, (list, tuple, np.ndarray)):
            raise MaskError(f"polygon {i} is a {type(poly).__name__}, expected a flat list of coordinates")
        try:
            coords = np.asarray(poly)
        except ValueError:  # nested, ragged
            coords = np.asarray(poly, dtype=object)
        if coords.ndim != 1 or coords.dtype.kind not in "iuf":
            raise MaskError(f"polygon {i} has non-numeric coordinates")
        coords = coords.astype(np.float64, copy=False)
        if coords.size % 2:
            raise MaskError(f"polygon {i} has an odd number of coordinates ({coords.size})")
        if coords.size < 6:
            raise MaskError(f"polygon {i} has {coords.size // 2} points; a polygon needs at least 3")
        if not np.all(np.isfinite(coords)):
            raise MaskError(f"polygon {i} has non-finite coordinates (nan or inf)")
        # pycocotools casts coordinates to C ints (huge values crash the process) and walks every pixel of every
        # edge (far values cost time and memory): refuse anything far outside the image.
        bound = 4 * max(height, width) + 16
        if np.abs(coords).max() > bound:
            raise MaskError(f"polygon {i} has a coordinate far outside the {width}x{height} (WxH) image "
                            f"({np.abs(coords).max():g} > {bound})")
        xy = coords.reshape(-1, 2)
        if _is_collinear(xy):
            raise MaskError(f"polygon {i} is degenerate: zero area (all points collinear or repeated)")
        if polygon_self_intersects(xy):
            message = f"polygon {i} is self-intersecting"
            if strict:
                raise MaskError(message)
            warnings.warn(message + " (accepted: rasterised as pycocotools does; strict=True rejects)", MaskWarning,
                          stacklevel=3)
        flat.append(coords.tolist())
    return mask_utils.merge(mask_utils.frPyObjects(flat, height, width))


def polygon_self_intersects(xy: np.ndarray) -> bool:
    """Whether any two non-adjacent edges of the closed polygon `xy: (N, 2)` cross or touch.

    Vectorised O(N^2) orientation test over all edge pairs, in blocks of pairs so memory stays bounded.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if n < 4:
        return False  # a triangle cannot self-intersect (degenerate ones are caught by the collinearity check)
    a = xy
    b = np.concatenate([xy[1:], xy[:1]])  # edge k: a[k] -> b[k]
    i, j = _edge_pairs(n) if n <= 512 else np.triu_indices(n, k=2)
    if n > 512:
        keep = ~((i == 0) & (j == n - 1))
        i, j = i[keep], j[keep]
    block = 1 << 18
    return any(_edges_cross(a, b, i[s:s + block], j[s:s + block]) for s in range(0, len(i), block))


def _edges_cross(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> bool:
    """Whether any edge pair (i, j) crosses or touches (edges a[k] -> b[k])."""
    p, p2, q, q2 = a[i], b[i], a[j], b[j]
    o1, o2, o3, o4 = _orient(p, p2, q), _orient(p, p2, q2), _orient(q, q2, p), _orient(q, q2, p2)
    if ((o1 * o2 < 0) & (o3 * o4 < 0)).any():
        return True  # a proper crossing
    zero = (o1 == 0) | (o2 == 0) | (o3 == 0) | (o4 == 0)
    if not zero.any():
        return False
    k = np.flatnonzero(zero)  # collinear triples: touching if the point lies on the other segment
    p, p2, q, q2, o1, o2, o3, o4 = p[k], p2[k], q[k], q2[k], o1[k], o2[k], o3[k], o4[k]
    touching = (
        ((o1 == 0) & _on_segment(p, p2, q)) | ((o2 == 0) & _on_segment(p, p2, q2))
        | ((o3 == 0) & _on_segment(q, q2, p)) | ((o4 == 0) & _on_segment(q, q2, p2))
    )
    return bool(touching.any())


@functools.lru_cache(maxsize=256)
def _edge_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of non-adjacent edges of an n-gon (edge k joins vertex k and k + 1)."""
    i, j = np.triu_indices(n, k=2)
    keep = ~((i == 0) & (j == n - 1))  # the first and last edges share vertex 0
    return i[keep], j[keep]


def _orient(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.sign((v[:, 0] - u[:, 0]) * (w[:, 1] - u[:, 1]) - (v[:, 1] - u[:, 1]) * (w[:, 0] - u[:, 0]))


def _on_segment(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """w within the bounding box of segment u-v (with collinearity known, that is: on the segment)."""
    return (
        (np.minimum(u[:, 0], v[:, 0]) <= w[:, 0]) & (w[:, 0] <= np.maximum(u[:, 0], v[:, 0]))
        & (np.minimum(u[:, 1], v[:, 1]) <= w[:, 1]) & (w[:, 1] <= np.maximum(u[:, 1], v[:, 1]))
    )


def _is_collinear(xy: np.ndarray) -> bool:
    """All points on one line (or one point): the polygon encloses nothing. (A signed-area test would also
    flag a symmetric bow-tie, whose lobes cancel.)"""
    d = xy - xy[0]
    far = d[np.argmax(np.abs(d).sum(axis=1))]
    return bool(np.all(d[:, 0] * far[1] - d[:, 1] * far[0] == 0))


# ---------------------------------------------------------------------------------------------- boxes


@dataclass(frozen=True)
class ClippedBox:
    """A box's corners inside the image; `clipped` says whether the sent box reached outside it."""

    x0: float
    y0: float
    x1: float
    y1: float
    clipped: bool


def box_to_polygon(box: Sequence[float]) -> list[float]:
    """`[x, y, w, h]` -> the rectangle as one flat COCO polygon (clockwise from the top-left)."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def decode_box(box: Sequence[float], height: int, width: int, *, clip: bool = False) -> np.ndarray:
    """`[x, y, w, h]` -> rectangle mask `(height, width) bool` (pycocotools box rasterisation).

    Raises MaskError for non-finite values, non-positive size, or a box reaching outside the image;
    with `clip=True` the box is clipped to the image instead (it must still overlap it).
    """
    check_size(height, width)
    return mask_utils.decode(box_to_coco(clip_box(box, height, width, clip=clip), height, width)).astype(bool)


def clip_box(box: Any, height: int, width: int, *, clip: bool) -> ClippedBox:
    """Validate `[x, y, w, h]` and return its corners, clipped to the image when `clip` (else a box reaching
    outside raises)."""
    if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4 or not all(is_number(v) for v in box):
        raise MaskError(f"box must be four numbers [x, y, w, h], got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise MaskError(f"box {list(box)} has non-finite values")
    if w <= 0 or h <= 0:
        raise MaskError(f"box {list(box)} has non-positive size (w={w}, h={h})")
    x0, y0, x1, y1 = x, y, x + w, y + h
    outside = x0 < 0 or y0 < 0 or x1 > width or y1 > height
    if outside and not clip:
        raise MaskError(f"box {list(box)} (xywh) reaches outside the image {width}x{height} (WxH)")
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:
        raise MaskError(f"box {list(box)} (xywh) lies outside the image {width}x{height} (WxH)")
    return ClippedBox(x0, y0, x1, y1, outside)


def box_to_coco(box: ClippedBox, height: int, width: int) -> dict[str, Any]:
    """pycocotools RLE of a box already inside the image."""
    xywh = np.array([[box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0]], dtype=np.float64)
    return mask_utils.frPyObjects(xywh, height, width)[0]


# ---------------------------------------------------------------------------------------------- measures


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """`mask: (H, W)` -> COCO `[x, y, w, h]` of its pixel extent (w = x_max - x_min + 1); zeros if empty."""
    mask = as_bool_mask(mask)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def mask_area(mask: np.ndarray) -> int:
    """Number of pixels inside `mask: (H, W)`."""
    return int(as_bool_mask(mask).sum())


# ---------------------------------------------------------------------------------------------- helpers


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_size(height: Any, width: Any) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise MaskError(f"image {name} must be a positive integer, got {v!r}")


def as_bool_mask(mask: Any) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise MaskError(f"mask must be 2-D (H, W), got shape {tuple(arr.shape)}")
    return arr.astype(bool, copy=False)
