"""Small helpers shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from osprey.inference import SamplingParams


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + png_b64(image)


def our_greedy_tokens(pipe, prompts, max_new_tokens: int, share_prefix: bool) -> list[list[int]]:
    """Our decoder's greedy token ids per prompt (EOS left out), read from the stream events."""
    tokens: list[list[int]] = [[] for _ in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for step in pipe.generate_stream(prompts, params, share_prefix=share_prefix):
        for event in step:
            if event.token_id is not None:
                tokens[event.row].append(event.token_id)
    return tokens


def transformers_greedy_tokens(pipe, prompts, max_new_tokens: int) -> list[list[int]]:
    """The independent reference: transformers' own greedy `generate` on the same prompt embeddings."""
    rows = [pipe.model.merge_embeddings(p.input_ids[None].to(pipe.device), p.image.tokens[None], p.mask_tokens,
                                        p.pos_tokens)[0] for p in prompts]
    length = max(r.shape[0] for r in rows)  # left-padded with zeros and masked, as transformers expects
    embeds = rows[0].new_zeros((len(rows), length, rows[0].shape[1]))
    attention = torch.zeros((len(rows), length), dtype=torch.long, device=pipe.device)
    for index, row in enumerate(rows):
        embeds[index, length - row.shape[0]:] = row
        attention[index, length - row.shape[0]:] = 1
    out = pipe.model.language_model.generate(
        inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=pipe.eos_token_id, pad_token_id=pipe.eos_token_id)
    rows = []
    for row in out.tolist():
        rows.append(row[:row.index(pipe.eos_token_id)] if pipe.eos_token_id in row else row)
    return rows
