"""The FLOP count behind MFU (train.metrics.LMFlops) against torch's own FLOP counter on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from train.metrics import LMFlops

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


def _measured(lm, ids: torch.Tensor) -> dict[str, int]:
    """Matrix-multiply FLOPs of one forward + backward, as torch counts them (eager attention: bmm)."""
    # Gradients must reach the LM's inputs, as they reach the image and region tokens in Osprey's stages.
    embeds = lm.get_input_embeddings()(ids).detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        lm(inputs_embeds=embeds, labels=ids).loss.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"linear": counts.get("aten.mm", 0) + counts.get("aten.addmm", 0), "attention": counts.get("aten.bmm", 0)}


@pytest.mark.parametrize("lora", [False, True])
def test_step_flops_match_torch_flop_counter(lora):
    lm = _tiny_llama()
    if lora:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
    else:
        lm.requires_grad_(True)
    ids = torch.randint(3, 96, (2, 10))
    flops = LMFlops.of(lm, weights_train=not lora)
    assert (flops.adapter_params > 0) == lora
    parts = flops.breakdown([10, 10], head_positions=20)
    measured = _measured(lm, ids)
    assert parts["body"] + parts["head"] + parts["adapters"] == measured["linear"]
    # eager attention computes the whole score matrix; the count keeps the causal half (and the diagonal)
    assert parts["attention"] == measured["attention"] * (10 + 1) / (2 * 10)


def test_head_counted_only_where_it_runs():
    flops = LMFlops.of(_tiny_llama(), weights_train=True)
    every = flops.step([10, 7], head_positions=17)
    trained = flops.step([10, 7], head_positions=3)
    assert every - trained == pytest.approx(6 * flops.head_params * 14)
    assert flops.body_params == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)  # q, o; k, v (GQA); gate, up, down
