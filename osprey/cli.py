"""The `osprey` command: core subcommands (`model`) plus those each project folder registers.

Other folders (data_tools, train, serve, eval, bench) plug in through the `osprey.cli` entry-point
group, so this package never imports them: each entry point is a `register(subparsers)` function that
adds its parsers and sets `func=callable(args) -> int` on each.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points


def _register_model_commands(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="inspect, create and convert model folders")
    sub = model.add_subparsers(dest="model_command", required=True)

    keys = sub.add_parser(
        "keys", help="print the state dict of a preset (built on the meta device): name<TAB>shape per tensor"
    )
    keys.add_argument("--preset", default="osprey-7b", help="preset name or a config JSON path")
    keys.add_argument("--ours", action="store_true", help="print our module names instead of the official ones")
    keys.set_defaults(func=_cmd_model_keys)

    init = sub.add_parser("init", help="write a random-initialised model folder (config, weights, tokenizer)")
    init.add_argument("--preset", default="tiny", help="preset name or a config JSON path")
    init.add_argument("--out", required=True, help="output folder")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    init.add_argument("--corpus", nargs="*", default=[], metavar="FILE",
                      help="record files (.json/.jsonl) or text files whose texts train the tokenizer")
    init.set_defaults(func=_cmd_model_init)

    derive = sub.add_parser("derive", help="copy a model folder with another mask-extractor architecture (ablations)")
    derive.add_argument("src")
    derive.add_argument("--out", required=True)
    derive.add_argument("--levels", default=None, help="comma-separated feature levels 0..3 (res2..res5), e.g. 2")
    derive.add_argument("--no-position-token", action="store_true")
    derive.add_argument("--mask-from-box", action="store_true", help="pool over each region's box, not its mask")
    derive.add_argument("--keep-extractor", action="store_true",
                        help="keep the extractor weights the new architecture still has (default: fresh extractor)")
    derive.add_argument("--seed", type=int, default=0)
    derive.set_defaults(func=_cmd_model_derive)

    count = sub.add_parser("params", help="parameter counts per part of a preset (meta device)")
    count.add_argument("--preset", default="osprey-7b")
    count.set_defaults(func=_cmd_model_params)

    convert = sub.add_parser(
        "convert", help="convert an official checkpoint folder (sharded .bin/safetensors) into our folder format"
    )
    convert.add_argument("src", help="official checkpoint folder (e.g. Osprey-7b)")
    convert.add_argument("--out", required=True)
    convert.add_argument("--clip-weights", default=None, help="open_clip weight file for the vision tower")
    convert.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    convert.set_defaults(func=_cmd_model_convert)


def _cmd_model_keys(args: argparse.Namespace) -> int:
    from osprey.checkpoint import official_state_dict_shapes
    from osprey.config import OspreyConfig

    config = OspreyConfig.from_preset(args.preset)
    for name, shape in official_state_dict_shapes(config, official_names=not args.ours):
        print(f"{name}\t{','.join(str(s) for s in shape)}")
    return 0


def _cmd_model_params(args: argparse.Namespace) -> int:
    from osprey.checkpoint import parameter_counts
    from osprey.config import OspreyConfig

    for part, count in parameter_counts(OspreyConfig.from_preset(args.preset)).items():
        print(f"{part}\t{count}\t{count / 1e6:.2f} M")
    return 0


def _cmd_model_init(args: argparse.Namespace) -> int:
    from osprey.checkpoint import corpus_from_files, init_model_folder

    corpus = corpus_from_files(args.corpus) if args.corpus else None
    path = init_model_folder(args.preset, args.out, seed=args.seed, dtype=args.dtype, corpus=corpus)
    print(f"wrote {path}")
    return 0


def _cmd_model_derive(args: argparse.Namespace) -> int:
    from osprey.checkpoint import derive_model_folder

    changes: dict = {}
    if args.levels:
        changes["levels"] = tuple(int(x) for x in args.levels.split(","))
    if args.no_position_token:
        changes["use_position_token"] = False
    if args.mask_from_box:
        changes["mask_from_box"] = True
    path = derive_model_folder(args.src, args.out, extractor=changes, seed=args.seed, keep_extractor=args.keep_extractor)
    print(f"wrote {path}")
    return 0


def _cmd_model_convert(args: argparse.Namespace) -> int:
    import torch

    from osprey.checkpoint import load_pretrained, save_pretrained

    model, tokenizer, report = load_pretrained(args.src, clip_weights=args.clip_weights, dtype=getattr(torch, args.dtype))
    print(report.summary())
    save_pretrained(model, tokenizer, args.out)
    print(f"wrote {args.out}")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osprey", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_model_commands(subparsers)
    for entry in sorted(entry_points(group="osprey.cli"), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as exc:  # a folder's optional dependencies are missing: say so, don't hide it
            stub = subparsers.add_parser(entry.name, help=f"(unavailable: {exc})")
            stub.set_defaults(func=lambda _a, exc=exc, name=entry.name: _unavailable(name, exc))
            continue
        register(subparsers)
    return parser


def _unavailable(name: str, exc: Exception) -> int:
    print(f"osprey {name}: cannot load this command ({exc}). Install the project with its extras: "
          "pip install -e '.[all]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request at INFO: one line per region of `osprey eval --endpoint`, breaking the progress bars
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
