"""Training for the three Osprey stages on DeepSpeed: typed YAML configs, one recipe, stage trainable sets.

    from train import Recipe, load_config
    Recipe(load_config("tiny_stage1", overrides=[(["max_steps"], 10)])).run()

Names are imported on first use, so `osprey --help` (which imports `train.cli`) stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "train.config", "LoraConfig": "train.config", "OptimConfig": "train.config",
    "TrainConfig": "train.config", "load_config": "train.config", "Recipe": "train.recipe",
    "STAGE_PARTS": "train.trainable", "set_trainable": "train.trainable",
}
__all__ = [  # the keys of _EXPORTS, spelled out so linters and IDEs can read them
    "STAGE_PARTS", "DataConfig", "LoraConfig", "OptimConfig", "Recipe", "TrainConfig", "load_config", "set_trainable",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
