"""Checkpoint layout (official key names and shapes), strict loading with reports, and save/load round trips."""

import json
import re
import subprocess
import sys

import pytest
import torch

from osprey.checkpoint import (
    build_model,
    from_official,
    load_pretrained,
    official_state_dict_shapes,
    parameter_counts,
    save_pretrained,
    to_official,
)
from osprey.config import OspreyConfig

SEVEN_B = OspreyConfig.from_preset("osprey-7b")
TOWER = "model.vision_tower.vision_tower.visual."

# The spec's key list (sections 3, 4, 7): [out, in] shapes.
SPEC_SHAPES = {
    "model.mm_projector.0.weight": (4096, 768), "model.mm_projector.0.bias": (4096,),
    "model.mm_projector.2.weight": (4096, 4096), "model.mm_projector.2.bias": (4096,),
    "mask_extractor.res2.weight": (1024, 192), "mask_extractor.res3.weight": (1024, 384),
    "mask_extractor.res4.weight": (1024, 768), "mask_extractor.res5.weight": (1024, 1536),
    "mask_extractor.res2.bias": (1024,), "mask_extractor.res5.bias": (1024,),
    "mask_extractor.feat_linear.weight": (4096, 1024), "mask_extractor.feat_linear.bias": (4096,),
    "mask_extractor.mask_linear.layers.0.weight": (1024, 12544), "mask_extractor.mask_linear.layers.1.weight": (1024, 1024),
    "mask_extractor.mask_linear.layers.2.weight": (4096, 1024),
    "model.embed_tokens.weight": (32000, 4096), "lm_head.weight": (32000, 4096), "model.norm.weight": (4096,),
    "model.layers.31.self_attn.q_proj.weight": (4096, 4096), "model.layers.31.mlp.gate_proj.weight": (11008, 4096),
    "model.layers.0.input_layernorm.weight": (4096,),
    TOWER + "trunk.stem.0.weight": (192, 3, 4, 4), TOWER + "trunk.stem.1.weight": (192,),
    TOWER + "trunk.stages.2.blocks.26.gamma": (768,), TOWER + "trunk.stages.2.blocks.26.conv_dw.weight": (768, 1, 7, 7),
    TOWER + "trunk.stages.3.downsample.1.weight": (1536, 768, 2, 2), TOWER + "trunk.stages.3.blocks.2.mlp.fc2.weight": (1536, 6144),
}


@pytest.fixture(scope="module")
def shapes_7b():
    return dict(official_state_dict_shapes(SEVEN_B))


def test_7b_keys_and_shapes_follow_the_official_layout(shapes_7b):
    for name, shape in SPEC_SHAPES.items():
        assert shapes_7b[name] == shape, name
    allowed = re.compile(r"^(model\.(embed_tokens|layers\.\d+|norm|mm_projector\.[02])\.|lm_head\.|mask_extractor\.|"
                         + re.escape(TOWER) + r"(trunk|head)\.)")
    assert all(allowed.match(k) for k in shapes_7b), [k for k in shapes_7b if not allowed.match(k)]
    assert sum(1 for k in shapes_7b if k.endswith(".gamma")) == 3 + 3 + 27 + 3
    assert not any(k.endswith(".inv_freq") for k in shapes_7b)
    assert len([k for k in shapes_7b if k.startswith("mask_extractor.")]) == 4 * 2 + 2 + 3 * 2


def test_7b_parameter_counts():
    counts = parameter_counts(SEVEN_B)
    assert counts["mm_projector"] == 19_931_136  # 19.93 M
    assert counts["mask_extractor"] == 25_245_696  # 25.25 M
    assert counts["language_model"] == 6_738_415_616


