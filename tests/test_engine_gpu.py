"""The engine's CUDA paths (FlashAttention over packed sequences and the memory-efficient kernel, each with its
log-sum-exp; bf16 decoding) against references; skipped without a GPU, run on the device machine with
`python -m pytest -m gpu`."""

import numpy as np
import pytest
import torch
from PIL import Image

from osprey.engine.attention import attend, attend_packed, length_bias
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_the_packed_kernel_equals_attention_per_sequence(dtype, causal):
    """Sequences of 3, 0, 5 and 1 queries over 7, 2, 9 and 4 used keys of slots 10 keys apart, 2 query heads per
    key head: each sequence against plain fp32 attention over its own used keys."""
    torch.manual_seed(0)
    queries, used, slot = [3, 0, 5, 1], [7, 2, 9, 4], 10
    q = torch.randn(sum(queries), 4, 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(slot * len(used), 2, 64, device="cuda", dtype=dtype) for _ in range(2))
    starts = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32, device="cuda")
    key_starts = torch.arange(5, dtype=torch.int32, device="cuda") * slot
    out, lse = attend_packed(q, k, v, starts, key_starts, torch.tensor(used, dtype=torch.int32, device="cuda"),
                             16, slot, causal, 0.125)
    for index, (count, keys) in enumerate(zip(queries, used)):
        if count == 0:
            continue
        rows = slice(int(starts[index]), int(starts[index]) + count)
        kk = k[index * slot:index * slot + keys].float().repeat_interleave(2, dim=1)  # (keys, 4, 64)
        vv = v[index * slot:index * slot + keys].float().repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), kk) * 0.125
        if causal:  # the last query sees every used key, each earlier one a key less
            visible = torch.arange(keys, device="cuda")[None, :] <= torch.arange(count, device="cuda")[:, None] + keys - count
            scores = scores.masked_fill(~visible[None], float("-inf"))
        ref_lse = torch.logsumexp(scores, dim=-1)
        ref = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vv)
        torch.testing.assert_close(out[rows].float(), ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse[rows], ref_lse.transpose(0, 1), atol=2e-2, rtol=2e-2)


def _two_image_prompts(pipe):
    """Regions of two images, the second with a longer shared prefix (more text before its region)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    masks = np.zeros((6, 40, 56), bool)
    for q in range(6):
        masks[q, 3 * q:3 * q + 12, 5 * q:5 * q + 20] = True
    prompts = pipe.prepare_each(pipe.encode_image(images[0]), [("human", task_prompt("short"))], masks)
    longer = "<image>\nThis provides an overview of the picture. Look at all of it before you answer.\nWhat is <mask><pos>?"
    return prompts + pipe.prepare_each(pipe.encode_image(images[1]), [("human", longer)], masks[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_on_cuda_equal_transformers_generate(tiny_model_dir, dtype):
    pipe = OspreyPipeline.from_pretrained(tiny_model_dir, device="cuda", dtype=dtype)
    prompts = _two_image_prompts(pipe)
    ours = [[] for _ in prompts]
    for events in pipe.generate_stream(prompts, SamplingParams(max_new_tokens=16)):
        for e in events:
            if e.token_id is not None:
                ours[e.row].append(e.token_id)
    agree = sum(ours[row] == _generate(pipe, prompt) for row, prompt in enumerate(prompts))
    assert agree == len(prompts) if dtype == torch.float32 else agree >= len(prompts) - 1


def _generate(pipe, prompt) -> list[int]:
    """transformers' greedy `generate` on the full spliced prompt, 16 tokens, up to EOS."""
    embeds = pipe.model.merge_embeddings(prompt.input_ids[None].cuda(), prompt.image.tokens[None],
                                         prompt.mask_tokens, prompt.pos_tokens)
    with torch.inference_mode():
        ref = pipe.model.language_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device="cuda"),
            max_new_tokens=16, do_sample=False, eos_token_id=pipe.eos_token_id, pad_token_id=0)[0].tolist()
    return ref[:ref.index(pipe.eos_token_id)] if pipe.eos_token_id in ref else ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_fast_kernels_run_and_agree_on_the_gpu(tiny_model_dir, dtype):
    """The engine's start-up checks compile the Triton decoding kernels and the layer pieces and compare them with
    the references; on a GPU both must pass (a silent fallback would hide a broken kernel)."""
    from osprey.engine.forward import LlamaForward

    pipe = OspreyPipeline.from_pretrained(tiny_model_dir, device="cuda", dtype=dtype)
    forward = LlamaForward(pipe.model.language_model, fast_kernels=True)
    assert forward.decode_kernel and forward.fused is not None


def test_greedy_tokens_with_the_fast_kernels_equal_transformers_generate(tiny_model_dir):
    """The Triton decoding kernels and compiled layers end to end (bf16): regions of two images against
    `generate`, as the default kernels are held to."""
    from osprey.engine.kv import PoolSize

    pipe = OspreyPipeline.from_pretrained(tiny_model_dir, device="cuda", dtype=torch.bfloat16)
    prompts = _two_image_prompts(pipe)
    session = pipe.session(PoolSize(4, 400, 16, 64), fast_kernels=True)
    assert session.decoder.forward.decode_kernel and session.decoder.forward.fused is not None
    session.add(pipe.group_requests(prompts, [SamplingParams(max_new_tokens=16)] * len(prompts)))
    ours = [[] for _ in prompts]
    while session.has_work:
        for event in session.step():
            if event.token_id is not None:
                ours[event.row].append(event.token_id)
    agree = sum(ours[row] == _generate(pipe, prompt) for row, prompt in enumerate(prompts))
    assert agree >= len(prompts) - 1
