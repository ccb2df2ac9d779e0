"""`--scoring likelihood` for `osprey eval classify` and `osprey eval ovseg`: each region's scores over a label list
from the model's own likelihood of every label as the answer (osprey.scoring, in-process, no generation), in place
of generating an answer and matching its text (`--scoring generate`, the official protocol and the default)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from eval.backends import Query, decode_region

SCORINGS = ("generate", "likelihood")


def add_scoring_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scoring", default="generate", choices=SCORINGS,
                   help="generate: the model answers and the answer is matched to the labels (official); "
                        "likelihood: every label is scored as the answer by the model's likelihood (mean "
                        "log-probability per token, softmax over the labels), in-process with --model")


def label_scores(args: argparse.Namespace, queries: Sequence[Query], labels: list[str]
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """Per query key, the (L,) mean log-probability per token of each label as the answer to the query's task;
    the run's description. One scoring pass per image (its regions together)."""
    from osprey.inference import OspreyPipeline
    from osprey.scoring import AnswerScorer

    if getattr(args, "endpoint", None) or not getattr(args, "model", None):
        raise ValueError("--scoring likelihood runs in-process: give --model DIR (not --endpoint)")
    pipe = OspreyPipeline.from_pretrained(args.model, device=args.device,
                                          dtype=None if args.dtype == "auto" else args.dtype)
    scorer = AnswerScorer(pipe)
    by_image: dict[tuple[str, str], list[Query]] = {}
    for query in queries:
        by_image.setdefault((query.image, query.task), []).append(query)
    out: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    for (image, task), group in by_image.items():
        encoded = pipe.encode_image(image)
        masks = np.stack([decode_region(q.segmentation, encoded.height, encoded.width) for q in group])
        scores = scorer.classify(encoded, masks, labels, task)
        out.update((q.key, scores.mean_logprob[i]) for i, q in enumerate(group))
    run = {"scoring": "likelihood", "model": args.model, "backend": f"{args.model} (likelihood)",
           "labels": len(labels), "items": len(queries), "answer_seconds": round(time.perf_counter() - start, 3)}
    return out, run


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Sum over equal-width confidence bins of (share of items) x |accuracy - mean confidence|."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = which == b
        if chosen.any():
            error += chosen.mean() * abs(correct[chosen].mean() - confidence[chosen].mean())
    return float(error)
