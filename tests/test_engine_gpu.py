"""The engine's CUDA paths (the memory-efficient attention kernel with its log-sum-exp, bf16 decoding) against
references; skipped without a GPU, run on the device machine with `python -m pytest -m gpu`."""

import numpy as np
import pytest
import torch
from PIL import Image

from osprey.engine.attention import attend, length_bias
from osprey.inference import OspreyPipeline, SamplingParams
from osprey.prompts import task_prompt

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_kernel_equals_the_reference_math(dtype):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 5, 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(3, 4, 37, 64, device="cuda", dtype=dtype) for _ in range(2))
    bias = length_bias(torch.tensor([37, 20, 1], device="cuda"), 37)
    out, lse = attend(q, k, v, bias, 0.125)
    ref_out, ref_lse = attend(q.cpu(), k.cpu(), v.cpu(), bias.cpu(), 0.125)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_on_cuda_equal_transformers_generate(tiny_model_dir, dtype):
    pipe = OspreyPipeline.from_pretrained(tiny_model_dir, device="cuda", dtype=dtype)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))
    masks = np.zeros((6, 40, 56), bool)
    for q in range(6):
        masks[q, 3 * q:3 * q + 12, 5 * q:5 * q + 20] = True
    prompts = pipe.prepare_each(pipe.encode_image(image), [("human", task_prompt("short"))], masks)
    ours = [[] for _ in prompts]
    for events in pipe.generate_stream(prompts, SamplingParams(max_new_tokens=16)):
        for e in events:
            if e.token_id is not None:
                ours[e.row].append(e.token_id)
    agree = 0
    for row, prompt in enumerate(prompts):
        embeds = pipe.model.merge_embeddings(prompt.input_ids[None].cuda(), prompt.image.tokens[None],
                                             prompt.mask_tokens, prompt.pos_tokens)
        with torch.inference_mode():
            ref = pipe.model.language_model.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device="cuda"),
                max_new_tokens=16, do_sample=False, eos_token_id=pipe.eos_token_id, pad_token_id=0)[0].tolist()
        ref = ref[:ref.index(pipe.eos_token_id)] if pipe.eos_token_id in ref else ref
        agree += ours[row] == ref
    assert agree == len(prompts) if dtype == torch.float32 else agree >= len(prompts) - 1
