"""The transformers config class of an Osprey model folder, so that vLLM (which reads folders through AutoConfig)
can read ours: config.json holds the Llama fields at the top level (as the official folders do), so the config is
a `LlamaConfig` whose `model_type` is "osprey"; our full `OspreyConfig` rides along under `osprey` (our folders)."""

from __future__ import annotations

from transformers import LlamaConfig


class OspreyHFConfig(LlamaConfig):
    model_type = "osprey"
