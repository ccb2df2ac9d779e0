"""Region and text embeddings (osprey.embedding): one space, normalised; the text tower from an open_clip file (the
official route) and from a model folder's own files (the built-in model's, trained by `osprey train text-tower`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from osprey import BUILTIN_MODEL_DIR
from osprey.embedding import (
    NoTextTower,
    RegionTextConfig,
    RegionTextEmbedder,
    TextEncoder,
    load_vision_tower,
    region_embeddings_from_pooled,
    save_region_text,
    text_tower_from_open_clip,
)
from osprey.mask_extractor import masked_mean_pool_batch

CATEGORIES = ("circle", "ellipse", "square", "triangle", "diamond", "star", "ring", "frame", "cross", "x",
              "house", "flower", "robot", "tree")


@pytest.fixture(scope="module")
def builtin_embedder():
    return RegionTextEmbedder.from_pretrained(BUILTIN_MODEL_DIR)


@pytest.fixture(scope="module")
def generated_test_images(tmp_path_factory):
    """Six images of the held-out test split of `osprey data synth --n 20000` (seed 0), written by the generator."""
    from data_tools.synth.generate import SynthConfig, generate_image, split_assignment
    from osprey.data.records import parse_record

    out = tmp_path_factory.mktemp("synth")
    (out / "images").mkdir()
    config = SynthConfig(out=str(out), n=20000)
    test = [i for i, s in enumerate(split_assignment(20000, 0, 0.05, 0.05)) if s == "test"][:6]
    return [(out, parse_record(json.loads(generate_image(i, config)[1]["stage2_categories"]))) for i in test]


def test_two_crosses_are_closer_than_a_cross_and_a_diamond(builtin_embedder, generated_test_images):
    """Regions and texts in one space: each region's vector ranks its own category's text first among the 14
    category names for nearly every region (a random text tower gets ~1 in 14), and every vector has norm 1."""
    from osprey.data.records import record_masks

    texts = builtin_embedder.embed_texts(list(CATEGORIES))
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    right = total = 0
    for root, record in generated_test_images:
        vectors = builtin_embedder.embed_regions(root / record.file_name, record_masks(record))
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        best = (vectors @ texts.T).argmax(axis=1)
        right += sum(CATEGORIES[b] == a.category_name for b, a in zip(best, record.annotation, strict=True))
        total += len(record.annotation)
    assert total >= 15 and right / total >= 0.8, f"{right} of {total} regions nearest to their category's text"


def test_empty_and_misshapen_masks_are_refused(builtin_embedder):
    from osprey import EXAMPLE_DIR
    from osprey.preprocess import load_image

    image = load_image(EXAMPLE_DIR / "image.png")
    with pytest.raises(ValueError, match="empty"):
        builtin_embedder.embed_regions(image, np.zeros((1, image.height, image.width), bool))
    with pytest.raises(ValueError, match="masks must be"):
        builtin_embedder.embed_regions(image, np.ones((1, 5, 5), bool))


def test_a_model_without_a_text_tower_says_so(tiny_model_dir):
    with pytest.raises(NoTextTower, match="osprey train text-tower"):
        RegionTextEmbedder.from_pretrained(tiny_model_dir)


def test_text_tower_from_an_open_clip_file_matches_open_clip(tmp_path, tiny_model_dir):
    """The official route: a CLIP file holding both towers; its text tower loads strictly under open_clip's config
    of that name and tokenizer, and gives open_clip's own text features; regions go through the CLIP head."""
    import open_clip
    from safetensors.torch import save_file

    from osprey.checkpoint import read_config

    vision_config = read_config(tiny_model_dir).vision
    name = "osprey_test_clip_with_text"
    clip_cfg = {**vision_config.open_clip_config,
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(clip_cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    clip = open_clip.create_model(name, pretrained=None).eval()
    weights = tmp_path / "open_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))

    text = text_tower_from_open_clip(weights, name)
    tokens = open_clip.get_tokenizer(name)(["a red circle", "a cross"], context_length=16)
    with torch.no_grad():
        expected = clip.encode_text(tokens, normalize=True)
    assert torch.allclose(text(["a red circle", "a cross"]), expected, atol=1e-5)

    vision = load_vision_tower(tiny_model_dir, vision_config)
    embedder = RegionTextEmbedder(vision, text, "tiny")
    size = vision_config.image_size
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    masks = np.zeros((2, size, size), bool)
    masks[0, :40, :50] = masks[1, 60:, 30:] = True
    from PIL import Image

    from osprey.preprocess import preprocess_image

    got = embedder.embed_regions(Image.fromarray(image), masks)
    with torch.no_grad():
        final = vision(preprocess_image(Image.fromarray(image), vision_config)[None])[-1]
        manual = region_embeddings_from_pooled(vision.vision_tower.visual,
                                               masked_mean_pool_batch(final, [torch.from_numpy(masks)]))
    assert np.allclose(got, torch.nn.functional.normalize(manual, dim=-1).numpy(), atol=1e-5)
    assert embedder.space == f"tiny:{name}-text" and embedder.dim == clip_cfg["embed_dim"]

    only_visual = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items() if k.startswith("visual.")}, str(only_visual))
    with pytest.raises(NoTextTower, match="holds no text tower"):
        text_tower_from_open_clip(only_visual, name)


