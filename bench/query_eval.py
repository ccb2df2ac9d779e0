"""Label-list classification and text-query counting by likelihood (osprey.scoring) on a generated dataset's split.

    python -m bench.query_eval --data data/synth --split val --limit 100 --out bench/results/query_eval_val.json
    python -m bench.query_eval --data data/synth --split test --limit 100 \
        --thresholds-from bench/results/query_eval_val.json --out bench/results/query_eval_test.json

Per image of `stage2_categories` (all its object regions, ground-truth masks):
- classification: each region's probabilities over the dataset's categories (the label list); top-1 accuracy and
  the expected calibration error of the top-1 probability (15 equal-width bins);
- queries, one per (image, category) pair for every category (absent ones too, whose right count is 0), scored two
  ways: `label_list`, the category's probability in the label list above (the query against the other categories
  as background: what /v1/regions/query serves), and `yes_no`, P(yes) to "Is there a {category} in <region>?".
  A region matches when its score reaches the threshold; reported: the share of pairs whose count is exactly right,
  region-level precision and recall, and the ECE of the score as P(region is the category).
Without --threshold / --thresholds-from the threshold of each method is chosen on this split (the best exact-count
share over 0.01..0.99, ties to the better F1): run on val for that, then on test with the values chosen there.
The raw scores go beside the JSON (.npz); `--scores` recomputes the metrics from them without the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.eval_all import write_atomic
from bench.region_eval import split_records
from eval.tasks.likelihood import expected_calibration_error

METHODS = ("yes_no", "label_list")
THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


def collect(pipe, data: Path, split: str, limit: int | None) -> dict:
    """Scores of every region of the first `limit` images: label-list probabilities and P(yes) per category."""
    from osprey.data.records import record_masks
    from osprey.data.samples import region_descriptions
    from osprey.scoring import AnswerScorer

    records = list(split_records(data, split, "stage2_categories", limit))
    categories = sorted({label for record in records for _, label in region_descriptions(record)})
    scorer = AnswerScorer(pipe)
    truth, probabilities, yes, image_of = [], [], [], []
    start = time.perf_counter()
    for number, record in enumerate(tqdm(records, desc=f"query_eval {split}", leave=False)):
        masks = record_masks(record)
        encoded = pipe.encode_image(data / record.file_name)
        labels = dict(region_descriptions(record))
        truth += [categories.index(labels[k + 1]) for k in range(len(masks))]
        probabilities.append(scorer.classify(encoded, masks, categories).probabilities)
        yes.append(np.stack([q.scores for q in scorer.yes_probabilities(encoded, masks, categories)], axis=1))
        image_of += [number] * len(masks)
    return {"categories": categories, "truth": np.array(truth), "label_list": np.concatenate(probabilities),
            "yes_no": np.concatenate(yes), "image": np.array(image_of), "images": len(records),
            "seconds": time.perf_counter() - start}


def classification(scores: dict) -> dict:
    probabilities, truth = scores["label_list"], scores["truth"]
    top = probabilities.argmax(axis=1)
    correct = top == truth
    return {"top1": float(correct.mean()), "ece": expected_calibration_error(probabilities.max(axis=1), correct),
            "mean_true_probability": float(probabilities[np.arange(len(truth)), truth].mean()),
            "regions": len(truth)}


def counting(scores: dict, method: str, threshold: float) -> dict:
    """Exact-count share over (image, category) pairs, region-level precision/recall, ECE of the score."""
    score, truth, image = scores[method], scores["truth"], scores["image"]
    is_category = truth[:, None] == np.arange(score.shape[1])[None, :]  # (regions, categories)
    match = score >= threshold
    exact = []
    for number in range(scores["images"]):
        rows = image == number
        exact += (match[rows].sum(axis=0) == is_category[rows].sum(axis=0)).tolist()
    true_positive = int((match & is_category).sum())
    precision = true_positive / max(int(match.sum()), 1)
    recall = true_positive / max(int(is_category.sum()), 1)
    return {"threshold": float(threshold), "count_exact": float(np.mean(exact)), "pairs": len(exact),
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "ece": expected_calibration_error(score.ravel(), is_category.ravel())}


def choose_threshold(scores: dict, method: str) -> float:
    results = [counting(scores, method, t) for t in THRESHOLDS]
    best = max(results, key=lambda r: (r["count_exact"], r["f1"]))
    return best["threshold"]


def _save_scores(path: Path, scores: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **{key: np.asarray(value) for key, value in scores.items()})
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="an `osprey data synth` folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    parser.add_argument("--limit", type=int, default=60, help="images (default 60)")
    parser.add_argument("--threshold", type=float, action="append", default=None, metavar="T",
                        help="query threshold per method, in the order yes_no, label_list (default: chosen here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (default float32: CPUs run bf16 matmuls slowly)")
    parser.add_argument("--thresholds-from", type=Path, default=None, metavar="VAL.json",
                        help="take the thresholds from a results file of this script (run on val)")
    parser.add_argument("--scores", type=Path, default=None, metavar="FILE.npz",
                        help="reuse the scores an earlier run saved (beside its --out) instead of scoring again")
    parser.add_argument("--out", required=True, type=Path, help="results JSON (the raw scores go beside it, .npz)")
    args = parser.parse_args(argv)

    from osprey import BUILTIN_MODEL_DIR
    from osprey.data.provenance import training_overlap
    from osprey.inference import OspreyPipeline

    model = args.model or str(BUILTIN_MODEL_DIR)
    pipe = OspreyPipeline.from_pretrained(model, device=args.device, dtype=args.dtype)
    torch.set_num_threads(args.threads)
    contamination = training_overlap(pipe.config.training_data, args.data, args.split)
    if contamination:
        print(f"warning: {contamination}", file=sys.stderr, flush=True)
    if args.scores:  # the scores of an earlier run: only the thresholds and metrics are recomputed
        with np.load(args.scores) as saved:
            scores = {key: saved[key] for key in saved.files}
        scores = {**scores, "categories": list(scores["categories"]), "images": int(scores["images"]),
                  "seconds": float(scores["seconds"])}
    else:
        scores = collect(pipe, args.data, args.split, args.limit)
        _save_scores(args.out.with_suffix(".npz"), scores)
    if args.thresholds_from:
        chosen = json.loads(args.thresholds_from.read_text())["queries"]
        args.threshold = [chosen[method]["threshold"] for method in METHODS]
    thresholds = args.threshold or [choose_threshold(scores, method) for method in METHODS]
    if len(thresholds) != len(METHODS):
        parser.error(f"give --threshold once per method ({', '.join(METHODS)}) or not at all")
    results = {
        "data": str(args.data), "split": args.split, "model": model, "images": scores["images"],
        "categories": scores["categories"], "seconds": round(scores["seconds"], 1),
        "thresholds_chosen_here": args.threshold is None, "warning": contamination or None,
        "classification": classification(scores),
        "queries": {method: counting(scores, method, t) for method, t in zip(METHODS, thresholds)},
    }
    write_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
