"""Converters from the public region datasets of the official recipe into Osprey-format records.

`FORMATS` is the registry the CLI reads: each format names its input files (positional, in order) and
the options it takes; `convert_to_file` runs one and writes the records atomically.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_tools.converters.common import ConvertStats
    from osprey.data.records import Record

__all__ = ["FORMATS", "Format", "convert_to_file"]


@dataclass(frozen=True)
class Format:
    """One source format: where its converter lives ("module:function", imported on use so that
    `osprey --help` stays fast), its positional inputs and the keyword options it accepts."""

    target: str
    inputs: tuple[str, ...]
    options: tuple[str, ...]
    help: str

    def load(self) -> Callable[..., Iterator[Record]]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


FORMATS: dict[str, Format] = {
    "coco": Format("data_tools.converters.instances:convert_coco", ("instances_*.json",),
                   ("task", "labels", "seed", "max_regions"),
                   "COCO instances: category answers, regions shuffled and capped at 20; --task short_answer, "
                   "label_list or yes_no: questions about each annotation's `attributes` and --labels CSV "
                   "(stage 3, capped at 15)"),
    "refcoco": Format("data_tools.converters.refcoco:convert_refcoco", ("refs(unc|umd|google).p", "instances.json"),
                      ("split", "seed", "max_regions", "source"),
                      "RefCOCO / RefCOCO+ / RefCOCOg: referring-expression answers, one split, capped at 15"),
    "lvis": Format("data_tools.converters.instances:convert_lvis", ("lvis_v1_*.json",), ("seed", "max_regions"),
                   "LVIS v1: category answers (synonyms kept per region), capped at 15"),
    "paco": Format("data_tools.converters.instances:convert_paco", ("paco_lvis_v1_*.json",),
                   ("kind", "seed", "max_regions"), "PACO-LVIS: object and 'obj:part' answers, capped at 15"),
    "vg": Format("data_tools.converters.vg:convert_vg", ("region_descriptions.json", "image_data.json"),
                 ("style", "seed", "max_regions"),
                 "Visual Genome region captions: boxes as rectangle polygons, capped at 15"),
    "panoptic": Format("data_tools.converters.panoptic:convert_panoptic", ("panoptic_*.json",),
                       ("png_dir", "include_crowd", "max_regions"),
                       "COCO-panoptic-style segments (open-vocabulary eval): one RLE region per segment"),
}


def convert_to_file(fmt: str, inputs: list[str], out: str | os.PathLike[str], *, progress: bool = True,
                    **options: Any) -> ConvertStats:
    """Run converter `fmt` on `inputs` and write its records to `out` (JSON list, or JSON lines for
    `.jsonl`); options not given (None) keep the converter's defaults."""
    from data_tools.converters.common import ConvertStats
    from osprey.data.records import RecordWriter

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
    spec = FORMATS[fmt]
    if len(inputs) != len(spec.inputs):
        raise ValueError(f"format {fmt!r} takes {len(spec.inputs)} input file(s) {list(spec.inputs)}, "
                         f"got {len(inputs)}: {inputs}")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path} does not exist")
    unknown = sorted(k for k, v in options.items() if v is not None and k not in spec.options)
    if unknown:
        raise ValueError(f"format {fmt!r} does not take option(s) {unknown}; it takes {list(spec.options)}")
    kwargs = {k: v for k, v in options.items() if v is not None and k in spec.options}
    stats = ConvertStats()
    with RecordWriter(out) as writer:
        for record in spec.load()(*inputs, stats=stats, progress=progress, **kwargs):
            writer.write(record)
    return stats
