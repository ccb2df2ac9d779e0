"""The decoder layer's pieces around attention as torch.compile'd functions of tensors (CUDA only).

A 7B decoding step of eager transformers modules launches ~30 small elementwise kernels per layer (RMSNorm's five,
rotary's ten, the activation, residual adds, casts): at one row they took ~2.7 ms of a 9.3 ms step on an H100. The
same math compiled by Inductor fuses them into the GEMMs' neighbours. The functions take weights as tensors, not
modules, so one compiled graph serves every layer (no recompilation per layer), with dynamic row counts.
The math is transformers' LlamaRMSNorm / apply_rotary_pos_emb / LlamaMLP, written out; eager CPU runs keep the
modules themselves (osprey.engine.forward).

The query, key and value projections run as one product, and the MLP's gate and up projections as another (as
vLLM's merged projections do): at a few rows a product reads its weights and little else, and one large read runs
closer to the memory bandwidth than three small ones. The merged weights are stored once: the modules' own weights
become views into them, so nothing is held twice and the modules compute as before.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

__all__ = ["CompiledLayers", "MergedWeights", "compiled_layers_agree", "merge_projections", "plain_linears"]

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


@dataclass(frozen=True)
class MergedWeights:
    """One layer's projections merged along their output dimension (biases likewise, or None)."""
    qkv: torch.Tensor  # (H*d + 2*Hkv*d, D): query, key, value rows
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor  # (2*I, D): gate rows, then up rows
    gate_up_bias: torch.Tensor | None


def _merged(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The modules' weights (and biases) in one tensor each; each module's own becomes a view into it."""
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = torch.cat([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        if bias is not None:
            m.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


# a layer merged once stays merged: every engine made over the same model (a session per call) reuses its weights
_MERGED: weakref.WeakKeyDictionary[nn.Module, MergedWeights] = weakref.WeakKeyDictionary()


def _still_views(modules: list[nn.Linear], weight: torch.Tensor) -> bool:
    """The modules' weights still lie in `weight`, in order (no one has replaced a module's parameter since)."""
    start = 0
    for m in modules:
        if m.weight.data_ptr() != weight[start].data_ptr():
            return False
        start += m.weight.shape[0]
    return start == weight.shape[0]


def merge_projections(model: nn.Module) -> dict[nn.Module, MergedWeights]:
    """Each decoder layer's q/k/v and gate/up weights merged (plain nn.Linear modules only, see `plain_linears`)."""
    merged, new = {}, False
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_modules, gate_up_modules = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        known = _MERGED.get(layer)
        if known is None or not (_still_views(qkv_modules, known.qkv) and _still_views(gate_up_modules, known.gate_up)):
            known = _MERGED[layer] = MergedWeights(*_merged(qkv_modules), *_merged(gate_up_modules))
            new = True
        merged[layer] = known
    if new and known.qkv.is_cuda:  # the separate weights' blocks back to the device, for the KV pool planned before
        torch.cuda.empty_cache()
    return merged


def _qkv(hidden, norm_weight, eps: float, w_qkv, b_qkv, cos, sin, heads: int, kv_heads: int, dim: int):
    normed = _rms_norm(hidden, norm_weight, eps)
    query, key, value = F.linear(normed, w_qkv, b_qkv).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    query, key = apply_rotary_pos_emb(query.reshape(-1, heads, dim), key.reshape(-1, kv_heads, dim), cos, sin,
                                      unsqueeze_dim=1)
    return query, key, value.reshape(-1, kv_heads, dim)


def _finish(hidden, attention, wo, bo, norm_weight, eps: float, w_gate_up, b_gate_up, w_down, b_down, act):
    hidden = hidden + F.linear(attention, wo, bo)
    normed = _rms_norm(hidden, norm_weight, eps)
    gate, up = F.linear(normed, w_gate_up, b_gate_up).chunk(2, dim=-1)
    return hidden + F.linear(act(gate) * up, w_down, b_down)


@functools.cache
def _compiled() -> tuple:
    """Compiled once per process (dynamic row counts); every layer and every engine reuses them."""
    return torch.compile(_qkv, dynamic=True), torch.compile(_finish, dynamic=True)


class CompiledLayers:
    def __init__(self, forward, merged: dict[nn.Module, MergedWeights], compiled: bool = True) -> None:
        self.heads, self.kv_heads, self.dim = forward.num_heads, forward.num_kv_heads, forward.head_dim
        self.merged = merged
        self._qkv, self._finish = _compiled() if compiled else (_qkv, _finish)

    def qkv(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        weights, norm = self.merged[layer], layer.input_layernorm
        return self._qkv(hidden, norm.weight, norm.variance_epsilon, weights.qkv, weights.qkv_bias, cos, sin,
                         self.heads, self.kv_heads, self.dim)

    def finish(self, layer, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        weights, attn, norm, mlp = self.merged[layer], layer.self_attn, layer.post_attention_layernorm, layer.mlp
        return self._finish(hidden, attention, attn.o_proj.weight, attn.o_proj.bias, norm.weight,
                            norm.variance_epsilon, weights.gate_up, weights.gate_up_bias, mlp.down_proj.weight,
                            mlp.down_proj.bias, mlp.act_fn)


def compiled_layers_agree(forward, merged: dict[nn.Module, MergedWeights], layer, cos_sin) -> CompiledLayers | None:
    """Compile the pieces (rows 1 and 3) and compare them with the eager modules on `layer`; None (logged) if
    compiling fails or the results differ by more than bf16 rounding, so decoding keeps the eager modules."""
    compiled, eager = CompiledLayers(forward, merged), CompiledLayers(forward, merged, compiled=False)
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
