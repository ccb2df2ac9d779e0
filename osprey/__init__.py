"""Osprey: pixel-level region understanding with a multimodal LLM (model, tokens, prompts, mask codecs)."""

from osprey.config import ExtractorConfig, OspreyConfig, VisionConfig

__all__ = ["OspreyConfig", "VisionConfig", "ExtractorConfig"]
__version__ = "0.1.0"
