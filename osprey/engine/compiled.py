"""The decoder layer's pieces around attention as torch.compile'd functions of tensors (CUDA only).

A 7B decoding step of eager transformers modules launches ~30 small elementwise kernels per layer (RMSNorm's five,
rotary's ten, the activation, residual adds, casts): at one row they took ~2.7 ms of a 9.3 ms step on an H100. The
same math compiled by Inductor fuses them into the GEMMs' neighbours. The functions take weights as tensors, not
modules, so one compiled graph serves every layer (no recompilation per layer), with dynamic row counts.
The math is transformers' LlamaRMSNorm / apply_rotary_pos_emb / LlamaMLP, written out; eager CPU runs keep the
modules themselves (osprey.engine.forward).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

__all__ = ["CompiledLayers", "compiled_layers_agree", "plain_linears"]

log = logging.getLogger(__name__)


def plain_linears(model: nn.Module) -> bool:
    """Every projection is a plain nn.Linear (not an unmerged LoRA wrapper or a quantised layer)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return all(type(getattr(layer.self_attn, name)) is nn.Linear for layer in model.layers for name in names) and all(
        type(getattr(layer.mlp, name)) is nn.Linear for layer in model.layers for name in ("gate_proj", "up_proj",
                                                                                          "down_proj"))


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = hidden.dtype
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _qkv(hidden, norm_weight, eps: float, wq, bq, wk, bk, wv, bv, cos, sin, heads: int, kv_heads: int, dim: int):
    normed = _rms_norm(hidden, norm_weight, eps)
    query = F.linear(normed, wq, bq).view(-1, heads, dim)
    key = F.linear(normed, wk, bk).view(-1, kv_heads, dim)
    value = F.linear(normed, wv, bv).view(-1, kv_heads, dim)
    query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
    return query, key, value


def _finish(hidden, attention, wo, bo, norm_weight, eps: float, w_gate, b_gate, w_up, b_up, w_down, b_down, act):
    hidden = hidden + F.linear(attention, wo, bo)
    normed = _rms_norm(hidden, norm_weight, eps)
    return hidden + F.linear(act(F.linear(normed, w_gate, b_gate)) * F.linear(normed, w_up, b_up), w_down, b_down)


@functools.cache
def _compiled() -> tuple:
    """Compiled once per process (dynamic row counts); every layer and every engine reuses them."""
    return torch.compile(_qkv, dynamic=True), torch.compile(_finish, dynamic=True)


class CompiledLayers:
    def __init__(self, forward, compiled: bool = True) -> None:
        self.heads, self.kv_heads, self.dim = forward.num_heads, forward.num_kv_heads, forward.head_dim
        self._qkv, self._finish = _compiled() if compiled else (_qkv, _finish)

    def qkv(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        attn, norm = layer.self_attn, layer.input_layernorm
        return self._qkv(hidden, norm.weight, norm.variance_epsilon, attn.q_proj.weight, attn.q_proj.bias,
                         attn.k_proj.weight, attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias, cos, sin,
                         self.heads, self.kv_heads, self.dim)

    def finish(self, layer, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        attn, norm, mlp = layer.self_attn, layer.post_attention_layernorm, layer.mlp
        return self._finish(hidden, attention, attn.o_proj.weight, attn.o_proj.bias, norm.weight,
                            norm.variance_epsilon, mlp.gate_proj.weight, mlp.gate_proj.bias, mlp.up_proj.weight,
                            mlp.up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias, mlp.act_fn)


def compiled_layers_agree(forward, layer, cos_sin) -> CompiledLayers | None:
    """Compile the pieces (rows 1 and 3) and compare them with the eager modules on `layer`; None (logged) if
    compiling fails or the results differ by more than bf16 rounding, so decoding keeps the eager modules."""
    compiled, eager = CompiledLayers(forward), CompiledLayers(forward, compiled=False)
    weight = layer.self_attn.q_proj.weight
    try:
        for rows in (1, 3):
            hidden = torch.randn(rows, weight.shape[1], device=weight.device).to(weight.dtype)
            attention = torch.randn(rows, weight.shape[0], device=weight.device).to(weight.dtype)
            cos, sin = cos_sin(hidden, torch.arange(rows, device=weight.device))
            pairs = list(zip(compiled.qkv(layer, hidden, cos, sin), eager.qkv(layer, hidden, cos, sin)))
            pairs.append((compiled.finish(layer, hidden, attention), eager.finish(layer, hidden, attention)))
            for ours, reference in pairs:
                scale = reference.float().abs().max().item() + 1e-6
                if not (ours.float() - reference.float()).abs().max().item() <= 0.02 * scale:
                    log.warning("compiled layer pieces differ from the modules: decoding with the eager modules")
                    return None
    except Exception as exc:  # noqa: BLE001 - no compiler, no Triton, an unsupported op: stay eager
        log.warning("torch.compile of the layer pieces failed (%s): decoding with the eager modules", exc)
        return None
    return compiled
