"""SAM segmentation from local folders: clicks and boxes -> masks, "segment everything", and text concepts.

`PromptSegmenter` runs transformers' `SamModel` (+ `SamProcessor`): positive/negative points and boxes become one
mask per object, scored by SAM's predicted IoU, and its automatic mask generator (transformers' mask-generation
pipeline) segments a whole image. `ConceptSegmenter` runs `Sam3Model` (+ `Sam3Processor`): a short noun phrase
("bottle") becomes every instance of it, each with its confidence. Both load only from a folder on disk (a
`save_pretrained` layout; nothing is downloaded), and both return typed `Segment`s. Prompts are validated here
(`PromptError` names the field), so every caller refuses bad input the same way.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from osprey.preprocess import as_rgb

PROMPT_MODEL_TYPES = ("sam",)  # config.json model_type a PromptSegmenter loads
CONCEPT_MODEL_TYPES = ("sam3",)  # ... and a ConceptSegmenter


@dataclass(frozen=True)
class Segment:
    """One mask SAM proposes: `mask (H, W) bool` at the image size, `score` its predicted IoU (SAM) or instance
    confidence (SAM 3), in [0, 1] for trained models."""

    mask: np.ndarray
    score: float


@dataclass(frozen=True)
class Prompt:
    """What the user pointed at, in image pixels: points `(x, y)` with labels 1 (inside) / 0 (outside), and boxes
    COCO `[x, y, w, h]`. Points go with at most one box: SAM reads them as one object together."""

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()


class PromptError(ValueError):
    """A prompt that does not fit the image or itself; `field` names the request field (`points[2]`)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.message = message
        self.field = field


class SegmenterLoadError(RuntimeError):
    """A folder that is not a loadable SAM model of the expected kind; the message says what is wrong."""


def check_prompt(prompt: Prompt, height: int, width: int) -> None:
    """Raise PromptError unless the prompt names something inside the `height x width` image."""
    if not prompt.points and not prompt.boxes:
        raise PromptError("give at least one point or box", "points")
    if len(prompt.labels) != len(prompt.points):
        raise PromptError(f"{len(prompt.labels)} labels for {len(prompt.points)} points: give one label (1 inside, "
                          "0 outside) per point", "labels")
    for i, (x, y) in enumerate(prompt.points):
        if not (0 <= x < width and 0 <= y < height):
            raise PromptError(f"point ({x:g}, {y:g}) is outside the {width}x{height} (WxH) image", f"points[{i}]")
    for i, label in enumerate(prompt.labels):
        if label not in (0, 1):
            raise PromptError(f"label {label} is neither 1 (inside) nor 0 (outside)", f"labels[{i}]")
    if prompt.points and not any(prompt.labels) and not prompt.boxes:
        raise PromptError("every point is negative (label 0): add a positive point or a box", "labels")
    for i, (x, y, w, h) in enumerate(prompt.boxes):
        if w <= 0 or h <= 0:
            raise PromptError(f"box [{x:g}, {y:g}, {w:g}, {h:g}] has no area", f"boxes[{i}]")
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise PromptError(f"box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {width}x{height} (WxH) image",
                              f"boxes[{i}]")
    if prompt.points and len(prompt.boxes) > 1:
        raise PromptError("points go with at most one box (SAM reads points and a box as one object); send "
                          "several boxes without points, or one box with its points", "boxes")


def _load(folder: str | Path, device: str, model_class, processor_class, model_types: tuple[str, ...], flag: str
          ) -> tuple[torch.nn.Module, object, str]:
    """A transformers SAM-family model and processor from a local folder (never downloaded), checked to be of
    `model_types`; errors name the flag."""
    _model_type(folder, model_types, flag)
    try:
        model = model_class.from_pretrained(folder, local_files_only=True).to(device)
        processor = processor_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SegmenterLoadError(f"{flag} {folder}: {exc}") from None
    return model, processor, Path(folder).resolve().name


