"""The one inference path: describe end to end, batching equals one-by-one, streaming, errors."""

import numpy as np
import pytest
import torch
from helpers import our_greedy_tokens, transformers_greedy_tokens
from PIL import Image

from osprey.inference import SamplingParams
from osprey.prompts import task_prompt


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((48, 72, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def masks():
    m = np.zeros((4, 48, 72), bool)
    m[0, 5:20, 10:40] = True
    m[1] = True
    m[2, 30, 60] = True  # one pixel
    return m  # m[3] empty


def test_describe_returns_one_answer_per_mask_and_encodes_once(tiny_pipeline, image, masks, monkeypatch):
    calls = []
    original = tiny_pipeline.model.get_image_features
    monkeypatch.setattr(tiny_pipeline.model, "get_image_features", lambda px: calls.append(px.shape) or original(px))
    answers = tiny_pipeline.describe(image, masks, task="category", params=SamplingParams(max_new_tokens=5))
    assert len(answers) == 4 and len(calls) == 1
    # the same as preparing each region's official prompt and generating it alone
    enc = tiny_pipeline.encode_image(image)
    alone = [tiny_pipeline.generate([tiny_pipeline.prepare(enc, [("human", task_prompt("category"))], masks[i:i + 1])],
                                    SamplingParams(max_new_tokens=5))[0] for i in range(4)]
    assert answers == alone
    prompt_tokens = len(tiny_pipeline._prompt_ids([("human", task_prompt("category"))]))
    for a in answers:
        assert a.prompt_tokens == prompt_tokens
        assert (a.finish_reason, a.completion_tokens) in (("length", 5), *(("stop", n) for n in range(1, 5)))


def test_batched_generation_equals_one_by_one(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    params = SamplingParams(max_new_tokens=6)
    prompts = [
        tiny_pipeline.prepare(enc, [("human", task_prompt("short"))], masks[:1]),
        tiny_pipeline.prepare(enc, [("human", task_prompt("category")), ("gpt", "a thing"),
                                    ("human", "and <mask><pos> next to <mask><pos>?")], masks[:3]),
        tiny_pipeline.prepare(enc, [("human", "<image>\nWhat is <mask><pos>?")], masks[3:4]),
    ]
    batched = tiny_pipeline.generate(prompts, params)
    single = [tiny_pipeline.generate([p], params)[0] for p in prompts]
    assert [b.raw_text for b in batched] == [s.raw_text for s in single]
    assert [b.completion_tokens for b in batched] == [s.completion_tokens for s in single]


def test_shared_prefix_prefill_equals_full_prefill(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    ids = tiny_pipeline._prompt_ids([("human", task_prompt("short"))])
    tokens, pos = tiny_pipeline.region_tokens(enc, masks)
    from osprey.inference import PreparedPrompt

    prompts = [PreparedPrompt(ids, enc, tokens[i:i + 1], pos[i:i + 1]) for i in range(4)]
    params = SamplingParams(max_new_tokens=6)
    shared = tiny_pipeline.generate(prompts, params, share_prefix=True)
    full = tiny_pipeline.generate(prompts, params, share_prefix=False)
    assert [s.raw_text for s in shared] == [f.raw_text for f in full]
    assert len(tiny_pipeline.group_requests(prompts, [params] * 4, share_prefix=True)) == 1  # one shared prefix
    assert len(tiny_pipeline.group_requests(prompts, [params] * 4, share_prefix=False)) == 4


def test_seeded_sampling_is_reproducible(tiny_pipeline, image, masks):
    params = SamplingParams(max_new_tokens=8, temperature=0.9, seed=7)
    a = tiny_pipeline.describe(image, masks[:2], params=params)
    b = tiny_pipeline.describe(image, masks[:2], params=params)
    assert [x.raw_text for x in a] == [x.raw_text for x in b]


def test_stream_concatenates_to_the_generated_text(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    prompt = tiny_pipeline.prepare(enc, [("human", task_prompt("detailed"))], masks[:1])
    params = SamplingParams(max_new_tokens=7)
    text = "".join(e.text_delta for events in tiny_pipeline.generate_stream([prompt], params) for e in events)
    assert text == tiny_pipeline.generate([prompt], params)[0].raw_text


def test_cancelled_rows_finish_early(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    prompt = tiny_pipeline.prepare(enc, [("human", task_prompt("short"))], masks[:1])
    events = [e for step in tiny_pipeline.generate_stream([prompt, prompt], SamplingParams(max_new_tokens=20),
                                                         cancelled=lambda row: row == 1) for e in step]
    assert any(e.row == 1 and e.finish_reason == "cancelled" for e in events)
    assert not any(e.row == 1 and e.text_delta for e in events)


def test_bad_inputs_raise_clear_errors(tiny_pipeline, image, masks):
    enc = tiny_pipeline.encode_image(image)
    with pytest.raises(ValueError, match=r"references 1 regions .* but 2 masks"):
        tiny_pipeline.prepare(enc, [("human", task_prompt("short"))], masks[:2])
    with pytest.raises(ValueError, match=r"masks must be \(Q, 48, 72\)"):
        tiny_pipeline.prepare(enc, [("human", task_prompt("short"))], np.zeros((1, 10, 10), bool))
    with pytest.raises(ValueError, match="no <image> placeholder"):
        tiny_pipeline.prepare(enc, [("human", "what is <mask><pos>?")], masks[:1])
    with pytest.raises(ValueError, match="unknown task"):
        tiny_pipeline.describe(enc, masks[:1], task="nonsense")
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_describe_accepts_a_path_and_torch_masks(tiny_pipeline, image, masks, tmp_path):
    path = tmp_path / "x.png"
    image.save(path)
    out = tiny_pipeline.describe(str(path), torch.from_numpy(masks[:2]), params=SamplingParams(max_new_tokens=3))
    assert len(out) == 2
    with pytest.raises(ValueError, match="cannot read image"):
        tiny_pipeline.describe(str(tmp_path / "missing.png"), masks[:1])


@pytest.mark.parametrize("width, height", [(128, 128), (192, 128), (128, 320), (64, 64)])  # tiny: S = 128
def test_preprocess_image_is_the_official_resize_then_normalise(width, height):
    """Short side to S (bicubic), normalised, then bilinear to S x S; a square image of size S is only normalised
    (the bilinear resize to its own size is the identity, which the fast path skips)."""
    import torch.nn.functional as F

    from osprey.config import OspreyConfig
    from osprey.preprocess import preprocess_image, shortest_edge_size

    config = OspreyConfig.from_preset("tiny").vision
    size = config.image_size
    rng = np.random.default_rng(width * 1000 + height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    resized = image.resize(shortest_edge_size(width, height, size), resample=Image.BICUBIC)
    normalised = (np.asarray(resized, dtype=np.float32) / 255 - np.asarray(config.mean, dtype=np.float32)) / np.asarray(
        config.std, dtype=np.float32)
    reference = F.interpolate(torch.from_numpy(normalised).permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                              align_corners=False)[0]
    out = preprocess_image(image, config)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert torch.allclose(out, reference, atol=1e-6)


def test_preprocess_images_equals_preprocess_image_for_each():
    """The batch form (resizes in threads) gives each image exactly what `preprocess_image` gives it, in order,
    whatever the sizes and modes (a grey and an RGBA image among them)."""
    from osprey.config import OspreyConfig
    from osprey.preprocess import preprocess_image, preprocess_images

    config = OspreyConfig.from_preset("tiny").vision
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(128, 128), (96, 200), (300, 90), (64, 64), (129, 131)]]
    images += [images[1].convert("L"), images[2].convert("RGBA")]
    batch = preprocess_images(images, config)
    assert batch.shape == (len(images), 3, config.image_size, config.image_size)
    for out, image in zip(batch, images):
        assert torch.equal(out, preprocess_image(image, config))


@pytest.mark.parametrize("which", ["tiny_pipeline", "builtin_pipeline"])
def test_greedy_tokens_equal_transformers_generate(which, request, masks):
    """Batched (left-padded, shared prefix or not) and single decoding give transformers' greedy tokens; the
    built-in model gives real sentences (EOS included), the tiny one long random ones."""
    pipe = request.getfixturevalue(which)
    rng = np.random.default_rng(1)
    image = Image.fromarray((rng.random((48, 72, 3)) * 255).astype(np.uint8))
    enc = pipe.encode_image(image)
    prompts = [pipe.prepare(enc, [("human", task_prompt("short"))], masks[i:i + 1]) for i in range(3)]
    prompts.append(pipe.prepare(enc, [("human", task_prompt("category")), ("gpt", "a thing"),
                                      ("human", "and <mask><pos> next to <mask><pos>?")], masks[:3]))
    reference = transformers_greedy_tokens(pipe, prompts, 12)
    assert any(reference), reference
    assert our_greedy_tokens(pipe, prompts, 12, share_prefix=False) == reference
    assert our_greedy_tokens(pipe, prompts[:3], 12, share_prefix=True) == reference[:3]
    assert [our_greedy_tokens(pipe, [p], 12, share_prefix=False)[0] for p in prompts] == reference


def test_images_encoded_together_equal_each_encoded_alone(tiny_pipeline, monkeypatch):
    """`encode_images`: images of different sizes through the vision tower `batch_size` at a time give each image's
    own features, its size, and no view of the others' (each keeps its own copy)."""
    rng = np.random.default_rng(3)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in [(48, 72), (30, 30), (64, 40)]]
    calls = []
    original = tiny_pipeline.model.get_image_features
    monkeypatch.setattr(tiny_pipeline.model, "get_image_features", lambda px: calls.append(px.shape[0]) or original(px))
    together = tiny_pipeline.encode_images(images, batch_size=2)
    assert calls == [2, 1]
    for image, batched in zip(images, together):
        alone = tiny_pipeline.encode_image(image)
        assert (batched.height, batched.width) == (image.height, image.width)
        torch.testing.assert_close(batched.tokens, alone.tokens, atol=1e-5, rtol=1e-5)
        for level, level_alone in zip(batched.levels, alone.levels):
            torch.testing.assert_close(level, level_alone, atol=1e-5, rtol=1e-5)
            assert level.untyped_storage().nbytes() == level.numel() * level.element_size()
