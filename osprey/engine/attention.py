"""Attention in two parts merged by log-sum-exp: a shared prefix read once per image, and each row's own suffix.

Every region row of one image attends over the same prefix (system prompt, 1024 image tokens, text before the
region): its keys and values are stored once and read once per decoding step for all of that image's rows, as
one query block. Each row's suffix (its region tokens, question and generated tokens) is attended separately;
the two partial softmaxes are combined exactly through their log-sum-exps, so the result equals attention over
the concatenation.

`attend` computes one part with two batched matmuls. On CUDA the inputs stay bf16 and cuBLAS accumulates and
writes the scores in fp32 (`bmm(..., out_dtype=float32)`), the probabilities go back to bf16 for the second
product, as flash attention does. Unlike the fused SDPA kernels, cuBLAS spreads a handful of long key rows over the
whole GPU, which is the decoding case: 1 to 64 query rows per image against ~1,100 prefix keys (the
memory-efficient kernel ran this 3-4x slower than the bytes it reads allow on an H100). Elsewhere (CPU) the same
math runs in fp32.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

__all__ = ["attend", "length_bias", "merge"]

NEG_INF = float("-inf")


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """query (B, H, M, d), key/value (B, H, N, d), bias broadcastable to (B, H, M, N) (0 or -inf)
    -> output (B, H, M, d) fp32, log-sum-exp (B, H, M) fp32.

    `key` and `value` may be strided views of a KV pool: (B, H) must merge into one batch dimension without a copy.
    Every query row must see at least one key (a row of -inf gives NaN, as softmax would).
    """
    if query.is_cuda and query.dtype != torch.float32 and _bmm_writes_fp32():
        return _attend_low_precision(query, key, value, bias, scale)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), value.float())
    return out, lse


@functools.cache
def _bmm_writes_fp32() -> bool:
    """cuBLAS bf16 x bf16 -> fp32 through `torch.bmm(out_dtype=...)` (recent torch); else the fp32 path, slower."""
    try:
        a = torch.ones((1, 1, 8), dtype=torch.bfloat16, device="cuda")
        return torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError) as exc:
        log.warning("torch.bmm(out_dtype=float32) is unavailable (%s): attention runs in fp32 copies", exc)
        return False


def _attend_low_precision(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, rows, _ = query.shape
    keys = key.shape[2]
    q = query.reshape(batch * heads, rows, -1)
    k, v = key.flatten(0, 1), value.flatten(0, 1)  # views: the pool's (slot, head) strides merge
    scores = torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32).view(batch, heads, rows, keys)
    scores = scores.mul_(scale).add_(bias)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores.sub_(lse[..., None])).to(value.dtype)
    out = torch.bmm(probs.view(batch * heads, rows, keys), v, out_dtype=torch.float32)
    return out.view(batch, heads, rows, -1), lse


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Two partial attentions over disjoint key sets -> attention over their union (fp32, the shape of `out_a`).

    out_* (..., d), lse_* (...): the weights are each part's share of the total softmax mass.
    """
    weight_a = torch.sigmoid(lse_a - lse_b)[..., None]  # = exp(lse_a) / (exp(lse_a) + exp(lse_b))
    return out_a.float() * weight_a + out_b.float() * (1.0 - weight_a)


def length_bias(lengths: torch.Tensor, keys: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """lengths (B,) -> (B, 1, 1, keys) additive bias: 0 for key positions < length, -inf after."""
    positions = torch.arange(keys, device=lengths.device)
    bias = torch.zeros((lengths.shape[0], keys), dtype=dtype, device=lengths.device)
    bias.masked_fill_(positions[None, :] >= lengths[:, None], NEG_INF)
    return bias[:, None, None, :]

