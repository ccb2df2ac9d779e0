"""The Llama forward passes of the engine, over the weights of a transformers `LlamaForCausalLM`.

Three passes share one layer walk: a prefix prefill (one image's shared prefix, causal, its keys and values
stored in a prefix slot), a suffix prefill (the new rows' own tokens, padded to one length) and a decoding step
(one token per live row). The last two attend over [prefix of the row's image] + [the row's own suffix] with
`osprey.engine.attention`: the prefix as one query block per image, so its keys are read once for all of that
image's rows. Norms, projections, rotary embedding and MLP are the transformers modules themselves, so the
numerics are the reference model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from osprey.engine.attention import attend, attend_packed, length_bias, merge, packed_kernel_runs
from osprey.engine.compiled import compiled_layers_agree, plain_linears
from osprey.engine.kv import KVPool

try:  # Triton ships with CUDA builds of torch; without it decoding uses FlashAttention (CUDA) or the dense path
    from osprey.engine import decode_attention as triton_decode
except ImportError:
    triton_decode = None

__all__ = ["LlamaForward", "RowBlock", "supports"]

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)


def supports(language_model: PreTrainedModel) -> bool:
    """The engine runs Llama-architecture language models (Osprey's Vicuna, the built-in and tiny models)."""
    return getattr(language_model.config, "model_type", None) in SUPPORTED_MODEL_TYPES


@dataclass
class RowBlock:
    """Query rows of one pass, all in the pool: rows `first .. first + n - 1`, each with `tokens` new tokens
    (padded to the same count) written from suffix position `start` (n,).

    `group` (n,) is each row's image slot relative to `group_first`, `local` (n,) its index within that image;
    `groups` image slots from `group_first` take part, `width` = max local + 1.
    """

    first: int
    count: int
    tokens: int
    start: torch.Tensor  # (n,) long: suffix position of the first new token
    lengths: torch.Tensor  # (n,) long: real new tokens per row (<= tokens)
    group: torch.Tensor  # (n,) long
    local: torch.Tensor  # (n,) long
    group_first: int
    groups: int
    width: int
    prefix_keys: int  # prefix positions to read (>= the longest prefix of the groups)
    suffix_keys: int  # suffix positions to read (>= max start + tokens)


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
class _PackedLayout:
    order: torch.Tensor  # (n,) rows sorted by image slot
    inverse: torch.Tensor  # (n,) back to pool order
    prefix_query_starts: torch.Tensor  # (groups + 1,) int32
    prefix_key_starts: torch.Tensor  # (groups + 1,) int32
    prefix_used: torch.Tensor  # (groups,) int32
    suffix_query_starts: torch.Tensor  # (n + 1,) int32
    suffix_key_starts: torch.Tensor  # (n + 1,) int32
    suffix_used: torch.Tensor  # (n,) int32


@dataclass
class _DenseLayout:
    suffix_bias: torch.Tensor  # (n, 1, T * g, suffix keys)
    prefix_bias: torch.Tensor  # (groups, 1, 1, prefix keys)


class LlamaForward:
    def __init__(self, language_model: PreTrainedModel, fast_kernels: bool = False) -> None:
        """`fast_kernels`: on CUDA, the Triton decoding kernels and the compiled layer pieces (each checked at
        start-up, falling back on failure). Off by default until measured on a GPU (docs/engine.md)."""
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
        # torch.compile'd layer pieces on CUDA: norms, rotary, activation and residuals fused around the GEMMs
        self.fused = (compiled_layers_agree(self, self.model.layers[0], self._rope)
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
    def prefill_prefix(self, embeds: torch.Tensor, pool: KVPool, slot: int) -> None:
        """embeds (P, D): causal pass over one shared prefix; its keys/values go to prefix slot `slot`."""
        length = embeds.shape[0]
        positions = torch.arange(length, device=embeds.device)
        cos, sin = self._rope(embeds, positions)
        hidden = embeds
        for index, layer in enumerate(self.model.layers):
            query, key, value = self._qkv(layer, hidden, cos, sin)
            pool.prefix_k[index][slot, :length] = key
            pool.prefix_v[index][slot, :length] = value
            out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                                 value.transpose(0, 1)[None], is_causal=True, scale=self.scale,
                                                 enable_gqa=self.group_size > 1)
            hidden = self._finish_layer(layer, hidden, out[0].transpose(0, 1).reshape(length, -1))

    def forward_rows(self, embeds: torch.Tensor, block: RowBlock, pool: KVPool, prefix_lengths: torch.Tensor
                     ) -> torch.Tensor:
        """embeds (n, T, D) new tokens of the block's rows -> logits (n, V) fp32 at each row's last real token.

        `prefix_lengths` (groups,): prefix length of each image slot taking part.
        """
        hidden = self.row_hidden(embeds, block, pool, prefix_lengths)
        last = hidden[torch.arange(block.count, device=embeds.device), block.lengths - 1]
        return self.logits(last)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) final-normed hidden states -> (..., V) fp32 logits."""
        return self.head(hidden).float()

    def row_hidden(self, embeds: torch.Tensor, block: RowBlock, pool: KVPool, prefix_lengths: torch.Tensor
                   ) -> torch.Tensor:
        """embeds (n, T, D) -> final-normed hidden states (n, T, D) at every position (padding included); the
        rows' keys and values are written to their pool slots from `block.start` on. Scoring reads every
        position (osprey.scoring); decoding only each row's last (`forward_rows`)."""
        n, tokens = block.count, block.tokens
        suffix_pos = block.start[:, None] + torch.arange(tokens, device=embeds.device)[None, :]  # (n, T)
        positions = prefix_lengths[block.group][:, None] + suffix_pos
        cos, sin = self._rope(embeds, positions.reshape(-1))
        rows = torch.arange(block.first, block.first + n, device=embeds.device)[:, None].expand(n, tokens)
        write_at = suffix_pos.clamp(max=pool.max_suffix - 1)
        if tokens == 1 and self.decode_kernel:
            layout, attention = self._decode_layout(block, pool, prefix_lengths), self._decode_attention
        elif packed_kernel_runs(embeds):
            layout, attention = self._packed_layout(block, pool, prefix_lengths), self._packed_attention
        else:
            layout, attention = self._dense_layout(block, prefix_lengths), self._dense_attention
        hidden = embeds.reshape(n * tokens, -1)
        for index, layer in enumerate(self.model.layers):
            query, key, value = self._qkv(layer, hidden, cos, sin)
            pool.suffix_k[index][rows, write_at] = key.view(n, tokens, self.num_kv_heads, self.head_dim)
            pool.suffix_v[index][rows, write_at] = value.view(n, tokens, self.num_kv_heads, self.head_dim)
            out = attention(index, query.view(n, tokens, self.num_heads, self.head_dim), block, pool, layout)
            hidden = self._finish_layer(layer, hidden, out)
        return self.model.norm(hidden.view(n, tokens, -1))

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
        """query (n, 1, H, d) -> (n, H * d) with the Triton decoding kernels."""
        groups = slice(block.group_first, block.group_first + block.groups)
        rows = slice(block.first, block.first + block.count)
        out = triton_decode.decode_attention(query[:, 0], pool.prefix_k[index][groups], pool.prefix_v[index][groups],
                               pool.suffix_k[index][rows], pool.suffix_v[index][rows], layout, self.scale)
        return out.reshape(block.count, -1).to(query.dtype)

    # -- packed attention (CUDA, fp16/bf16) --------------------------------------------------------------------
    def _packed_layout(self, block: RowBlock, pool: KVPool, prefix_lengths: torch.Tensor) -> _PackedLayout:
        """The sequences of the two kernel calls: per image its rows' tokens (rows sorted by image) against the
        image's prefix slot, per row its tokens against its own suffix slot. Computed once per pass; fixed shapes,
        no host sync, so a CUDA graph records it."""
        device, int32 = block.group.device, torch.int32
        n, tokens = block.count, block.tokens
        order = torch.argsort(block.group, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=device)
        per_image = torch.zeros(block.groups, dtype=int32, device=device).scatter_add_(
            0, block.group, torch.full((n,), tokens, dtype=int32, device=device))
        return _PackedLayout(
            order=order, inverse=inverse,
            prefix_query_starts=F.pad(per_image.cumsum(0, dtype=int32), (1, 0)),
            prefix_key_starts=torch.arange(block.groups + 1, dtype=int32, device=device) * pool.max_prefix,
            prefix_used=prefix_lengths.to(int32),
            suffix_query_starts=torch.arange(n + 1, dtype=int32, device=device) * tokens,
            suffix_key_starts=torch.arange(n + 1, dtype=int32, device=device) * pool.max_suffix,
            suffix_used=(block.start + tokens).clamp(max=pool.max_suffix).to(int32),
        )

    def _packed_attention(self, index: int, query: torch.Tensor, block: RowBlock, pool: KVPool,
                          layout: _PackedLayout) -> torch.Tensor:
        """query (n, T, H, d) -> (n * T, H * d): each image's prefix read once for all its rows, each row's suffix
        read by that row, merged by log-sum-exp."""
        n, tokens, heads, d = block.count, block.tokens, self.num_heads, self.head_dim
        groups = slice(block.group_first, block.group_first + block.groups)
        rows = slice(block.first, block.first + n)
        by_image = query[layout.order].reshape(n * tokens, heads, d)
        prefix_out, prefix_lse = attend_packed(
            by_image, pool.prefix_k[index][groups].flatten(0, 1), pool.prefix_v[index][groups].flatten(0, 1),
            layout.prefix_query_starts, layout.prefix_key_starts, layout.prefix_used, n * tokens, pool.max_prefix,
            False, self.scale)
        suffix_out, suffix_lse = attend_packed(
            query.reshape(n * tokens, heads, d), pool.suffix_k[index][rows].flatten(0, 1),
            pool.suffix_v[index][rows].flatten(0, 1), layout.suffix_query_starts, layout.suffix_key_starts,
            layout.suffix_used, tokens, pool.max_suffix, True, self.scale)
        out = merge(prefix_out.view(n, tokens, heads, d)[layout.inverse],
                    prefix_lse.view(n, tokens, heads)[layout.inverse],
                    suffix_out.view(n, tokens, heads, d), suffix_lse.view(n, tokens, heads))
        return out.reshape(n * tokens, heads * d).to(query.dtype)

    # -- dense attention (CPU, fp32: the reference) --------------------------------------------------------------
    def _dense_layout(self, block: RowBlock, prefix_lengths: torch.Tensor) -> _DenseLayout:
        return _DenseLayout(suffix_bias=self._suffix_bias(block, block.suffix_keys),
                            prefix_bias=length_bias(prefix_lengths, block.prefix_keys))

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
        """query (n, T, H, d) -> (n * T, H * d): attention over the row's image prefix and its own suffix."""
        n, tokens, keys = block.count, block.tokens, block.suffix_keys
        kv_heads, g, d = self.num_kv_heads, self.group_size, self.head_dim
        # prefix: every image's rows as one query block (G, Hkv, W * T * g, d) against that image's prefix
        grid = query.new_zeros((block.groups, block.width, tokens, kv_heads, g, d))
        grid[block.group, block.local] = query.view(n, tokens, kv_heads, g, d)
        grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(block.groups, kv_heads, -1, d)
        groups = slice(block.group_first, block.group_first + block.groups)
        prefix_out, prefix_lse = attend(grid, pool.prefix_k[index][groups, :block.prefix_keys].transpose(1, 2),
                                        pool.prefix_v[index][groups, :block.prefix_keys].transpose(1, 2),
                                        layout.prefix_bias, self.scale)
        prefix_out = prefix_out.view(block.groups, kv_heads, block.width, tokens, g, d).permute(0, 2, 3, 1, 4, 5)
        prefix_lse = prefix_lse.view(block.groups, kv_heads, block.width, tokens, g).permute(0, 2, 3, 1, 4)
        prefix_out = prefix_out[block.group, block.local]  # (n, T, Hkv, g, d)
        prefix_lse = prefix_lse[block.group, block.local]
        # suffix: each row against its own keys
        rows = slice(block.first, block.first + n)
        own = query.view(n, tokens, kv_heads, g, d).permute(0, 2, 1, 3, 4).reshape(n, kv_heads, tokens * g, d)
        suffix_out, suffix_lse = attend(own, pool.suffix_k[index][rows, :keys].transpose(1, 2),
                                        pool.suffix_v[index][rows, :keys].transpose(1, 2), layout.suffix_bias,
                                        self.scale)
        suffix_out = suffix_out.view(n, kv_heads, tokens, g, d).permute(0, 2, 1, 3, 4)
        suffix_lse = suffix_lse.view(n, kv_heads, tokens, g).permute(0, 2, 1, 3)
        out = merge(prefix_out, prefix_lse, suffix_out, suffix_lse)  # (n, T, Hkv, g, d)
        return out.reshape(n * tokens, self.num_heads * d).to(query.dtype)
