"""The GPU paths (marked `gpu`, skipped without CUDA; run them on a GPU machine with `pytest -m gpu`): the pipeline
and the engine on CUDA against transformers' greedy generate, and Osprey-7B shapes through a real forward pass."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from helpers import our_greedy_tokens, png_b64, transformers_greedy_tokens
from PIL import Image

from osprey.config import OspreyConfig
from osprey.inference import OspreyPipeline, SamplingParams
from osprey.prompts import task_prompt

pytestmark = pytest.mark.gpu

IMAGE = Image.fromarray((np.random.default_rng(0).random((48, 72, 3)) * 255).astype(np.uint8))
MASKS = np.zeros((3, 48, 72), bool)
MASKS[0, 5:20, 10:40] = True
MASKS[1] = True
MASKS[2, 30, 60] = True


@pytest.fixture(scope="module")
def cuda_pipeline(tiny_model_dir):
    return OspreyPipeline.from_pretrained(tiny_model_dir, device="cuda", dtype=torch.float32)


def test_cuda_greedy_tokens_equal_transformers_generate(cuda_pipeline):
    enc = cuda_pipeline.encode_image(IMAGE)
    prompts = [cuda_pipeline.prepare(enc, [("human", task_prompt("short"))], MASKS[i:i + 1]) for i in range(3)]
    reference = transformers_greedy_tokens(cuda_pipeline, prompts, 12)
    assert our_greedy_tokens(cuda_pipeline, prompts, 12, share_prefix=False) == reference
    assert our_greedy_tokens(cuda_pipeline, prompts, 12, share_prefix=True) == reference


def test_engine_on_cuda_answers_what_the_cuda_pipeline_answers(tiny_model_dir, cuda_pipeline):
    from serve.background import BackgroundServer
    from serve.config import ServeConfig

    config = ServeConfig(model=str(tiny_model_dir), devices=("cuda",), dtype="float32")
    boxes = [{"box": [10, 5, 30, 15]}, {"box": [0, 0, 72, 48]}]
    with BackgroundServer(config) as server:
        r = httpx.post(server.url + "/v1/regions/describe", timeout=120, json={
            "image": png_b64(IMAGE), "regions": boxes, "task": "category", "max_tokens": 6})
    assert r.status_code == 200, r.text
    masks = np.zeros((2, 48, 72), bool)
    masks[0, 5:20, 10:40] = True
    masks[1] = True
    expected = cuda_pipeline.describe(IMAGE, masks, task="category", params=SamplingParams(max_new_tokens=6))
    assert [x["raw_text"] for x in r.json()["results"]] == [g.raw_text for g in expected]


def test_7b_shapes_in_a_real_bf16_forward_pass():
    """Osprey-7B with random bf16 weights on the GPU: image tokens (1024 x 4096), region tokens and logits over the
    full vocabulary for a prompt with the image and one region."""
    from osprey.checkpoint import build_model

    config = OspreyConfig.from_preset("osprey-7b")
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = build_model(config, device="cuda").eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, device="cuda")
        features = model.get_image_features(pixels)
        assert tuple(features.tokens.shape) == (1, config.vision.num_image_tokens, config.hidden_size)
        mask = torch.zeros(1, 512, 512, dtype=torch.bool, device="cuda")
        mask[0, 100:200, 50:300] = True
        regions = model.get_region_features(features.levels, [mask])
        assert tuple(regions.mask_tokens.shape) == tuple(regions.pos_tokens.shape) == (1, config.hidden_size)
        assert torch.isfinite(regions.mask_tokens.float()).all()
