"""Region-captioning metrics from the coco-caption toolkit (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L, CIDEr.

METEOR and the PTB tokenizer run Java programs shipped inside pycocoevalcap, so a Java runtime is required.
"""

from __future__ import annotations

import contextlib
import functools
import io
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

JAVA_HELP = (
    "the coco-caption toolkit (pycocoevalcap) needs a Java runtime for its PTB tokenizer and METEOR, and "
    "`java` was not found on PATH. Install one, e.g. on Debian/Ubuntu: `sudo apt-get install -y "
    "default-jre-headless` (conda: `conda install -c conda-forge openjdk`), check with `java -version`, then rerun."
)


def java_version() -> str | None:
    """The first line of `java -version`, or None when no working Java runtime is on PATH."""
    java = shutil.which("java")
    if java is None:
        return None
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[0] if lines else "java"


def require_java() -> str:
    """Raise a RuntimeError explaining how to install Java when it is missing; else return its version line."""
    version = java_version()
    if version is None:
        raise RuntimeError(JAVA_HELP)
    return version


def caption_scores(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Corpus scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr; raw toolkit scale, CIDEr ~0-10) and per-item scores.

    references: item id -> one or more reference captions; predictions: item id -> caption. Both are
    PTB-tokenized first, as `COCOEvalCap` does.
    """
    if set(references) != set(predictions):
        missing = sorted(set(references) ^ set(predictions))[:5]
        raise ValueError(
            f"references and predictions must cover the same ids; differing ids include {missing}"
        )
    if not predictions:
        raise ValueError("no captions to score")
    for key, refs in references.items():
        if not refs:
            raise ValueError(f"item {key!r} has no reference caption")
    require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    corpus: dict[str, float] = {}
    per_item: dict[str, dict[str, float]] = {k: {} for k in gts}
    keys = list(gts)
    for scorer, names in _scorers():
        with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its length statistics
            score, scores = scorer.compute_score({k: gts[k] for k in keys}, {k: res[k] for k in keys})
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, s, item_scores in zip(names, score, scores):
            corpus[name] = float(s)
            for k, v in zip(keys, item_scores):
                per_item[k][name] = float(v)
    return corpus, per_item


@functools.lru_cache(maxsize=1)
def _scorers() -> tuple[tuple[Any, list[str]], ...]:
    """The toolkit's scorers, built once per process: METEOR starts a JVM that loads its paraphrase
    tables (seconds), so later calls reuse it."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    return (
        (Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]),
        (Meteor(), ["METEOR"]),
        (Rouge(), ["ROUGE-L"]),
        (Cider(), ["CIDEr"]),
    )
