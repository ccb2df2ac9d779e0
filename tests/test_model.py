"""Model shapes at every level, the splice of image and region tokens, and the forward/backward pass."""

import pytest
import torch

from osprey.checkpoint import build_model
from osprey.config import OspreyConfig
from osprey.tokenization import IGNORE_INDEX

TINY = OspreyConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


def test_tiny_feature_shapes_at_every_level(model):
    features = model.get_image_features(torch.randn(2, 3, 128, 128))
    assert [tuple(level.shape) for level in features.levels] == [
        (2, 40, 32, 32), (2, 80, 16, 16), (2, 160, 8, 8), (2, 320, 4, 4)
    ]
    assert features.tokens.shape == (2, TINY.vision.num_image_tokens, TINY.hidden_size)


def test_7b_feature_shapes_on_meta_device():
    config = OspreyConfig.from_preset("osprey-7b")
    model = build_model(config, device="meta")
    levels = model.vision_tower(torch.empty(1, 3, 512, 512, device="meta"))
    assert [tuple(level.shape[1:]) for level in levels] == [(192, 128, 128), (384, 64, 64), (768, 32, 32), (1536, 16, 16)]
    tokens = model.mm_projector(levels[2].flatten(2).transpose(1, 2))
    assert tuple(tokens.shape) == (1, 1024, 4096)


