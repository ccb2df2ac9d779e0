"""Region mask codecs: every format Osprey data, clients and evals use, decoded to `(H, W) bool` and back.

One place for all of them (data tools, dataset, server and evals import this module) so that a polygon
means the same pixels everywhere. Rasterisation is pycocotools' (the official Osprey data loader and the
COCO/LVIS evals use it), so our masks are bit-identical to theirs.

Formats accepted by `decode_mask` (see `detect_format`):
- COCO polygons: list of flat `[x1, y1, x2, y2, ...]` lists (merged into one mask), or one flat list.
- RLE: `{"size": [h, w], "counts": str | bytes}` (compressed) or `counts: list[int]` (uncompressed).
- binary arrays: `np.ndarray` or list-of-lists of 0/1 / bools, shape (H, W).
- PNG: raw bytes, or base64 text (optionally a `data:image/png;base64,` URL). Any mode; a pixel is inside
  when it is nonzero (for modes with alpha, LA / RGBA / PA: when its alpha is nonzero).
- boxes: `[x, y, w, h]` (four numbers, COCO xywh), rasterised as the rectangle polygon by pycocotools like
  the official Ferret-Bench eval. Integer boxes cover columns x..x+w-1 and rows y..y+h-1 exactly;
  fractional edges snap to the nearest pixel boundary (x=1.4 -> 1, x=1.5 -> 2, x+w=3.6 -> 4 exclusive).
- one-key dicts naming the format: `{"rle": ...}`, `{"polygon": ...}`, `{"box": ...}`, `{"png": ...}`,
  `{"bitmap": ...}` (the server's request shape).
- SAM automatic-mask-generator entries: dicts with `segmentation` (RLE, or a bitmap list-of-lists) plus
  `bbox`, `area`, `predicted_iou`, ...; `decode_sam` / `decode_sam_list` for whole SAM output files.

Self-intersecting polygons: the COCO annotations contain some and the official loader rasterises them as
pycocotools does, so by default they are accepted with a `MaskWarning`; `strict=True` rejects them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "MaskError",
    "MaskWarning",
    "box_to_polygon",
    "decode_binary",
    "decode_box",
    "decode_mask",
    "decode_png",
    "decode_polygons",
    "decode_rle",
    "decode_sam",
    "decode_sam_list",
    "detect_format",
    "encode_png",
    "encode_png_base64",
    "encode_rle",
    "encode_sam",
    "encode_uncompressed_rle",
    "mask_area",
    "mask_to_bbox",
    "panoptic_segment_ids",
    "polygon_self_intersects",
    "rle_area",
    "rle_counts",
    "to_rle",
]

# Single-key request dicts (the server's `{"rle": ...}`, `{"polygon": ...}`, `{"box": ...}`, `{"png": ...}`):
# key -> the format its value is read as.
_KEYED = {"rle": "rle", "polygon": "polygons", "polygons": "polygons", "box": "box", "bbox": "box", "png": "png",
          "bitmap": "binary"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class MaskError(ValueError):
    """A region mask that cannot be decoded; the message names the offending value."""


class MaskWarning(UserWarning):
    """A mask that decodes but looks suspicious (e.g. a self-intersecting polygon)."""


# ---------------------------------------------------------------------------------------------- dispatch


def detect_format(obj: Any, height: int | None = None, width: int | None = None) -> str:
    """Name of the mask format of `obj`: "rle", "polygons", "box", "binary", "png", "sam" (any dict with a
    `segmentation`), or "keyed" (a one-key dict: rle / polygon(s) / box / bbox / png / bitmap)."""
    if isinstance(obj, np.ndarray):
        return "binary"
    if isinstance(obj, (bytes, bytearray, memoryview, str)):
        return "png"
    if isinstance(obj, Mapping):
        if "segmentation" in obj:
            return "sam"
        keyed = [k for k in _KEYED if k in obj]
        if len(keyed) == 1 and len(obj) == 1:
            return "keyed"
        if "counts" in obj or "size" in obj:
            return "rle"
        raise MaskError(f"mask dict has neither 'counts'/'size' (RLE) nor 'segmentation'; keys: {sorted(obj)}")
    if isinstance(obj, (list, tuple)):
        if len(obj) == 0:
            raise MaskError("empty mask list: expected polygons, a box, a bitmap or RLE parts")
        if all(isinstance(v, Mapping) for v in obj):
            return "rle"  # RLE parts, merged like pycocotools does for a list of RLEs
        if all(_is_number(v) for v in obj):
            return "box" if len(obj) == 4 else "polygons"
        if all(isinstance(v, (list, tuple, np.ndarray)) for v in obj):
            if _looks_like_bitmap(obj, height, width):
                return "binary"
            return "polygons"
    raise MaskError(f"unrecognised mask object of type {type(obj).__name__}")


def decode_mask(obj: Any, height: int, width: int, *, strict: bool = False) -> np.ndarray:
    """Decode any supported mask object to `(height, width) bool`.

    A bare four-number list is a box `[x, y, w, h]`; any other flat number list is one polygon.
    `strict` rejects self-intersecting polygons and SAM entries whose `area` disagrees with the mask.
    """
    _check_size(height, width)
    kind, obj = _resolve(obj, height, width)
    if kind == "binary":
        return decode_binary(obj, height, width)
    if kind == "png":
        return decode_png(obj, height, width)
    return mask_utils.decode(_coco_rle(kind, obj, height, width, strict)).astype(bool)


def to_rle(obj: Any, height: int, width: int, *, strict: bool = False) -> dict[str, Any]:
    """Any supported mask object -> compressed RLE `{"size": [h, w], "counts": str}`, with the same checks as
    `decode_mask` but without materialising the mask for polygons, RLE and boxes (fast validation, storage).
    """
    _check_size(height, width)
    kind, obj = _resolve(obj, height, width)
    if kind == "binary":
        return encode_rle(decode_binary(obj, height, width))
    if kind == "png":
        return encode_rle(decode_png(obj, height, width))
    rle = _coco_rle(kind, obj, height, width, strict)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_area(rle: Mapping[str, Any]) -> int:
    """Pixels inside a (validated) compressed RLE, without decoding it."""
    counts = rle["counts"]
    return int(mask_utils.area({"size": list(rle["size"]),
                                "counts": counts.encode("ascii") if isinstance(counts, str) else counts}))


def _resolve(obj: Any, height: int, width: int) -> tuple[str, Any]:
    """(format, payload) with one-key dicts unwrapped."""
    kind = detect_format(obj, height, width)
    if kind == "keyed":
        ((key, value),) = obj.items()
        return _KEYED[key], value
    return kind, obj


def _coco_rle(kind: str, obj: Any, height: int, width: int, strict: bool) -> dict[str, Any]:
    """pycocotools RLE (bytes counts) of a validated polygon / RLE / box / SAM-entry object."""
    if kind == "rle":
        return _rle_to_coco(obj, height, width)
    if kind == "polygons":
        return _polygons_to_coco(obj, height, width, strict)
    if kind == "box":
        return _box_to_coco(obj, height, width)
    if kind == "sam":
        seg = obj["segmentation"]
        if isinstance(seg, Mapping) or (isinstance(seg, (list, tuple)) and seg and isinstance(seg[0], Mapping)):
            rle = _rle_to_coco(seg, height, width)
        else:
            seg_kind, seg = _resolve(seg, height, width)
            if seg_kind in ("binary", "png"):
                mask = decode_binary(seg, height, width) if seg_kind == "binary" else decode_png(seg, height, width)
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            else:
                rle = _coco_rle(seg_kind, seg, height, width, strict)
        if strict and "area" in obj and int(obj["area"]) != int(mask_utils.area(rle)):
            raise MaskError(f"SAM entry area {obj['area']} does not match the mask's {int(mask_utils.area(rle))} "
                            "pixels")
        return rle
    raise MaskError(f"{kind} masks have no RLE path")  # binary / png are handled by the callers


# ---------------------------------------------------------------------------------------------- polygons


def decode_polygons(
    polygons: Sequence[Sequence[float]] | Sequence[float], height: int, width: int, *, strict: bool = False
) -> np.ndarray:
    """COCO polygons (list of flat xy lists, or one flat list) -> union mask `(height, width) bool`.

    Raises MaskError for odd-length or < 3-point polygons, non-finite coordinates and zero-area polygons;
    self-intersecting ones raise only with `strict`, otherwise they warn (MaskWarning).
    """
    _check_size(height, width)
    return mask_utils.decode(_polygons_to_coco(polygons, height, width, strict)).astype(bool)


def _polygons_to_coco(polygons: Any, height: int, width: int, strict: bool) -> dict[str, Any]:
    if len(polygons) > 0 and all(_is_number(v) for v in polygons):
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


# ---------------------------------------------------------------------------------------------- RLE


def rle_counts(rle: Mapping[str, Any]) -> tuple[int, int, list[int]]:
    """Validate an RLE dict and return `(h, w, counts)` with counts as plain ints (column-major runs).

    Checks before pycocotools sees the data: its C decoder does not bounds-check the counts.
    """
    h, w = _rle_size(rle)
    counts = rle["counts"]
    if isinstance(counts, (bytes, bytearray)):
        counts = bytes(counts).decode("ascii", errors="replace")
    if isinstance(counts, str):
        values = _counts_from_string(counts)
    elif isinstance(counts, (list, tuple, np.ndarray)):
        values = []
        for k, v in enumerate(counts):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise MaskError(f"RLE counts[{k}] = {v!r} is not an integer")
            values.append(int(v))
    else:
        raise MaskError(f"RLE counts must be a string, bytes or a list of ints, got {type(counts).__name__}")
    for k, v in enumerate(values):
        if v < 0:
            raise MaskError(f"RLE counts[{k}] = {v} is negative")
    total = sum(values)
    if total != h * w:
        raise MaskError(f"RLE counts sum to {total} but size {h}x{w} needs {h * w}")
    return h, w, values


def _rle_size(rle: Any) -> tuple[int, int]:
    if not isinstance(rle, Mapping):
        raise MaskError(f"RLE must be a dict, got {type(rle).__name__}")
    if "size" not in rle or "counts" not in rle:
        raise MaskError(f"RLE needs 'size' and 'counts'; got keys {sorted(rle)}")
    size = rle["size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
    ):
        raise MaskError(f"RLE size must be [height, width] integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise MaskError(f"RLE size must be positive, got {[h, w]}")
    return h, w


def decode_rle(rle: Mapping[str, Any] | Sequence[Mapping[str, Any]], height: int | None = None,
               width: int | None = None) -> np.ndarray:
    """Compressed or uncompressed RLE (or a list of RLE parts, merged) -> `(h, w) bool`.

    `height`/`width`, when given, must match the RLE size (the image the region belongs to).
    """
    return mask_utils.decode(_rle_to_coco(rle, height, width)).astype(bool)


def _rle_to_coco(rle: Any, height: int | None, width: int | None) -> dict[str, Any]:
    if isinstance(rle, (list, tuple)):
        if not rle:
            raise MaskError("empty list of RLE parts")
        parts = [_rle_to_coco(part, height, width) for part in rle]
        sizes = {tuple(p["size"]) for p in parts}
        if len(sizes) != 1:
            raise MaskError(f"RLE parts have different sizes {sorted(sizes)}")
        return mask_utils.merge(parts)
    h, w = _rle_size(rle)
    if height is not None and width is not None and (h, w) != (height, width):
        raise MaskError(f"RLE size {[h, w]} does not match the image size {[height, width]}")
    _, _, counts = rle_counts(rle)
    return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)


def _counts_from_string(s: str) -> list[int]:
    """Parse COCO's compressed counts string (pycocotools rleFrString, in Python so it can be checked)."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise MaskError(f"RLE counts string is truncated at character {p}")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise MaskError(f"RLE counts string has an invalid character {s[p]!r} at position {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """`mask: (H, W)` -> compressed COCO RLE `{"size": [H, W], "counts": str}` (JSON-safe)."""
    mask = _as_bool_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """`mask: (H, W)` -> uncompressed RLE `{"size": [H, W], "counts": [int, ...]}` (runs, column-major,
    starting with the number of zeros)."""
    mask = _as_bool_mask(mask)
    flat = mask.T.reshape(-1)  # column-major, like COCO
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


