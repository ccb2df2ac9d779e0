"""Attention in two parts merged by log-sum-exp: a shared prefix read once per image, and each row's own suffix.

Every region row of one image attends over the same prefix (system prompt, 1024 image tokens, text before the
region): its keys and values are stored once and read once per decoding step for all of that image's rows, as
one query block. Each row's suffix (its region tokens, question and generated tokens) is attended separately;
the partial softmaxes are combined exactly through their log-sum-exps, so the result equals attention over
the concatenation. Scoring adds a third part between the two: an answer row reads its question row's stored
suffix in place (`osprey.engine.forward.ParentRows`), one query block per question, instead of a copy.

Two kernels, one contract (output + log-sum-exp per query):
- `attend_packed`, on CUDA in fp16/bf16: FlashAttention-2's variable-length kernel over packed sequences. Each
  image's rows are one query sequence against that image's prefix (no padding to a common row count, no bias
  tensor), and each row is one query sequence against its own suffix; `seqused_k` says how many stored keys each
  sequence has, so the pool's fixed-size slots are read in place.
- `attend`, everywhere else (CPU, fp32): dense batches with an additive bias; on CUDA the memory-efficient SDPA
  kernel, on CPU the same math in fp32 with matmuls. It is the reference the packed kernel is tested against.
Two cuBLAS batched matmuls with fp32 scores were tried for the dense path and were slower (a 16 images x 16 regions
7B step: 33.5 ms on an H200, against 29.4 ms with the memory-efficient kernel on an H100): the unfused softmax
passes over the prefix part's fp32 scores cost more than they saved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["attend", "attend_packed", "length_bias", "merge", "packed_kernel_runs"]

NEG_INF = float("-inf")


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """query (B, H, M, d), key/value (B, H, N, d), bias broadcastable to (B, H, M, N) (0 or -inf)
    -> output (B, H, M, d) fp32, log-sum-exp (B, H, M) fp32.

    `key` and `value` may be strided views of a KV pool.
    Every query row must see at least one key (a row of -inf gives NaN, as softmax would).
    """
    if query.is_cuda:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, _aligned_bias(bias, query, key.shape[2]), True, 0.0, False, scale=scale)
        return out.float(), lse[:, :, :query.shape[2]]
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), value.float())
    return out, lse


def packed_kernel_runs(tensor: torch.Tensor) -> bool:
    """Whether `attend_packed` can take tensors like this one (FlashAttention: CUDA, fp16/bf16)."""
    return tensor.is_cuda and tensor.dtype in (torch.float16, torch.bfloat16)


def attend_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_starts: torch.Tensor,
                  key_starts: torch.Tensor, keys_used: torch.Tensor, max_queries: int, max_keys: int, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences: query (Q, H, d), key/value (K, Hkv, d) with Hkv dividing H; sequence i owns queries
    `query_starts[i] .. query_starts[i+1]` and keys from `key_starts[i]`, of which the first `keys_used[i]` count
    (int32, on the device). Causal masks align the last query with the last used key.
    -> output (Q, H, d) in the query's dtype, log-sum-exp (Q, H) fp32.

    `max_queries` / `max_keys` bound the longest sequence (they size the launch grid; larger is fine, smaller
    is wrong), so a CUDA graph records them once for a padded shape.
    """
    out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        query, key, value, query_starts, key_starts, max_queries, max_keys, 0.0, causal, False, scale=scale,
        seqused_k=keys_used)
    if lse.dim() != 2:  # FlashAttention >= 2.5 returns the varlen log-sum-exp unpadded: (H, Q)
        raise RuntimeError(f"this torch's FlashAttention returns a log-sum-exp of shape {tuple(lse.shape)}; the "
                           "engine needs the unpadded (heads, queries) layout of FlashAttention >= 2.5")
    return out, lse.transpose(0, 1)


def _aligned_bias(bias: torch.Tensor, query: torch.Tensor, keys: int) -> torch.Tensor:
    """The CUDA kernel wants the bias in the query's dtype, expanded to (B, H, M, N), with rows whose stride is a
    multiple of 16 elements: stored padded, passed as a view."""
    batch, heads, rows = query.shape[:3]
    padded = -(-keys // 16) * 16
    store = torch.empty((*bias.shape[:-1], padded), dtype=query.dtype, device=query.device)
    store[..., :keys] = bias
    return store[..., :keys].expand(batch, heads, rows, keys)


def merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Partial attentions over disjoint key sets -> attention over their union (fp32, the shape of each output).

    parts: (out (..., d), lse (...)) each; every part's weight is its share of the total softmax mass.
    """
    lse = torch.stack([part_lse for _, part_lse in parts])
    weights = torch.softmax(lse, dim=0)[..., None]  # exp(lse_i) / sum_j exp(lse_j)
    return sum(out.float() * weight for (out, _), weight in zip(parts, weights))


def length_bias(lengths: torch.Tensor, keys: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """lengths (B,) -> (B, 1, 1, keys) additive bias: 0 for key positions < length, -inf after."""
    positions = torch.arange(keys, device=lengths.device)
    bias = torch.zeros((lengths.shape[0], keys), dtype=dtype, device=lengths.device)
    bias.masked_fill_(positions[None, :] >= lengths[:, None], NEG_INF)
    return bias[:, None, None, :]

