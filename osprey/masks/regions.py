"""Regions: every accepted form of a region, decoded in one place to `(H, W) bool`.

`decode_mask` / `to_rle` read any codec object (data tools, datasets, evals); `decode_region` is the one
decoder for regions that users send (the server's requests, `osprey describe`'s mask files): it also accepts
the request shapes, fits a mask of another size when asked, clips boxes reaching outside the image (with a
note), refuses empty masks and huge sizes, and names the region in every error (`regions[2].box`).

Forms (`detect_format`):
- COCO polygons: list of flat `[x1, y1, x2, y2, ...]` lists (merged into one mask), or one flat list.
- RLE: `{"size": [h, w], "counts": str | bytes}` (compressed, pycocotools' own output) or `counts: list[int]`.
- binary arrays: `np.ndarray` or list-of-lists of 0/1 / bools, shape (H, W).
- PNG: raw bytes, or base64 text (optionally a `data:image/png;base64,` URL); `codecs.image_to_mask` reads it.
- boxes: `[x, y, w, h]` (four numbers, COCO xywh; `geometry` says how they are rasterised).
- one-key dicts naming the format: `{"rle": ...}`, `{"polygon": ...}`, `{"box": ...}`, `{"png": ...}`,
  `{"bitmap": ...}` (the server's request shape).
- SAM automatic-mask-generator entries: dicts with `segmentation` (RLE, or a bitmap list-of-lists) plus
  `bbox`, `area`, `predicted_iou`, ...; `decode_sam` / `decode_sam_list` for whole SAM output files.

Self-intersecting polygons: the COCO annotations contain some and the official loader rasterises them as
pycocotools does, so by default they are accepted with a `MaskWarning` (a note, for `decode_region`);
`strict=True` rejects them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .codecs import decode_binary, decode_png, decode_rle, encode_rle, rle_size, rle_to_coco
from .errors import MaskError, MaskWarning
from .geometry import as_bool_mask, box_to_coco, check_size, clip_box, is_number, polygons_to_coco

# One-key request dicts (`{"rle": ...}`, `{"polygon": ...}`, ...): key -> the format its value is read as.
KEYED = {"rle": "rle", "polygon": "polygons", "polygons": "polygons", "box": "box", "bbox": "box", "png": "png",
         "bitmap": "binary"}
REGION_KEYS = ("rle", "polygon", "box", "png", "bitmap")  # the request keys docs name; KEYED adds aliases

# ---------------------------------------------------------------------------------------------- any codec object


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
        keyed = [k for k in KEYED if k in obj]
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
        if all(is_number(v) for v in obj):
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
    check_size(height, width)
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
    check_size(height, width)
    kind, obj = _resolve(obj, height, width)
    if kind == "binary":
        return encode_rle(decode_binary(obj, height, width))
    if kind == "png":
        return encode_rle(decode_png(obj, height, width))
    rle = _coco_rle(kind, obj, height, width, strict)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _resolve(obj: Any, height: int, width: int) -> tuple[str, Any]:
    """(format, payload) with one-key dicts unwrapped."""
    kind = detect_format(obj, height, width)
    if kind == "keyed":
        ((key, value),) = obj.items()
        return KEYED[key], value
    return kind, obj


def _coco_rle(kind: str, obj: Any, height: int, width: int, strict: bool) -> dict[str, Any]:
    """pycocotools RLE (bytes counts) of a validated polygon / RLE / box / SAM-entry object."""
    if kind == "rle":
        return rle_to_coco(obj, height, width)
    if kind == "polygons":
        return polygons_to_coco(obj, height, width, strict)
    if kind == "box":
        return box_to_coco(clip_box(obj, height, width, clip=False), height, width)
    if kind == "sam":
        seg = obj["segmentation"]
        if isinstance(seg, Mapping) or (isinstance(seg, (list, tuple)) and seg and isinstance(seg[0], Mapping)):
            rle = rle_to_coco(seg, height, width)
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
    mask = as_bool_mask(mask)
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


# ---------------------------------------------------------------------------------------------- user regions


@dataclass(frozen=True)
class RegionFit:
    """How a user's region is fitted to its image."""

    resize: bool = False  # a mask of another size is resized (nearest) instead of refused
    resize_option: str = "ask for resizing"  # how the caller spells that opt-in, named in the size error
    max_pixels: int | None = None  # a mask larger than this (RLE size, PNG header) is refused before decoding
    clip_boxes: bool = True  # a box reaching outside the image is clipped (with a note), not refused
    strict: bool = False  # self-intersecting polygons and SAM areas that disagree are refused, not noted


