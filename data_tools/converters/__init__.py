"""Converters from the public region datasets of the official recipe into Osprey-format records.

`FORMATS` is the registry the CLI reads: each format names its input files (positional, in order) and
the options it takes; `convert_to_file` runs one and writes the records atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from data_tools.converters.common import ConvertStats
from data_tools.converters.instances import convert_coco, convert_lvis, convert_paco
from data_tools.converters.panoptic import convert_panoptic
from data_tools.converters.refcoco import convert_refcoco
from data_tools.converters.vg import convert_vg
from osprey.data.records import Record, RecordWriter

__all__ = [
    "FORMATS",
    "ConvertStats",
    "Format",
    "convert_coco",
    "convert_lvis",
    "convert_paco",
    "convert_panoptic",
    "convert_refcoco",
    "convert_to_file",
    "convert_vg",
]


@dataclass(frozen=True)
class Format:
    """One source format: its converter, its positional inputs and the keyword options it accepts."""

    convert: Callable[..., Iterator[Record]]
    inputs: tuple[str, ...]
    options: tuple[str, ...]
    help: str


FORMATS: dict[str, Format] = {
    "coco": Format(convert_coco, ("instances_*.json",), ("seed", "max_regions"),
                   "COCO instances: category answers, regions shuffled and capped at 20"),
    "refcoco": Format(convert_refcoco, ("refs(unc|umd|google).p", "instances.json"),
                      ("split", "seed", "max_regions", "source"),
                      "RefCOCO / RefCOCO+ / RefCOCOg: referring-expression answers, one split, capped at 15"),
    "lvis": Format(convert_lvis, ("lvis_v1_*.json",), ("seed", "max_regions"),
                   "LVIS v1: category answers (synonyms kept per region), capped at 15"),
    "paco": Format(convert_paco, ("paco_lvis_v1_*.json",), ("kind", "seed", "max_regions"),
                   "PACO-LVIS: object and 'obj:part' answers, capped at 15"),
    "vg": Format(convert_vg, ("region_descriptions.json", "image_data.json"), ("style", "seed", "max_regions"),
                 "Visual Genome region captions: boxes as rectangle polygons, capped at 15"),
    "panoptic": Format(convert_panoptic, ("panoptic_*.json",), ("png_dir", "include_crowd", "max_regions"),
                       "COCO-panoptic-style segments (open-vocabulary eval): one RLE region per segment"),
}


def convert_to_file(fmt: str, inputs: list[str], out: str | os.PathLike[str], *, progress: bool = True,
                    **options: Any) -> ConvertStats:
    """Run converter `fmt` on `inputs` and write its records to `out` (JSON list, or JSON lines for
    `.jsonl`); options not given (None) keep the converter's defaults."""
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
        for record in spec.convert(*inputs, stats=stats, progress=progress, **kwargs):
            writer.write(record)
    return stats
