"""`osprey data ...`: validate record files, convert public datasets, and (data_tools.synth) synthesise.

Heavy modules are imported inside the command functions so `osprey --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its subcommands (validate, convert, and synth when present)."""
    data = subparsers.add_parser("data", help="validate, convert and synthesise Osprey instruction data",
                                 description="Osprey instruction data tools.")
    data_subparsers = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    _register_validate(data_subparsers)
    _register_convert(data_subparsers)
    _register_synth(data_subparsers)


def _register_synth(data_subparsers: argparse._SubParsersAction) -> None:
    """The synthetic-data generator lives in data_tools.synth (another module); add it when it exists."""
    try:
        from data_tools.synth import cli as synth_cli
    except ModuleNotFoundError as exc:
        if exc.name not in ("data_tools.synth", "data_tools.synth.cli"):
            raise  # a real missing dependency inside synth: surface it
        return
    synth_cli.register(data_subparsers)


# ---------------------------------------------------------------------------------------------- validate


def _register_validate(data_subparsers: argparse._SubParsersAction) -> None:
    p = data_subparsers.add_parser(
        "validate", help="check every record of an Osprey-format JSON file (exit 1 on any error)",
        description="Check schema, region references, conversation roles, masks and image files of every "
                    "record; bad records are reported with their index.")
    p.add_argument("file", help="records file (JSON list, or JSON lines for .jsonl)")
    p.add_argument("--images", default=None, help="image folder that file_name is relative to (omit to skip "
                                                  "image checks)")
    p.add_argument("--check-images", action="store_true", help="also open each image and compare its size")
    p.add_argument("--strict-masks", action="store_true", help="self-intersecting polygons are errors, not warnings")
    p.add_argument("--max-errors", type=int, default=50, help="issues printed in detail (all are counted; "
                                                              "0 = no limit)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from data_tools.validate import validate_file

    if args.check_images and args.images is None:
        print("--check-images needs --images DIR", file=sys.stderr)
        return 2
    report = validate_file(args.file, args.images, check_images=args.check_images, strict_masks=args.strict_masks,
                           max_errors=args.max_errors or None, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for issue in report.issues:
            print(issue)
        if report.max_errors is not None and report.num_errors > len(report.issues):
            print(f"... {report.num_errors - len(report.issues)} more errors (raise --max-errors)")
        print(report.summary())
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------- convert


def _register_convert(data_subparsers: argparse._SubParsersAction) -> None:
    from data_tools.converters import FORMATS  # a table only: converters are imported on use

    formats = "\n".join(f"  {name:9s} inputs: {' '.join(spec.inputs)}\n  {'':9s} {spec.help}"
                        for name, spec in FORMATS.items())
    p = data_subparsers.add_parser(
        "convert", help="convert a public region dataset into Osprey-format records",
        description=f"Convert a public dataset into Osprey-format records.\n\nformats:\n{formats}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=sorted(FORMATS), help="source format")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="the format's input files, in the order listed")
    p.add_argument("--out", required=True, help="output records file (.json list or .jsonl)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the region shuffle and, for the coco attribute tasks, of the question order and "
                        "wordings (default 0)")
    p.add_argument("--max-regions", type=int, default=None,
                   help="regions per record (default: coco 20 (attribute tasks 15), others 15, panoptic all; 0 = all)")
    p.add_argument("--task", default=None, choices=["categories", "short_answer", "label_list", "yes_no"],
                   help="coco: what the records ask (default categories; the others ask about each annotation's "
                        "`attributes` and the --labels CSV: stage-3 data, docs/finetune.md)")
    p.add_argument("--labels", default=None, metavar="CSV",
                   help="coco attribute tasks: a CSV with columns id (annotation id) and labels (';'-separated)")
    p.add_argument("--split", default=None, help="refcoco: split to convert (default train)")
    p.add_argument("--source", default=None, help="refcoco: dataset name stored in records (default: folder name)")
    p.add_argument("--kind", default=None, choices=["all", "part", "object"], help="paco: which annotations")
    p.add_argument("--style", default=None, choices=["conversation", "description"], help="vg: record style")
    p.add_argument("--png-dir", default=None, help="panoptic: folder of segment PNGs (default: json path "
                                                   "without .json)")
    p.add_argument("--no-crowd", dest="include_crowd", action="store_const", const=False, default=None,
                   help="panoptic: skip crowd segments")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from data_tools.converters import convert_to_file

    options = {k: getattr(args, k) for k in ("task", "labels", "seed", "max_regions", "split", "source", "kind", "style",
                                             "png_dir", "include_crowd")}
    try:
        stats = convert_to_file(args.format, args.inputs, args.out, progress=not args.no_progress, **options)
    except (ValueError, FileNotFoundError) as exc:
        print(f"osprey data convert: {exc}", file=sys.stderr)
        return 2
    print(stats.summary())
    print(f"wrote {args.out}")
    return 0 if stats.records else 1
