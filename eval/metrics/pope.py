"""POPE yes/no metrics with the answer parsing of POPE's own `evaluate.py` (as used by Osprey)."""

from __future__ import annotations

from collections.abc import Sequence


def parse_yes_no(answer: str) -> str:
    """ "no" when the first sentence contains the word no/not/No (commas dropped), else "yes"."""
    text = answer.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    lowered = {w.lower() for w in words}
    return "no" if ("no" in lowered or "not" in lowered) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """predictions, labels: "yes"/"no" each. Accuracy, precision, recall, F1, yes-ratio in [0, 1], plus counts.

    Precision (recall) is 0 when no "yes" was predicted (is labelled), where POPE's script would divide by 0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no answers to score")
    for value in list(predictions) + list(labels):
        if value not in ("yes", "no"):
            raise ValueError(f"answers and labels must be 'yes' or 'no', got {value!r}")
    tp = sum(p == "yes" and l == "yes" for p, l in zip(predictions, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(predictions, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(predictions, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(predictions, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in predictions) / len(predictions),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
