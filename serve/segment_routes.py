"""HTTP for SAM: `GET /v1/segment` (what is enabled), `POST /v1/segment` (points, boxes or a text concept ->
masks), `POST /v1/segment/everything` (automatic mask generation).

The segmenters (osprey.segment) are loaded by `osprey serve --sam/--sam3` and live on `app.state.segmenters`.
A server without one answers 404 `segmentation_not_enabled` naming the flag to pass: the route is there, the
model is not, and no retry will change that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from osprey import masks as mask_codecs
from osprey.segment import ConceptSegmenter, Prompt, PromptError, PromptSegmenter, Segment, Segmenters

from . import inputs
from .errors import APIError, bad_request
from .schemas import ErrorResponse
from .segment_schemas import (
    EverythingRequest,
    SegmentCapabilities,
    SegmentOut,
    SegmentRequest,
    SegmentResponse,
)

router = APIRouter()
_ERRORS = {400: {"model": ErrorResponse, "description": "invalid request; error.param names the field"},
           404: {"model": ErrorResponse, "description": "no SAM model on this server (error.message says the flag)"},
           413: {"model": ErrorResponse, "description": "body or image too large"}}
SAM_HINT = "start the server with --sam PATH (a local transformers SAM folder) for clicks, boxes and segment everything"
SAM3_HINT = "start the server with --sam3 PATH (a local transformers SAM 3 folder) for text concepts"


def _segmenters(request: Request) -> Segmenters:
    return request.app.state.segmenters


@router.get("/v1/segment")
async def capabilities(request: Request) -> SegmentCapabilities:
    """What `/v1/segment` can do here (the playground reads this to enable clicks)."""
    seg = _segmenters(request)
    hints = [h for h, off in ((SAM_HINT, seg.prompt is None), (SAM3_HINT, seg.concept is None)) if off]
    return SegmentCapabilities(points=seg.prompt is not None, everything=seg.prompt is not None,
                               text=seg.concept is not None, sam=seg.prompt.name if seg.prompt else None,
                               sam3=seg.concept.name if seg.concept else None, hint="; ".join(hints) or None)


@router.post("/v1/segment", response_model=SegmentResponse, responses=_ERRORS)
async def segment(body: SegmentRequest, request: Request) -> SegmentResponse:
    """Points (1 inside / 0 outside) and boxes -> one mask per object (SAM); or `text` -> every instance (SAM 3)."""
    if body.text is not None:
        if body.points or body.boxes:
            raise bad_request("give either text or points/boxes, not both", "text")
        segmenter = _concept(request)
        image = await _image(body.image, request)
        found = await asyncio.to_thread(_run, segmenter.segment_text, image.rgb(), body.text,
                                        threshold=body.threshold)
        return _response(segmenter.name, found)
    segmenter = _prompt(request)
    image = await _image(body.image, request)
    prompt = Prompt(points=tuple(body.points), labels=tuple(body.labels), boxes=tuple(body.boxes))
    found = await asyncio.to_thread(_run, segmenter.segment, image.rgb(), prompt, image.key, body.multimask)
    return _response(segmenter.name, found)


@router.post("/v1/segment/everything", response_model=SegmentResponse, responses=_ERRORS)
async def everything(body: EverythingRequest, request: Request) -> SegmentResponse:
    """SAM's automatic mask generator: the image's masks, best first."""
    segmenter = _prompt(request)
    image = await _image(body.image, request)
    found = await asyncio.to_thread(_run, segmenter.everything, image.rgb(), points_per_side=body.points_per_side,
                                    min_score=body.min_score, min_stability=body.min_stability,
                                    max_masks=body.max_masks)
    return _response(segmenter.name, found)


async def _image(source: str, request: Request) -> inputs.DecodedImage:
    server = request.app.state.server
    return await inputs.load_image(source, "image", server.config, server.limits)


def _prompt(request: Request) -> PromptSegmenter:
    segmenter = _segmenters(request).prompt
    if segmenter is None:
        raise APIError(404, f"this server has no SAM model: {SAM_HINT}", param=None, code="segmentation_not_enabled")
    return segmenter


def _concept(request: Request) -> ConceptSegmenter:
    segmenter = _segmenters(request).concept
    if segmenter is None:
        raise APIError(404, f"this server has no SAM 3 model: {SAM3_HINT}", param="text",
                       code="segmentation_not_enabled")
    return segmenter


def _run(method: Callable[..., list[Segment]], *args: Any, **kwargs: Any) -> list[Segment]:
    """Call a segmenter, turning its prompt errors into 400s naming the field."""
    try:
        return method(*args, **kwargs)
    except PromptError as exc:
        raise bad_request(exc.message, exc.field, "invalid_prompt") from None


def _response(name: str, segments: list[Segment]) -> SegmentResponse:
    return SegmentResponse(model=name, segments=[_segment_out(s.mask, s.score) for s in segments])


def _segment_out(mask: np.ndarray, score: float) -> SegmentOut:
    return SegmentOut(segmentation=mask_codecs.encode_rle(mask), area=mask_codecs.mask_area(mask),
                      bbox=mask_codecs.mask_to_bbox(mask), predicted_iou=round(score, 6))
