"""Where `osprey annotate` gets its answers: the pipeline in this process, running servers over HTTP, or a Ray pool.

Every backend maps image items to `ImageResult`s (records and per-region failures) and yields them as images
finish, so the runner can append each image's lines as one batch. Masks are decoded by `osprey.masks` in
`decode_item`, the one place all backends share, so the same region gives the same pixels everywhere.
"""

from __future__ import annotations

import base64
import collections
import io
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from osprey import masks as mask_codecs
from osprey.http import post_json
from osprey.inference import EncodedImage, OspreyPipeline, SamplingParams, StreamEvent
from osprey.prompts import clean_answer, task_prompt

from .annotate_io import Failure, ImageItem, ImageResult, RegionItem, RegionRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotateSettings:
    task: str  # a task name or a custom prompt with <region>
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy, so every backend gives the same answers
    seed: int | None = None


@dataclass
class DecodedRegion:
    item: RegionItem
    mask: np.ndarray  # (H, W) bool
    rle: dict
    box: list[float]
    area: int


@dataclass
class DecodedImage:
    image: Image.Image | None  # None when the image could not be read (then every region is a failure)
    regions: list[DecodedRegion]
    failures: list[Failure]


def decode_item(item: ImageItem) -> DecodedImage:
    """Read the image and decode every region; a bad image or mask becomes a failure with its reason."""
    try:
        with Image.open(item.path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as exc:
        reason = f"cannot read image {item.path}: {exc}"
        return DecodedImage(None, [], [Failure(item.image, region.id, reason) for region in item.regions])
    regions, failures = [], []
    panoptic: dict[str, np.ndarray] = {}  # a panoptic PNG holds all regions of its image: decoded once
    for region in item.regions:
        try:
            mask = _decode_region(region, image.height, image.width, panoptic)
        except (mask_codecs.MaskError, OSError, TypeError, ValueError) as exc:
            failures.append(Failure(item.image, region.id, f"undecodable mask: {exc}"))
            continue
        if not mask.any():  # the extractor pools over mask pixels: an empty mask has no features
            failures.append(Failure(item.image, region.id, "empty mask"))
            continue
        regions.append(DecodedRegion(region, mask, mask_codecs.encode_rle(mask),
                                     mask_codecs.mask_to_bbox(mask), mask_codecs.mask_area(mask)))
    return DecodedImage(image, regions, failures)


def _decode_region(region: RegionItem, height: int, width: int, panoptic: dict[str, np.ndarray]) -> np.ndarray:
    if region.segment_id is not None:
        if region.mask_file not in panoptic:
            panoptic[region.mask_file] = mask_codecs.panoptic_segment_ids(region.mask_file)
        ids = panoptic[region.mask_file]
        if ids.shape != (height, width):
            raise mask_codecs.MaskError(f"panoptic PNG {region.mask_file} is {ids.shape[1]}x{ids.shape[0]}, "
                                        f"the image {width}x{height}")
        return ids == region.segment_id
    if region.mask_file is not None:
        return mask_codecs.decode_png(Path(region.mask_file).read_bytes(), height, width)
    return mask_codecs.decode_mask(region.segmentation, height, width)


def _record(item: ImageItem, region: DecodedRegion, text: str, raw: str, reason: str, model: str,
            prompt: str) -> RegionRecord:
    return RegionRecord(item.image, item.image_id, region.item.id, region.rle, region.box, region.area, text, raw,
                        reason, model, prompt)


# ---------------------------------------------------------------------------------------------- in-process


@dataclass
class _OpenImage:
    """An image whose regions are rows in the engine: answers gather per region index until no row is open."""

    item: ImageItem
    regions: list[DecodedRegion]  # the regions given to the engine (none when they could not be added)
    failures: list[Failure]
    texts: list[str] = field(init=False)  # per region, the text streamed so far
    reasons: list[str | None] = field(init=False)  # per region, its finish reason; None while its row decodes

    def __post_init__(self) -> None:
        self.texts = [""] * len(self.regions)
        self.reasons = [None] * len(self.regions)

    @property
    def open_rows(self) -> int:
        return self.reasons.count(None)

    def result(self, model: str, prompt: str) -> ImageResult:
        records = [_record(self.item, region, clean_answer(text), text, reason, model, prompt)
                   for region, text, reason in zip(self.regions, self.texts, self.reasons, strict=True)]
        return ImageResult(records, self.failures)


class PipelineAnnotator:
    """`OspreyPipeline` in this process on one long-lived continuous-batching session (the engine `osprey serve`
    drives): each image is read and its masks decoded a few images ahead in a thread, encoded once, all its regions
    prepared in one extractor pass, and its rows added while earlier images' rows decode, up to `max_rows` rows
    open; results come out in input order as soon as an image and every image before it are answered."""

    def __init__(self, pipe: OspreyPipeline, settings: AnnotateSettings, model: str, max_rows: int | None = None,
                 fast_kernels: bool = True, kv_cache_gb: float | None = None) -> None:
        self.pipe, self.model = pipe, model
        self.prompt = task_prompt(settings.task)
        self.params = SamplingParams(max_new_tokens=settings.max_tokens, temperature=settings.temperature,
                                     seed=settings.seed)
        pool = pipe.engine_pool(max_rows or pipe.max_batch_size, settings.max_tokens + 256, kv_cache_gb)
        self.session = pipe.session(pool, fast_kernels=fast_kernels)
        self.max_rows = pool.row_slots  # the KV memory may hold fewer rows than asked for
        self._image_seq = itertools.count()  # row ids (image seq, region index) stay unique across calls

    @classmethod
    def from_model_dir(cls, model_dir: str, settings: AnnotateSettings, device: str = "cpu", dtype: str | None = None,
                       max_batch_size: int = 32, fast_kernels: bool = True,
                       gpu_share: float = 1.0) -> PipelineAnnotator:
        """`max_batch_size`: region rows in flight (256 on a GPU). `gpu_share`: the part of the GPU this replica
        may fill when others share it (Ray's --actors-per-gpu): its KV memory is sized to that share, not to what
        the GPU has free when it happens to start."""
        pipe = OspreyPipeline.from_pretrained(model_dir, device=device, dtype=dtype, max_batch_size=max_batch_size)
        return cls(pipe, settings, Path(model_dir).name, fast_kernels=fast_kernels,
                   kv_cache_gb=_shared_kv_gb(pipe.device, gpu_share))

    def annotate(self, item: ImageItem) -> ImageResult:
        """One image through `map` (the Ray actors' call): the same session, the same path."""
        [result] = self.map([item])
        return result

    def map(self, items: Iterable[ImageItem]) -> Iterator[ImageResult]:
        """Admit images while fewer than `max_rows` rows are open, step the engine, and yield each image's result
        in input order once it and all earlier images are complete (the runner appends image by image, so a
        resumed run gives the file of an uninterrupted one)."""
        opened: dict[int, _OpenImage] = {}  # by image seq, in input order
        with ThreadPoolExecutor(1, thread_name_prefix="annotate-read") as reader:
            decoded = _decoded_ahead(reader, items, lookahead=4)
            more = True
            try:
                while more or opened:
                    if more:
                        more = self._admit(decoded, opened)
                    while opened and not opened[first := next(iter(opened))].open_rows:
                        yield opened.pop(first).result(self.model, self.prompt)
                    if opened:
                        assert self.session.has_work, "open rows but nothing in the engine"
                        self._route(opened, self.session.step())
            finally:  # the consumer stopped early: free the rows still decoding
                for seq, entry in opened.items():
                    for index, reason in enumerate(entry.reasons):
                        if reason is None:
                            self.session.cancel((seq, index))

    def _admit(self, decoded: Iterator[tuple[ImageItem, DecodedImage]], opened: dict[int, _OpenImage]) -> bool:
        """Take the next images while fewer than `max_rows` rows would be open, encode them in one vision pass and
        open each; False when no image is left."""
        free = self.max_rows - sum(entry.open_rows for entry in opened.values())
        taken: list[tuple[ImageItem, DecodedImage]] = []
        while free > 0:
            entry = next(decoded, None)
            if entry is None:
                break
            taken.append(entry)
            free -= len(entry[1].regions)
        try:
            encoded = iter(self.pipe.encode_images([image.image for _, image in taken if image.regions]))
        except ValueError:  # an image the vision tower refuses: each is encoded alone, so only its regions fail
            encoded = None
        for item, image in taken:
            seq = next(self._image_seq)
            own = next(encoded) if encoded is not None and image.regions else None
            opened[seq] = self._open(seq, item, image, own)
        return free <= 0

    def _open(self, seq: int, item: ImageItem, decoded: DecodedImage, encoded: EncodedImage | None) -> _OpenImage:
        """Prepare the image's regions (`encoded`, or encoded here) and add them as rows (seq, region index); a prompt
        that cannot be prepared or rows that cannot fit the engine fail every region of the image with the reason."""
        if not decoded.regions:
            return _OpenImage(item, [], decoded.failures)
        try:
            if encoded is None:
                encoded = self.pipe.encode_image(decoded.image)
            masks = np.stack([region.mask for region in decoded.regions])
            prompts = self.pipe.prepare_each(encoded, [("human", self.prompt)], masks)
            ids = [(seq, index) for index in range(len(prompts))]
            self.session.add(self.pipe.group_requests(prompts, [self.params] * len(prompts), row_ids=ids))
        except ValueError as exc:
            failed = [Failure(item.image, region.item.id, str(exc)) for region in decoded.regions]
            return _OpenImage(item, [], decoded.failures + failed)
        return _OpenImage(item, decoded.regions, decoded.failures)

    @staticmethod
    def _route(opened: dict[int, _OpenImage], events: list[StreamEvent]) -> None:
        for event in events:
            seq, index = event.row
            entry = opened.get(seq)
            if entry is None:  # a row of an earlier call that stopped early, finishing its last step
                continue
            entry.texts[index] += event.text_delta
            if event.finished:
                entry.reasons[index] = event.finish_reason or "length"


def _shared_kv_gb(device: torch.device, gpu_share: float) -> float | None:
    """KV memory of a replica holding `gpu_share` of a GPU: its share of the 90% `engine_pool` plans with, less its
    own weights and the 4 GiB it keeps for a prefill; None (the pool's default) for a whole GPU or the CPU."""
    if gpu_share >= 1 or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    budget = 0.9 * total * gpu_share - torch.cuda.memory_allocated(device) - 4 * 2**30
    if budget <= 0:
        raise RuntimeError(f"{gpu_share:.2f} of this GPU ({total / 2**30:.0f} GiB) leaves no KV memory beside the "
                           f"weights: fewer replicas per GPU")
    return budget / 2**30


def _decoded_ahead(reader: ThreadPoolExecutor, items: Iterable[ImageItem], lookahead: int
                   ) -> Iterator[tuple[ImageItem, DecodedImage]]:
    """`decode_item` of each item in `reader`, `lookahead` items ahead of the caller, in input order: reading
    the image and decoding its masks on the CPU overlaps the engine's steps."""
    queue: collections.deque[tuple[ImageItem, Future]] = collections.deque()
    for item in items:
        queue.append((item, reader.submit(decode_item, item)))
        if len(queue) > lookahead:
            done, future = queue.popleft()
            yield done, future.result()
    while queue:
        done, future = queue.popleft()
        yield done, future.result()


# ---------------------------------------------------------------------------------------------- HTTP


class EndpointAnnotator:
    """Running `osprey serve` servers, `POST /v1/regions/describe`, one image per request chunk.

    A small thread pool keeps `workers` images in flight, spread round-robin over the URLs; each server's engine
    batches the regions of concurrent requests together. Regions are sent as the RLE decoded here, so a mask
    means the same pixels as in-process.
    """

    def __init__(self, urls: list[str], settings: AnnotateSettings, api_key: str | None = None,
                 workers: int | None = None, max_regions: int = 64, timeout_s: float = 600.0) -> None:
        try:
            import httpx
        except ImportError:
            raise RuntimeError("--endpoint needs httpx: pip install 'osprey-regions[serve]'") from None

        self.urls = [u.rstrip("/") + "/v1/regions/describe" for u in urls]
        self.settings, self.prompt, self.max_regions = settings, task_prompt(settings.task), max_regions
        self.workers = workers or 2 * len(urls)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers,
                                   limits=httpx.Limits(max_connections=self.workers))
        self._next = 0
        self._lock = threading.Lock()

    def _url(self) -> str:
        with self._lock:
            self._next += 1
            return self.urls[self._next % len(self.urls)]

    def annotate(self, item: ImageItem) -> ImageResult:
        decoded = decode_item(item)
        result = ImageResult(failures=decoded.failures)
        if not decoded.regions:
            return result
        buffer = io.BytesIO()
        decoded.image.save(buffer, format="PNG")  # lossless: the server sees the pixels we read
        image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        for start in range(0, len(decoded.regions), self.max_regions):
            chunk = decoded.regions[start:start + self.max_regions]
            body = {"image": image, "regions": [{"rle": r.rle} for r in chunk], "task": self.settings.task,
                    "max_tokens": self.settings.max_tokens, "temperature": self.settings.temperature,
                    "seed": self.settings.seed}
            try:
                answer = post_json(self.client, self._url(), body)
            except RuntimeError as exc:
                result.failures += [Failure(item.image, r.item.id, str(exc)) for r in chunk]
                continue
            rows = sorted(answer["results"], key=lambda row: row["index"])
            result.records += [_record(item, r, row["text"], row["raw_text"], row["finish_reason"], answer["model"],
                                       self.prompt) for r, row in zip(chunk, rows, strict=True)]
        return result

    def map(self, items: Iterable[ImageItem]) -> Iterator[ImageResult]:
        """Results as images finish (not in input order), at most `workers` images in flight."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="annotate") as pool:
            pending: set[Future] = set()
            for item in items:
                if len(pending) >= self.workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
                pending.add(pool.submit(self.annotate, item))
            for future in pending:
                yield future.result()


# ---------------------------------------------------------------------------------------------- Ray


@dataclass(frozen=True)
class RayPlacement:
    """How `--ray` lays out its model replicas and feeds them."""

    actors: int = 1
    actors_per_gpu: int = 1  # on CUDA: replicas sharing one GPU (each gets 1/N of it in Ray's accounting)
    images_per_call: int = 8  # images each actor call gets: their rows decode together (continuous batching)
    max_rows: int = 32  # region rows in flight per replica (the in-process --max-batch-size)
    fast_kernels: bool = True

    def __post_init__(self) -> None:
        for name in ("actors", "actors_per_gpu", "images_per_call", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class _RayActor:
    """A model replica in a Ray actor: items arrive as JSON text (nested lists do not survive Arrow batches). Each
    call's images go through one `PipelineAnnotator.map`, so their regions share the replica's engine."""

    def __init__(self, model_dir: str, settings: AnnotateSettings, device: str, dtype: str | None,
                 threads: int, placement: RayPlacement) -> None:
        import torch

        torch.set_num_threads(threads)
        self.annotator = PipelineAnnotator.from_model_dir(model_dir, settings, device=device, dtype=dtype,
                                                          max_batch_size=placement.max_rows,
                                                          fast_kernels=placement.fast_kernels,
                                                          gpu_share=1 / placement.actors_per_gpu)

    def __call__(self, batch: dict) -> dict:
        results = self.annotator.map([ImageItem.from_json(text) for text in batch["item"]])
        return {"result": [json.dumps({"records": [asdict(r) for r in res.records],
                                       "failures": [asdict(f) for f in res.failures]}) for res in results]}


class RayAnnotator:
    """Ray Data over images: `from_items` -> `map_batches` with `placement.actors` model replicas (1/actors_per_gpu
    of a GPU each on CUDA, a fraction of a CPU each on CPU so Ray's own read tasks still get a core)."""

    def __init__(self, model_dir: str, settings: AnnotateSettings, address: str | None,
                 placement: RayPlacement = RayPlacement(), device: str = "cpu", dtype: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError("--ray needs Ray Data: pip install 'osprey-regions[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=address or None, num_cpus=None if address else os.cpu_count(), log_to_driver=False,
                     include_dashboard=False)
        self.ray, self.model_dir, self.settings = ray, str(Path(model_dir).resolve()), settings
        self.placement, self.device, self.dtype = placement, device, dtype

    def map(self, items: Iterable[ImageItem]) -> Iterator[ImageResult]:
        rows = [{"item": item.to_json()} for item in items]
        if not rows:
            return
        place = self.placement
        on_gpu = self.device.startswith("cuda")
        threads = max(1, (os.cpu_count() or 1) // place.actors)
        data = self.ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * place.actors))
        data = data.map_batches(
            _RayActor, batch_size=place.images_per_call, concurrency=place.actors,
            fn_constructor_args=(self.model_dir, self.settings, self.device, self.dtype, threads, place),
            num_gpus=1 / place.actors_per_gpu if on_gpu else 0, num_cpus=1 if on_gpu else 0.5)
        for batch in data.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            for text in batch["result"]:
                raw = json.loads(text)
                yield ImageResult([RegionRecord(**r) for r in raw["records"]], [Failure(**f) for f in raw["failures"]])
