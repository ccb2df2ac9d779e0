"""Mask-aware extractor numerics against an independent per-pixel reference (spec section 4)."""

import numpy as np
import pytest
import torch

from osprey.config import ExtractorConfig
from osprey.mask_extractor import MaskExtractor, masked_mean_pool, masks_to_boxes_masks, resize_masks


def reference_bilinear(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixel-by-pixel bilinear resize, align_corners=False, no antialias (what F.interpolate computes)."""
    H, W = mask.shape
    out = np.zeros((h, w))
    for i in range(h):
        sy = max((i + 0.5) * H / h - 0.5, 0.0)
        y0 = int(sy)
        y1 = min(y0 + 1, H - 1)
        ly = sy - y0
        for j in range(w):
            sx = max((j + 0.5) * W / w - 0.5, 0.0)
            x0 = int(sx)
            x1 = min(x0 + 1, W - 1)
            lx = sx - x0
            out[i, j] = (1 - ly) * ((1 - lx) * mask[y0, x0] + lx * mask[y0, x1]) + ly * (
                (1 - lx) * mask[y1, x0] + lx * mask[y1, x1]
            )
    return out


def reference_pool(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean by explicit loops over the feature grid."""
    C, h, w = features.shape
    binary = reference_bilinear(mask.astype(np.float64), h, w) > 0
    total = np.zeros(C)
    count = 0
    for i in range(h):
        for j in range(w):
            if binary[i, j]:
                total += features[:, i, j]
                count += 1
    return total / (count + 1e-8)


def _masks(shape):
    rng = np.random.default_rng(0)
    H, W = shape
    masks = np.zeros((5, H, W), bool)
    masks[0, H // 4: H // 2, W // 3: W // 2] = True  # a rectangle
    masks[1] = rng.random((H, W)) > 0.7  # scattered pixels
    masks[2, H // 2, W // 2] = True  # one pixel
    masks[3] = True  # full
    # masks[4] stays empty
    return masks


@pytest.mark.parametrize("mask_shape, grid", [((40, 40), (8, 8)), ((37, 61), (8, 8)), ((16, 16), (32, 32)), ((90, 30), (5, 7))])
def test_masked_mean_pool_matches_per_pixel_reference(mask_shape, grid):
    torch.manual_seed(0)
    features = torch.randn(6, *grid, dtype=torch.float64)
    masks = _masks(mask_shape)
    pooled = masked_mean_pool(features.float(), torch.from_numpy(masks))
    for q in range(masks.shape[0]):
        expected = reference_pool(features.numpy(), masks[q])
        np.testing.assert_allclose(pooled[q].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_resize_matches_reference_and_is_float():
    masks = _masks((23, 45))
    out = resize_masks(torch.from_numpy(masks), (11, 9))
    assert out.dtype == torch.float32 and out.shape == (5, 11, 9)
    for q in range(5):
        np.testing.assert_allclose(out[q].numpy(), reference_bilinear(masks[q].astype(float), 11, 9), atol=1e-5)  # fp32 vs fp64
    assert resize_masks(torch.zeros((0, 4, 4), dtype=torch.bool), (2, 2)).shape == (0, 2, 2)


def test_full_mask_pools_the_global_mean_and_empty_mask_pools_zero():
    features = torch.randn(3, 4, 6)
    masks = torch.zeros((2, 8, 12), dtype=torch.bool)
    masks[0] = True
    pooled = masked_mean_pool(features, masks)
    torch.testing.assert_close(pooled[0], features.mean(dim=(1, 2)))
    assert torch.equal(pooled[1], torch.zeros(3))


def _extractor(**overrides):
    torch.manual_seed(0)
    config = ExtractorConfig(hidden_size=16, mask_size=8, **overrides)
    extractor = MaskExtractor(config, level_channels=(4, 6, 8, 10), out_dim=12)
    extractor.reset_parameters()
    for p in extractor.parameters():  # non-zero biases so "bias-only" outputs are distinguishable
        torch.nn.init.normal_(p, std=0.1)
    return extractor


def _levels(dtype=torch.float32, batch=1):
    """Feature maps of a batch, (B, C, s, s) per level."""
    torch.manual_seed(1)
    return [torch.randn(batch, c, s, s, dtype=dtype) for c, s in zip((4, 6, 8, 10), (16, 8, 4, 2))]


def test_extractor_matches_the_spec_formula():
    extractor = _extractor()
    levels = _levels()
    masks = torch.from_numpy(_masks((31, 47)))
    tokens, pos = extractor(levels, [masks])
    assert tokens.shape == (5, 12) and pos.shape == (5, 12)
    assert tokens.dtype == torch.float32 and pos.dtype == torch.float32
    fused = sum(getattr(extractor, name)(masked_mean_pool(level[0], masks)) for name, level in zip(("res2", "res3", "res4", "res5"), levels))
    torch.testing.assert_close(tokens, extractor.feat_linear(fused))
    small = torch.nn.functional.interpolate(masks[:, None].float(), size=(8, 8), mode="bilinear", align_corners=False)
    x = small.flatten(1)
    layers = extractor.mask_linear.layers
    expected_pos = layers[2](torch.relu(layers[1](torch.relu(layers[0](x)))))
    torch.testing.assert_close(pos, expected_pos)


def test_empty_mask_gives_bias_only_tokens():
    extractor = _extractor()
    tokens, pos = extractor(_levels(), [torch.zeros((1, 20, 20), dtype=torch.bool)])
    bias_sum = sum(getattr(extractor, n).bias for n in ("res2", "res3", "res4", "res5"))
    torch.testing.assert_close(tokens[0], extractor.feat_linear(bias_sum))
    torch.testing.assert_close(pos[0], extractor.mask_linear(torch.zeros(1, 64))[0])
    assert torch.isfinite(tokens).all() and torch.isfinite(pos).all()


def test_half_precision_features_still_give_fp32_tokens_rounded_per_level():
    """bf16 weights and features: each level's projection is computed in fp32 and stored in bf16 before the
    sum (the official dtype flow), by hand here; summing unrounded projections gives other tokens."""
    extractor = _extractor().to(torch.bfloat16)
    levels = _levels(torch.bfloat16)
    masks = torch.from_numpy(_masks((16, 16)))
    tokens, pos = extractor(levels, [masks])
    assert tokens.dtype == torch.float32 and pos.dtype == torch.float32

    def projection(name, level):
        layer = getattr(extractor, name)
        pooled = masked_mean_pool(level[0].float(), masks)
        return pooled @ layer.weight.float().T + layer.bias.float()

    names = ("res2", "res3", "res4", "res5")
    head = extractor.feat_linear
    rounded = sum(projection(n, lv).to(torch.bfloat16).float() for n, lv in zip(names, levels))
    torch.testing.assert_close(tokens, rounded @ head.weight.float().T + head.bias.float(), rtol=0, atol=1e-6)
    unrounded = sum(projection(n, lv) for n, lv in zip(names, levels))
    assert not torch.allclose(tokens, unrounded @ head.weight.float().T + head.bias.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(31, 47), (3, 5), (1, 1)])
def test_position_tokens_match_the_per_pixel_reference(shape):
    """Position token = 3-layer MLP (ReLU) of the mask resized to mask_size^2 (bilinear, align_corners=False),
    row-major: computed in float64 from the per-pixel resize, for small, one-pixel and 1x1 images."""
    extractor = _extractor()
    masks = _masks(shape) if min(shape) > 2 else np.ones((1, *shape), bool)
    _, pos = extractor(_levels(), [torch.from_numpy(masks)])
    size = extractor.config.mask_size
    x = np.stack([reference_bilinear(m.astype(np.float64), size, size).reshape(-1) for m in masks])
    for i, layer in enumerate(extractor.mask_linear.layers):
        x = x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        x = np.maximum(x, 0) if i < 2 else x
    np.testing.assert_allclose(pos.detach().numpy(), x, rtol=1e-5, atol=1e-6)


def test_res4_only_and_no_position_token_ablations():
    extractor = _extractor(levels=(2,), use_position_token=False)
    assert not hasattr(extractor, "res2") and hasattr(extractor, "res4")
    tokens, pos = extractor(_levels(), [torch.from_numpy(_masks((16, 16)))])
    assert pos is None and tokens.shape == (5, 12)


def test_box_ablation_pools_over_the_bounding_box():
    masks = torch.zeros((2, 10, 10), dtype=torch.bool)
    masks[0, 2, 3] = masks[0, 6, 8] = True  # two corners of a box
    boxes = masks_to_boxes_masks(masks)
    expected = torch.zeros((10, 10), dtype=torch.bool)
    expected[2:7, 3:9] = True
    assert torch.equal(boxes[0], expected)
    assert not boxes[1].any()  # empty stays empty
    extractor = _extractor(mask_from_box=True)
    torch.testing.assert_close(extractor(_levels(), [masks])[0], _extractor()(_levels(), [boxes])[0])


def test_extractor_rejects_bad_mask_rank_and_count():
    with pytest.raises(ValueError, match="Q, H, W"):
        _extractor()(_levels(), [torch.zeros((4, 4), dtype=torch.bool)])
    with pytest.raises(ValueError, match="mask stacks for 2 images but features for 1"):
        _extractor()(_levels(), [torch.zeros((1, 4, 4), dtype=torch.bool)] * 2)


def test_batched_extraction_equals_image_by_image():
    """Images with different region counts (0 included) and mask sizes: one batched pass == one pass per image."""
    extractor = _extractor()
    levels = _levels(batch=4)
    rng = np.random.default_rng(3)
    masks = [
        torch.from_numpy(rng.random((3, 40, 40)) > 0.6),
        torch.zeros((0, 40, 40), dtype=torch.bool),
        torch.from_numpy(_masks((37, 61))),
        torch.from_numpy(rng.random((1, 29, 40)) > 0.5),  # the width of images 0-1, another height
    ]
    tokens, pos = extractor(levels, masks)
    assert tokens.shape == (9, 12) and pos.shape == (9, 12)
    singles = [extractor([level[i:i + 1] for level in levels], [m]) for i, m in enumerate(masks)]
    torch.testing.assert_close(tokens, torch.cat([t for t, _ in singles]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pos, torch.cat([p for _, p in singles]), rtol=1e-5, atol=1e-6)


def test_fresh_initialisation_is_the_official_one():
    """reset_parameters (stage-2 start): every Linear weight N(0, 0.02), every bias 0."""
    torch.manual_seed(0)
    extractor = MaskExtractor(ExtractorConfig(hidden_size=256, mask_size=16), level_channels=(64, 128, 256, 512),
                              out_dim=256)
    extractor.reset_parameters()
    linears = [m for m in extractor.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 + 1 + 3
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.mean().item()) < 1e-3 and weights.std().item() == pytest.approx(0.02, rel=0.01)
    assert all(not m.bias.any() for m in linears)
