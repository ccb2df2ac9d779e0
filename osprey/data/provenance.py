"""Which data a model was trained on, and whether an evaluation set shares its images.

`osprey data synth` makes image i a function of (seed, i) whatever `--n` is, and draws the splits as a
permutation of range(n); `--extra-train M` adds images n..n+M-1, all training images. Two generated datasets with
the same seed and settings but a different `--n` (or split fractions) therefore hold the same images under
different splits: the test split of `--n 6000` is mostly training images of `--n 20000`. The same `--n` with
different `--extra-train` keeps val and test as they are. `osprey train` records each training set in the model's
config (`training_data`), and `training_overlap` names the problem before an evaluation reports contaminated figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# Settings that only change how many images there are and how they are split, not what image i looks like;
# the first three draw the split (extra training images are appended after it).
_SPLIT_DRAW = ("n", "val_fraction", "test_fraction")
_SPLIT_ONLY = (*_SPLIT_DRAW, "extra_train")


def _images(config: dict[str, Any]) -> int:
    """How many images a generated dataset holds (osprey/ does not import data_tools' `SynthConfig.total`)."""
    return int(config.get("n", 0)) + int(config.get("extra_train", 0))


def dataset_identity(root: str | Path) -> dict[str, Any] | None:
    """{"generator", "config"} of a generated dataset (from its manifest), or None for any other folder."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "generator" not in manifest or "config" not in manifest:
        return None
    return {"generator": manifest["generator"], "config": manifest["config"]}


def training_entry(root: str | Path | None, split: str, stage: int) -> dict[str, Any]:
    """The `training_data` entry for one training run: the dataset's identity when generated, else its path."""
    identity = dataset_identity(root) if root is not None else None
    entry = dict(identity) if identity is not None else {"root": None if root is None else str(root)}
    return {**entry, "split": split, "stage": stage}


def merge_training_data(previous: tuple[dict[str, Any], ...], entry: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Earlier stages' entries plus this one, without repeating an identical entry."""
    return previous if entry in previous else (*previous, entry)


def training_overlap(training_data, data_root: str | Path, split: str) -> str | None:
    """A sentence naming how `split` of `data_root` overlaps the model's training data, or None when it does not
    (or when nothing is known: datasets that are not generated, models trained before this was recorded)."""
    evaluated = dataset_identity(data_root)
    if evaluated is None:
        return None
    for trained in training_data:
        if trained.get("generator") != evaluated["generator"] or "config" not in trained:
            continue
        a, b = trained["config"], evaluated["config"]
        if any(a.get(k) != b.get(k) for k in set(a) | set(b) if k not in _SPLIT_ONLY):
            continue  # other seed or settings: other images
        if all(a.get(k) == b.get(k) for k in _SPLIT_DRAW):  # the same split (extra images are training images)
            if split == trained.get("split"):
                return f"the model was trained on the {split} split of this dataset"
            continue  # the same dataset's held-out split
        return (f"the model was trained on the {trained.get('split')} split of `{evaluated['generator']} --n {a.get('n')}` "
                f"(seed {a.get('seed')}); this dataset (--n {b.get('n')}, same seed and settings) holds the same images "
                f"0..{min(_images(a), _images(b)) - 1} split differently, so its {split} split contains training "
                f"images: evaluate on the {split} split of --n {a.get('n')}")
    return None