@dataclass(frozen=True)
class DecodedRegion:
    mask: np.ndarray  # (H, W) bool at the image size, at least one pixel inside
    notes: tuple[str, ...] = ()  # what was changed or tolerated: a clipped box, a self-intersecting polygon


@dataclass(frozen=True)
class DecodedRegions:
    masks: np.ndarray  # (Q, H, W) bool, in request order
    notes: list[str] = field(default_factory=list)


def decode_regions(regions: Any, height: int, width: int, *, max_regions: int, fit: RegionFit = RegionFit(),
                   where: str = "regions") -> DecodedRegions:
    """A list of user regions -> `(Q, H, W) bool`; errors name the list (`regions`) or the region."""
    if not isinstance(regions, (list, tuple)):
        raise MaskError(f"must be a list of regions, got {type(regions).__name__}", code="invalid_type", where=where)
    if not regions:
        raise MaskError("is empty: give at least one region", code="invalid_value", where=where)
    if len(regions) > max_regions:
        raise MaskError(f"too many regions: {len(regions)} > {max_regions}", code="too_many_regions", where=where)
    out = np.zeros((len(regions), height, width), dtype=bool)
    notes: list[str] = []
    for i, region in enumerate(regions):
        decoded = decode_region(region, height, width, fit=fit, where=f"{where}[{i}]")
        out[i] = decoded.mask
        notes.extend(decoded.notes)
    return DecodedRegions(out, notes)


def decode_region(region: Any, height: int, width: int, *, fit: RegionFit = RegionFit(),
                  where: str = "region") -> DecodedRegion:
    """One user region (any form above) -> its mask at the image size, or a MaskError naming `where`."""
    check_size(height, width)
    kind, payload, at = _region_form(region, height, width, where)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MaskWarning)
        try:
            mask, notes = _decode_form(kind, payload, height, width, fit)
            mask = fit_mask(mask, height, width, fit)
        except MaskError as exc:
            raise MaskError(exc.message, code=exc.code, where=at) from None
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. numbers too large for pycocotools' C ints
            raise MaskError(f"undecodable region: {exc}", where=at) from None
    notes = tuple(f"{at}: {note}" for note in notes)
    notes += tuple(f"{at}: {w.message}" for w in caught if issubclass(w.category, MaskWarning))
    return DecodedRegion(_require_pixels(mask, where), notes)


def fit_region(mask: np.ndarray, height: int, width: int, *, fit: RegionFit = RegionFit(),
               where: str = "region") -> np.ndarray:
    """A mask decoded elsewhere (an image sent as a mask) held to the rules of `decode_region`: fitted to the
    image size and not empty."""
    try:
        mask = fit_mask(mask, height, width, fit)
    except MaskError as exc:
        raise MaskError(exc.message, code=exc.code, where=where) from None
    return _require_pixels(mask, where)


def _require_pixels(mask: np.ndarray, where: str) -> np.ndarray:
    if not mask.any():  # the model would answer about nothing and sound sure of it
        raise MaskError("the mask is empty: no pixel of the region is inside the image", code="empty_mask",
                        where=where)
    return mask


def fit_mask(mask: np.ndarray, height: int, width: int, fit: RegionFit = RegionFit()) -> np.ndarray:
    """A decoded mask at the image size: as it is, resized (nearest) when `fit.resize`, else refused."""
    if mask.shape == (height, width):
        return mask
    if not fit.resize:
        raise _size_mismatch(mask.shape, height, width, fit)
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST), dtype=bool)


