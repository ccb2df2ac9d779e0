"""Small helpers shared by the test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import base64
import io

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
    embeds, attention, prefix = pipe._embed(prompts, share_prefix=False)
    assert prefix is None
    out = pipe.model.language_model.generate(
        inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=pipe.eos_token_id, pad_token_id=pipe.eos_token_id)
    rows = []
    for row in out.tolist():
        rows.append(row[:row.index(pipe.eos_token_id)] if pipe.eos_token_id in row else row)
    return rows
