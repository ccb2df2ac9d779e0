"""Regions against words by likelihood: `POST /v1/regions/classify` (probabilities over a label list) and
`POST /v1/regions/query` (which regions are a text, and how many), both scored by osprey.scoring on the engine's
worker thread (docs/classify.md).

The routes read the server's state from `app.state.server` (serve.app.ServerState); the query takes its masks
from `regions` today, and is written so that masks found another way (a text-prompted segmenter) go through the
same scoring (`work` reads only `regions.masks`): without `regions`, the server's SAM 3 (`--sam3`) proposes the
text's instances and the model verifies and counts them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Request

from osprey.inference import EncodedImage
from osprey.masks import DecodedRegions
from osprey.masks.codecs import encode_rle
from osprey.scoring import (
    DEFAULT_QUERY_THRESHOLD,
    VOCABULARY_FILE,
    LabelScores,
    QueryScores,
    default_vocabulary,
)
from osprey.segment import Segment

from . import inputs
from .engine import Backend
from .errors import bad_request
from .schemas import (
    ERROR_RESPONSES,
    ClassifyRequest,
    ClassifyResponse,
    LabelProbability,
    QueryRequest,
    QueryResponse,
    Region,
    RegionLabels,
    RegionMatch,
    regions_payload,
)

if TYPE_CHECKING:
    from .app import ServerState

router = APIRouter()


@router.post("/v1/regions/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """Each region's probability over `labels` (summing to 1), by the model's likelihood of each label as the
    answer to `prompt`; the `top_k` most probable per region, in order."""
    server: ServerState = request.app.state.server
    inputs.check_model(body.model, server.config)
    image = await inputs.load_image(body.image, "image", server.config, server.limits)
    regions = await _decode_regions(body.regions, body.resize_masks, image, server)
    labels = [label.strip() for label in body.labels]

    def work(backend: Backend, encoded: EncodedImage) -> LabelScores:
        return backend.scorer().classify(encoded, regions.masks, labels, body.prompt)

    scores = await server.engine.run(image.image, image.key, work, server.config.request_timeout_s)
    top_k = body.top_k or len(labels)
    results = [RegionLabels(index=q, labels=[
        LabelProbability(label=labels[i], probability=float(scores.probabilities[q, i]),
                         score=float(scores.mean_logprob[q, i]))
        for i in np.argsort(-scores.probabilities[q], kind="stable")[:top_k]]) for q in range(len(regions.masks))]
    return ClassifyResponse(id=f"cls-{uuid.uuid4().hex}", created=int(time.time()), model=server.config.model_name,
                            results=results, notes=regions.notes)


@router.post("/v1/regions/query", response_model=QueryResponse, responses=ERROR_RESPONSES)
async def query(body: QueryRequest, request: Request) -> QueryResponse:
    """Which regions are `text`: a calibrated score per region (the probability of `text` in a label list with the
    background `vocabulary`), a match where it reaches `threshold`, and the count of matches."""
    server: ServerState = request.app.state.server
    inputs.check_model(body.model, server.config)
    image = await inputs.load_image(body.image, "image", server.config, server.limits)
    regions = None if body.regions is None else await _decode_regions(body.regions, body.resize_masks, image, server)
    text = " ".join(body.text.split())
    vocabulary = _vocabulary(body.vocabulary, text, server)
    segments: list[Segment] = []
    if regions is None:  # "count the bottles" from the image alone: SAM 3 proposes, the model verifies
        segments = await _segment_text(request, image, text, body.segment_threshold)
        regions = DecodedRegions(np.stack([s.mask for s in segments]) if segments else
                                 np.zeros((0, image.image.height, image.image.width), bool))

    def work(backend: Backend, encoded: EncodedImage) -> QueryScores:
        return backend.scorer().query(encoded, regions.masks, text, vocabulary)

    threshold = DEFAULT_QUERY_THRESHOLD if body.threshold is None else body.threshold
    if not len(regions.masks):  # SAM 3 found no instance: nothing to verify
        return QueryResponse(id=f"qry-{uuid.uuid4().hex}", created=int(time.time()), model=server.config.model_name,
                             text=text, threshold=threshold, vocabulary=len(vocabulary), count=0, results=[],
                             notes=[f"SAM 3 found no instance of {text!r}"])
    scores = await server.engine.run(image.image, image.key, work, server.config.request_timeout_s)
    matches = scores.matches(threshold)
    found = {q: {"segmentation": encode_rle(s.mask), "segment_score": round(s.score, 6)} for q, s in enumerate(segments)}
    results = [RegionMatch(index=q, match=bool(matches[q]), score=float(scores.scores[q]), **found.get(q, {}))
               for q in range(len(matches))]
    return QueryResponse(
        id=f"qry-{uuid.uuid4().hex}", created=int(time.time()), model=server.config.model_name, text=text,
        threshold=threshold, vocabulary=len(vocabulary), count=int(matches.sum()), notes=regions.notes,
        results=results)


async def _segment_text(request: Request, image: inputs.DecodedImage, text: str, threshold: float) -> list[Segment]:
    """The text's instances by the server's SAM 3; without one, the request must give regions."""
    concept = request.app.state.segmenters.concept
    if concept is None:
        raise bad_request("give 'regions' (this server has no SAM 3 to find the text's instances: start it with "
                          "--sam3 PATH)", "regions", "regions_required")
    return await asyncio.to_thread(concept.segment_text, image.image, text, threshold=threshold)


def _vocabulary(given: list[str] | None, text: str, server: ServerState) -> list[str]:
    """The request's background labels, else the model folder's; without `text` itself."""
    vocabulary = given if given is not None else default_vocabulary(server.config.model)
    if vocabulary is None:
        raise bad_request(f"this model has no default vocabulary ({VOCABULARY_FILE} in its folder): give "
                          "'vocabulary', the labels a region may be besides the text", "vocabulary",
                          "vocabulary_required")
    background = list(dict.fromkeys(v.strip() for v in vocabulary if v.strip() != text))
    if not background:
        raise bad_request("the vocabulary holds only the text itself: give other labels a region may be",
                          "vocabulary")
    return background


async def _decode_regions(regions: list[Region], resize: bool, image: inputs.DecodedImage,
                          server: ServerState) -> DecodedRegions:
    h, w = image.size_hw
    return await asyncio.to_thread(inputs.decode_regions, regions_payload(regions), h, w, server.limits,
                                   max_regions=server.config.max_regions, resize=resize)
