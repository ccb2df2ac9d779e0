"""The Llama forward passes of the engine, over the weights of a transformers `LlamaForCausalLM`.

Three passes share one layer walk: a prefix prefill (one image's shared prefix, causal, its keys and values
stored in a prefix slot), a suffix prefill (the new rows' own tokens, padded to one length) and a decoding step
(one token per live row). The last two attend over [prefix of the row's image] + [the row's own suffix] with
`osprey.engine.attention`: the prefix as one query block per image, so its keys are read once for all of that
image's rows. Norms, projections, rotary embedding and MLP are the transformers modules themselves, so the
numerics are the reference model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from osprey.engine.attention import attend, length_bias, merge
from osprey.engine.kv import KVPool

__all__ = ["LlamaForward", "RowBlock", "supports"]

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


class LlamaForward:
    def __init__(self, language_model: PreTrainedModel) -> None:
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
            pool.prefix_k[index][slot, :, :length] = key.transpose(0, 1)
            pool.prefix_v[index][slot, :, :length] = value.transpose(0, 1)
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
        keys = block.suffix_keys
        suffix_bias = self._suffix_bias(block, keys)
        prefix_bias = length_bias(prefix_lengths, block.prefix_keys)
        hidden = embeds.reshape(n * tokens, -1)
        for index, layer in enumerate(self.model.layers):
            query, key, value = self._qkv(layer, hidden, cos, sin)
            pool.suffix_k[index][rows, :, write_at] = key.view(n, tokens, self.num_kv_heads, self.head_dim)
            pool.suffix_v[index][rows, :, write_at] = value.view(n, tokens, self.num_kv_heads, self.head_dim)
            out = self._attention(index, query.view(n, tokens, self.num_heads, self.head_dim), block, pool,
                                  keys, suffix_bias, prefix_bias)
            hidden = self._finish_layer(layer, hidden, out)
        return self.model.norm(hidden.view(n, tokens, -1))

    # -- pieces ------------------------------------------------------------------------------------------------
    def _rope(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.model.rotary_emb(like, positions[None])
        return cos[0], sin[0]

    def _qkv(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (M, D) -> query (M, H, d), key and value (M, Hkv, d), rotary applied."""
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = attn.q_proj(normed).view(-1, self.num_heads, self.head_dim)
        key = attn.k_proj(normed).view(-1, self.num_kv_heads, self.head_dim)
        value = attn.v_proj(normed).view(-1, self.num_kv_heads, self.head_dim)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
        return query, key, value

    def _finish_layer(self, layer, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        hidden = hidden + layer.self_attn.o_proj(attention)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _suffix_bias(self, block: RowBlock, keys: int) -> torch.Tensor:
        """(n, 1, T * g, keys): query token i of a row sees its suffix positions <= start + i (causal)."""
        device = block.start.device
        query_pos = block.start[:, None] + torch.arange(block.tokens, device=device)[None, :]  # (n, T)
        query_pos = query_pos.repeat_interleave(self.group_size, dim=1)  # (n, T * g), order (token, head in group)
        key_pos = torch.arange(keys, device=device)
        bias = torch.zeros((block.count, query_pos.shape[1], keys), device=device)
        bias.masked_fill_(key_pos[None, None, :] > query_pos[:, :, None], float("-inf"))
        return bias[:, None]

    def _attention(self, index: int, query: torch.Tensor, block: RowBlock, pool: KVPool, keys: int,
                   suffix_bias: torch.Tensor, prefix_bias: torch.Tensor) -> torch.Tensor:
        """query (n, T, H, d) -> (n * T, H * d): attention over the row's image prefix and its own suffix."""
        n, tokens = block.count, block.tokens
        kv_heads, g, d = self.num_kv_heads, self.group_size, self.head_dim
        # prefix: every image's rows as one query block (G, Hkv, W * T * g, d) against that image's prefix
        grid = query.new_zeros((block.groups, block.width, tokens, kv_heads, g, d))
        grid[block.group, block.local] = query.view(n, tokens, kv_heads, g, d)
        grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(block.groups, kv_heads, -1, d)
        groups = slice(block.group_first, block.group_first + block.groups)
        prefix_out, prefix_lse = attend(grid, pool.prefix_k[index][groups, :, :block.prefix_keys],
                                        pool.prefix_v[index][groups, :, :block.prefix_keys], prefix_bias, self.scale)
        prefix_out = prefix_out.view(block.groups, kv_heads, block.width, tokens, g, d).permute(0, 2, 3, 1, 4, 5)
        prefix_lse = prefix_lse.view(block.groups, kv_heads, block.width, tokens, g).permute(0, 2, 3, 1, 4)
        prefix_out = prefix_out[block.group, block.local]  # (n, T, Hkv, g, d)
        prefix_lse = prefix_lse[block.group, block.local]
        # suffix: each row against its own keys
        rows = slice(block.first, block.first + n)
        own = query.view(n, tokens, kv_heads, g, d).permute(0, 2, 1, 3, 4).reshape(n, kv_heads, tokens * g, d)
        suffix_out, suffix_lse = attend(own, pool.suffix_k[index][rows, :, :keys],
                                        pool.suffix_v[index][rows, :, :keys], suffix_bias, self.scale)
        suffix_out = suffix_out.view(n, kv_heads, tokens, g, d).permute(0, 2, 1, 3, 4)
        suffix_lse = suffix_lse.view(n, kv_heads, tokens, g).permute(0, 2, 1, 3)
        out = merge(prefix_out, prefix_lse, suffix_out, suffix_lse)  # (n, T, Hkv, g, d)
        return out.reshape(n * tokens, self.num_heads * d).to(query.dtype)
