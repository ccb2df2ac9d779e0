"""`osprey eval describe`: detailed region descriptions judged by an LLM against reference (GPT-4) answers.

Score = sum of our scores / sum of the reference's scores x100 (the official summary's ratio of means).
Reviews the judge writes without a readable score pair are recorded as errors and left out of both sums
(the official script would count them as -1 / -1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from eval.backends import Query
from eval.datasets import load_descriptions
from eval.judge import JudgeClient, review_prompt
from eval.metrics.judge_scores import parse_scores, relative_score
from eval.metrics.text import official_answer
from eval.report import Report, pyplot
from eval.runner import PartialResults, partial_path
from eval.tasks.common import add_common_arguments, answer_queries, finish, limit, report_path

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "describe",
        help="detailed region descriptions scored by an LLM judge (OpenAI-compatible endpoint)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        required=True,
        help="questions: the official questions.json (with --references/--context), one list of items "
        "(image, annotation, text, answer, context), or Osprey-format records",
    )
    p.add_argument(
        "--references", default=None, help="reference answers (official answers.json: question_id, text)"
    )
    p.add_argument(
        "--context", default=None, help="judge context per image (official prompt.json: image, prompt)"
    )
    p.add_argument(
        "--judge-url", required=True, help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1"
    )
    p.add_argument("--judge-model", default="gpt-4", help="judge model name")
    p.add_argument("--judge-api-key", default=None, help="judge API key (or set OPENAI_API_KEY)")
    p.add_argument("--judge-max-tokens", type=int, default=1024)
    add_common_arguments(p)
    p.set_defaults(func=run)


# The official answer generation puts "<image>.\n" before the overview line, which LLaVA's preprocessing turns
# into "<image>\n.\n" (the same opening as the `open_vocab` and `refcocog` prompts).
OFFICIAL_PREFIX = "<image>\n.\nThis provides an overview of the picture.\n"


def model_prompt(question: str) -> str:
    """The model's prompt for a judge question (its region written `<region>`), as the official script builds it."""
    return question if question.startswith("<image>") else OFFICIAL_PREFIX + question


def _score_figure(pairs: list[tuple[float, float]]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3.4))
    ax.scatter([p[0] for p in pairs], [p[1] for p in pairs], alpha=0.5)
    ax.plot([0, 10], [0, 10], color="grey", lw=0.8)
    ax.set_xlim(0, 10.5)
    ax.set_ylim(0, 10.5)
    ax.set_xlabel("reference (Assistant 1)")
    ax.set_ylabel("ours (Assistant 2)")
    ax.set_title("Judge scores per question")
    return fig


def run(args: argparse.Namespace) -> int:
    items = limit(load_descriptions(args.data, args.images, args.references, args.context), args.limit)
    queries = [Query(it.key, it.image, model_prompt(it.question), it.height, it.width, it.segmentation)
               for it in items]
    answers, run_info = answer_queries(args, "describe", queries)
    judge = JudgeClient(args.judge_url, args.judge_model, args.judge_api_key or os.environ.get("OPENAI_API_KEY"),
                        max_tokens=args.judge_max_tokens)
    reviews = _judge_answers(args, judge, items, answers, run_info)
    rows, pairs, errors = _score_rows(items, answers, reviews)
    summary = {
        "relative_score": relative_score(pairs) if pairs else float("nan"),
        "mean_reference": sum(p[0] for p in pairs) / len(pairs) if pairs else float("nan"),
        "mean_ours": sum(p[1] for p in pairs) / len(pairs) if pairs else float("nan"),
        "scored": len(pairs), "errors": errors, "items": len(items),
    }
    finish(args, {"command": "describe", "data": str(args.data), "summary": summary, "run": run_info,
                  "judge": {"url": judge.url, "model": args.judge_model}, "items": rows})
    partial_path(str(args.out) + ".reviews").unlink(missing_ok=True)
    _write_report(args, judge, run_info, summary, rows, pairs, errors)
    print(f"describe: relative score {summary['relative_score']:.2f} ({len(pairs)} scored, {errors} unparseable) "
          f"-> {args.out}")
    return 0


def _judge_answers(args: argparse.Namespace, judge: JudgeClient, items: list, answers: dict[str, dict],
                   run_info: dict) -> PartialResults:
    """The judge's review of every answer; resumable, in its own partial file."""
    from tqdm import tqdm

    reviews = PartialResults(partial_path(str(args.out) + ".reviews"),
                             {"judge": args.judge_model, "judge_url": judge.url, "answers": run_info["sampling"]})
    for it in tqdm([it for it in items if it.key not in reviews.done], desc="judging", unit="answer"):
        content = review_prompt(it.extra.get("context", ""), it.question or "", it.target,
                                official_answer(answers[it.key]["text"]))
        review = judge.review(content)
        reviews.append([{"key": it.key, "review": review, "scores": parse_scores(review)}])
    return reviews


def _score_rows(items: list, answers: dict[str, dict],
                reviews: PartialResults) -> tuple[list[dict], list[tuple[float, float]], int]:
    """(one row per item, the (reference, ours) score pairs of readable reviews, the unreadable count)."""
    rows, pairs, errors = [], [], 0
    for it in items:
        rev = reviews.done[it.key]
        scores = rev["scores"]
        if scores is None:
            errors += 1
        else:
            pairs.append((float(scores[0]), float(scores[1])))
        rows.append({"key": it.key, "image": it.image, "question": it.question, "reference": it.target,
                     "answer": official_answer(answers[it.key]["text"]), "review": rev["review"], "scores": scores,
                     "error": None if scores is not None else "unparseable review"})
    return rows, pairs, errors


def _write_report(args: argparse.Namespace, judge: JudgeClient, run_info: dict, summary: dict, rows: list[dict],
                  pairs: list[tuple[float, float]], errors: int) -> None:
    rep = Report(report_path(args), "Detailed region description (LLM judge)")
    rep.text(
        f"Data: `{args.data}`; model: `{run_info['backend']}`; judge: `{args.judge_model}` at `{judge.url}`. "
        "Relative score = sum(ours) / sum(reference) x100 over reviews with a readable score pair."
    )
    rep.table(
        ["relative score", "mean reference", "mean ours", "scored", "unparseable"],
        [[summary["relative_score"], summary["mean_reference"], summary["mean_ours"], len(pairs), errors]],
    )
    if pairs:
        rep.figure("scores", _score_figure(pairs))
    bad = [r for r in rows if r["error"]][:5]
    if bad:
        rep.text("Unparseable reviews (first lines):")
        rep.table(["key", "review"], [[r["key"], json.dumps(r["review"][:160])] for r in bad])
    rep.write()
