"""`osprey classify` (each region's probabilities over a label list) and `osprey query` (which regions are a text,
and how many): one image in-process, scored by likelihood (osprey.scoring; docs/classify.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def register(subparsers: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    classify = subparsers.add_parser(
        "classify", help="each region's probabilities over a label list, by likelihood (no generation)",
        description="Score every label as the answer to Osprey's category prompt for each region of IMAGE (mean "
                    "log-probability per token, softmax over the list) and print the most probable labels. "
                    "See docs/classify.md.", formatter_class=formatter)
    _image_arguments(classify)
    labels = classify.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated labels: circle,square,red mug")
    labels.add_argument("--labels-file", help="a text file with one label per line")
    classify.add_argument("--top-k", type=int, default=3, help="labels shown per region")
    classify.add_argument("--prompt", default="category",
                          help="the prompt the labels answer: a task name or a custom prompt containing <region>")
    classify.set_defaults(func=_cmd_classify)

    query = subparsers.add_parser(
        "query", help="which regions are a text, with a score each, and how many",
        description="Score each region of IMAGE with the probability of TEXT in a label list with a background "
                    "vocabulary (what else a region may be), and count those at or above the threshold. See "
                    "docs/classify.md.", formatter_class=formatter)
    _image_arguments(query)
    query.add_argument("--text", required=True, help="what to look for, e.g. circle")
    background = query.add_mutually_exclusive_group()
    background.add_argument("--vocabulary", help="comma-separated background labels: what else a region may be "
                                                 "(default: the model folder's vocabulary.txt)")
    background.add_argument("--vocabulary-file", help="background labels, one per line")
    query.add_argument("--threshold", type=float, default=None,
                       help="a region matches when its score reaches this (default: the threshold chosen on "
                            "validation data, osprey.scoring.DEFAULT_QUERY_THRESHOLD)")
    query.set_defaults(func=_cmd_query)


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file")
    parser.add_argument("--masks", nargs="+", required=True, metavar="FILE", help="PNG mask files or JSON region lists")
    parser.add_argument("--model", default=None, help="model folder (default: $OSPREY_MODEL or the built-in model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (default: the folder's)")
    parser.add_argument("--resize-masks", action="store_true",
                        help="resize masks of another size than the image (nearest) instead of refusing them")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """The label list of --labels or --labels-file (or --vocabulary / --vocabulary-file): stripped, none empty, none twice, at most MAX_LABELS."""
    from .schemas import MAX_LABELS

    text = Path(labels_file).read_text(encoding="utf-8").splitlines() if labels_file else labels.split(",")
    out = [label.strip() for label in text if label.strip()]
    if not out:
        raise ValueError("the label list is empty")
    if len(out) > MAX_LABELS:
        raise ValueError(f"{len(out)} labels; at most {MAX_LABELS}")
    repeated = sorted({label for label in out if out.count(label) > 1})
    if repeated:
        raise ValueError(f"labels given more than once: {', '.join(repeated)}")
    return out


def _cmd_classify(args: argparse.Namespace) -> int:
    try:
        labels = read_labels(args.labels, args.labels_file)
        if not 1 <= args.top_k:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    except (OSError, ValueError) as exc:
        print(f"osprey classify: {exc}", file=sys.stderr)
        return 2
    loaded = _load("classify", args)
    if loaded is None:
        return 2
    scorer, encoded, masks, _ = loaded
    scores = scorer.classify(encoded, masks, labels, args.prompt)
    rows = [{"index": q, "labels": [{"label": label, "probability": round(p, 6)}
                                    for label, p in scores.top(q, args.top_k)]} for q in range(len(masks))]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            ranked = "  ".join(f"{item['label']} {item['probability']:.3f}" for item in row["labels"])
            print(f"{row['index'] + 1:>3}  {ranked}")
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from osprey.scoring import DEFAULT_QUERY_THRESHOLD, VOCABULARY_FILE, default_vocabulary

    if args.threshold is None:
        args.threshold = DEFAULT_QUERY_THRESHOLD
    if not 0.0 <= args.threshold <= 1.0 or not args.text.strip():
        print("osprey query: --threshold must be in [0, 1] and --text not empty", file=sys.stderr)
        return 2
    loaded = _load("query", args)
    if loaded is None:
        return 2
    scorer, encoded, masks, model = loaded
    try:
        if args.vocabulary or args.vocabulary_file:
            vocabulary = read_labels(args.vocabulary, args.vocabulary_file)
        else:
            vocabulary = default_vocabulary(model)
            if vocabulary is None:
                raise ValueError(f"{model} has no {VOCABULARY_FILE}: give --vocabulary or --vocabulary-file")
        scores = scorer.query(encoded, masks, args.text, vocabulary)
    except (OSError, ValueError) as exc:
        print(f"osprey query: {exc}", file=sys.stderr)
        return 2
    matches = scores.matches(args.threshold)
    result = {"text": scores.text, "threshold": args.threshold, "count": int(matches.sum()),
              "results": [{"index": q, "match": bool(m), "score": round(float(s), 6)}
                          for q, (m, s) in enumerate(zip(matches, scores.scores))]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row in result["results"]:
            print(f"{row['index'] + 1:>3}  {'yes' if row['match'] else 'no ':<3}  {row['score']:.3f}")
        print(f"count: {result['count']} of {len(masks)} regions are {scores.text!r} (threshold {args.threshold})")
    return 0


def _load(command: str, args: argparse.Namespace):
    """-> (scorer, encoded image, masks (Q, H, W), model folder) or None after printing why not."""
    from osprey.inference import OspreyPipeline
    from osprey.scoring import AnswerScorer

    from .config import model_path_for
    from .describe import MaskFileError, load_masks

    model = model_path_for(command, args.model)
    if model is None:
        return None
    try:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as exc:
        print(f"osprey {command}: cannot read image {args.image}: {exc}", file=sys.stderr)
        return None
    try:
        regions = load_masks(args.masks, image.height, image.width, resize=args.resize_masks)
    except (MaskFileError, OSError) as exc:
        print(f"osprey {command}: {exc}", file=sys.stderr)
        return None
    for note in regions.notes:
        print(f"osprey {command}: note: {note}", file=sys.stderr)
    pipe = OspreyPipeline.from_pretrained(model, device=args.device, dtype=args.dtype)
    masks: np.ndarray = regions.masks
    return AnswerScorer(pipe), pipe.encode_image(image), masks, model
