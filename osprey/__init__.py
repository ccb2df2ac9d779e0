"""Osprey: pixel-level region understanding with a multimodal LLM (model, tokens, prompts, mask codecs)."""

from pathlib import Path

from osprey.config import ExtractorConfig, OspreyConfig, VisionConfig

__all__ = ["BUILTIN_MODEL_DIR", "EXAMPLE_DIR", "ExtractorConfig", "OspreyConfig", "VisionConfig", "default_model_path"]
__version__ = "0.1.0"

# The project's own small model, trained by its own pipeline on the generated dataset (docs/builtin_model.md).
BUILTIN_MODEL_DIR = Path(__file__).parent / "assets" / "builtin"
# A held-out test image of the generated dataset (--n 20000, image 155) and its six regions as SAM
# automatic-mask-generator entries: the README's quick start sends them from any folder.
EXAMPLE_DIR = Path(__file__).parent / "assets" / "example"


def default_model_path() -> Path | None:
    """The model `osprey serve` and `osprey describe` use without --model, or None if it is not installed."""
    return BUILTIN_MODEL_DIR if (BUILTIN_MODEL_DIR / "config.json").is_file() else None
