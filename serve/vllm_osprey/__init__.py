"""Osprey on vLLM: the whole model (tower, projector, mask extractor, vLLM's own Llama) as an out-of-tree vLLM model.

`register` is the `vllm.general_plugins` entry point (pyproject.toml): vLLM calls it in every process it starts
(API server, engine core, workers) before it reads a model folder, so `vllm serve FOLDER` and our `VllmBackend`
both find the architecture `OspreyLlamaForCausalLM` that our model folders name. The modules that import vLLM
(`model`, `processor`, `backend`) are imported only by vLLM itself or by `osprey serve --backend vllm`;
`prompts` is pure Python (tested without vLLM). Design and use: docs/vllm.md.
"""

from __future__ import annotations

ARCHITECTURE = "OspreyLlamaForCausalLM"  # what osprey.checkpoint writes into config.json["architectures"]


def register() -> None:
    """vLLM plugin entry point: the folder's config class and the model class (imported lazily by vLLM)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .hf_config import OspreyHFConfig

    AutoConfig.register(OspreyHFConfig.model_type, OspreyHFConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "serve.vllm_osprey.model:OspreyVllmForCausalLM")
