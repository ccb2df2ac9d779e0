"""Where answers come from: the model in-process (`osprey.inference.OspreyPipeline`) or a running server
(`POST /v1/regions/describe` over HTTP). Both take a chunk of queries on one image and return answers in order.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from osprey.http import post_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """One question about one region (or about the whole image when `segmentation` is None).

    task: a task name of `osprey.prompts.TASK_PROMPTS` or a custom prompt naming its region `<region>`;
    for a whole-image question (`segmentation` None) it is the question text itself (official POPE:
    the user message is `<image>\\n{question}` with no region).
    segmentation: COCO polygons (list of [x1, y1, ...]) or RLE dict of an `height` x `width` image.
    """

    key: str
    image: str
    task: str
    height: int
    width: int
    segmentation: Any = None


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Answer:
    text: str  # cleaned with osprey.prompts.clean_answer
    raw_text: str
    completion_tokens: int = 0
    finish_reason: str = "stop"


class Backend(Protocol):
    name: str

    def answer(self, queries: Sequence[Query], sampling: Sampling) -> list[Answer]:
        """All queries share one image (`queries[i].image`)."""
        ...


def decode_region(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO polygon list / RLE via the project's mask codecs (`osprey.masks`)."""
    from osprey.masks import decode_mask

    return decode_mask(segmentation, height, width)


class InProcessBackend:
    """Runs `OspreyPipeline` in this process; the last image's encoding is cached (queries come per image)."""

    def __init__(self, model_dir: str, device: str = "auto", dtype: str | None = None) -> None:
        from osprey.inference import OspreyPipeline

        self.pipe = OspreyPipeline.from_pretrained(model_dir, device=device, dtype=dtype)
        self.name = Path(model_dir).name
        self._cached: tuple[str, Any] | None = None

    def _encode(self, image: str) -> Any:
        if self._cached is None or self._cached[0] != image:
            self._cached = (image, self.pipe.encode_image(image))
        return self._cached[1]

    def answer(self, queries: Sequence[Query], sampling: Sampling) -> list[Answer]:
        from osprey.inference import SamplingParams
        from osprey.prompts import IMAGE_PLACEHOLDER, task_prompt

        if not queries:
            return []
        enc = self._encode(queries[0].image)
        prepared: list[Any] = [None] * len(queries)
        by_task: dict[str, list[int]] = {}  # regions asked the same task: one extractor pass (prepare_each)
        for index, q in enumerate(queries):
            if q.image != queries[0].image:
                raise ValueError(f"one chunk must hold one image, got {queries[0].image!r} and {q.image!r}")
            if q.segmentation is None:
                no_region = np.zeros((0, enc.height, enc.width), dtype=bool)
                prepared[index] = self.pipe.prepare(enc, [("human", f"{IMAGE_PLACEHOLDER}\n{q.task}")], no_region)
            else:
                by_task.setdefault(q.task, []).append(index)
        for task, indices in by_task.items():
            masks = np.stack([decode_region(queries[i].segmentation, enc.height, enc.width) for i in indices])
            for index, prompt in zip(indices, self.pipe.prepare_each(enc, [("human", task_prompt(task))], masks)):
                prepared[index] = prompt
        params = SamplingParams(
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        gens = self.pipe.generate(prepared, [params] * len(prepared))
        return [Answer(g.text, g.raw_text, g.completion_tokens, g.finish_reason) for g in gens]


def region_payload(segmentation: Any, height: int, width: int) -> dict:
    """The server's region object for a COCO segmentation (polygons or RLE; bytes counts become str)."""
    if isinstance(segmentation, dict):
        counts = segmentation["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        return {"rle": {"size": list(segmentation.get("size", [height, width])), "counts": counts}}
    if isinstance(segmentation, list):
        return {"polygon": segmentation}
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}: use polygons or RLE")


def image_data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


class HttpBackend:
    """Talks to a running `osprey serve` through `POST {endpoint}/v1/regions/describe`.

    A whole-image question (no segmentation) is sent as a full-image box region with the custom prompt
    `<region> {question}`, since the endpoint always takes regions; in-process runs send no region at all.
    """

    def __init__(
        self, endpoint: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0
    ):
        import httpx

        self.url = endpoint.rstrip("/") + "/v1/regions/describe"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.model = model
        self.name = model or endpoint
        self._cached: tuple[str, str] | None = None

    def _image(self, path: str) -> str:
        if self._cached is None or self._cached[0] != path:
            self._cached = (path, image_data_url(path))
        return self._cached[1]

    def _post(self, body: dict) -> list[dict]:
        """One describe request (back-pressure retried): its results in region order."""
        return sorted(post_json(self.client, self.url, body)["results"], key=lambda r: r["index"])

    def answer(self, queries: Sequence[Query], sampling: Sampling) -> list[Answer]:
        if not queries:
            return []
        # one request per task (regions of one request share the prompt), answers put back in query order
        by_task: dict[tuple[str, bool], list[int]] = {}
        for i, q in enumerate(queries):
            by_task.setdefault((q.task, q.segmentation is None), []).append(i)
        answers: list[Answer | None] = [None] * len(queries)
        for (task, whole_image), idxs in by_task.items():
            regions = [
                {"box": [0, 0, queries[i].width, queries[i].height]}
                if whole_image
                else region_payload(queries[i].segmentation, queries[i].height, queries[i].width)
                for i in idxs
            ]
            body = {
                "image": self._image(queries[idxs[0]].image),
                "regions": regions,
                "task": f"<region> {task}" if whole_image else task,
                "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "seed": sampling.seed,
                "stream": False,
            }
            if self.model:
                body["model"] = self.model
            results = self._post(body)
            if len(results) != len(idxs):
                raise RuntimeError(f"{self.url} returned {len(results)} results for {len(idxs)} regions")
            for i, r in zip(idxs, results):
                answers[i] = Answer(
                    r["text"],
                    r.get("raw_text", r["text"]),
                    r.get("completion_tokens", 0),
                    r.get("finish_reason", "stop"),
                )
        return [a for a in answers if a is not None]


def make_backend(args: Any) -> Backend:
    """From the shared CLI options: `--endpoint URL` (HTTP) or `--model DIR` (in-process)."""
    if getattr(args, "endpoint", None):
        return HttpBackend(args.endpoint, api_key=args.api_key, model=getattr(args, "served_model", None))
    if not getattr(args, "model", None):
        raise ValueError("give --model DIR (in-process) or --endpoint URL (a running `osprey serve`)")
    return InProcessBackend(args.model, device=args.device, dtype=args.dtype)
