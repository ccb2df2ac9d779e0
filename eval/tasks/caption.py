"""`osprey eval caption`: region captioning (RefCOCOg) scored with the coco-caption toolkit."""

from __future__ import annotations

import argparse

from eval.backends import Query
from eval.datasets import load_captions
from eval.metrics.captions import caption_scores, require_java
from eval.metrics.text import official_answer
from eval.report import Report, bars, histogram
from eval.tasks.common import add_common_arguments, answer_queries, finish, limit, report_path

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="region captioning (RefCOCOg): METEOR, CIDEr, BLEU-1..4, ROUGE-L (pycocoevalcap; needs Java)",
        description="Caption each region (default prompt: `refcocog`) and score against the references with "
        "pycocoevalcap (PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr). Java is required: "
        "`apt-get install default-jre-headless`.",
    )
    p.add_argument(
        "--data", required=True, help="RefCOCOg-style COCO json with captions, or Osprey-format records"
    )
    add_common_arguments(p, default_task="refcocog")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    java = require_java()  # fail before spending model time
    items = limit(load_captions(args.data, args.images), args.limit)
    queries = [Query(it.key, it.image, args.task, it.height, it.width, it.segmentation) for it in items]
    answers, run_info = answer_queries(args, "caption", queries, {"task": args.task})
    preds = {it.key: official_answer(answers[it.key]["text"]) for it in items}
    corpus, per_item = caption_scores({it.key: it.target for it in items}, preds)
    summary = {name: 100.0 * corpus[name] for name in METRICS} | {"items": len(items)}
    rows = [
        {
            "key": it.key,
            "image": it.image,
            "prediction": preds[it.key],
            "references": it.target,
            **{m: per_item[it.key][m] for m in METRICS},
        }
        for it in items
    ]
    results = {
        "command": "caption",
        "data": str(args.data),
        "summary": summary,
        "run": run_info,
        "java": java,
        "note": "scores x100 (CIDEr too, as papers report it)",
        "items": rows,
    }
    finish(args, results)

    rep = Report(report_path(args), "Region captioning")
    rep.text(
        f"Data: `{args.data}`; model: `{run_info['backend']}`; prompt task: `{args.task}`; {len(items)} regions. "
        f"coco-caption toolkit (pycocoevalcap), PTB-tokenized; scores x100. Java: {java}."
    )
    rep.table(METRICS, [[summary[m] for m in METRICS]])
    rep.figure("metrics", bars(METRICS, [summary[m] for m in METRICS], "Caption metrics", "score x100"))
    rep.figure("cider", histogram([100 * r["CIDEr"] for r in rows], "CIDEr per region", "CIDEr x100"))
    rep.text("First regions:")
    rep.table(
        ["key", "prediction", "reference", "CIDEr x100"],
        [[r["key"], r["prediction"][:120], r["references"][0][:120], 100 * r["CIDEr"]] for r in rows[:10]],
    )
    rep.write()
    print(
        f"caption: METEOR {summary['METEOR']:.2f}  CIDEr {summary['CIDEr']:.2f}  ({len(items)} regions) -> {args.out}"
    )
    return 0
