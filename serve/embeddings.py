"""`POST /v1/embeddings` (OpenAI's shape) and `POST /v1/regions/search`: texts and regions in the model's CLIP space.

`input` holds texts (a string or a list of them), or `{image, region}` items (the image as base64 / a data URL,
the region in any form osprey.masks decodes); the vectors are L2-normalised and the response names the model and
the space (osprey.embedding). The embedder (the vision tower and the text tower, not the LLM) loads on the first
request and runs in a worker thread, one request at a time. Search embeds the query text and asks the region
index the server was started with (`--index`, osprey.region_index).
"""

from __future__ import annotations

import asyncio
import base64
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from osprey.embedding import NoTextTower, RegionTextEmbedder

from . import inputs
from .errors import APIError, bad_request
from .schemas import ErrorResponse

MAX_INPUTS = 256  # items per embeddings request
MAX_TEXT_CHARS = 2000


class RegionItem(BaseModel):
    """One region of one image: `image` base64 or a data URL (or http(s) where the server allows it); `region`
    any form of osprey.masks (`{"rle"}`, `{"polygon"}`, `{"box"}`, `{"png"}`, a SAM entry, bare COCO RLE)."""

    model_config = ConfigDict(extra="forbid")
    image: str
    region: Any


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str] | list[RegionItem] = Field(
        description="a text, a list of texts, or a list of {image, region} items (not token ids)")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, description="must equal the space's width when given")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    space: str  # vectors compare only within one space (osprey.embedding.RegionTextEmbedder.space)
    dimensions: int
    usage: EmbeddingUsage


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(description="the text to find regions for")
    k: int = Field(default=10, ge=1, le=1000)
    index: str = Field(default="regions", description="the index's name in the server's database")
    model: str | None = None


class SearchHitOut(BaseModel):
    image: str
    region: int
    rle: dict[str, Any]
    box: list[float]
    label: str | None
    caption: str | None
    score: float


class SearchResponse(BaseModel):
    object: Literal["region_search"] = "region_search"
    model: str
    space: str
    index: str
    results: list[SearchHitOut]


@dataclass
class EmbeddingService:
    """The embedder of the served model, loaded once on first use; calls run one at a time in a worker thread."""

    model_dir: str
    model_name: str
    device: str
    clip_weights: str | None = None
    index_db: str | None = None
    _embedder: RegionTextEmbedder | None = None
    _error: APIError | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _index_conn: Any = None

    def embedder(self) -> RegionTextEmbedder:
        """Load on first use; a model without a text tower answers every request with the same 400."""
        with self._lock:
            if self._embedder is None and self._error is None:
                try:
                    self._embedder = RegionTextEmbedder.from_pretrained(self.model_dir, self.clip_weights,
                                                                        self.device, self.model_name)
                except NoTextTower as exc:
                    self._error = bad_request(f"the model {self.model_name!r} has no text tower, so it has no "
                                              f"embedding space: {exc}", "model", "no_text_tower")
            if self._error is not None:
                raise self._error
            return self._embedder

    def run(self, fn, *args):
        with self._lock:
            return fn(*args)

    def search(self, name: str, vector: np.ndarray, k: int, space: str):
        from osprey import region_index

        with self._lock:
            if self._index_conn is None:
                self._index_conn = region_index.connect(self.index_db)
            try:
                index = region_index.RegionIndex.open(self._index_conn, name)
                index.check_vectors(len(vector), space)
                return index.search(vector, k)
            except region_index.UnknownIndex as exc:
                raise APIError(404, str(exc), param="index", code=exc.code) from None
            except region_index.IndexRequestError as exc:
                raise bad_request(str(exc), "index", exc.code) from None


def _service(request: Request) -> EmbeddingService:
    return request.app.state.embeddings


Service = Annotated[EmbeddingService, Depends(_service)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request, or a model without a text tower"},
    404: {"model": ErrorResponse, "description": "unknown model or index"},
    413: {"model": ErrorResponse, "description": "body or image too large"},
}
router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request, service: Service) -> EmbeddingResponse:
    """Texts or regions -> L2-normalised vectors in the served model's region-text space (OpenAI's shape)."""
    _check_model(body.model, service)
    items = [body.input] if isinstance(body.input, str) else list(body.input)
    if not items:
        raise bad_request("input is empty: give a text, a list of texts or a list of {image, region} items", "input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"input holds {len(items)} items; at most {MAX_INPUTS}", "input", "too_many_inputs")
    embedder = await asyncio.to_thread(service.embedder)
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise bad_request(f"dimensions = {body.dimensions}, but the space {embedder.space!r} has {embedder.dim}",
                          "dimensions", "invalid_dimensions")
    if isinstance(items[0], str):
        for i, text in enumerate(items):
            if not text.strip() or len(text) > MAX_TEXT_CHARS:
                raise bad_request(f"input[{i}] must be a non-empty text of at most {MAX_TEXT_CHARS} characters",
                                  f"input[{i}]")
        vectors = await asyncio.to_thread(service.run, embedder.embed_texts, items)
        tokens = sum(int((ids != embedder.text.config.pad_id).sum()) for ids in embedder.text.tokenize(items))
    else:
        vectors = await _region_vectors(items, embedder, request, service)
        tokens = 0
    data = [Embedding(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingResponse(data=data, model=service.model_name, space=embedder.space, dimensions=embedder.dim,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


async def _region_vectors(items: list[RegionItem], embedder: RegionTextEmbedder, request: Request,
                          service: EmbeddingService) -> np.ndarray:
    """Each item's image decoded and checked (serve.inputs), its region by osprey.masks; one tower pass per image."""

    server = request.app.state.server
    vectors = []
    for i, item in enumerate(items):
        image = await inputs.load_image(item.image, f"input[{i}].image", server.config, server.limits)
        h, w = image.size_hw
        region = await asyncio.to_thread(inputs.decode_regions, [item.region], h, w, server.limits,
                                         max_regions=1, param=f"input[{i}].region")
        vectors.append(await asyncio.to_thread(service.run, embedder.embed_regions, image.rgb(), region.masks))
    return np.concatenate(vectors)


@router.post("/v1/regions/search", response_model=SearchResponse, responses=_ERRORS)
async def search(body: SearchRequest, service: Service) -> SearchResponse:
    """The k regions of the index nearest to the query text (cosine), best first."""
    _check_model(body.model, service)
    if service.index_db is None:
        raise APIError(404, "this server has no region index: start it with --index URL|DIR", param="index",
                       code="no_index")
    if not body.query.strip() or len(body.query) > MAX_TEXT_CHARS:
        raise bad_request(f"query must be a non-empty text of at most {MAX_TEXT_CHARS} characters", "query",
                          "invalid_query")
    embedder = await asyncio.to_thread(service.embedder)
    vector = (await asyncio.to_thread(service.run, embedder.embed_texts, [body.query]))[0]
    hits = await asyncio.to_thread(service.search, body.index, vector, body.k, embedder.space)
    return SearchResponse(model=service.model_name, space=embedder.space, index=body.index,
                          results=[SearchHitOut(**hit.__dict__) for hit in hits])


def _check_model(model: str | None, service: EmbeddingService) -> None:
    if model and model != service.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {service.model_name!r}",
                       param="model", code="model_not_found")


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """OpenAI's encodings: a list of floats, or base64 of the little-endian float32 bytes (the openai client's
    default request)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
