"""Mask codecs: COCO RLE (compressed and uncompressed), binary arrays and PNG, decoded to `(H, W) bool` and back.

The RLE checks run in Python before pycocotools sees the data: its C decoder does not bounds-check counts.
A PNG or image used as a mask is inside where its alpha is nonzero (modes with alpha: LA / RGBA / PA, and P
with a transparent colour), else where any channel is nonzero: `image_to_mask` is that rule, for PNG masks
and for mask images sent to the server alike.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from .errors import MaskError
from .geometry import as_bool_mask

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_ALPHA_MODES = ("RGBA", "LA", "PA")

# ---------------------------------------------------------------------------------------------- RLE


def rle_area(rle: Mapping[str, Any]) -> int:
    """Pixels inside a (validated) compressed RLE, without decoding it."""
    counts = rle["counts"]
    return int(mask_utils.area({"size": list(rle["size"]),
                                "counts": counts.encode("ascii") if isinstance(counts, str) else counts}))



def rle_counts(rle: Mapping[str, Any]) -> tuple[int, int, list[int]]:
    """Validate an RLE dict and return `(h, w, counts)` with counts as plain ints (column-major runs).

    Checks before pycocotools sees the data: its C decoder does not bounds-check the counts.
    """
    h, w = rle_size(rle)
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


def rle_size(rle: Any) -> tuple[int, int]:
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
    return mask_utils.decode(rle_to_coco(rle, height, width)).astype(bool)


def rle_to_coco(rle: Any, height: int | None, width: int | None) -> dict[str, Any]:
    if isinstance(rle, (list, tuple)):
        if not rle:
            raise MaskError("empty list of RLE parts")
        parts = [rle_to_coco(part, height, width) for part in rle]
        sizes = {tuple(p["size"]) for p in parts}
        if len(sizes) != 1:
            raise MaskError(f"RLE parts have different sizes {sorted(sizes)}")
        return mask_utils.merge(parts)
    h, w = rle_size(rle)
    if height is not None and width is not None and (h, w) != (height, width):
        raise MaskError(f"RLE size {[h, w]} does not match the image size {[height, width]}", code="mask_size_mismatch")
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
    mask = as_bool_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """`mask: (H, W)` -> uncompressed RLE `{"size": [H, W], "counts": [int, ...]}` (runs, column-major,
    starting with the number of zeros)."""
    mask = as_bool_mask(mask)
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
        raise MaskError(f"bitmap shape {tuple(arr.shape)} does not match the image size {(height, width)}",
                        code="mask_size_mismatch")
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf" or not np.isin(arr, (0, 1)).all():
            raise MaskError(f"bitmap values must be 0/1 or bools (dtype {arr.dtype})")
        arr = arr.astype(bool)
    return arr


def decode_png(data: bytes | str, height: int | None = None, width: int | None = None, *,
               max_pixels: int | None = None) -> np.ndarray:
    """PNG bytes or base64 PNG text -> `(H, W) bool` by `image_to_mask`.

    `max_pixels` refuses a larger PNG from its header, before any pixel is decoded (decompression bombs).
    """
    raw = _png_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                w, h = image.size
                if max_pixels is not None and w * h > max_pixels:
                    raise MaskError(f"PNG mask is {w}x{h} (WxH): more than {max_pixels} pixels", code="image_too_large")
                image.load()
                mask = image_to_mask(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise MaskError("PNG mask is too large (decompression bomb limit)", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, MaskError):
            raise
        raise MaskError(f"undecodable PNG: {exc}") from None
    if height is not None and width is not None and mask.shape != (height, width):
        raise MaskError(f"PNG size {mask.shape[1]}x{mask.shape[0]} (WxH) does not match the image "
                        f"{width}x{height}", code="mask_size_mismatch")
    return mask


def _png_bytes(data: bytes | str) -> bytes:
    if isinstance(data, str):
        text = "".join(_DATA_URL.sub("", data.strip()).split())  # MIME encoders break lines
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise MaskError("mask text is not valid base64 (expected a base64 PNG)", code="invalid_base64") from None
    else:
        raw = bytes(data)
    if not raw.startswith(PNG_SIGNATURE):
        raise MaskError(f"undecodable PNG: data does not start with the PNG signature (got {raw[:8]!r})")
    return raw


def has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def image_to_mask(image: Image.Image) -> np.ndarray:
    """An image used as a mask -> `(H, W) bool`: alpha > 0 if it has alpha, else any channel nonzero."""
    if has_alpha(image):
        return np.asarray(image.convert("RGBA").getchannel("A")) > 0
    arr = np.asarray(image) != 0
    return arr.any(axis=-1) if arr.ndim == 3 else arr


def alpha_mask(image: Image.Image) -> np.ndarray | None:
    """`(H, W) bool` where alpha > 0, or None when the image has no alpha or it is fully opaque (a plain image)."""
    if not has_alpha(image):
        return None
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    return None if alpha.min() == 255 else alpha > 0


def encode_png(mask: np.ndarray) -> bytes:
    """`mask: (H, W)` -> 8-bit grayscale PNG bytes (0 outside, 255 inside)."""
    mask = as_bool_mask(mask)
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def encode_png_base64(mask: np.ndarray) -> str:
    """`mask: (H, W)` -> base64 text of `encode_png(mask)` (what JSON clients send)."""
    return base64.b64encode(encode_png(mask)).decode("ascii")


def panoptic_segment_ids(png: str | bytes | Any) -> np.ndarray:
    """A COCO-panoptic PNG (a path or its bytes) -> `(H, W) int64` segment ids, R + 256 G + 256^2 B (0 = none);
    segment K's mask is `ids == K`."""
    source = io.BytesIO(png) if isinstance(png, (bytes, bytearray)) else png
    try:
        with Image.open(source) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise MaskError(f"undecodable panoptic PNG: {exc}") from None
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
