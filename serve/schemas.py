"""Request and response bodies (pydantic v2): OpenAI chat completions, and the native describe endpoint.

OpenAI requests ignore unknown fields (clients send many we do not use); our own request forbids them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from osprey.prompts import CUSTOM_REGION_TAG, TASK_PROMPTS, task_prompt

# ---------------------------------------------------------------------------------------------- regions
# What each form means, and the checks no schema can say (polygon area, RLE counts summing to the size, a
# PNG's pixels), are osprey.masks.decode_region's; these models tell a client (and a fuzzer) which shapes exist.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Side = Annotated[int, Field(ge=1, le=1 << 20)]
Count = Annotated[int, Field(ge=0)]
Coordinate = Annotated[float, Field(allow_inf_nan=False)]
Extent = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Bit = Annotated[int, Field(ge=0, le=1)]


class CocoRLE(_Strict):
    """COCO run-length encoding, as pycocotools writes it: `counts` compressed (text) or a list of runs."""

    size: tuple[Side, Side] = Field(description="[height, width] of the mask")
    counts: Annotated[str, Field(json_schema_extra={"format": "coco-rle-counts"})] | list[Count] = Field(
        description="column-major runs starting with the zeros, summing to height x width: as a list, or "
                    "compressed as pycocotools writes them")


class RLERegion(_Strict):
    rle: CocoRLE


Polygon = Annotated[list[Coordinate], Field(min_length=6)]  # x1, y1, x2, y2, x3, y3, ...


class PolygonRegion(_Strict):
    polygon: Annotated[list[Polygon], Field(min_length=1)] | Polygon = Field(
        description="COCO polygons: flat [x1, y1, x2, y2, ...] lists (merged into one region), or one such list")


class BoxRegion(_Strict):
    box: tuple[Coordinate, Coordinate, Extent, Extent] = Field(
        description="[x, y, w, h] in pixels; a box reaching outside the image is clipped (a note says so)")


class PNGRegion(_Strict):
    png: str = Field(min_length=1, json_schema_extra={"format": "mask-png", "contentEncoding": "base64"},
                     description="base64 PNG (or a data URL) at the image size: nonzero or alpha > 0 is inside")


class BitmapRegion(_Strict):
    bitmap: list[Annotated[list[Bit], Field(min_length=1)]] = Field(min_length=1, description="rows of 0/1")


class SAMRegion(BaseModel):
    """A SAM automatic-mask-generator entry as it is; fields other than these are ignored."""

    model_config = ConfigDict(extra="ignore")

    segmentation: CocoRLE | list[Annotated[list[Bit], Field(min_length=1)]]
    area: Count | None = None
    bbox: list[float] | None = None
    predicted_iou: float | None = None
    stability_score: float | None = None


def _region_tag(value: Any) -> str | None:
    """Which region model a request value is, by its keys (the forms share no `type` field). The tags hold
    brackets so that serve.guard drops them from error locations, like pydantic's union branch names."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if not isinstance(value, dict):
        return None
    if "segmentation" in value:
        return "region[sam]"
    if "counts" in value or "size" in value:
        return "region[coco_rle]"
    keys = [k for k in ("rle", "polygon", "box", "png", "bitmap") if k in value]
    return f"region[{keys[0]}]" if len(keys) == 1 else None


Region = Annotated[
    Annotated[RLERegion, Tag("region[rle]")] | Annotated[PolygonRegion, Tag("region[polygon]")] | Annotated[BoxRegion, Tag("region[box]")]
    | Annotated[PNGRegion, Tag("region[png]")] | Annotated[BitmapRegion, Tag("region[bitmap]")]
    | Annotated[CocoRLE, Tag("region[coco_rle]")] | Annotated[SAMRegion, Tag("region[sam]")],
    Discriminator(_region_tag, custom_error_type="invalid_region",
                  custom_error_message="a region needs exactly one of rle, polygon, box, png, bitmap, or is a COCO "
                                       "RLE {size, counts} or a SAM entry with segmentation"),
]


def regions_payload(regions: list[Region]) -> list[dict[str, Any]]:
    """The validated regions as the plain objects osprey.masks decodes (None fields left out)."""
    return [r.model_dump(exclude_none=True) for r in regions]


# ---------------------------------------------------------------------------------------------- chat requests


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str = Field(json_schema_extra={"format": "image-url"},
                     description="a data URL (data:image/png;base64,...), or http(s) if the server allows it")
    detail: str | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # int64, as OpenAI documents (and torch accepts)
StopText = Annotated[str, Field(min_length=1)]  # an empty stop string would end every answer at once
# A task: an official prompt's name, or a custom prompt with `<region>` where the region goes.
Task = Literal[tuple(sorted(TASK_PROMPTS))] | Annotated[str, Field(pattern=CUSTOM_REGION_TAG, max_length=16_000)]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]  # no tools: this model does not call them
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions (the `openai` client sends these through extra_body)
    regions: list[Region] | None = Field(default=None, min_length=1)
    resize_masks: bool = False


# ---------------------------------------------------------------------------------------------- chat responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------- native describe


