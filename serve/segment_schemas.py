"""Bodies of the SAM endpoints (`/v1/segment`, `/v1/segment/everything`): prompts in, COCO-RLE segments out.

A returned segment is a SAM automatic-mask-generator entry (`segmentation`, `area`, `bbox`, `predicted_iou`), so
a client can send it back unchanged as a region to `/v1/regions/describe` or the chat's `regions`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import CocoRLE

Coordinate = Annotated[float, Field(allow_inf_nan=False)]
Extent = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Point = tuple[Coordinate, Coordinate]
Box = tuple[Coordinate, Coordinate, Extent, Extent]
Image = Annotated[str, Field(min_length=1, json_schema_extra={"format": "image-url"},
                             description="base64 image or data URL (http(s) URL if the server allows)")]


class SegmentRequest(BaseModel):
    """Points and boxes (SAM), or a text concept (SAM 3), on one image."""

    model_config = ConfigDict(extra="forbid")

    image: Image
    points: list[Point] = Field(default_factory=list, max_length=64,
                                description="clicks [x, y] in image pixels; with at most one box they make one object")
    labels: list[Literal[0, 1]] = Field(default_factory=list, max_length=64,
                                        description="one per point: 1 inside the object, 0 outside")
    boxes: list[Box] = Field(default_factory=list, max_length=64,
                             description="[x, y, w, h] in pixels; each box is one object")
    multimask: bool = Field(default=False, description="for points: SAM's three candidates, best first, not only the best")
    text: str | None = Field(default=None, min_length=1, max_length=200,
                             description="a concept (\"bottle\"): every instance, by SAM 3; not with points or boxes")
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="with text: the least instance confidence kept")


class EverythingRequest(BaseModel):
    """SAM's automatic mask generator on one image."""

    model_config = ConfigDict(extra="forbid")

    image: Image
    points_per_side: int = Field(default=16, ge=2, le=64, description="the grid of clicks: points_per_side^2")
    min_score: float = Field(default=0.8, ge=0.0, le=1.0, description="least predicted IoU kept")
    min_stability: float = Field(default=0.85, ge=0.0, le=1.0, description="least stability score kept")
    max_masks: int = Field(default=64, ge=1, le=256, description="the best this many")


class SegmentOut(BaseModel):
    segmentation: CocoRLE
    area: int
    bbox: list[float] = Field(description="COCO [x, y, w, h] of the mask's pixels")
    predicted_iou: float = Field(description="SAM's predicted IoU, or SAM 3's instance confidence")


class SegmentResponse(BaseModel):
    object: Literal["segmentation"] = "segmentation"
    model: str = Field(description="the SAM folder's name")
    segments: list[SegmentOut]


class SegmentCapabilities(BaseModel):
    """What `/v1/segment` can do on this server; `hint` says how to enable what is off."""

    points: bool = Field(description="points and boxes (and segment everything): --sam")
    everything: bool
    text: bool = Field(description="text concepts: --sam3")
    sam: str | None = None
    sam3: str | None = None
    hint: str | None = None
