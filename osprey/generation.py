"""Batched autoregressive decoding from prompt embeddings, with per-row sampling settings and per-step output.

One loop serves `generate` and streaming: rows are left-padded, each has its own temperature, top-p, seed and
token budget, and finished rows stop counting as soon as they emit EOS.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, checked on the decoded text

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class DecodeStep:
    tokens: torch.Tensor  # (B,) the token chosen for each row this step (meaningless for rows already done)
    active: torch.Tensor  # (B,) bool: the row produced `tokens` this step
    finished: torch.Tensor  # (B,) bool: the row is done after this step
    hit_eos: torch.Tensor  # (B,) bool: the row ended with EOS this step


def left_pad(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (T_i, D) -> (B, T, D) left-padded with zeros and the (B, T) attention mask."""
    length = max(e.shape[0] for e in embeds)
    batch = embeds[0].new_zeros((len(embeds), length, embeds[0].shape[1]))
    mask = torch.zeros((len(embeds), length), dtype=torch.long, device=embeds[0].device)
    for row, e in enumerate(embeds):
        batch[row, length - e.shape[0]:] = e
        mask[row, length - e.shape[0]:] = 1
    return batch, mask


@dataclass
class _Sampler:
    params: list[SamplingParams]
    device: torch.device
    generators: list[torch.Generator | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        for p in self.params:
            if p.temperature > 0:
                g = torch.Generator(device=self.device)
                g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item()))
                self.generators.append(g)
            else:
                self.generators.append(None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> (B,) tokens; greedy rows argmax, sampling rows temperature + nucleus."""
        tokens = logits.argmax(dim=-1)
        for row, (p, g) in enumerate(zip(self.params, self.generators)):
            if g is None:
                continue
            probs = torch.softmax(logits[row].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # smallest prefix with mass >= top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            tokens[row] = torch.multinomial(probs, 1, generator=g)[0]
        return tokens


@torch.inference_mode()
def decode(
    language_model: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    params: Sequence[SamplingParams],
    eos_token_id: int,
    shared_prefix: torch.Tensor | None = None,
) -> Iterator[DecodeStep]:
    """Yield one DecodeStep per generated position until every row is finished (EOS or its token budget).

    `shared_prefix` (1, P, D): embeddings that precede every row (then rows must not be padded); it is prefilled
    once and its KV cache repeated for all rows, e.g. the system prompt and image tokens shared by all regions of
    one image. The caller may stop iterating at any time (e.g. stop strings, a cancelled request).
    """
    batch = inputs_embeds.shape[0]
    if len(params) != batch:
        raise ValueError(f"{len(params)} sampling params for {batch} rows")
    device = inputs_embeds.device
    sampler = _Sampler(list(params), device)
    budgets = torch.tensor([p.max_new_tokens for p in params], device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = {_cache_kwarg(language_model): DynamicCache()}
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if shared_prefix is not None:
        if not bool(attention_mask.all()):
            raise ValueError("rows after a shared prefix must not be padded")
        prefix_length = shared_prefix.shape[1]
        language_model(inputs_embeds=shared_prefix, use_cache=True, logits_to_keep=1, **cache)
        next(iter(cache.values())).batch_repeat_interleave(batch)
        attention_mask = torch.cat([attention_mask.new_ones((batch, prefix_length)), attention_mask], dim=1)
        position_ids = position_ids + prefix_length
    out = language_model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=True, logits_to_keep=1, **cache,
    )
    next_position = position_ids[:, -1:] + 1
    for step in range(int(budgets.max())):
        tokens = sampler(out.logits[:, -1])
        active = ~done
        hit_eos = active & (tokens == eos_token_id)
        done = done | hit_eos | (budgets <= step + 1)
        yield DecodeStep(tokens=tokens, active=active, finished=done.clone(), hit_eos=hit_eos)
        if bool(done.all()):
            return
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        feed = torch.where(done, torch.full_like(tokens, eos_token_id), tokens)
        out = language_model(
            input_ids=feed[:, None], attention_mask=attention_mask, position_ids=next_position,
            use_cache=True, **cache,
        )
        next_position = next_position + 1


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers renamed the forward argument `past_key_values` to `cache` (5.2x); accept either version."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
