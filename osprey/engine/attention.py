"""Attention in two parts merged by log-sum-exp: a shared prefix read once per image, and each row's own suffix.

Every region row of one image attends over the same prefix (system prompt, 1024 image tokens, text before the
region): its keys and values are stored once and read once per decoding step for all of that image's rows, as
one query block. Each row's suffix (its region tokens, question and generated tokens) is attended separately;
the two partial softmaxes are combined exactly through their log-sum-exps, so the result equals attention over
the concatenation.

`attend` is the one kernel call: on CUDA the memory-efficient SDPA kernel (fp32 accumulation, additive bias, and
it returns the log-sum-exp); elsewhere the same math in fp32 with matmuls.
"""

from __future__ import annotations

import torch

__all__ = ["attend", "length_bias", "merge"]

NEG_INF = float("-inf")


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """query (B, H, M, d), key/value (B, H, N, d), bias broadcastable to (B, H, M, N) (0 or -inf)
    -> output (B, H, M, d) in the query's dtype, log-sum-exp (B, H, M) in fp32.

    Every query row must see at least one key (a row of -inf gives NaN, as softmax would).
    """
    if query.is_cuda:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, _aligned_bias(bias, query, key.shape[2]), True, 0.0, False, scale=scale)
        return out, lse[:, :, :query.shape[2]]
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), value.float())
    return out.to(query.dtype), lse


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Two partial attentions over disjoint key sets -> attention over their union (same shapes as `out_a`).

    out_* (..., d), lse_* (...): the weights are each part's share of the total softmax mass.
    """
    weight_a = torch.sigmoid(lse_a - lse_b)[..., None]  # = exp(lse_a) / (exp(lse_a) + exp(lse_b))
    return (out_a.float() * weight_a + out_b.float() * (1.0 - weight_a)).to(out_a.dtype)


def length_bias(lengths: torch.Tensor, keys: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """lengths (B,) -> (B, 1, 1, keys) additive bias: 0 for key positions < length, -inf after."""
    positions = torch.arange(keys, device=lengths.device)
    bias = torch.zeros((lengths.shape[0], keys), dtype=dtype, device=lengths.device)
    bias.masked_fill_(positions[None, :] >= lengths[:, None], NEG_INF)
    return bias[:, None, None, :]


def _aligned_bias(bias: torch.Tensor, query: torch.Tensor, keys: int) -> torch.Tensor:
    """The CUDA kernel wants the bias in the query's dtype, expanded to (B, H, M, N), with rows whose stride is a
    multiple of 16 elements: stored padded, passed as a view."""
    batch, heads, rows = query.shape[:3]
    padded = -(-keys // 16) * 16
    store = torch.empty((*bias.shape[:-1], padded), dtype=query.dtype, device=query.device)
    store[..., :keys] = bias
    return store[..., :keys].expand(batch, heads, rows, keys)
