"""`osprey eval short-answer`: exact-match accuracy of single-region questions with short reference answers.

The held-out check of a fine-tune on one's own labels (docs/finetune.md): every question of Osprey-format records
that names one region (the converted `--task short_answer` / `label_list` / `yes_no` records, or the generated
short-form data) is asked about that region as a custom prompt, as `osprey serve` asks it. An answer is right when
it equals the reference after lower-casing, dropping punctuation and a leading article; label lists ("red, striped")
are compared as sets of labels.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

from eval.backends import Query
from eval.datasets import load_descriptions
from eval.report import Report
from eval.tasks.common import add_common_arguments, answer_queries, finish, limit, report_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "short-answer",
        help="single-region questions with short answers (attributes, label lists, yes/no): exact-match accuracy",
        description="Ask every single-region question of Osprey-format records about its region (custom prompt) "
        "and compare the answer with the reference: lower-cased, punctuation and a leading article dropped, "
        "comma-separated label lists as sets. Reports accuracy overall and per question wording.",
    )
    p.add_argument("--data", required=True, help="Osprey-format records (e.g. `osprey data convert coco --task ...`)")
    add_common_arguments(p)
    p.set_defaults(func=run)


def normalize_short(text: str) -> frozenset[str]:
    """'The Red, striped.' -> {'red', 'striped'}: the answer's comma-separated labels, normalised."""
    labels = set()
    for part in text.lower().split(","):
        part = re.sub(r"[^a-z0-9: ]", " ", part.replace("</s>", ""))
        part = re.sub(r"^\s*(a|an|the)\s+", "", " ".join(part.split()))
        if part:
            labels.add(part)
    return frozenset(labels)


def wording(question: str) -> str:
    """The question with the region tag, as one group of the report (`What color is <region>?`)."""
    return question.split("\n")[-1].strip()


def run(args: argparse.Namespace) -> int:
    items = limit(load_descriptions(args.data, args.images), args.limit)
    queries = [Query(it.key, it.image, it.question, it.height, it.width, it.segmentation) for it in items]
    answers, run_info = answer_queries(args, "short_answer", queries)
    rows = []
    for it in items:
        answer = answers[it.key]["raw_text"]
        rows.append({"key": it.key, "image": it.image, "question": it.question, "answer": answer,
                     "reference": it.target, "correct": normalize_short(answer) == normalize_short(it.target)})
    by_wording: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_wording[wording(row["question"])].append(row["correct"])
    summary = {"accuracy": 100.0 * sum(r["correct"] for r in rows) / len(rows), "items": len(rows),
               "by_wording": {w: {"accuracy": 100.0 * sum(v) / len(v), "n": len(v)} for w, v in sorted(by_wording.items())}}
    finish(args, {"command": "short-answer", "data": str(args.data), "summary": summary, "run": run_info,
                  "items": rows})

    rep = Report(report_path(args), "Short answers about single regions")
    rep.text(f"Data: `{args.data}`; model: `{run_info['backend']}`; {len(rows)} questions; exact match after "
             "normalisation (label lists as sets). Accuracy x100.")
    rep.table(["question", "n", "accuracy"],
              [["all", len(rows), summary["accuracy"]]]
              + [[w, v["n"], v["accuracy"]] for w, v in summary["by_wording"].items()])
    rep.write()
    print(f"short-answer: accuracy {summary['accuracy']:.2f} ({len(rows)} questions) -> {args.out}")
    return 0
