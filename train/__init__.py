"""Training for the three Osprey stages on DeepSpeed: typed YAML configs, one recipe, stage trainable sets.

    from train import Recipe, load_config
    Recipe(load_config("tiny_stage1", overrides=[(["max_steps"], 10)])).run()
"""

from train.config import DataConfig, LoraConfig, OptimConfig, TrainConfig, load_config
from train.recipe import Recipe
from train.trainable import STAGE_PARTS, set_trainable

__all__ = [
           "STAGE_PARTS",
           "DataConfig",
           "LoraConfig",
           "OptimConfig",
           "Recipe",
           "TrainConfig",
           "load_config",
           "set_trainable",
]
