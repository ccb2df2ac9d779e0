"""Request payload decoding with limits: base64 / data URLs / http(s) images, PIL safety; regions by osprey.masks.

Everything here raises `APIError` (4xx) naming the request field, never anything else: the server must
answer every malformed input with a client error and keep serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from osprey import masks as mask_codecs
from osprey.preprocess import as_rgb

from .config import ServeConfig
from .errors import APIError, bad_request

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?:;[\w=.-]+)*;base64,", re.IGNORECASE)
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


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
        return as_rgb(self.image)


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


def check_model(model: str | None, config: ServeConfig) -> None:
    """A request naming another model than the served one is a 404."""
    if model and model != config.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r}",
                       param="model", code="model_not_found")


async def load_image(source: str, param: str, config: ServeConfig, limits: Limits) -> DecodedImage:
    """A request's image (base64, a data URL, or http(s) where the server allows it), validated and decoded."""
    if not isinstance(source, str) or not source.strip():
        raise bad_request("the image is empty", param, "invalid_image")
    if is_remote_url(source):
        if not config.allow_image_urls:
            raise bad_request("image URLs are disabled on this server (start it with --allow-image-urls); "
                              "send the image as a base64 data URL", param, "image_urls_disabled")
        raw = await fetch_url(source, param, max_bytes=config.max_body_bytes, timeout_s=config.url_fetch_timeout_s)
    else:
        raw = decode_base64(source, param)
    return await asyncio.to_thread(open_image, raw, param, limits)


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


def decode_regions(regions: Any, height: int, width: int, limits: Limits, *, max_regions: int,
                   resize: bool = False, param: str = "regions") -> mask_codecs.DecodedRegions:
    """A request's `regions` -> `(Q, H, W) bool` masks at the image size, by osprey.masks' region decoder."""
    try:
        return mask_codecs.decode_regions(regions, height, width, max_regions=max_regions,
                                          fit=region_fit(limits, resize), where=param)
    except mask_codecs.MaskError as exc:
        raise region_error(exc) from None


def mask_image_region(image: Image.Image, height: int, width: int, limits: Limits, *, resize: bool,
                      param: str) -> np.ndarray:
    """An extra image sent as a mask (DAM convention) -> its region, held to the same rules as `regions`."""
    try:
        return mask_codecs.fit_region(mask_codecs.image_to_mask(image), height, width,
                                      fit=region_fit(limits, resize), where=param)
    except mask_codecs.MaskError as exc:
        raise region_error(exc) from None


def region_fit(limits: Limits, resize: bool) -> mask_codecs.RegionFit:
    return mask_codecs.RegionFit(resize=resize, resize_option='set "resize_masks": true',
                                 max_pixels=limits.max_image_pixels)


def region_error(exc: mask_codecs.MaskError) -> APIError:
    """The one mapping from a region the decoder refused to the HTTP error naming it."""
    return bad_request(exc.message, exc.where, exc.code)