# ---------------------------------------------------------------------------------------------- arrays, PNG


def decode_binary(array: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
    """A binary array or list-of-lists `(H, W)` -> `(H, W) bool`; values must be 0/1 or bools."""
    try:
        arr = np.asarray(array)
    except ValueError as exc:  # ragged lists
        raise MaskError(f"bitmap rows have different lengths ({exc})") from None
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise MaskError(f"bitmap must be 2-D (H, W), got shape {tuple(arr.shape)}")
    if height is not None and width is not None and arr.shape != (height, width):
        raise MaskError(f"bitmap shape {tuple(arr.shape)} does not match the image size {(height, width)}")
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf" or not np.isin(arr, (0, 1)).all():
            raise MaskError(f"bitmap values must be 0/1 or bools (dtype {arr.dtype})")
        arr = arr.astype(bool)
    return arr


def decode_png(data: bytes | str, height: int | None = None, width: int | None = None) -> np.ndarray:
    """PNG bytes or base64 PNG text -> `(H, W) bool`: nonzero pixels, or nonzero alpha for alpha modes."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, str):
        text = _DATA_URL.sub("", data.strip())
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise MaskError("mask text is not valid base64 (expected a base64 PNG)") from None
    else:
        raw = bytes(data)
    if not raw.startswith(PNG_SIGNATURE):
        raise MaskError(f"undecodable PNG: data does not start with the PNG signature (got {raw[:8]!r})")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                arr = np.asarray(image.convert("RGBA"))[..., 3] if image.mode == "P" else np.asarray(
                    image.getchannel("A"))
            else:
                arr = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MaskError(f"undecodable PNG: {exc}") from None
    mask = arr != 0
    if mask.ndim == 3:
        mask = mask.any(axis=-1)  # RGB: any channel nonzero
    if height is not None and width is not None and mask.shape != (height, width):
        raise MaskError(f"PNG size {mask.shape[1]}x{mask.shape[0]} (WxH) does not match the image "
                        f"{width}x{height}")
    return mask


def encode_png(mask: np.ndarray) -> bytes:
    """`mask: (H, W)` -> 8-bit grayscale PNG bytes (0 outside, 255 inside)."""
    from PIL import Image

    mask = _as_bool_mask(mask)
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def encode_png_base64(mask: np.ndarray) -> str:
    """`mask: (H, W)` -> base64 text of `encode_png(mask)` (what JSON clients send)."""
    return base64.b64encode(encode_png(mask)).decode("ascii")


# ---------------------------------------------------------------------------------------------- boxes


def box_to_polygon(box: Sequence[float]) -> list[float]:
    """`[x, y, w, h]` -> the rectangle as one flat COCO polygon (clockwise from the top-left)."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def decode_box(box: Sequence[float], height: int, width: int, *, clip: bool = False) -> np.ndarray:
    """`[x, y, w, h]` -> rectangle mask `(height, width) bool` (pycocotools box rasterisation).

    Raises MaskError for non-finite values, non-positive size, or a box reaching outside the image;
    with `clip=True` the box is clipped to the image instead (it must still overlap it).
    """
    _check_size(height, width)
    return mask_utils.decode(_box_to_coco(box, height, width, clip=clip)).astype(bool)


def _box_to_coco(box: Any, height: int, width: int, *, clip: bool = False) -> dict[str, Any]:
    if len(box) != 4 or not all(_is_number(v) for v in box):
        raise MaskError(f"box must be four numbers [x, y, w, h], got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise MaskError(f"box {list(box)} has non-finite values")
    if w <= 0 or h <= 0:
        raise MaskError(f"box {list(box)} has non-positive size (w={w}, h={h})")
    x0, y0, x1, y1 = x, y, x + w, y + h
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        if not clip:
            raise MaskError(f"box {list(box)} (xywh) reaches outside the image {width}x{height} (WxH)")
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
        if x1 <= x0 or y1 <= y0:
            raise MaskError(f"box {list(box)} (xywh) lies outside the image {width}x{height} (WxH)")
    return mask_utils.frPyObjects(np.array([[x0, y0, x1 - x0, y1 - y0]], dtype=np.float64), height, width)[0]


# ---------------------------------------------------------------------------------------------- panoptic


def panoptic_segment_ids(png: str | bytes | Any) -> np.ndarray:
    """A COCO-panoptic PNG (a path or its bytes) -> `(H, W) int64` segment ids, R + 256 G + 256^2 B (0 = none);
    segment K's mask is `ids == K`."""
    from PIL import Image, UnidentifiedImageError

    source = io.BytesIO(png) if isinstance(png, (bytes, bytearray)) else png
    try:
        with Image.open(source) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise MaskError(f"undecodable panoptic PNG: {exc}") from None
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


# ---------------------------------------------------------------------------------------------- SAM


def decode_sam(entry: Mapping[str, Any], height: int | None = None, width: int | None = None, *,
               strict: bool = False) -> np.ndarray:
    """One SAM automatic-mask-generator entry (or any dict with a `segmentation`) -> `(H, W) bool`.

    `segmentation` may be RLE (output_mode "coco_rle" or "uncompressed_rle") or a bitmap (list-of-lists,
    "binary_mask" saved to JSON). With `strict`, a stated `area` must equal the mask's pixel count.
    """
    if not isinstance(entry, Mapping) or "segmentation" not in entry:
        raise MaskError("SAM entry must be a dict with a 'segmentation' key")
    seg = entry["segmentation"]
    if isinstance(seg, Mapping) or (isinstance(seg, (list, tuple)) and seg and isinstance(seg[0], Mapping)):
        mask = decode_rle(seg, height, width)
    elif height is not None and width is not None:
        mask = decode_mask(seg, height, width, strict=strict)  # region dicts may carry polygons too
    else:
        mask = decode_binary(seg)
    if strict and "area" in entry and int(entry["area"]) != int(mask.sum()):
        raise MaskError(f"SAM entry area {entry['area']} does not match the mask's {int(mask.sum())} pixels")
    return mask


def decode_sam_list(entries: Iterable[Mapping[str, Any]], height: int | None = None,
                    width: int | None = None, *, strict: bool = False) -> np.ndarray:
    """A SAM output file's list of entries -> `(N, H, W) bool`, in file order."""
    masks = [decode_sam(e, height, width, strict=strict) for e in entries]
    if not masks:
        if height is None or width is None:
            raise MaskError("empty SAM list and no image size given")
        return np.zeros((0, height, width), dtype=bool)
    shapes = {m.shape for m in masks}
    if len(shapes) != 1:
        raise MaskError(f"SAM masks have different sizes {sorted(shapes)}")
    return np.stack(masks)


def encode_sam(mask: np.ndarray, *, predicted_iou: float = 1.0, stability_score: float = 1.0,
               point_coords: Sequence[Sequence[float]] | None = None,
               crop_box: Sequence[float] | None = None) -> dict[str, Any]:
    """`mask: (H, W)` -> a SAM "coco_rle" output entry. SAM's `bbox` is `[x0, y0, x1 - x0, y1 - y0]` with
    inclusive x1/y1 (one pixel narrower than COCO's), reproduced here."""
    mask = _as_bool_mask(mask)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    bbox = [0, 0, 0, 0] if len(xs) == 0 else [
        int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]
    return {
        "segmentation": encode_rle(mask),
        "area": int(mask.sum()),
        "bbox": bbox,
        "predicted_iou": float(predicted_iou),
        "point_coords": [list(map(float, p)) for p in point_coords] if point_coords is not None else [],
        "stability_score": float(stability_score),
        "crop_box": list(map(float, crop_box)) if crop_box is not None else [0.0, 0.0, float(w), float(h)],
    }


# ---------------------------------------------------------------------------------------------- measures


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """`mask: (H, W)` -> COCO `[x, y, w, h]` of its pixel extent (w = x_max - x_min + 1); zeros if empty."""
    mask = _as_bool_mask(mask)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def mask_area(mask: np.ndarray) -> int:
    """Number of pixels inside `mask: (H, W)`."""
    return int(_as_bool_mask(mask).sum())


# ---------------------------------------------------------------------------------------------- helpers


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_size(height: Any, width: Any) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise MaskError(f"image {name} must be a positive integer, got {v!r}")


def _as_bool_mask(mask: Any) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise MaskError(f"mask must be 2-D (H, W), got shape {tuple(arr.shape)}")
    return arr.astype(bool, copy=False)


def _looks_like_bitmap(obj: Sequence[Any], height: int | None, width: int | None) -> bool:
    """Rows of equal length holding only 0/1/bools (and matching the image when its size is known)."""
    if height is not None and len(obj) != height:
        return False
    lengths = {len(row) for row in obj}
    if len(lengths) != 1 or (width is not None and lengths != {width}):
        return False
    first = obj[0]
    if any(isinstance(v, (bool, np.bool_)) for v in first):
        return True
    try:
        arr = np.asarray(obj)
    except ValueError:
        return False
    return arr.dtype.kind in "biu" and bool(np.isin(arr, (0, 1)).all())