def test_cli_model_keys_prints_name_tab_shape():
    out = subprocess.run([sys.executable, "-m", "osprey.cli", "model", "keys", "--preset", "osprey-7b"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert "model.mm_projector.0.weight\t4096,768" in out
    assert TOWER + "trunk.stages.0.blocks.0.gamma\t192" in out
    assert all(re.fullmatch(r"[\w.]+\t\d+(,\d+)*", line) for line in out)


def test_key_map_is_explicit_and_invertible(shapes_7b):
    for name in shapes_7b:
        assert to_official(from_official(name)) == name
    # files written by older transformers carry layer-scale as `.weight`: mapped back to `gamma`
    legacy = TOWER + "trunk.stages.1.blocks.2.weight"
    assert from_official(legacy) == "vision_tower.vision_tower.visual.trunk.stages.1.blocks.2.gamma"


def _outputs(model, seed=0):
    cfg = model.config
    torch.manual_seed(seed)
    n = cfg.vision.num_image_tokens
    ids = torch.tensor([[1, *[cfg.image_token_id] * n, 7, cfg.mask_token_id, cfg.pos_token_id, 9]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=torch.randn(1, 3, 128, 128), masks=[torch.rand(1, 33, 47) > 0.4]).logits


def test_save_load_round_trip_gives_identical_outputs(tiny_model_dir, tmp_path):
    model, tokenizer, report = load_pretrained(tiny_model_dir)
    assert report.ok, report.summary()
    save_pretrained(model, tokenizer, tmp_path / "copy")
    again, _, report2 = load_pretrained(tmp_path / "copy")
    assert report2.ok
    assert torch.equal(_outputs(model), _outputs(again))
    names = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert names["architectures"] == ["OspreyLlamaForCausalLM"]


def test_sharded_save_writes_an_index(tiny_model_dir, tmp_path):
    model, tokenizer, _ = load_pretrained(tiny_model_dir)
    save_pretrained(model, tokenizer, tmp_path / "sharded", max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again, _, report = load_pretrained(tmp_path / "sharded")
    assert report.ok and torch.equal(_outputs(model), _outputs(again))


def _legacy_inv_freq(text_config: dict, dtype: torch.dtype, theta: float | None = None) -> torch.Tensor:
    """The per-layer rotary buffer as transformers 4.31 computes it (LlamaRotaryEmbedding) and saves it: in the
    model's dtype, since `model.to(dtype)` casts buffers too."""
    dim = text_config["hidden_size"] // text_config["num_attention_heads"]
    base = theta or text_config.get("rope_theta", 10000.0)
    return (1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))).to(dtype)


def _write_official_folder(model, tokenizer, path, legacy_gamma=False, rope_theta=None):
    """An official folder as transformers 4.31 writes it: sharded pytorch_model-*.bin + index (with every layer's
    `rotary_emb.inv_freq` buffer), added_tokens.json, official config.json."""
    path.mkdir()
    state = {to_official(k): v.clone() for k, v in model.state_dict().items()}
    inv_freq = _legacy_inv_freq(model.config.text, model.dtype, rope_theta)
    for layer in range(model.config.text["num_hidden_layers"]):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    if legacy_gamma:
        state = {re.sub(r"(blocks\.\d+)\.gamma$", r"\1.weight", k): v for k, v in state.items()}
    names = sorted(state)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for fname, keys in shards.items():
        torch.save({k: state[k] for k in keys}, path / fname)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = {k: v for k, v in model.config.text.items() if k != "model_type"}
    (path / "config.json").write_text(json.dumps({**text, "architectures": ["OspreyLlamaForCausalLM"],
                                                  "model_type": "osprey", "mm_projector_type": "mlp2x_gelu"}))
    tokenizer.save_pretrained(str(path))
    (path / "added_tokens.json").write_text(json.dumps({"<mask>": 512, "<pos>": 513}))


@pytest.mark.parametrize("legacy_gamma", [False, True])
def test_official_folder_loads_strictly(tiny_model_dir, tmp_path, legacy_gamma):
    model, tokenizer, _ = load_pretrained(tiny_model_dir)
    _write_official_folder(model, tokenizer, tmp_path / "official", legacy_gamma=legacy_gamma)
    loaded, tok, report = load_pretrained(tmp_path / "official", config=model.config)
    assert report.ok, report.summary()
    assert not report.missing and not report.unexpected
    layers = model.config.text["num_hidden_layers"]
    assert sorted(report.ignored) == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(layers)]
    assert "ignored (recomputed)" in report.summary()
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    # .bin tensors come back in mmap'd storages whose alignment can change CPU kernel blocking: last-bit differences
    torch.testing.assert_close(_outputs(model), _outputs(loaded), rtol=1e-6, atol=1e-6)
    assert tok.convert_tokens_to_ids(["<mask>", "<pos>"]) == [512, 513]


def test_legacy_inv_freq_of_another_rope_setting_is_an_error_naming_it(tiny_model_dir, tmp_path):
    model, tokenizer, _ = load_pretrained(tiny_model_dir)
    _write_official_folder(model, tokenizer, tmp_path / "official", rope_theta=1_000_000.0)
    with pytest.raises(ValueError, match=r"rotary_emb\.inv_freq differs .*rope_theta=10000"):
        load_pretrained(tmp_path / "official", config=model.config)


def test_legacy_inv_freq_in_bfloat16_matches_after_rounding(tiny_model_dir, tmp_path):
    model, tokenizer, _ = load_pretrained(tiny_model_dir)
    _write_official_folder(model.to(torch.bfloat16), tokenizer, tmp_path / "official")
    _, _, report = load_pretrained(tmp_path / "official", config=model.config)
    assert report.ok and len(report.ignored) == model.config.text["num_hidden_layers"]


def test_unknown_keys_next_to_legacy_inv_freq_still_fail(tiny_model_dir, tmp_path):
    model, tokenizer, _ = load_pretrained(tiny_model_dir)
    _write_official_folder(model, tokenizer, tmp_path / "official")
    shard = tmp_path / "official" / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard)
    state["model.layers.0.self_attn.rotary_emb.cos_cached"] = torch.zeros(3)
    torch.save(state, shard)
    with pytest.raises(ValueError, match=r"unexpected: 1\b"):
        load_pretrained(tmp_path / "official", config=model.config)