def test_image_tokens_are_the_official_projector_of_the_token_level_in_row_major_order(model):
    """mlp2x_gelu by hand in float64: Linear, exact (erf) GELU, Linear over the token level's grid cells in
    row-major order (cell (r, c) is token r * w + c)."""
    import math

    import numpy as np

    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        features = model.get_image_features(pixels)
    grid = features.levels[TINY.vision.image_token_level][0].double().numpy()  # (C, h, w)
    _, h, w = grid.shape
    w1, b1 = (t.detach().double().numpy() for t in (model.mm_projector[0].weight, model.mm_projector[0].bias))
    w2, b2 = (t.detach().double().numpy() for t in (model.mm_projector[2].weight, model.mm_projector[2].bias))
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    for r, col in ((0, 0), (0, w - 1), (h - 1, 0), (h // 2, w // 3)):
        expected = gelu(grid[:, r, col] @ w1.T + b1) @ w2.T + b2
        np.testing.assert_allclose(features.tokens[0, r * w + col].double().numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_vision_tower_is_frozen_by_default_and_runs_without_grad(stage):
    """Every stage applied with the training config's defaults leaves the tower frozen, in eval mode, and its
    features carry no graph; asked to train it, the same tower's features do (so the check can fail)."""
    train = pytest.importorskip("train.trainable")
    from train.config import TrainConfig

    torch.manual_seed(0)
    model = build_model(TINY).train()
    default = TrainConfig.__dataclass_fields__["train_vision"].default
    train.set_trainable(model, stage, train_vision=default)
    assert not model.vision_tower.trainable and not model.vision_tower.training
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not model.vision_tower(torch.randn(1, 3, 128, 128))[0].requires_grad
    train.set_trainable(model, stage, train_vision=True)
    assert model.vision_tower(torch.randn(1, 3, 128, 128))[0].requires_grad


def _ids(*parts):
    out = []
    for p in parts:
        out.extend(p if isinstance(p, list) else [p])
    return torch.tensor([out])


def test_splice_places_image_and_region_tokens_in_order(model):
    cfg = TINY
    n = cfg.vision.num_image_tokens
    ids = _ids(1, 5, [cfg.image_token_id] * n, 7, cfg.mask_token_id, cfg.pos_token_id, 8, cfg.mask_token_id, cfg.pos_token_id)
    image = torch.randn(1, n, cfg.hidden_size)
    mask_tokens = torch.randn(2, cfg.hidden_size)
    pos_tokens = torch.randn(2, cfg.hidden_size)
    embeds = model.merge_embeddings(ids, image, mask_tokens, pos_tokens)
    table = model.get_input_embeddings().weight
    assert embeds.shape == (1, ids.shape[1], cfg.hidden_size)
    torch.testing.assert_close(embeds[0, 0], table[1])
    torch.testing.assert_close(embeds[0, 2:2 + n], image[0])
    k = 2 + n + 1
    torch.testing.assert_close(embeds[0, k], mask_tokens[0])
    torch.testing.assert_close(embeds[0, k + 1], pos_tokens[0])
    torch.testing.assert_close(embeds[0, k + 2], table[8])
    torch.testing.assert_close(embeds[0, k + 3], mask_tokens[1])
    torch.testing.assert_close(embeds[0, k + 4], pos_tokens[1])


def test_splice_batch_with_different_region_counts(model):
    cfg = TINY
    n = cfg.vision.num_image_tokens
    row0 = [1, *[cfg.image_token_id] * n, cfg.mask_token_id, cfg.pos_token_id, cfg.mask_token_id, cfg.pos_token_id, 3]
    row1 = [1, *[cfg.image_token_id] * n, 4, 5, 6, 0, 0]  # no regions, padded
    ids = torch.tensor([row0, row1])
    image = torch.randn(2, n, cfg.hidden_size)
    mask_tokens = torch.randn(2, cfg.hidden_size)
    embeds = model.merge_embeddings(ids, image, mask_tokens, mask_tokens + 1)
    torch.testing.assert_close(embeds[1, 1:1 + n], image[1])
    torch.testing.assert_close(embeds[0, 1 + n + 2], mask_tokens[1])


def test_splice_count_mismatches_raise(model):
    cfg = TINY
    n = cfg.vision.num_image_tokens
    ids = _ids(1, [cfg.image_token_id] * n, cfg.mask_token_id, cfg.pos_token_id)
    image = torch.randn(1, n, cfg.hidden_size)
    with pytest.raises(ValueError, match=r"<mask> tokens in the text \(1\) and masks \(2\)"):
        model.merge_embeddings(ids, image, torch.randn(2, cfg.hidden_size), torch.randn(2, cfg.hidden_size))
    with pytest.raises(ValueError, match="image placeholder slots"):
        model.merge_embeddings(ids, torch.randn(1, n - 1, cfg.hidden_size), torch.randn(1, cfg.hidden_size), torch.randn(1, cfg.hidden_size))
    bad = _ids(1, [cfg.image_token_id] * n, cfg.mask_token_id, 9, cfg.pos_token_id)
    with pytest.raises(ValueError, match="followed by exactly one <pos>"):
        model.merge_embeddings(bad, image, torch.randn(1, cfg.hidden_size), torch.randn(1, cfg.hidden_size))


def test_forward_backward_with_two_images_and_masks_of_any_size(model):
    cfg = TINY
    n = cfg.vision.num_image_tokens
    rows = [
        [1, *[cfg.image_token_id] * n, 10, cfg.mask_token_id, cfg.pos_token_id, 11, 12, 2],
        [1, *[cfg.image_token_id] * n, 13, cfg.mask_token_id, cfg.pos_token_id, cfg.mask_token_id, cfg.pos_token_id, 2],
    ]
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[ids < 0] = IGNORE_INDEX
    labels[(ids == cfg.mask_token_id) | (ids == cfg.pos_token_id)] = IGNORE_INDEX
    masks = [torch.rand(1, 37, 53) > 0.5, torch.zeros(2, 200, 90, dtype=torch.bool)]
    masks[1][1] = True
    model.train()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 128, 128), masks=masks, labels=labels)
    model.eval()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.mask_extractor.feat_linear.weight.grad.abs().sum() > 0
    assert model.mask_extractor.mask_linear.layers[0].weight.grad.abs().sum() > 0
    assert model.mm_projector[0].weight.grad.abs().sum() > 0
    model.zero_grad()


def _batch_with_labels(cfg, trained_rows=(True, True)):
    n = cfg.vision.num_image_tokens
    rows = [
        [1, *[cfg.image_token_id] * n, 10, cfg.mask_token_id, cfg.pos_token_id, 11, 12, 13, 2],
        [1, *[cfg.image_token_id] * n, 14, cfg.mask_token_id, cfg.pos_token_id, 15, 16, 2, 0],
    ]
    ids = torch.tensor(rows)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, trained in enumerate(trained_rows):
        if trained:  # the answer: the last text tokens and </s>
            labels[r, -4:] = ids[r, -4:]
    labels[1, -1] = IGNORE_INDEX  # padding
    attention = torch.ones_like(ids)
    attention[1, -1] = 0
    masks = [torch.rand(1, 40, 40) > 0.5, torch.rand(1, 64, 32) > 0.5]
    return {"input_ids": ids, "attention_mask": attention, "pixel_values": torch.randn(2, 3, 128, 128), "masks": masks,
            "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_trained_logits_only_gives_the_full_logits_loss_and_gradients():
    """The LM head at trained positions only: same loss and same gradients as transformers' loss over all
    logits, no logits returned; with nothing trained, a zero loss that still reaches the LM head (both paths)."""
    torch.manual_seed(0)
    model = build_model(TINY).float().train()
    batch = _batch_with_labels(TINY)
    full = model(**batch)
    full.loss.backward()
    expected = _grads(model)
    model.zero_grad()
    sparse = model(**batch, trained_logits_only=True)
    sparse.loss.backward()
    got = _grads(model)
    assert sparse.logits is None and full.logits is not None
    assert torch.allclose(sparse.loss, full.loss, atol=1e-6)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6, rtol=1e-4) for k in expected)
    for trained_only in (True, False):  # nothing trained: a zero (not the NaN of an all-ignored loss) either way
        model.zero_grad()
        empty = model(**_batch_with_labels(TINY, trained_rows=(False, False)), trained_logits_only=trained_only)
        assert float(empty.loss) == 0.0
        empty.loss.backward()
        assert model.language_model.get_output_embeddings().weight.grad is not None


def test_trained_logits_only_through_a_lora_wrapper():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = build_model(TINY).float().train()
    model.language_model = peft.get_peft_model(model.language_model, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    batch = _batch_with_labels(TINY)
    assert torch.allclose(model(**batch, trained_logits_only=True).loss, model(**batch).loss, atol=1e-6)