def test_region_text_files_round_trip(tmp_path, tiny_model_dir):
    """save_region_text writes bf16 files that load back strictly (text tower and level head) into an embedder."""
    from osprey.checkpoint import read_config
    from osprey.embedding import LevelRegionHead
    from osprey.tokenization import load_tokenizer

    vision_config = read_config(tiny_model_dir).vision
    tokenizer = load_tokenizer(tiny_model_dir)
    config = RegionTextConfig(embed_dim=32, context_length=8, vocab_size=len(tokenizer), width=32, heads=2, layers=1,
                              pad_id=tokenizer.pad_token_id or 0, eos_id=tokenizer.eos_token_id, pool_type="eos",
                              name="t", region_head="levels")
    text = TextEncoder(config, config.build(), tokenizer)
    head = LevelRegionHead(vision_config.level_channels, 32)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    save_region_text(model, text, head, note="x")
    embedder = RegionTextEmbedder.from_pretrained(model)
    with torch.no_grad():
        expected = text.tower.to(torch.bfloat16).float()(text.tokenize(["circle"]))
        head_bf16 = head.to(torch.bfloat16).float()
    assert np.allclose(embedder.embed_texts(["circle"]), torch.nn.functional.normalize(expected, dim=-1).numpy(),
                       atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(embedder.level_head.state_dict().values(),
                                                 head_bf16.state_dict().values(), strict=True))
    assert embedder.space.endswith(":t") and json.loads((model / "region_text.json").read_text())["note"] == "x"


def test_train_text_tower_writes_files_the_embedder_loads(tmp_path, tiny_model_dir):
    """`osprey train text-tower` end to end on the fixture dataset: the vision tower stays as it was, the loss is
    finite, and the two files it writes give the model folder a text space."""
    from pathlib import Path

    from osprey.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = (model / "model.safetensors").read_bytes()
    data = Path(__file__).parent / "fixtures" / "synth"
    out = tmp_path / "lit"
    assert main(["train", "text-tower", "--data", str(data), "--model", str(model), "--out", str(out),
                 "--max-images", "4", "--val-images", "0", "--steps", "6", "--batch-size", "8",
                 "--warmup-steps", "2", "--threads", "1"]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(r["loss"]) for r in logged)
    for name in ("region_text.json", "region_text.safetensors"):
        shutil.copy(out / name, model / name)
    embedder = RegionTextEmbedder.from_pretrained(model)
    assert (model / "model.safetensors").read_bytes() == before
    assert embedder.embed_texts(["circle"]).shape == (1, embedder.dim) and embedder.space.endswith(":lit-v1")
    assert json.loads((model / "region_text.json").read_text())["training_data"]["split"] == "train"