class DescribeRequest(BaseModel):
    """`POST /v1/regions/describe` (docs/serve.md). Regions are decoded by osprey.masks (param-named errors)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    image: str = Field(min_length=1, json_schema_extra={"format": "image-url"},
                       description="base64 image or data URL (http(s) URL if the server allows)")
    regions: list[Region] = Field(min_length=1)
    task: Task = "short"
    max_tokens: int | None = Field(default=None, ge=1, description="new tokens per region (default: 64, or the "
                                   "server's limit if lower)")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stream: bool = False
    resize_masks: bool = False

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        task_prompt(task)  # raises ValueError naming the known tasks
        return task


class RegionResult(BaseModel):
    index: int
    text: str
    raw_text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class DescribeResponse(BaseModel):
    id: str
    object: Literal["region.description"] = "region.description"
    created: int
    model: str
    results: list[RegionResult]
    usage: Usage
    notes: list[str] = Field(default_factory=list, description="what was changed in the regions, e.g. a clipped box")


# ---------------------------------------------------------------------------------------------- classify / query
MAX_LABELS = 10_000  # labels per classify request: 16 regions x 10,000 labels is 160,000 scored rows
MAX_LABEL_CHARS = 200
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS, pattern=r"\S")]


class ClassifyRequest(BaseModel):
    """`POST /v1/regions/classify` (docs/classify.md): each region's probability over `labels`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    image: str = Field(min_length=1, json_schema_extra={"format": "image-url"},
                       description="base64 image or data URL (http(s) URL if the server allows)")
    regions: list[Region] = Field(min_length=1)
    labels: list[Label] = Field(min_length=1, max_length=MAX_LABELS,
                                description=f"candidate labels, distinct, at most {MAX_LABELS}")
    top_k: int | None = Field(default=None, ge=1, le=MAX_LABELS,
                              description="labels returned per region, most probable first (default: all)")
    prompt: Task = Field(default="category", description="the single-region prompt the labels answer (default: "
                                                         "Osprey's category prompt)")
    resize_masks: bool = False

    @field_validator("prompt")
    @classmethod
    def _known_prompt(cls, prompt: str) -> str:
        task_prompt(prompt)  # raises ValueError naming the known tasks
        return prompt

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        for index, label in enumerate(labels):
            first = seen.setdefault(label.strip(), index)
            if first != index:
                raise ValueError(f"labels {first} and {index} are both {label.strip()!r}; give each label once")
        return labels

    @model_validator(mode="after")
    def _top_k_within_labels(self) -> ClassifyRequest:
        if self.top_k is not None and self.top_k > len(self.labels):
            raise ValueError(f"top_k = {self.top_k} is more than the {len(self.labels)} labels given")
        return self


class LabelProbability(BaseModel):
    label: str
    probability: float = Field(description="softmax over the request's labels of `score`")
    score: float = Field(description="mean log-probability per token of the label and its </s>")


class RegionLabels(BaseModel):
    index: int
    labels: list[LabelProbability]


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["region.classification"] = "region.classification"
    created: int
    model: str
    results: list[RegionLabels]
    notes: list[str] = Field(default_factory=list, description="what was changed in the regions, e.g. a clipped box")


class QueryRequest(BaseModel):
    """`POST /v1/regions/query` (docs/classify.md): which regions are `text`, and how many."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    image: str = Field(min_length=1, json_schema_extra={"format": "image-url"},
                       description="base64 image or data URL (http(s) URL if the server allows)")
    regions: list[Region] | None = Field(
        default=None, min_length=1,
        description="the regions to check; omitted: the server's SAM 3 (--sam3) finds the text's instances first")
    text: Label = Field(description="what to look for, e.g. 'circle' or 'red mug'")
    vocabulary: list[Label] | None = Field(
        default=None, min_length=1, max_length=MAX_LABELS - 1,
        description="the background: what else a region may be (default: the model folder's vocabulary.txt)")
    threshold: float | None = Field(default=None, ge=0.0, le=1.0,
                                    description="a region matches when its score is at least this (default: the "
                                                "threshold chosen on validation data, docs/classify.md)")
    segment_threshold: float = Field(default=0.5, ge=0.0, le=1.0,
                                     description="without regions: SAM 3's confidence an instance needs")
    resize_masks: bool = False


class RegionMatch(BaseModel):
    index: int
    match: bool
    segmentation: CocoRLE | None = Field(default=None, description="the region's mask (COCO RLE) when SAM 3 found it")
    segment_score: float | None = Field(default=None, description="SAM 3's instance confidence, when it found it")
    score: float = Field(description="the probability that the region is `text` rather than a label of the "
                                     "vocabulary (docs/classify.md)")


class QueryResponse(BaseModel):
    id: str
    object: Literal["region.query"] = "region.query"
    created: int
    model: str
    text: str
    threshold: float
    vocabulary: int = Field(description="background labels the text was scored against")
    count: int = Field(description="regions that match")
    results: list[RegionMatch]
    notes: list[str] = Field(default_factory=list, description="what was changed in the regions, e.g. a clipped box")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, OpenAI's shape; `param` names the offending field (`regions[2].box`)."""

    error: ErrorDetail


# Every request error is a 400 in OpenAI's shape (serve.guard turns FastAPI's 422 into it), so the routes list
# these instead of FastAPI's default 422.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request; error.param names the field"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    413: {"model": ErrorResponse, "description": "body or image too large"},
    429: {"model": ErrorResponse, "description": "queue full; retry after Retry-After seconds"},
    504: {"model": ErrorResponse, "description": "request timed out"},
}


# ---------------------------------------------------------------------------------------------- models


class ReplicaHealth(BaseModel):
    """One engine replica (serve.replicas): its index and device in --devices, state and open rows."""

    replica: int
    device: str
    status: Literal["ok", "loading", "error"]
    open_rows: int  # region rows queued or decoding (a scoring request counts one): what dispatch balances


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]  # ok once every replica is loaded; error when one failed
    error: str | None = None
    replicas: list[ReplicaHealth] = []


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "osprey"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
