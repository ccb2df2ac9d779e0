"""Request payload decoding with limits: base64 / data URLs / http(s) images, PIL safety, region masks.

Everything here raises `APIError` (4xx) naming the request field, never anything else: the server must
answer every malformed input with a client error and keep serving.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from osprey import masks as mask_codecs

from .errors import APIError, bad_request

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?:;[\w=.-]+)*;base64,", re.IGNORECASE)
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
REGION_KEYS = ("rle", "polygon", "box", "png")  # a region is a dict with exactly one of these, or a SAM entry


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int
    max_image_side: int


@dataclass
class DecodedImage:
    """A validated image: `image` is fully loaded (any mode, alpha kept); `key` hashes the sent bytes."""

    image: Image.Image
    key: str

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.image.height, self.image.width

    def rgb(self) -> Image.Image:
        return self.image if self.image.mode == "RGB" else self.image.convert("RGB")


def set_pil_limits(limits: Limits) -> None:
    """PIL refuses images over 2x this at open (DecompressionBombError); we check 1x ourselves first."""
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def decode_base64(text: str, param: str) -> bytes:
    """Raw base64 or a `data:...;base64,` URL -> bytes."""
    if not isinstance(text, str):
        raise bad_request(f"expected base64 text, got {type(text).__name__}", param)
    body = _DATA_URL.sub("", text.strip(), count=1)
    if text.strip().lower().startswith("data:") and body == text.strip():
        raise bad_request("data URL must be base64-encoded (data:<mime>;base64,<data>)", param, "invalid_image")
    body = "".join(body.split())  # tolerate line breaks from MIME encoders
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("malformed base64 data", param, "invalid_base64") from None
    if not raw:
        raise bad_request("empty image data", param, "invalid_image")
    return raw


def is_remote_url(text: str) -> bool:
    return text.strip().lower().startswith(("http://", "https://"))


async def fetch_url(url: str, param: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """GET an http(s) image with a byte cap and a timeout (only called when the server allows URLs)."""
    import httpx

    try:
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=True, max_redirects=3) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise bad_request(f"fetching the image URL returned HTTP {response.status_code}", param,
                                  "image_fetch_failed")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(413, f"image at URL is larger than {max_bytes} bytes", param=param,
                                   code="image_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise bad_request(f"could not fetch the image URL: {type(exc).__name__}", param, "image_fetch_failed") from None
    return b"".join(chunks)


def open_image(raw: bytes, param: str, limits: Limits) -> DecodedImage:
    """Validate the header (format, size) before decoding any pixels, then decode fully."""
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise bad_request("data is not a decodable image (PNG, JPEG, WebP, GIF, BMP, TIFF)", param,
                          "invalid_image") from None
    except Image.DecompressionBombError:
        raise _too_large(param, limits) from None
    if image.format not in _IMAGE_FORMATS:
        raise bad_request(f"unsupported image format {image.format}", param, "invalid_image")
    width, height = image.size
    if width < 1 or height < 1:
        raise bad_request(f"image has no pixels ({width}x{height})", param, "invalid_image")
    if width * height > limits.max_image_pixels or max(width, height) > limits.max_image_side:
        raise _too_large(param, limits, width, height)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise bad_request(f"image data is truncated or corrupt ({exc})", param, "invalid_image") from None
    return DecodedImage(image=image, key=hashlib.sha256(raw).hexdigest())


def _too_large(param: str, limits: Limits, width: int | None = None, height: int | None = None) -> APIError:
    got = f" ({width}x{height})" if width else ""
    return bad_request(
        f"image is too large{got}: at most {limits.max_image_pixels} pixels and {limits.max_image_side} per side",
        param, "image_too_large")


def alpha_mask(image: Image.Image) -> np.ndarray | None:
    """`(H, W) bool` where alpha > 0, or None when the image has no alpha or it is fully opaque."""
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return None
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    if alpha.min() == 255:
        return None
    return alpha > 0


def image_as_mask(image: Image.Image) -> np.ndarray:
    """An extra image sent as a mask (DAM convention): alpha > 0 if it has alpha, else nonzero gray."""
    alpha = alpha_mask(image)
    if alpha is not None:
        return alpha
    if image.mode in ("RGBA", "LA", "PA"):  # fully opaque alpha: the whole image
        return np.ones((image.height, image.width), dtype=bool)
    return np.asarray(image.convert("L")) > 0


def decode_regions(regions: Any, height: int, width: int, limits: Limits, *, max_regions: int,
                   resize: bool = False, param: str = "regions") -> np.ndarray:
    """A request's `regions` list -> `(Q, H, W) bool` masks at the image size.

    Each region: `{"rle": ...}`, `{"polygon": ...}`, `{"box": [x, y, w, h]}`, `{"png": base64}`, or a SAM
    automatic-mask-generator entry (a dict with `segmentation`). Masks of another size than the image are
    refused unless `resize` (nearest-neighbour) is asked for.
    """
    if not isinstance(regions, list):
        raise bad_request(f"'{param}' must be a list of regions, got {type(regions).__name__}", param, "invalid_type")
    if not regions:
        raise bad_request(f"'{param}' is empty: give at least one region", param, "invalid_value")
    if len(regions) > max_regions:
        raise bad_request(f"too many regions: {len(regions)} > {max_regions}", param, "too_many_regions")
    out = np.zeros((len(regions), height, width), dtype=bool)
    for i, region in enumerate(regions):
        out[i] = decode_region(region, height, width, limits, resize=resize, param=f"{param}[{i}]")
    return out


def decode_region(region: Any, height: int, width: int, limits: Limits, *, resize: bool, param: str) -> np.ndarray:
    if not isinstance(region, Mapping):
        raise bad_request(f"a region must be an object with one of {list(REGION_KEYS)} or a SAM entry, "
                          f"got {type(region).__name__}", param, "invalid_type")
    try:
        if "segmentation" in region:  # SAM entry as-is (other keys: bbox, area, predicted_iou, ...)
            seg = region["segmentation"]
            if isinstance(seg, Mapping):
                _check_rle_size(seg, height, width, limits, resize, param + ".segmentation")
                mask = mask_codecs.decode_sam(region)
            else:
                mask = mask_codecs.decode_sam(region, height, width) if not resize else mask_codecs.decode_sam(region)
        else:
            keys = [k for k in REGION_KEYS if k in region]
            extra = sorted(set(region) - set(REGION_KEYS))
            if len(keys) != 1 or extra:
                raise bad_request(f"a region needs exactly one of {list(REGION_KEYS)} (or SAM's 'segmentation'); "
                                  f"got keys {sorted(region)}", param, "invalid_region")
            kind = keys[0]
            value = region[kind]
            param = f"{param}.{kind}"
            if kind == "rle":
                _check_rle_size(value, height, width, limits, resize, param)
                mask = mask_codecs.decode_rle(value)
            elif kind == "polygon":
                if not isinstance(value, list):
                    raise bad_request("polygon must be a list of [x1, y1, x2, y2, ...] lists", param, "invalid_type")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", mask_codecs.MaskWarning)
                    mask = mask_codecs.decode_polygons(value, height, width)
            elif kind == "box":
                if not isinstance(value, list):
                    raise bad_request("box must be [x, y, w, h]", param, "invalid_type")
                mask = mask_codecs.decode_box(value, height, width)
            else:
                raw = decode_base64(value, param)
                if not raw.startswith(mask_codecs.PNG_SIGNATURE):
                    raise bad_request("region png is not a PNG file", param, "invalid_mask")
                open_image(raw, param, limits)  # header size check before decoding (bombs)
                mask = mask_codecs.decode_png(raw)
    except mask_codecs.MaskError as exc:
        raise bad_request(str(exc), param, "invalid_mask") from None
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. numbers too large for pycocotools
        raise bad_request(f"undecodable region: {exc}", param, "invalid_mask") from None
    return fit_mask(mask, height, width, resize=resize, param=param)


def _check_rle_size(rle: Any, height: int, width: int, limits: Limits, resize: bool, param: str) -> None:
    """Refuse a wrong or huge RLE size before decoding allocates it."""
    if not isinstance(rle, Mapping) or not isinstance(rle.get("size"), (list, tuple)) or len(rle["size"]) != 2:
        return  # decode_rle names the problem
    h, w = rle["size"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)):
        return
    if (h, w) != (height, width):
        if not resize:
            raise _size_mismatch(param, (h, w), (height, width))
        if h * w > limits.max_image_pixels:
            raise bad_request(f"mask size {w}x{h} is larger than the pixel limit", param, "image_too_large")


def fit_mask(mask: np.ndarray, height: int, width: int, *, resize: bool, param: str) -> np.ndarray:
    """Check a mask against the image size; resize nearest only when the client opted in."""
    if mask.shape == (height, width):
        return mask
    if not resize:
        raise _size_mismatch(param, mask.shape, (height, width))
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST), dtype=bool)


def _size_mismatch(param: str, got: Sequence[int], want: Sequence[int]) -> APIError:
    return bad_request(
        f"mask size {got[1]}x{got[0]} (WxH) differs from the image {want[1]}x{want[0]}; send masks at the "
        "image size or set \"resize_masks\": true", param, "mask_size_mismatch")
