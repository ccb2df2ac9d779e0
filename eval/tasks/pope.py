"""`osprey eval pope`: object-hallucination yes/no questions (POPE), answer parsing as POPE's evaluate.py."""

from __future__ import annotations

import argparse

from eval.backends import Query
from eval.datasets import load_pope
from eval.metrics.pope import parse_yes_no, pope_metrics
from eval.report import Report, pyplot
from eval.tasks.common import add_common_arguments, answer_queries, finish, limit, report_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pope",
        help="POPE object hallucination: accuracy, precision, recall, F1, yes-ratio",
        description="Image-level POPE files (JSON lines: image, text, label) are asked as `<image>\\n{question}` "
        "with no region, like the official script (over --endpoint: a full-image box region). "
        "Osprey-format records with yes/no answers about one region are asked about that region.",
    )
    p.add_argument(
        "--data", required=True, help="POPE JSON lines, or Osprey-format records with yes/no answers"
    )
    add_common_arguments(p)
    p.set_defaults(func=run)


def _confusion_figure(m: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.4, 3))
    grid = [[m["tp"], m["fn"]], [m["fp"], m["tn"]]]
    ax.imshow(grid, cmap="Blues", vmin=0)
    top = max(max(row) for row in grid) or 1
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(grid[i][j]),
                ha="center",
                va="center",
                color="white" if grid[i][j] > top / 2 else "black",
            )
    ax.set_xticks([0, 1], ["pred yes", "pred no"])
    ax.set_yticks([0, 1], ["label yes", "label no"])
    ax.set_title("POPE confusion")
    return fig


def run(args: argparse.Namespace) -> int:
    items = limit(load_pope(args.data, args.images), args.limit)
    # a region question carries its `<region>` tag and is a custom prompt; an image-level one is the bare text
    queries = [Query(it.key, it.image, it.question, it.height, it.width, it.segmentation) for it in items]
    answers, run_info = answer_queries(args, "pope", queries)
    preds = [parse_yes_no(answers[it.key]["raw_text"].lower()) for it in items]
    labels = [it.target for it in items]
    m = pope_metrics(preds, labels)
    summary = {k: (100.0 * v if isinstance(v, float) else v) for k, v in m.items()} | {"items": len(items)}
    rows = [
        {
            "key": it.key,
            "image": it.image,
            "question": it.question,
            "answer": answers[it.key]["raw_text"],
            "parsed": p,
            "label": it.target,
        }
        for it, p in zip(items, preds)
    ]
    results = {"command": "pope", "data": str(args.data), "summary": summary, "run": run_info, "items": rows}
    finish(args, results)

    rep = Report(report_path(args), "POPE (object hallucination)")
    rep.text(
        f'Data: `{args.data}`; model: `{run_info["backend"]}`; {len(items)} questions. An answer is "no" when '
        'its first sentence contains the word no/not (POPE\'s evaluate.py), else "yes". Values x100.'
    )
    rep.table(
        ["accuracy", "precision", "recall", "F1", "yes ratio", "TP", "FP", "TN", "FN"],
        [
            [
                summary[k]
                for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn")
            ]
        ],
    )
    rep.figure("confusion", _confusion_figure(m))
    rep.write()
    print(
        f"pope: acc {summary['accuracy']:.2f}  F1 {summary['f1']:.2f}  yes {summary['yes_ratio']:.2f} "
        f"({len(items)} questions) -> {args.out}"
    )
    return 0
