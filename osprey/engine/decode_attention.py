"""Decoding attention in Triton: one query token per row, each image's prefix read once for all of its rows.

Why not FlashAttention's variable-length kernel for decoding: it tiles queries 128 rows at a time, so an image's 16
region rows fill 1/8 of a tile and a row's own suffix (one query) 1/128, and the tensor-core work of the empty tile
rows dominates (a 16 images x 16 regions 7B step spent 9.8 ms in it, H100, where the bytes it reads take ~2.7 ms).
Here an image's rows are a 16-row query block (the smallest tensor-core tile) and its prefix is split into chunks
read in parallel (flash decoding); a row's suffix is read by one program per (row, head) with vector math. Each
part returns partial outputs with their log-sum-exps, merged exactly (`attention.merge` generalised to many parts).

Prefill passes (several tokens per row) keep FlashAttention; the CPU keeps the dense reference math. The kernels
run under Triton's interpreter on the CPU too (TRITON_INTERPRET=1), which is how the tests check them there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from osprey.engine.attention import packed_kernel_runs

__all__ = ["DecodeLayout", "choose_splits", "decode_attention", "decode_kernel_runs", "decode_layout"]

BLOCK_M = 16  # query rows of one image per program: the smallest tensor-core tile
BLOCK_N = 64  # keys per loop step


def decode_kernel_runs(like: torch.Tensor, head_dim: int) -> bool:
    """CUDA fp16/bf16 tensors and a power-of-two head size of at least 16 (tensor-core tiles)."""
    return packed_kernel_runs(like) and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def choose_splits(blocks: int, heads: int, prefix_tokens: int, device: torch.device) -> int:
    """Prefix chunks per (query block, head): enough programs to fill the device twice over, chunks of at least
    256 keys."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    wanted = -(-2 * processors // max(1, blocks * heads))
    return max(1, min(wanted, -(-prefix_tokens // 256), 32))


@dataclass
class DecodeLayout:
    """Where each program reads: built once per decoding step from the rows' image slots, on the device."""

    order: torch.Tensor  # (n,) int64 row indices sorted by image slot
    block_group: torch.Tensor  # (blocks,) int32 image slot of each 16-row query block (>= groups: unused)
    block_start: torch.Tensor  # (blocks,) int32 first position in `order` of the block
    block_end: torch.Tensor  # (blocks,) int32 end (exclusive) of the block's image in `order`
    prefix_used: torch.Tensor  # (groups,) int32
    suffix_used: torch.Tensor  # (n,) int32
    splits: int  # prefix chunks read in parallel per (block, head)


def decode_layout(group: torch.Tensor, groups: int, prefix_lengths: torch.Tensor, suffix_used: torch.Tensor,
                  splits: int) -> DecodeLayout:
    """group (n,) int64 image slot of each row; prefix_lengths (groups,); suffix_used (n,) keys each row has.

    Fixed shapes and no host synchronisation, so a CUDA graph can record it: there are at most
    n // BLOCK_M + groups blocks (each image's last block may be partial)."""
    n, device = group.shape[0], group.device
    order = torch.argsort(group, stable=True)
    counts = torch.zeros(groups, dtype=torch.int64, device=device).scatter_add_(0, group, torch.ones_like(group))
    ends = counts.cumsum(0)
    starts = ends - counts
    blocks_per_group = (counts + BLOCK_M - 1) // BLOCK_M
    last_block = blocks_per_group.cumsum(0)  # (groups,) one past each image's last block
    block = torch.arange(n // BLOCK_M + groups, device=device)
    block_group = torch.searchsorted(last_block, block, right=True)  # == groups past the last image's blocks
    safe = block_group.clamp(max=groups - 1)
    first_block = last_block[safe] - blocks_per_group[safe]
    block_start = starts[safe] + (block - first_block) * BLOCK_M
    return DecodeLayout(order=order, block_group=block_group.to(torch.int32), block_start=block_start.to(torch.int32),
                        block_end=ends[safe].to(torch.int32), prefix_used=prefix_lengths.to(torch.int32),
                        suffix_used=suffix_used.to(torch.int32), splits=splits)


def decode_attention(query: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, suffix_k: torch.Tensor,
                     suffix_v: torch.Tensor, layout: DecodeLayout, scale: float) -> torch.Tensor:
    """query (n, H, d) one token per row; prefix_k/v (groups, P, Hkv, d) the rows' image slots; suffix_k/v
    (n, S, Hkv, d) the rows' own slots (token-major pool slices) -> (n, H, d) fp32 attention over
    [image prefix + own suffix]."""
    n, heads, dim = query.shape
    kv_heads = prefix_k.shape[2]
    splits = layout.splits
    out = torch.empty((splits + 1, n, heads, dim), dtype=torch.float32, device=query.device)
    lse = torch.empty((splits + 1, n, heads), dtype=torch.float32, device=query.device)
    blocks = layout.block_group.shape[0]
    _prefix_kernel[(blocks, heads, splits)](
        query, prefix_k, prefix_v, out, lse, layout.order, layout.block_group, layout.block_start,
        layout.block_end, layout.prefix_used, prefix_k.shape[0], splits, scale,
        *query.stride(), *prefix_k.stride(), *out.stride(), *lse.stride(),
        GROUP_SIZE=heads // kv_heads, DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    _suffix_kernel[(n, heads)](
        query, suffix_k, suffix_v, out[splits], lse[splits], layout.suffix_used, scale,
        *query.stride(), *suffix_k.stride(), *out.stride()[1:], *lse.stride()[1:],
        GROUP_SIZE=heads // kv_heads, DIM=dim, BLOCK_N=BLOCK_N)
    total = torch.logsumexp(lse, dim=0)  # (n, H); a chunk without keys has lse -inf and weight 0
    weights = torch.exp(lse - total[None])
    return (out * weights[..., None]).sum(dim=0)


@triton.jit
def _prefix_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, order_ptr, block_group_ptr, block_start_ptr,
                   block_end_ptr, used_ptr, groups, splits, scale,
                   sq_n, sq_h, sq_d, sk_g, sk_t, sk_h, sk_d, so_s, so_n, so_h, so_d, sl_s, sl_n, sl_h,
                   GROUP_SIZE: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    block = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    group = tl.load(block_group_ptr + block)
    if group < groups:
        start = tl.load(block_start_ptr + block)
        end = tl.load(block_end_ptr + block)
        used = tl.load(used_ptr + group)
        chunk = tl.cdiv(tl.cdiv(used, BLOCK_N), splits) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, used)
        offs_m = start + tl.arange(0, BLOCK_M)
        valid_m = offs_m < end
        rows = tl.load(order_ptr + offs_m, mask=valid_m, other=0)
        offs_d = tl.arange(0, DIM)
        q = tl.load(q_ptr + rows[:, None] * sq_n + head * sq_h + offs_d[None, :] * sq_d, mask=valid_m[:, None],
                    other=0.0)
        kv_head = head // GROUP_SIZE
        k_base = k_ptr + group.to(tl.int64) * sk_g + kv_head * sk_h
        v_base = v_ptr + group.to(tl.int64) * sk_g + kv_head * sk_h
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DIM), tl.float32)
        for key_start in range(lo, hi, BLOCK_N):
            offs_n = key_start + tl.arange(0, BLOCK_N)
            valid_n = offs_n < hi
            k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=valid_n[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=valid_n[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(valid_n[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        has_keys = l_i > 0
        result = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(out_ptr + split * so_s + rows[:, None] * so_n + head * so_h + offs_d[None, :] * so_d, result,
                 mask=valid_m[:, None])
        tl.store(lse_ptr + split * sl_s + rows * sl_n + head * sl_h, lse, mask=valid_m)


@triton.jit
def _suffix_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, used_ptr, scale,
                   sq_n, sq_h, sq_d, sk_n, sk_t, sk_h, sk_d, so_n, so_h, so_d, sl_n, sl_h,
                   GROUP_SIZE: tl.constexpr, DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    used = tl.load(used_ptr + row)
    offs_d = tl.arange(0, DIM)
    q = tl.load(q_ptr + row * sq_n + head * sq_h + offs_d * sq_d).to(tl.float32)
    kv_head = head // GROUP_SIZE
    k_base = k_ptr + row.to(tl.int64) * sk_n + kv_head * sk_h
    v_base = v_ptr + row.to(tl.int64) * sk_n + kv_head * sk_h
    m_i = tl.full((1,), float("-inf"), tl.float32)
    l_i = tl.zeros((1,), tl.float32)
    acc = tl.zeros((DIM,), tl.float32)
    for key_start in range(0, used, BLOCK_N):
        offs_n = key_start + tl.arange(0, BLOCK_N)
        valid_n = offs_n < used
        k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=valid_n[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=valid_n[:, None], other=0.0)
        scores = tl.sum(q[None, :] * k.to(tl.float32), axis=1) * scale
        scores = tl.where(valid_n, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    tl.store(out_ptr + row * so_n + head * so_h + offs_d * so_d, acc / l_i)
    tl.store(lse_ptr + row * sl_n + head * sl_h + tl.arange(0, 1), m_i + tl.log(l_i))
