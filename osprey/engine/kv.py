"""Preallocated key/value storage: prefix slots (one per image in flight) and row slots (one per region row).

Both are allocated once, at start-up, from a memory budget, so a burst of requests queues instead of running out
of memory. Live slots are kept at the front (0 .. n-1): when one is freed, the last live one is moved into its
place (one copy of its keys and values), so every pass reads contiguous slices and never gathers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from osprey.engine.transfer import to_device

__all__ = ["KVPool", "PoolSize", "plan_pool"]


@dataclass(frozen=True)
class PoolSize:
    prefix_slots: int  # images in flight
    prefix_tokens: int  # longest shared prefix kept (longer prompts move the rest into the rows' suffix)
    row_slots: int  # region rows in flight
    suffix_tokens: int  # per row: its own prompt tokens + generated tokens

    def __post_init__(self) -> None:
        for name in ("prefix_slots", "prefix_tokens", "row_slots", "suffix_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of keys + values of one token over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def plan_pool(budget_bytes: int, per_token: int, prefix_tokens: int, suffix_tokens: int, rows_per_image: int = 8
              ) -> PoolSize:
    """The largest pool within `budget_bytes` with `rows_per_image` row slots per prefix slot."""
    per_image = per_token * (prefix_tokens + rows_per_image * suffix_tokens)
    images = budget_bytes // per_image
    if images < 1:
        raise ValueError(f"a KV budget of {budget_bytes / 2**30:.2f} GiB holds not even one image "
                         f"({per_image / 2**30:.2f} GiB for {prefix_tokens} prefix and {rows_per_image} x "
                         f"{suffix_tokens} row tokens); lower max_suffix_tokens or free memory")
    return PoolSize(int(images), prefix_tokens, int(images * rows_per_image), suffix_tokens)


class KVPool:
    def __init__(self, size: PoolSize, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.size = size
        # token-major slots (slot, token, head, dim): a run of slots flattens to the packed (tokens, head, dim)
        # layout FlashAttention's variable-length kernel reads in place
        prefix_shape = (size.prefix_slots, size.prefix_tokens, num_kv_heads, head_dim)
        suffix_shape = (size.row_slots, size.suffix_tokens, num_kv_heads, head_dim)
        self.prefix_k = [torch.zeros(prefix_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.prefix_v = [torch.zeros(prefix_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.suffix_k = [torch.zeros(suffix_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.suffix_v = [torch.zeros(suffix_shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def with_rows(self, row_slots: int, suffix_tokens: int) -> KVPool:
        """Another pool over the same prefix slots (shared, not copied) with row slots of its own."""
        other = copy.copy(self)
        other.size = replace(self.size, row_slots=row_slots, suffix_tokens=suffix_tokens)
        shape = (row_slots, suffix_tokens, *self.suffix_k[0].shape[2:])
        like = self.suffix_k[0]
        other.suffix_k = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in self.suffix_k]
        other.suffix_v = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in self.suffix_v]
        return other

    @property
    def max_prefix(self) -> int:
        return self.size.prefix_tokens

    @property
    def max_suffix(self) -> int:
        return self.size.suffix_tokens

    def move_rows(self, sources: list[int], targets: list[int]) -> None:
        """Copy row slots `sources` onto `targets` (all layers)."""
        self._move(self.suffix_k + self.suffix_v, sources, targets)

    def move_prefix(self, source: int, target: int) -> None:
        self._move(self.prefix_k + self.prefix_v, [source], [target])

    @staticmethod
    def _move(tensors: list[torch.Tensor], sources: list[int], targets: list[int]) -> None:
        if not sources:
            return
        device = tensors[0].device
        src = to_device(sources, torch.long, device)  # queued behind the step in flight, which still reads the slots
        dst = to_device(targets, torch.long, device)
        for tensor in tensors:
            tensor[dst] = tensor[src]