def _model_type(folder: str | Path, expected: Sequence[str], flag: str) -> str:
    """The folder's `config.json` model_type, or SegmenterLoadError saying what was expected."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise SegmenterLoadError(f"{flag} {folder}: no config.json there (a transformers SAM folder, as written by "
                                 "save_pretrained, is expected)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise SegmenterLoadError(f"{flag} {folder}: config.json is not readable JSON ({exc})") from None
    if model_type not in expected:
        raise SegmenterLoadError(f"{flag} {folder}: model_type {model_type!r} is not one of {list(expected)}")
    return model_type


class PromptSegmenter:
    """SAM: points and boxes -> masks, and automatic mask generation. Thread-safe (one call at a time); the image
    embedding of the last few images is cached, so clicking on one image runs SAM's encoder once."""

    def __init__(self, model: torch.nn.Module, processor: object, name: str, cache_size: int = 4) -> None:
        self.model, self.processor, self.name = model.eval(), processor, name
        self._lock = threading.Lock()
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._generator: object | None = None  # transformers' mask-generation pipeline, made on first use

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu") -> PromptSegmenter:
        from transformers import SamModel, SamProcessor

        return cls(*_load(folder, device, SamModel, SamProcessor, PROMPT_MODEL_TYPES, "--sam"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def segment(self, image: Image.Image, prompt: Prompt, image_key: str, multimask: bool = False) -> list[Segment]:
        """One mask per box (with the points, if any), or one for the points alone: SAM's best of three for an
        ambiguous click unless `multimask`, which returns all three (whole, part, subpart) best first."""
        check_prompt(prompt, image.height, image.width)
        objects = max(1, len(prompt.boxes))
        kwargs: dict[str, object] = {}
        if prompt.points:
            kwargs["input_points"] = [[[list(p) for p in prompt.points]] * objects]
            kwargs["input_labels"] = [[list(prompt.labels)] * objects]
        if prompt.boxes:  # SAM reads corners; a box reaching outside the image is clipped to it
            kwargs["input_boxes"] = [[[max(x, 0.0), max(y, 0.0), min(x + w, image.width), min(y + h, image.height)]
                                      for x, y, w, h in prompt.boxes]]
        with self._lock, torch.inference_mode():
            inputs = self.processor(images=as_rgb(image), return_tensors="pt", **kwargs).to(self.device)
            embeddings = self._embedding(image_key, inputs.pop("pixel_values"))
            several = multimask or (not prompt.boxes and len(prompt.points) == 1)
            out = self.model(image_embeddings=embeddings, multimask_output=several,
                             **{k: v for k, v in inputs.items() if k.startswith("input_")})
            masks = self.processor.post_process_masks(out.pred_masks.cpu(), inputs["original_sizes"].cpu(),
                                                      inputs["reshaped_input_sizes"].cpu())[0]
        scores = out.iou_scores[0].float().cpu()  # (objects, candidates)
        results = []
        for k in range(objects):
            order = torch.argsort(scores[k], descending=True).tolist()
            keep = order if multimask else order[:1]
            results.extend(Segment(masks[k, j].numpy().astype(bool), float(scores[k, j])) for j in keep)
        return results

    def _embedding(self, key: str, pixel_values: torch.Tensor) -> torch.Tensor:
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        embedding = self.model.get_image_embeddings(pixel_values)
        self._embeddings[key] = embedding
        while len(self._embeddings) > self._cache_size:
            self._embeddings.popitem(last=False)
        return embedding

    def everything(self, image: Image.Image, *, points_per_side: int = 16, min_score: float = 0.8,
                   min_stability: float = 0.85, max_masks: int = 64) -> list[Segment]:
        """SAM's automatic mask generator (a grid of `points_per_side`^2 clicks, low-scoring and unstable masks
        dropped, overlaps removed by NMS), best `max_masks` first."""
        from transformers import pipeline

        with self._lock, torch.inference_mode():
            if self._generator is None:
                self._generator = pipeline("mask-generation", model=self.model, device=self.device,
                                           image_processor=self.processor.image_processor)
            out = self._generator(as_rgb(image), points_per_batch=64, points_per_crop=points_per_side,
                            pred_iou_thresh=min_score, stability_score_thresh=min_stability)
        segments = [Segment(np.asarray(m, dtype=bool), float(s)) for m, s in zip(out["masks"], out["scores"],
                                                                                  strict=True)]
        segments = [s for s in segments if s.mask.any()]
        return sorted(segments, key=lambda s: -s.score)[:max_masks]


class ConceptSegmenter:
    """SAM 3: a short noun phrase -> every instance of it in the image. Thread-safe (one call at a time)."""

    def __init__(self, model: torch.nn.Module, processor: object, name: str) -> None:
        self.model, self.processor, self.name = model.eval(), processor, name
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu") -> ConceptSegmenter:
        from transformers import Sam3Model, Sam3Processor

        return cls(*_load(folder, device, Sam3Model, Sam3Processor, CONCEPT_MODEL_TYPES, "--sam3"))

    def segment_text(self, image: Image.Image, text: str, *, threshold: float = 0.5,
                     max_masks: int = 64) -> list[Segment]:
        """Every instance of `text` ("bottle") whose confidence reaches `threshold`, best first; empty masks
        (an instance smaller than a pixel at this size) are dropped."""
        if not text.strip():
            raise PromptError("the text is empty: name a concept, e.g. \"bottle\"", "text")
        device = next(self.model.parameters()).device
        with self._lock, torch.inference_mode():
            inputs = self.processor(images=as_rgb(image), text=text.strip(), return_tensors="pt").to(device)
            out = self.model(**inputs)
            found = self.processor.post_process_instance_segmentation(
                out, threshold=threshold, mask_threshold=0.5, target_sizes=[(image.height, image.width)])[0]
        segments = [Segment(m.cpu().numpy().astype(bool), float(s))
                    for m, s in zip(found["masks"], found["scores"], strict=True)]
        segments = [s for s in segments if s.mask.any()]
        return sorted(segments, key=lambda s: -s.score)[:max_masks]


@dataclass(frozen=True)
class Segmenters:
    """The SAM models a server has (either may be absent): what `/v1/segment` runs."""

    prompt: PromptSegmenter | None = None
    concept: ConceptSegmenter | None = None

    @classmethod
    def load(cls, sam: str | None, sam3: str | None, device: str = "cpu") -> Segmenters:
        return cls(PromptSegmenter.from_folder(sam, device) if sam else None,
                   ConceptSegmenter.from_folder(sam3, device) if sam3 else None)
