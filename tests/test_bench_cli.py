"""`osprey bench` lists and dispatches the benchmarks."""

import math
import subprocess
import sys

import pytest

from bench.cli import BENCHMARKS


def test_bench_help_lists_every_benchmark():
    out = subprocess.run([sys.executable, "-m", "osprey.cli", "bench", "--help"], capture_output=True, text=True, check=True)
    for name in BENCHMARKS:
        assert name in out.stdout


def test_bench_dispatches_arguments_to_the_script():
    out = subprocess.run([sys.executable, "-m", "osprey.cli", "bench", "describe-speed", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--new-tokens" in out.stdout


def test_token_norms_on_the_tiny_model(tiny_pipeline):
    from pathlib import Path

    from bench.token_norms import token_statistics

    stats = token_statistics(tiny_pipeline, Path(__file__).parent / "fixtures" / "synth", "train", images=2)
    assert set(stats) >= {"word_embedding_norm", "image_norm", "mask_norm", "pos_norm", "mask_cosine"}
    assert all(math.isfinite(v) and v >= -1 for v in stats.values())  # finite, cosines within range


def test_slot_attention_on_the_tiny_model(tiny_pipeline):
    """bench.slot_attention: one entry per (question type, region 1 or later, layer), each counting every question
    of its kind that names a region; shares and totals are fractions of one attention row."""
    import re
    from collections import Counter
    from pathlib import Path

    from bench.region_eval import question_type, split_records
    from bench.slot_attention import slot_attention

    data = Path(__file__).parent / "fixtures" / "synth"
    config = tiny_pipeline.model.language_model.config
    before = config._attn_implementation
    result = slot_attention(tiny_pipeline, data, "test", records=2)
    assert config._attn_implementation == before  # the shared pipeline's attention kernel is given back
    expected = Counter()
    for record in split_records(data, "test", "stage3_short_form", 2):
        for turn in record.conversations[::2]:
            named = re.findall(r"<region(\d+)>", turn.value)
            if named:
                expected[f"{question_type(turn.value)}:{'region1' if named[-1] == '1' else 'region2+'}"] += 1
    layers = config.num_hidden_layers
    assert {k: v["n"] for k, v in result.items()} == {f"{k}:layer{i}": n for k, n in expected.items()
                                                      for i in range(layers)}
    assert all(0 <= v["share"] <= 1 + 1e-6 and 0 <= v["total"] <= 1 + 1e-6 for v in result.values())


def test_probe_labels_read_the_referring_expressions(tiny_pipeline):
    """--probe-label: each region's attribute comes from its own referring expression (same region number), a
    composite object has no texture; the probe's rows get those labels in region order."""
    from pathlib import Path

    from bench.region_eval import region_label_names
    from bench.token_norms import region_tokens_and_labels
    from data_tools.synth.vocab import COLORS, COMPOSITES, TEXTURES
    from osprey.data.records import iter_records
    from osprey.data.samples import region_descriptions

    data = Path(__file__).parent / "fixtures" / "synth"
    referring = {r.id: r for _, r in iter_records(data / "train" / "stage2_referring.json")}
    for _, record in iter_records(data / "train" / "stage2_categories.json"):
        phrases = dict(region_descriptions(referring[record.id]))
        colours = region_label_names(record, referring[record.id], "color")
        textures = region_label_names(record, referring[record.id], "texture")
        assert len(colours) == len(textures) == len(record.annotation)
        for k, (colour, texture, region) in enumerate(zip(colours, textures, record.annotation), start=1):
            assert colour in COLORS and f" {colour} " in f" {phrases[k]} "
            assert texture == "none" if region.category_name in COMPOSITES else texture in TEXTURES
    mask_tokens, _, _, labels = region_tokens_and_labels(tiny_pipeline, data, "train", images=2, label="color")
    first_two = [r for _, r in iter_records(data / "train" / "stage2_categories.json")][:2]
    assert labels == [c for r in first_two for c in region_label_names(r, referring[r.id], "color")]
    assert len(labels) == len(mask_tokens)


def test_probe_and_reliance_on_the_tiny_model(tiny_pipeline, tiny_model_dir):
    """The diagnostics behind docs/builtin_model.md run on the tiny model: probes are accuracies, the reliance
    test gives three finite losses (shuffling changes the inputs, so at least one loss moves), an attention
    weight and a gradient norm per part."""
    from pathlib import Path

    import torch

    from bench.token_norms import linear_probe_accuracy, probe, reliance

    data = Path(__file__).parent / "fixtures" / "synth"
    result = probe(tiny_pipeline, data, "test", train_images=8, test_images=4)
    assert all(0.0 <= result[k] <= 1.0 for k in ("probe_mask", "probe_pos", "probe_both", "probe_pooled_features",
                                                 "probe_pooled_res2", "probe_pooled_res5", "probe_clip_head"))
    assert result["probe_regions_train"] > result["probe_regions_test"] > 0
    x = torch.tensor([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.1]])
    assert linear_probe_accuracy(x, ["a", "a", "b", "b"], x, ["a", "a", "b", "b"]) == 1.0

    stats = reliance(str(tiny_model_dir), data, samples=6)
    losses = [stats["loss_own_masks"], stats["loss_shuffled_masks"], stats["loss_shuffled_images"]]
    assert stats["reliance_samples"] == 6 and all(0 < v < 50 for v in losses) and len(set(losses)) > 1
    assert 0.0 <= stats["max_attention_to_region_slots"] <= 1.0
    assert all(stats[f"grad_norm_{p}"] > 0 for p in ("mm_projector", "mask_extractor", "language_model"))


def test_step_profile_times_a_real_config_step(tmp_path):
    """bench.step_profile builds the run as `osprey train` does and times loader-fed and fixed-batch steps."""
    from pathlib import Path

    from bench.step_profile import main

    data = Path(__file__).parent / "fixtures" / "synth"
    result = main(["--stage", "1", "--config", "tiny_stage1", "--model", "tiny", "--output", str(tmp_path / "run"),
                   "--set", f"data.root={data}", "--set", "data.num_workers=0", "--set", "micro_batch_size=2",
                   "--set", "global_batch_size=2", "--set", "progress=false",
                   "--steps", "2", "--warmup", "1", "--profile-steps", "1", "--rows", "3"])
    assert result["step_s_with_loader"] > 0 and result["step_s_fixed_batch"] > 0 and result["tokens_per_batch"] > 0
    assert result["top_ops"]
    assert result["aten_ops_per_step"] > 100  # a real forward, backward and optimiser step dispatches many
    assert result["host_us_per_op_if_op_bound"] == pytest.approx(1e6 * result["step_s_fixed_batch"]
                                                                 / result["aten_ops_per_step"])
