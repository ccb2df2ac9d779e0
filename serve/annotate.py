"""`osprey annotate`: every region of a dataset captioned or labelled in one resumable command (docs/annotate.md).

The runner reads INPUT into image items, drops regions OUT already holds, hands the rest to a backend (in-process,
`--endpoint` servers or `--ray`) and appends each finished image's lines as one fsynced batch, so a killed run
resumes where it stopped without losing or duplicating a region.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from .annotate_backends import (
    AnnotateSettings,
    EndpointAnnotator,
    PipelineAnnotator,
    RayAnnotator,
    RayPlacement,
)
from .annotate_io import (
    Failure,
    ImageItem,
    ImageResult,
    InputError,
    JsonlOutput,
    read_input,
    record_key,
    write_coco,
    write_text_atomic,
)

log = logging.getLogger(__name__)


@dataclass
class Summary:
    regions: int = 0  # written this run
    skipped: int = 0  # already in OUT
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        rate = self.regions / self.seconds if self.seconds > 0 else 0.0
        head = (f"annotated {self.regions} regions in {self.seconds:.1f} s ({rate:.2f} regions/s), "
                f"{self.skipped} already done, {len(self.failures)} failed")
        lines = [head]
        lines += [f"  failed: {f.image} region {f.id}: {f.reason}" for f in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (see the failures file)")
        return "\n".join(lines)


def pending_items(items: list[ImageItem], done: set[str]) -> tuple[list[ImageItem], int]:
    """Items with the regions OUT already holds removed (images with none left dropped), and how many were."""
    out, skipped = [], 0
    for item in items:
        regions = tuple(r for r in item.regions if record_key(item.image, r.id) not in done)
        skipped += len(item.regions) - len(regions)
        if regions:
            out.append(replace(item, regions=regions))
    return out, skipped


def run_annotation(items: list[ImageItem], backend, out_path: str | Path, max_images: int | None = None,
                   progress: bool = True) -> Summary:
    """Annotate the regions of `items` not yet in `out_path`; `max_images` stops after that many images (batches)."""
    started = time.monotonic()
    output = JsonlOutput(out_path)
    if output.dropped_torn_line:
        log.warning("%s ended in a torn line (a killed run); dropped it, its region is redone", out_path)
    todo, skipped = pending_items(items, output.done)
    if max_images is not None:
        todo = todo[:max_images]
    summary = Summary(skipped=skipped)
    bar = tqdm(total=sum(len(i.regions) for i in todo), unit="region", disable=not progress, smoothing=0.1)
    try:
        for result in _results(backend, todo):
            output.append(result.records)
            summary.regions += len(result.records)
            summary.failures += result.failures
            bar.update(len(result.records) + len(result.failures))
    finally:
        bar.close()
        output.close()
    summary.seconds = time.monotonic() - started
    return summary


def _results(backend, todo: list[ImageItem]) -> Iterator[ImageResult]:
    yield from backend.map(todo) if todo else ()


# ---------------------------------------------------------------------------------------------- CLI


def make_backend(args: argparse.Namespace, settings: AnnotateSettings):
    if args.endpoint and args.ray is not None:
        raise ValueError("give --endpoint or --ray, not both")
    if args.endpoint:
        return EndpointAnnotator([u for u in args.endpoint.split(",") if u], settings, api_key=args.api_key,
                                 workers=args.workers)
    from .config import resolve_model_path

    model = resolve_model_path(args.model)
    if args.ray is not None:
        placement = RayPlacement(args.actors, args.actors_per_gpu, args.images_per_call, args.max_batch_size,
                                 args.fast_kernels)
        return RayAnnotator(model, settings, args.ray, placement, device=args.device, dtype=args.dtype)
    return PipelineAnnotator.from_model_dir(model, settings, device=args.device, dtype=args.dtype,
                                            max_batch_size=args.max_batch_size, fast_kernels=args.fast_kernels)


def run(args: argparse.Namespace) -> int:
    """The `osprey annotate` command: exits 2 for an unusable INPUT or option, 1 when regions failed, else 0."""
    from osprey.prompts import task_prompt

    from .config import NoDefaultModel

    try:
        task_prompt(args.task)
        items = read_input(args.input, args.images, args.layout, args.panoptic_masks)
        if args.coco and not Path(args.input).is_file():
            raise ValueError("--coco needs a COCO INPUT file")
        settings = AnnotateSettings(args.task, args.max_tokens, args.temperature, args.seed)
        backend = make_backend(args, settings)
        summary = run_annotation(items, backend, args.out, args.max_images, progress=not args.no_progress)
    except (InputError, NoDefaultModel, ValueError, RuntimeError) as exc:
        print(f"osprey annotate: {exc}", file=sys.stderr)
        return 2
    failures_path = Path(str(args.out) + ".failures.jsonl")
    # this run's failures only: a rerun retries them
    write_text_atomic("".join(json.dumps(asdict(x)) + "\n" for x in summary.failures), failures_path)
    if args.coco:
        count = write_coco(args.input, args.out, args.coco, args.task)
        log.info("wrote %s (%d annotations answered)", args.coco, count)
    print(summary.text(), file=sys.stderr)
    return 1 if summary.failures else 0
