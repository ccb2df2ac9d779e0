"""`osprey data synth`: write the generated region dataset (see docs/data.md)."""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)


def register(data_subparsers: argparse._SubParsersAction) -> None:
    """Add the `synth` command under `osprey data`."""
    parser = data_subparsers.add_parser(
        "synth",
        help="generate a synthetic region dataset (images, exact masks, Osprey-724K records for all stages)",
        description="Generate images of shapes and composite objects with exact instance and part masks, and "
        "Osprey-724K-format records for stage 1 (captions), stage 2 (region labels) and stage 3 (conversations, "
        "short-form, parts, positive/negative, detailed descriptions), split into train/val/test. "
        "Deterministic for a seed, whatever the number of workers.",
    )
    parser.add_argument("--out", required=True, help="output folder (images/, train/, val/, test/, manifest.json)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")
    parser.add_argument("--image-size", type=int, default=256, help="square image side in pixels (default 256)")
    parser.add_argument("--format", dest="image_format", choices=["png", "jpg"], default="png",
                        help="image file format (default png: lossless)")
    parser.add_argument("--max-objects", type=int, default=6, help="most objects per image (default 6)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of images in val (default 0.05)")
    parser.add_argument("--test-fraction", type=float, default=0.05, help="fraction of images in test (default 0.05)")
    parser.add_argument("--extra-train", type=int, default=0, metavar="M",
                        help="M more images, all in train, after the --n images' split: a larger training set with "
                             "the same val and test as the --n-image dataset of this seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_synth)

    export = data_subparsers.add_parser(
        "synth-coco", help="write a generated dataset's split as a COCO instances JSON with per-region attributes",
        description="One split of `osprey data synth` output as a COCO instances file whose annotations carry "
        "`attributes` (color, size, position, texture): the input docs/finetune.md starts from. file_name is "
        "relative to the dataset folder.")
    export.add_argument("data", help="an `osprey data synth` folder")
    export.add_argument("--split", default="train", choices=["train", "val", "test"], help="split (default train)")
    export.add_argument("--out", required=True, help="output COCO JSON")
    export.set_defaults(func=_cmd_synth_coco)


def _cmd_synth(args: argparse.Namespace) -> int:
    from data_tools.synth.generate import SynthConfig, generate

    config = SynthConfig(
        out=args.out, n=args.n, seed=args.seed, image_size=args.image_size, image_format=args.image_format,
        max_objects=args.max_objects, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        extra_train=args.extra_train,
    )
    manifest = generate(config, workers=max(1, args.workers), progress=not args.no_progress)
    for subset, info in manifest["subsets"].items():
        print(f"{subset}\t" + "\t".join(f"{split}={count}" for split, count in info["records"].items()))
    print(f"wrote {args.out}/manifest.json")
    return 0


def _cmd_synth_coco(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from data_tools.synth.coco_export import export_coco

    try:
        coco = export_coco(args.data, args.split)
    except (FileNotFoundError, ValueError) as exc:
        print(f"osprey data synth-coco: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(coco), encoding="utf-8")
    os.replace(tmp, out)  # whole or not at all
    print(f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations")
    return 0