def _region_form(region: Any, height: int, width: int, where: str) -> tuple[str, Any, str]:
    """(format, payload, where the payload is) of a user region; one-key dicts are unwrapped."""
    if isinstance(region, (np.ndarray, list, tuple)):
        try:
            return detect_format(region, height, width), region, where
        except MaskError as exc:
            raise MaskError(exc.message, code=exc.code, where=where) from None
    if not isinstance(region, Mapping):
        raise MaskError(f"a region must be an object with one of {list(REGION_KEYS)}, a COCO RLE or a SAM entry, "
                        f"got {type(region).__name__}", code="invalid_type", where=where)
    if "segmentation" in region:  # a SAM entry as it is; its other keys (bbox, area, ...) ride along
        return "sam", region, where
    keys = [k for k in KEYED if k in region]
    if len(keys) == 1 and len(region) == 1:
        return KEYED[keys[0]], region[keys[0]], f"{where}.{keys[0]}"
    if set(region) == {"size", "counts"}:  # a bare COCO RLE, as pycocotools writes it
        return "rle", region, where
    raise MaskError(f"a region needs exactly one of {list(REGION_KEYS)}, or is a COCO RLE {{size, counts}} or a "
                    f"SAM entry with 'segmentation'; got keys {sorted(region)}", code="invalid_region", where=where)


def _decode_form(kind: str, payload: Any, height: int, width: int, fit: RegionFit) -> tuple[np.ndarray, tuple[str, ...]]:
    """The mask of one region payload, at its own size (fit_mask fits it), and notes."""
    if kind == "box":
        if not isinstance(payload, (list, tuple, np.ndarray)):
            raise MaskError(f"box must be [x, y, w, h], got {type(payload).__name__}", code="invalid_type")
        box = clip_box(payload, height, width, clip=fit.clip_boxes)
        note = (f"box {list(payload)} reaches outside the {width}x{height} (WxH) image; clipped to "
                f"[{box.x0:g}, {box.y0:g}, {box.x1 - box.x0:g}, {box.y1 - box.y0:g}]")
        notes = (note,) if box.clipped else ()
        return mask_utils.decode(box_to_coco(box, height, width)).astype(bool), notes
    if kind == "polygons":
        if not isinstance(payload, (list, tuple, np.ndarray)):
            raise MaskError("polygon must be a list of [x1, y1, x2, y2, ...] lists", code="invalid_type")
        return mask_utils.decode(polygons_to_coco(payload, height, width, fit.strict)).astype(bool), ()
    if kind == "rle":
        _check_rle_size(payload, height, width, fit)
        return decode_rle(payload), ()
    if kind == "png":
        if not isinstance(payload, (str, bytes, bytearray)):
            raise MaskError(f"png must be base64 text, got {type(payload).__name__}", code="invalid_type")
        return decode_png(payload, max_pixels=fit.max_pixels), ()
    if kind == "binary":
        return decode_binary(payload), ()
    return _decode_sam_form(payload, height, width, fit)


def _decode_sam_form(entry: Mapping[str, Any], height: int, width: int,
                     fit: RegionFit) -> tuple[np.ndarray, tuple[str, ...]]:
    seg = entry["segmentation"]
    is_rle = isinstance(seg, Mapping) or (isinstance(seg, (list, tuple)) and bool(seg) and isinstance(seg[0], Mapping))
    mask, notes = _decode_form("rle" if is_rle else detect_format(seg), seg, height, width, fit)
    if "area" in entry and is_number(entry["area"]) and int(entry["area"]) != int(mask.sum()):
        message = f"SAM entry area {entry['area']} does not match the mask's {int(mask.sum())} pixels"
        if fit.strict:
            raise MaskError(message)
        notes += (message,)
    return mask, notes


def _check_rle_size(rle: Any, height: int, width: int, fit: RegionFit) -> None:
    """Refuse a wrong or huge RLE size before decoding allocates it."""
    for part in rle if isinstance(rle, (list, tuple)) else [rle]:
        h, w = rle_size(part)
        if (h, w) == (height, width):
            continue
        if not fit.resize:
            raise _size_mismatch((h, w), height, width, fit)
        if fit.max_pixels is not None and h * w > fit.max_pixels:
            raise MaskError(f"mask size {w}x{h} (WxH) is more than {fit.max_pixels} pixels", code="image_too_large")


def _size_mismatch(got: Sequence[int], height: int, width: int, fit: RegionFit) -> MaskError:
    return MaskError(f"mask size {got[1]}x{got[0]} (WxH) differs from the image {width}x{height}; send masks at "
                     f"the image size or {fit.resize_option}", code="mask_size_mismatch")