def test_official_config_json_reads_as_osprey_7b(tmp_path):
    from osprey.checkpoint import read_config

    text = {k: v for k, v in SEVEN_B.text.items() if k != "model_type"}
    (tmp_path / "config.json").write_text(json.dumps({**text, "model_type": "osprey", "mm_vision_tower": "/x.bin"}))
    config = read_config(tmp_path)
    assert config.text == SEVEN_B.text and config.vision == SEVEN_B.vision and config.extractor == SEVEN_B.extractor


def test_missing_and_unexpected_keys_are_reported(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tokenizer, _ = load_pretrained(tiny_model_dir)
    save_pretrained(model, tokenizer, tmp_path / "broken")
    weights = tmp_path / "broken" / "model.safetensors"
    state = load_file(str(weights))
    del state["mask_extractor.feat_linear.weight"]
    state["model.something_new"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="missing: 1, unexpected: 1"):
        load_pretrained(tmp_path / "broken")
    _, _, report = load_pretrained(tmp_path / "broken", strict=False)
    assert report.missing == ["mask_extractor.feat_linear.weight"]
    assert report.unexpected == ["model.something_new"]
    assert any("mask_extractor.feat_linear" in note for note in report.notes)


def test_clip_weights_file_replaces_the_tower(tiny_model_dir, tmp_path):
    model, _, _ = load_pretrained(tiny_model_dir)
    torch.manual_seed(3)
    other = build_model(model.config)
    clip_file = tmp_path / "open_clip_pytorch_model.bin"
    visual = {f"visual.{k}": v for k, v in other.vision_tower.vision_tower.visual.state_dict().items()}
    torch.save({**visual, "token_embedding.weight": torch.zeros(3, 2)}, clip_file)  # text keys are ignored
    loaded, _, report = load_pretrained(tiny_model_dir, clip_weights=clip_file)
    assert report.ok, report.summary()
    for name, tensor in other.vision_tower.state_dict().items():
        assert torch.equal(loaded.vision_tower.state_dict()[name], tensor)
    assert torch.equal(loaded.mm_projector[0].weight, model.mm_projector[0].weight)


def test_model_init_cli_writes_a_complete_folder(tmp_path):
    out = tmp_path / "m"
    subprocess.run([sys.executable, "-m", "osprey.cli", "model", "init", "--preset", "tiny", "--out", str(out)], check=True,
                   capture_output=True)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    _, _, report = load_pretrained(out)
    assert report.ok


def test_model_init_makes_a_llama_sized_vocabulary_offline_in_bfloat16(tmp_path):
    """osprey-7b's path (32,000 tokens, bf16) on tiny widths: the tokenizer is trained, not required."""
    tiny = OspreyConfig.from_preset("tiny")
    config = tiny.replace(text={**tiny.text, "vocab_size": 32000}, mask_token_id=32000, pos_token_id=32001)
    from osprey.checkpoint import init_model_folder

    init_model_folder(config, tmp_path / "m", dtype="bfloat16")
    model, tokenizer, report = load_pretrained(tmp_path / "m")
    assert report.ok and model.dtype == torch.bfloat16
    assert len(tokenizer) == 32002 and tokenizer.convert_tokens_to_ids(["<mask>", "<pos>"]) == [32000, 32001]


def test_derive_changes_only_the_extractor(tiny_model_dir, tmp_path):
    from osprey.checkpoint import derive_model_folder

    derive_model_folder(tiny_model_dir, tmp_path / "res4", extractor={"levels": (2,), "use_position_token": False})
    base, _, _ = load_pretrained(tiny_model_dir)
    derived, _, report = load_pretrained(tmp_path / "res4")
    assert report.ok and derived.config.extractor.levels == (2,) and not derived.config.extractor.use_position_token
    assert not hasattr(derived.mask_extractor, "res2") and not hasattr(derived.mask_extractor, "mask_linear")
    for name, tensor in base.state_dict().items():
        if not name.startswith("mask_extractor."):
            assert torch.equal(derived.state_dict()[name], tensor)


def test_derive_can_keep_the_extractor_weights_that_still_fit(tiny_model_dir, tmp_path):
    from osprey.checkpoint import derive_model_folder

    base, _, _ = load_pretrained(tiny_model_dir)
    derive_model_folder(tiny_model_dir, tmp_path / "fresh", extractor={"levels": (2,)})
    derive_model_folder(tiny_model_dir, tmp_path / "kept", extractor={"levels": (2,)}, keep_extractor=True)
    fresh, _, _ = load_pretrained(tmp_path / "fresh")
    kept, _, report = load_pretrained(tmp_path / "kept")
    assert report.ok
    for name, tensor in kept.state_dict().items():  # res4's projection, the fusion and the position MLP survive
        assert torch.equal(tensor, base.state_dict()[name]), name
    assert not torch.equal(fresh.mask_extractor.res4.weight, base.mask_extractor.res4.weight)


def test_builtin_preset_fits_the_size_budget():
    counts = parameter_counts(OspreyConfig.from_preset("builtin"))
    assert counts["total"] * 2 < 40e6  # bf16 weight file under 40 MB


def test_model_convert_cli_writes_a_folder_that_loads_strictly_and_answers_the_same(tiny_model_dir, tmp_path, capsys):
    """`osprey model convert` on an official-layout folder (sharded .bin, official key names, legacy `gamma`
    names): the written folder loads strictly with the same tensors and outputs. The tiny tower is not
    Osprey-7B's, so the source's config.json also carries our config (an official one implies the 7B tower);
    the weights are read through the official key map all the same. A source missing a tensor exits 1."""
    from osprey.cli import main

    model, tokenizer, _ = load_pretrained(tiny_model_dir)
    src = tmp_path / "official"
    _write_official_folder(model, tokenizer, src, legacy_gamma=True)
    ours = json.loads((tiny_model_dir / "config.json").read_text())["osprey"]
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), "osprey": ours}))
    assert main(["model", "convert", str(src), "--out", str(tmp_path / "converted"), "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    converted, _, report = load_pretrained(tmp_path / "converted")
    assert report.ok and not report.missing and not report.unexpected, report.summary()
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in converted.state_dict().items())
    torch.testing.assert_close(_outputs(model), _outputs(converted), rtol=1e-6, atol=1e-6)

    shard = src / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    dropped = min(state)
    torch.save({k: v for k, v in state.items() if k != dropped}, shard)
    with pytest.raises(ValueError, match="missing: 1"):
        main(["model", "convert", str(src), "--out", str(tmp_path / "broken"), "--dtype", "float32"])
