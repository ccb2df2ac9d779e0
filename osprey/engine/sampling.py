"""Next-token choice for a whole batch on the device: greedy, temperature and nucleus (top-p), one seed per row.

No per-row Python loop: every row's settings are tensors. Sampled rows draw Gumbel noise from a counter-based
hash of (seed, step, token id), so a seeded row gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

__all__ = ["sample"]

_M32 = 0xFFFFFFFF


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
           step: torch.Tensor, any_sampled: bool) -> torch.Tensor:
    """logits (N, V) fp32; temperature, top_p (N,) float (temperature 0 = greedy); seed, step (N,) int64 -> (N,).

    `any_sampled` (known on the host) skips the sampling work when every row is greedy.
    """
    greedy = logits.argmax(dim=-1)
    if not any_sampled:
        return greedy
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p[:, None]  # smallest prefix with mass >= p
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    noise = _uniform(seed, step, logits.shape[1])
    scores = torch.log(probs).masked_fill(~keep, float("-inf")) - torch.log(-torch.log(noise))
    return torch.where(temperature > 0, scores.argmax(dim=-1), greedy)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (values < 2**32 in int64, so products never overflow)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def _uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N, V) uniform numbers in (0, 1), a function of (seed, step, token id) only."""
    key = _hash32((_hash32(seed & _M32) ^ _hash32((seed >> 32) & _M32) * 31 + step) & _M32)
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    bits = _hash32((key[:, None] ^ ((ids * 0x9E3779B1) & _M32)[None, :]) & _M32)
    return (bits.double() + 0.5) / 4294967296.0
