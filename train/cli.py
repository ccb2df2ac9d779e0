"""`osprey train`: run a training stage from a YAML config, and `osprey train plot` for its metrics log."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  osprey model init --preset tiny --out runs/tiny/init
  osprey data synth --out data/synth --n 2000
  osprey train --stage 1 --config tiny_stage1            # a file in train/configs/ or a path
  osprey train --stage 1 --config tiny_stage1 --resume   # continue the newest checkpoint exactly
  osprey train --stage 3 --config osprey7b_stage3 --set optim.lr=2e-5 --set data.root=/data/osprey
  deepspeed --num_gpus 8 --no_local_rank $(which osprey) train --stage 3 --config osprey7b_stage3
  osprey train plot runs/tiny/stage1/metrics.jsonl --out curves.png
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train Osprey stage 1, 2 or 3 with DeepSpeed (GPU, or CPU for small models)",
        description="Train one Osprey stage from a YAML config (see docs/train.md). Runs single-process on CPU or "
        "one GPU as is; launch with `deepspeed` or `torchrun` for several GPUs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], help="stage; must agree with the config's `stage`")
    parser.add_argument("--config", help="YAML config: a path or the name of a file in train/configs/")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--max-steps", type=int, help="override max_steps")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="override time_limit: fit the schedule into this many seconds of training (0: none)")
    parser.add_argument("--output", help="override output_dir")
    parser.add_argument("--model", help="override model (start folder or preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, dotted, value parsed as YAML (repeatable): --set optim.lr=2e-5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=_cmd_train)

    sub = parser.add_subparsers(dest="train_command", metavar="{plot,clip,text-tower}")
    plot = sub.add_parser("plot", help="plot loss / lr / throughput of a metrics.jsonl log to a PNG")
    plot.add_argument("log", help="metrics.jsonl written by a run")
    plot.add_argument("--out", required=True, help="output PNG")
    plot.set_defaults(func=_cmd_plot)

    from train.clip_pretrain import ClipPretrainConfig

    defaults = ClipPretrainConfig(data="", tokenizer="", out="")
    clip = sub.add_parser(
        "clip", help="pretrain a preset's vision tower CLIP-style (open_clip) on a dataset's captions",
        description="Contrastive image-caption pretraining of the preset's open_clip vision tower with a small text "
        "tower, for models without a pretrained CLIP (the built-in model). Writes OUT/open_clip.safetensors, which "
        "stage configs load with clip_weights=.",
        epilog="example:\n  osprey train clip --data data/synth --tokenizer runs/builtin/init --out runs/builtin/clip",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    clip.add_argument("--data", required=True, help="a generated dataset folder (its stage-1 captions are used)")
    clip.add_argument("--tokenizer", required=True, help="a model folder whose tokenizer encodes the captions")
    clip.add_argument("--out", required=True, help="output folder")
    clip.add_argument("--preset", default=defaults.preset, help="preset whose vision tower is trained")
    for name in ("steps", "batch_size", "warmup_steps", "context_length", "text_width", "text_heads", "text_layers",
                 "num_workers", "seed", "save_steps", "log_steps"):
        clip.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    clip.add_argument("--lr", type=float, default=defaults.lr)
    clip.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    clip.add_argument("--region-weight", type=float, default=defaults.region_weight,
                      help="weight of the region-phrase contrastive loss (0: image-caption only)")
    clip.add_argument("--category-weight", type=float, default=defaults.category_weight,
                      help="weight of the loss between regions and their category names (0: none)")
    clip.add_argument("--region-levels", choices=("all", "final"), default=defaults.region_levels,
                      help="region embedding from every level's pooled features through per-level linear maps (all, "
                           "as the mask extractor reads them) or from the last map through the CLIP head (final)")
    clip.add_argument("--split", default=defaults.split)
    clip.add_argument("--time-limit", type=float, default=defaults.time_limit,
                      help="fit the schedule into this many seconds of training and write the weights (0: no "
                           "limit; as `osprey train --time-limit`)")
    clip.add_argument("--init", metavar="WEIGHTS", help="open_clip weights to start from (an earlier run's "
                      "open_clip.safetensors; the region level head starts fresh), e.g. to carry on a run whose "
                      "checkpoint is gone")
    clip.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    clip.add_argument("--no-progress", dest="progress", action="store_false")
    clip.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under OUT/checkpoints")
    clip.set_defaults(func=_cmd_clip)
    _register_text_tower(sub)


def _register_text_tower(sub: argparse._SubParsersAction) -> None:
    from train.text_tower import TextTowerTrainConfig

    defaults = TextTowerTrainConfig(data="", model="", out="")
    parser = sub.add_parser(
        "text-tower", help="train a text tower and region head for a model's frozen vision tower (LiT-style)",
        description="Locked-image tuning for region-text search (docs/search.md): the model's vision tower stays "
        "frozen; a small open_clip text tower and a region head over the mask-pooled levels are trained "
        "contrastively on the dataset's regions and their category, colour and referring texts. Writes "
        "OUT/region_text.json + OUT/region_text.safetensors; copy both into the model folder to give it a text space.",
        epilog="example:\n  osprey train text-tower --data data/synth --model osprey/assets/builtin --out runs/lit",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a generated dataset folder (osprey data synth)")
    parser.add_argument("--model", required=True, help="the model folder: its vision tower (frozen) and tokenizer")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default=defaults.split)
    for name in ("max_images", "val_images", "steps", "batch_size", "warmup_steps", "context_length", "text_width",
                 "text_heads", "text_layers", "seed", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--name", default=defaults.name, help="the space's name (with the model's)")
    parser.set_defaults(func=_cmd_text_tower)


def _cmd_text_tower(args: argparse.Namespace) -> int:
    from train.text_tower import config_from_args, train_text_tower

    try:
        weights = train_text_tower(config_from_args(args))
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"osprey train text-tower: {exc}") from exc
    print(f"wrote {weights}")
    return 0


def resolve_config(args: argparse.Namespace):
    import yaml

    from train.config import load_config, parse_override, resolve_config_path

    if not args.config:
        raise SystemExit("osprey train: --config is required (a YAML file or a name in train/configs/)")
    path = resolve_config_path(args.config)
    raw = yaml.safe_load(path.read_text()) or {}
    if args.stage is not None:
        if raw.get("stage", args.stage) != args.stage:
            raise SystemExit(f"osprey train: --stage {args.stage} contradicts stage: {raw['stage']} in {path}")
        raw["stage"] = args.stage
    overrides = [parse_override(text) for text in args.overrides]
    for key, value in (("max_steps", args.max_steps), ("time_limit", args.time_limit), ("output_dir", args.output),
                       ("model", args.model)):
        if value is not None:
            overrides.append(([key], value))
    return load_config(raw=raw, overrides=overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    try:
        cfg = resolve_config(args)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"osprey train: {exc}") from exc
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from train.recipe import Recipe

    try:
        final = Recipe(cfg).run(resume=args.resume)
    except FileExistsError as exc:
        raise SystemExit(f"osprey train: {exc}") from exc
    print(f"wrote {final}")
    return 0


def _cmd_clip(args: argparse.Namespace) -> int:
    from train.clip_pretrain import config_from_args
    from train.clip_recipe import train_clip

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        weights = train_clip(config_from_args(args), resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        raise SystemExit(f"osprey train clip: {exc}") from exc
    print(f"wrote {weights}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from train.metrics import plot_log

    print(f"wrote {plot_log(args.log, args.out)}")
    return 0
