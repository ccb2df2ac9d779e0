"""`osprey eval ...`: the paper's evaluations (classify, ovseg, caption, describe, pope) and short-answer accuracy.

Each command runs the model in-process (`--model DIR`) or against a server (`--endpoint URL`), writes a
results JSON (`--out`) and a Markdown report with plots next to it, and resumes from `<out>.partial.jsonl`.
Heavy imports happen inside the commands so `osprey --help` stays fast.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="run the paper's evaluations (classify, ovseg, caption, describe, pope) and short-answer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    # the parsers only need argparse and light modules; each command's work is imported when it runs
    from eval.tasks import caption, classify, describe, ovseg, pope, short_answer

    for module in (classify, ovseg, caption, describe, pope, short_answer):
        module.add_parser(sub)
