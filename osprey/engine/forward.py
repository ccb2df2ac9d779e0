"""The Llama forward passes of the engine, over the weights of a transformers `LlamaForCausalLM`.

Three passes share one layer walk: a prefix prefill (the shared prefixes of the images admitted together, their
tokens packed through the projections and MLP, attention causal within each; each one's keys and values stored in
its prefix slot), a suffix prefill (the new rows' own tokens, handed over padded to one length; only the real tokens
run through the layers) and a decoding step (one token per live row). The last two attend over [prefix of the row's
image] + [the row's own suffix] with `osprey.engine.attention`: the prefix as one query block per image, so its keys
are read once for all of that image's rows (scoring puts its question row's stored suffix between the two:
`ParentRows`). Norms, projections, rotary embedding and MLP are the transformers modules themselves, so the numerics
are the reference model's.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from osprey.engine.attention import attend, attend_packed, length_bias, merge, packed_kernel_runs
from osprey.engine.compiled import compiled_layers_agree, merge_projections, plain_linears
from osprey.engine.kv import KVPool

try:  # Triton ships with CUDA builds of torch; without it decoding uses FlashAttention (CUDA) or the dense path
    from osprey.engine import decode_attention as triton_decode
except ImportError:
    triton_decode = None

__all__ = ["LlamaForward", "ParentRows", "RowBlock", "supports"]

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)


def supports(language_model: PreTrainedModel) -> bool:
    """The engine runs Llama-architecture language models (Osprey's Vicuna, the built-in and tiny models)."""
    return getattr(language_model.config, "model_type", None) in SUPPORTED_MODEL_TYPES


@dataclass
class ParentRows:
    """Stored rows whose suffix keys each row of a block reads in place, between its prefix and its own suffix: an
    answer row of `osprey.scoring` reads its question row's tokens this way, one query block per question, so a
    hundred answers to one question neither copy its keys nor hold slots for them."""

    keys: list[torch.Tensor]  # per layer (slots, tokens, Hkv, d): the parents' stored keys (another pool's rows)
    values: list[torch.Tensor]
    slot: torch.Tensor  # (n,) long: each row's parent slot
    used: torch.Tensor  # (slots,) long: keys stored per parent slot

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def slot_tokens(self) -> int:
        """Positions a parent slot holds (>= every `used`)."""
        return self.keys[0].shape[1]


@dataclass
class RowBlock:
    """Query rows of one pass, all in the pool: rows `first .. first + n - 1`, each with `tokens` new tokens
    (padded to the same count; `lengths` real, >= 1) written from suffix position `start` (n,).

    `group` (n,) is each row's image slot relative to `group_first`, `local` (n,) its index within that image;
    `groups` image slots from `group_first` take part, `width` = max local + 1. `parent`: rows read between the
    prefix and their own suffix (their positions count in the rows' positions).
    """

    first: int
    count: int
    tokens: int
    start: torch.Tensor  # (n,) long: suffix position of the first new token
    lengths: torch.Tensor  # (n,) long: real new tokens per row (1 .. tokens)
    group: torch.Tensor  # (n,) long
    local: torch.Tensor  # (n,) long
    group_first: int
    groups: int
    width: int
    prefix_keys: int  # prefix positions to read (>= the longest prefix of the groups)
    suffix_keys: int  # suffix positions to read (>= max start + tokens)
    parent: ParentRows | None = None


def _reference_decode(query, prefix_k, prefix_v, suffix_k, suffix_v, group, prefix_used, suffix_used, scale
                      ) -> torch.Tensor:
    """Dense fp32 attention of each row's one query over [its image's used prefix + its used suffix]."""
    keys, values = [], []
    for row in range(query.shape[0]):
        image = int(group[row])
        k = torch.cat([prefix_k[image, :int(prefix_used[image])], suffix_k[row, :int(suffix_used[row])]])
        v = torch.cat([prefix_v[image, :int(prefix_used[image])], suffix_v[row, :int(suffix_used[row])]])
        keys.append(k)
        values.append(v)
    longest = max(k.shape[0] for k in keys)
    lengths = torch.tensor([k.shape[0] for k in keys], device=query.device)
    pad = [torch.nn.functional.pad(k, (0, 0, 0, 0, 0, longest - k.shape[0])) for k in keys]
    pad_v = [torch.nn.functional.pad(v, (0, 0, 0, 0, 0, longest - v.shape[0])) for v in values]
    group_size = query.shape[1] // prefix_k.shape[2]
    k = torch.stack(pad).repeat_interleave(group_size, dim=2).transpose(1, 2)  # (n, H, K, d)
    v = torch.stack(pad_v).repeat_interleave(group_size, dim=2).transpose(1, 2)
    out, _ = attend(query[:, :, None], k, v, length_bias(lengths, longest), scale)
    return out[:, :, 0]


@dataclass
class _KeyRun:
    """One call of the packed kernel: the real query tokens, grouped by the slot whose keys they read."""

    order: torch.Tensor | None  # (N,) tokens in slot order (None: already in it, one slot per row)
    inverse: torch.Tensor | None  # (N,) back to row order
    query_starts: torch.Tensor  # (slots + 1,) int32
    key_starts: torch.Tensor  # (slots + 1,) int32
    keys_used: torch.Tensor  # (slots,) int32
    max_queries: int
    causal: bool


@dataclass
class _PackedLayout:
    prefix: _KeyRun  # per image, its rows' tokens against its prefix slot
    parent: _KeyRun | None  # per parent row, its children's tokens against its suffix slot
    own: _KeyRun  # per row, its tokens against its own suffix slot (causal)


@dataclass
class _DenseLayout:
    real: torch.Tensor | slice  # the real positions among the n * T padded ones
    suffix_bias: torch.Tensor  # (n, 1, T * g, suffix keys)
    prefix_bias: torch.Tensor  # (groups, 1, 1, prefix keys)
    parent_bias: torch.Tensor | None  # (n, 1, 1, parent keys)


class LlamaForward:
    def __init__(self, language_model: PreTrainedModel, fast_kernels: bool = False) -> None:
        """`fast_kernels`: on CUDA, the Triton decoding kernels and the compiled layer pieces (each checked at
        start-up, falling back on failure). Off at this level (scoring's passes were measured without them); the
        pipeline's sessions, `osprey serve` and `osprey annotate` turn them on (faster at every load measured, docs/engine.md)."""
        if not supports(language_model):
            raise ValueError(f"the engine runs Llama models, not {language_model.config.model_type!r}")
        self.model = language_model.model
        self.head = language_model.lm_head
        config = language_model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = self.model.layers[0].self_attn.head_dim
        self.scale = float(self.model.layers[0].self_attn.scaling)
        self.group_size = self.num_heads // self.num_kv_heads
        weight = self.head.weight
        # torch.compile'd layer pieces on CUDA: norms, rotary, activation and residuals fused around the GEMMs, over
        # the merged q/k/v and gate/up weights
        self.fused = (compiled_layers_agree(self, merge_projections(self.model), self.model.layers[0], self._rope)
                      if fast_kernels and weight.is_cuda and plain_linears(self.model) else None)
        # the Triton decoding kernels where they run and agree with the reference on this device (else FlashAttention)
        self.decode_kernel = (fast_kernels and triton_decode is not None
                              and triton_decode.decode_kernel_runs(weight, self.head_dim)
                              and self._decode_kernel_agrees(weight.device, weight.dtype))

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    # -- passes ------------------------------------------------------------------------------------------------
    def prefill_prefixes(self, prefixes: list[torch.Tensor], pool: KVPool, slots: list[int]) -> None:
        """Shared prefixes (P_i, D) of several images in one causal pass, their tokens packed (they share the
        projection and MLP GEMMs); prefix i's keys and values go to prefix slot `slots[i]`. The last layer stops at
        its keys and values: nothing reads a prefix's outputs."""
        device = prefixes[0].device
        lengths = [prefix.shape[0] for prefix in prefixes]
        spans = [slice(start, start + length) for start, length in zip(itertools.accumulate([0, *lengths]), lengths)]
        positions = torch.cat([torch.arange(length, device=device) for length in lengths])
        slot_of = torch.tensor(slots, device=device).repeat_interleave(torch.tensor(lengths, device=device))
        hidden = torch.cat(prefixes)
        cos, sin = self._rope(hidden, positions)
        last = self.num_layers - 1
        for index, layer in enumerate(self.model.layers):
            query, key, value = self._qkv(layer, hidden, cos, sin)
            pool.prefix_k[index][slot_of, positions] = key
            pool.prefix_v[index][slot_of, positions] = value
            if index == last:
                break
            hidden = self._finish_layer(layer, hidden, self._causal(query, key, value, spans))

    def _causal(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[slice]
                ) -> torch.Tensor:
        """Causal attention within each packed prefix (`spans` of the N tokens): query (N, H, d), key/value
        (N, Hkv, d) -> (N, H * d). One SDPA call per prefix (a few per step; at ~1,100 tokens a prefix the
        projections and MLP are most of the work, and they are packed)."""
        outs = []
        for own in spans:
            out = F.scaled_dot_product_attention(query[own].transpose(0, 1)[None], key[own].transpose(0, 1)[None],
                                                 value[own].transpose(0, 1)[None], is_causal=True, scale=self.scale,
                                                 enable_gqa=self.group_size > 1)
            outs.append(out[0].transpose(0, 1).reshape(own.stop - own.start, -1))
        return torch.cat(outs)

    def forward_rows(self, embeds: torch.Tensor, block: RowBlock, pool: KVPool, prefix_lengths: torch.Tensor
                     ) -> torch.Tensor:
        """embeds (n, T, D) new tokens of the block's rows -> logits (n, V) fp32 at each row's last real token.

        `prefix_lengths` (groups,): prefix length of each image slot taking part.
        """
        hidden = self.row_hidden(embeds, block, pool, prefix_lengths)
        return self.logits(hidden[block.lengths.cumsum(0) - 1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) final-normed hidden states -> (..., V) fp32 logits."""
        return self.head(hidden).float()

    def row_hidden(self, embeds: torch.Tensor, block: RowBlock, pool: KVPool, prefix_lengths: torch.Tensor
                   ) -> torch.Tensor:
        """embeds (n, T, D), rows padded to T -> final-normed hidden states (N, D) of the real tokens, row after row
        (N = the sum of `block.lengths`): the padding never runs through the layers. The rows' keys and values are
        written to their pool slots from `block.start` on. Scoring reads every real position (osprey.scoring);
        decoding only each row's last (`forward_rows`)."""
        n, tokens, device = block.count, block.tokens, embeds.device
        real = _real_positions(block)
        suffix_pos = block.start[:, None] + torch.arange(tokens, device=device)[None, :]  # (n, T)
        before = prefix_lengths[block.group]  # positions before a row's suffix: its prefix, then its parent's
        if block.parent is not None:
            before = before + block.parent.used[block.parent.slot]
        cos, sin = self._rope(embeds, (before[:, None] + suffix_pos).reshape(-1)[real])
        rows = torch.arange(block.first, block.first + n, device=device)[:, None].expand(n, tokens).reshape(-1)[real]
        write_at = suffix_pos.clamp(max=pool.max_suffix - 1).reshape(-1)[real]
        hidden = embeds.reshape(n * tokens, -1)[real]
        if tokens == 1 and self.decode_kernel and block.parent is None:
            layout, attention = self._decode_layout(block, pool, prefix_lengths), self._decode_attention
        elif packed_kernel_runs(embeds):
            layout, attention = self._packed_layout(block, pool, prefix_lengths, hidden.shape[0]), self._packed_attention
        else:
            layout, attention = self._dense_layout(block, prefix_lengths, real), self._dense_attention
        for index, layer in enumerate(self.model.layers):
            query, key, value = self._qkv(layer, hidden, cos, sin)
            pool.suffix_k[index][rows, write_at] = key
            pool.suffix_v[index][rows, write_at] = value
            hidden = self._finish_layer(layer, hidden, attention(index, query, block, pool, layout))
        return self.model.norm(hidden)

    # -- pieces ------------------------------------------------------------------------------------------------
    def _rope(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.model.rotary_emb(like, positions[None])
        return cos[0], sin[0]

    def _qkv(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (M, D) -> query (M, H, d), key and value (M, Hkv, d), rotary applied."""
        if self.fused is not None:
            return self.fused.qkv(layer, hidden, cos, sin)
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = attn.q_proj(normed).view(-1, self.num_heads, self.head_dim)
        key = attn.k_proj(normed).view(-1, self.num_kv_heads, self.head_dim)
        value = attn.v_proj(normed).view(-1, self.num_kv_heads, self.head_dim)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
        return query, key, value

    def _finish_layer(self, layer, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused.finish(layer, hidden, attention)
        hidden = hidden + layer.self_attn.o_proj(attention)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    # -- decoding attention (CUDA, fp16/bf16, one token per row) ----------------------------------------------------
    def _decode_layout(self, block: RowBlock, pool: KVPool, prefix_lengths: torch.Tensor
                       ) -> triton_decode.DecodeLayout:
        splits = triton_decode.choose_splits(block.groups, self.num_heads, pool.max_prefix, block.group.device)
        return triton_decode.decode_layout(block.group, block.groups, prefix_lengths,
                                           (block.start + 1).clamp(max=pool.max_suffix), splits)

    def _decode_kernel_agrees(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Compile the decoding kernels for this model's head layout and check them once against the dense math
        (3 images, 20 rows, split prefixes); a failure is logged and decoding uses FlashAttention instead."""
        generator = torch.Generator(device=device).manual_seed(0)
        rows, groups, heads, kv_heads, dim = 20, 3, self.num_heads, self.num_kv_heads, self.head_dim

        def random(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=device).to(dtype)

        query = random(rows, heads, dim)
        prefix_k, prefix_v = random(groups, 300, kv_heads, dim), random(groups, 300, kv_heads, dim)
        suffix_k, suffix_v = random(rows, 9, kv_heads, dim), random(rows, 9, kv_heads, dim)
        group = torch.arange(rows, device=device) % groups
        prefix_used = torch.tensor([300, 17, 1], device=device)
        suffix_used = torch.arange(rows, device=device) % 9 + 1
        try:
            layout = triton_decode.decode_layout(group, groups, prefix_used, suffix_used, splits=3)
            ours = triton_decode.decode_attention(query, prefix_k, prefix_v, suffix_k, suffix_v, layout, self.scale)
        except Exception as exc:  # noqa: BLE001 - any compile or launch failure means: use the other kernel
            log.warning("the Triton decoding kernels do not run here (%s): decoding with FlashAttention", exc)
            return False
        reference = _reference_decode(query, prefix_k, prefix_v, suffix_k, suffix_v, group, prefix_used, suffix_used,
                                      self.scale)
        error = (ours - reference).abs().max().item()
        if not error <= 2e-2:
            log.warning("the Triton decoding kernels differ from the reference by %.3g: decoding with FlashAttention",
                        error)
            return False
        return True

    def _decode_attention(self, index: int, query: torch.Tensor, block: RowBlock, pool: KVPool,
                          layout: triton_decode.DecodeLayout) -> torch.Tensor:
        """query (n, H, d) -> (n, H * d) with the Triton decoding kernels."""
        groups = slice(block.group_first, block.group_first + block.groups)
        rows = slice(block.first, block.first + block.count)
        out = triton_decode.decode_attention(query, pool.prefix_k[index][groups], pool.prefix_v[index][groups],
                               pool.suffix_k[index][rows], pool.suffix_v[index][rows], layout, self.scale)
        return out.reshape(block.count, -1).to(query.dtype)

    # -- packed attention (CUDA, fp16/bf16) --------------------------------------------------------------------
    def _packed_layout(self, block: RowBlock, pool: KVPool, prefix_lengths: torch.Tensor, total: int
                       ) -> _PackedLayout:
        """The sequences of the kernel calls over the `total` real tokens: per image its rows' tokens against the
        image's prefix slot, per parent row its children's tokens against its suffix, per row its tokens against
        its own suffix slot. Computed once per pass; with one token per row no host sync, so a CUDA graph records
        it."""
        device, int32 = block.group.device, torch.int32
        n, lengths = block.count, block.lengths
        parent = block.parent
        return _PackedLayout(
            prefix=_grouped_run(block.group, block.groups, lengths, total, prefix_lengths, pool.max_prefix),
            parent=None if parent is None else _grouped_run(parent.slot, parent.slots, lengths, total, parent.used,
                                                            parent.slot_tokens),
            own=_KeyRun(order=None, inverse=None, query_starts=F.pad(lengths.cumsum(0, dtype=int32), (1, 0)),
                        key_starts=torch.arange(n + 1, dtype=int32, device=device) * pool.max_suffix,
                        keys_used=(block.start + lengths).clamp(max=pool.max_suffix).to(int32),
                        max_queries=block.tokens, causal=True))

    def _packed_attention(self, index: int, query: torch.Tensor, block: RowBlock, pool: KVPool,
                          layout: _PackedLayout) -> torch.Tensor:
        """query (N, H, d) -> (N, H * d): each image's prefix read once for all its rows (each parent's suffix once
        for all its children), each row's suffix by that row, merged by log-sum-exp."""
        groups = slice(block.group_first, block.group_first + block.groups)
        rows = slice(block.first, block.first + block.count)
        parts = [self._attend_run(query, layout.prefix, pool.prefix_k[index][groups], pool.prefix_v[index][groups])]
        if layout.parent is not None:
            parts.append(self._attend_run(query, layout.parent, block.parent.keys[index], block.parent.values[index]))
        parts.append(self._attend_run(query, layout.own, pool.suffix_k[index][rows], pool.suffix_v[index][rows]))
        return merge(parts).reshape(query.shape[0], -1).to(query.dtype)

    def _attend_run(self, query: torch.Tensor, run: _KeyRun, keys: torch.Tensor, values: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (N, H, d) against slots (S, tokens, Hkv, d) -> output (N, H, d), log-sum-exp (N, H)."""
        grouped = query if run.order is None else query[run.order]
        out, lse = attend_packed(grouped, keys.flatten(0, 1), values.flatten(0, 1), run.query_starts, run.key_starts,
                                 run.keys_used, run.max_queries, keys.shape[1], run.causal, self.scale)
        if run.inverse is None:
            return out, lse
        return out[run.inverse], lse[run.inverse]

    # -- dense attention (CPU, fp32: the reference) --------------------------------------------------------------
    def _dense_layout(self, block: RowBlock, prefix_lengths: torch.Tensor, real: torch.Tensor | slice
                      ) -> _DenseLayout:
        parent = block.parent
        return _DenseLayout(real=real, suffix_bias=self._suffix_bias(block, block.suffix_keys),
                            prefix_bias=length_bias(prefix_lengths, block.prefix_keys),
                            parent_bias=None if parent is None else length_bias(parent.used[parent.slot],
                                                                                parent.slot_tokens))

    def _suffix_bias(self, block: RowBlock, keys: int) -> torch.Tensor:
        """(n, 1, T * g, keys): query token i of a row sees its suffix positions <= start + i (causal)."""
        device = block.start.device
        query_pos = block.start[:, None] + torch.arange(block.tokens, device=device)[None, :]  # (n, T)
        query_pos = query_pos.repeat_interleave(self.group_size, dim=1)  # (n, T * g), order (token, head in group)
        key_pos = torch.arange(keys, device=device)
        bias = torch.zeros((block.count, query_pos.shape[1], keys), device=device)
        bias.masked_fill_(key_pos[None, None, :] > query_pos[:, :, None], float("-inf"))
        return bias[:, None]

    def _dense_attention(self, index: int, query: torch.Tensor, block: RowBlock, pool: KVPool,
                         layout: _DenseLayout) -> torch.Tensor:
        """query (N, H, d) real tokens -> (N, H * d): attention over the row's image prefix, its parent's suffix
        and its own suffix, on the rows padded to T (the padding's queries are dropped after)."""
        n, tokens, keys = block.count, block.tokens, block.suffix_keys
        kv_heads, g, d = self.num_kv_heads, self.group_size, self.head_dim
        padded = query.new_zeros((n * tokens, *query.shape[1:]))
        padded[layout.real] = query
        padded = padded.view(n, tokens, kv_heads, g, d)
        # prefix: every image's rows as one query block (G, Hkv, W * T * g, d) against that image's prefix
        grid = query.new_zeros((block.groups, block.width, tokens, kv_heads, g, d))
        grid[block.group, block.local] = padded
        grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(block.groups, kv_heads, -1, d)
        groups = slice(block.group_first, block.group_first + block.groups)
        prefix_out, prefix_lse = attend(grid, pool.prefix_k[index][groups, :block.prefix_keys].transpose(1, 2),
                                        pool.prefix_v[index][groups, :block.prefix_keys].transpose(1, 2),
                                        layout.prefix_bias, self.scale)
        prefix_out = prefix_out.view(block.groups, kv_heads, block.width, tokens, g, d).permute(0, 2, 3, 1, 4, 5)
        prefix_lse = prefix_lse.view(block.groups, kv_heads, block.width, tokens, g).permute(0, 2, 3, 1, 4)
        parts = [(prefix_out[block.group, block.local], prefix_lse[block.group, block.local])]  # (n, T, Hkv, g, d)
        # parent and own suffix: each row against those keys
        own = padded.permute(0, 2, 1, 3, 4).reshape(n, kv_heads, tokens * g, d)
        parent = block.parent
        if parent is not None:
            parts.append(self._row_part(own, parent.keys[index][parent.slot], parent.values[index][parent.slot],
                                        layout.parent_bias, tokens))
        rows = slice(block.first, block.first + n)
        parts.append(self._row_part(own, pool.suffix_k[index][rows, :keys], pool.suffix_v[index][rows, :keys],
                                    layout.suffix_bias, tokens))
        out = merge(parts)  # (n, T, Hkv, g, d)
        return out.reshape(n * tokens, self.num_heads * d)[layout.real].to(query.dtype)

    def _row_part(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                  tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """query (n, Hkv, T * g, d) against per-row keys (n, K, Hkv, d) -> out (n, T, Hkv, g, d), lse (n, T, Hkv, g)."""
        n, kv_heads, _, d = query.shape
        out, lse = attend(query, keys.transpose(1, 2), values.transpose(1, 2), bias, self.scale)
        return (out.view(n, kv_heads, tokens, -1, d).permute(0, 2, 1, 3, 4),
                lse.view(n, kv_heads, tokens, -1).permute(0, 2, 1, 3))


def _real_positions(block: RowBlock) -> torch.Tensor | slice:
    """The real tokens' indices among the block's n * T padded positions (all of them, as a slice, when every row
    has one token: decoding, where a CUDA graph cannot follow a data-dependent count)."""
    if block.tokens == 1:
        return slice(None)
    steps = torch.arange(block.tokens, device=block.lengths.device)
    return (steps[None, :] < block.lengths[:, None]).reshape(-1).nonzero()[:, 0]


def _grouped_run(slot_of_row: torch.Tensor, slots: int, lengths: torch.Tensor, total: int, used: torch.Tensor,
                 stride: int) -> _KeyRun:
    """The rows' `total` tokens grouped by the slot they read (one query sequence per slot) against `slots` slots of
    `stride` stored positions, `used` (slots,) of them real."""
    device, int32 = slot_of_row.device, torch.int32
    by_token = slot_of_row if total == slot_of_row.shape[0] else slot_of_row.repeat_interleave(lengths,
                                                                                                 output_size=total)
    order = torch.argsort(by_token, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(total, device=device)
    per_slot = torch.zeros(slots, dtype=int32, device=device).scatter_add_(0, slot_of_row, lengths.to(int32))
    return _KeyRun(order=order, inverse=inverse, query_starts=F.pad(per_slot.cumsum(0, dtype=int32), (1, 0)),
                   key_starts=torch.arange(slots + 1, dtype=int32, device=device) * stride,
                   keys_used=used.to(int32), max_queries=total, causal=False)
