"""bench/train_step.py on CPU with the tiny preset: the code path the GPU benchmark takes (DeepSpeed engine,
synthetic official-shape batches, stage-3 trainable set, LoRA + ZeRO-3 + checkpointing), so it cannot fail
on the GPU machine for a trivial reason."""

from __future__ import annotations

import json
import os

import pytest

from bench.train_step import build_config, main, synthetic_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_synthetic_batch_matches_the_model_slots():
    config = build_config("tiny")
    batch = synthetic_batch(config, batch_size=2, regions=3, text_tokens=100, device="cpu", seed=0)
    ids = batch["input_ids"]
    assert ids.shape[1] == 1 + 6 + config.vision.num_image_tokens + 100 + 1
    assert ((ids == config.image_token_id).sum(dim=1) == config.vision.num_image_tokens).all()
    assert ((ids == config.mask_token_id).sum(dim=1) == 3).all() and len(batch["masks"]) == 2
    assert batch["masks"][0].shape == (3, config.vision.image_size, config.vision.image_size)
    assert ((batch["labels"] != -100).sum(dim=1) == 100 // 3 + 1).all()


def test_bench_full_finetune_zero2_fp32(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--no-bf16",
                   "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["tokens_per_s"] > 0 and result["mfu"] is None and result["flop_formula"] == "train.metrics.LMFlops"
    assert result["losses"][-1] < result["losses"][0]  # the same batch: one step already lowers the loss
    # the 1-rank world binds port 0 and leaves no concrete port behind for a later training subprocess to collide with
    assert os.environ.get("MASTER_PORT") == "0"
    # a result of the earlier formula is recounted from its recorded setting to the same FLOPs
    old = {k: v for k, v in result.items() if not k.startswith(("flops_per", "mfu"))}
    old["flop_formula"] = "6 * N_lm * tokens"
    out.write_text(json.dumps(old))
    main(["--recount", str(out)])
    recounted = json.loads(out.read_text())
    assert recounted["flops_per_step"] == result["flops_per_step"] and recounted["flops_per_step_parts"]["head"] > 0


def test_bench_lora_zero3_checkpointing_bf16():
    result = main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--lora", "--lora-r", "4",
                   "--zero", "3", "--grad-ckpt"])
    assert result["lora"] and result["zero"] == 3 and result["bf16"]
    assert result["trainable_params"] < result["lm_params"] and result["flops_per_step_parts"]["adapters"] > 0


def test_1b_preset_shape():
    from osprey.checkpoint import parameter_counts

    counts = parameter_counts(build_config("osprey-1b"))
    assert 1.0e9 < counts["language_model"] < 1.2e9 and 1.9e8 < counts["vision_tower"] < 2.1e8


def test_data_index_bench_builds_a_stage_config_both_ways(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """bench/data_index.py on the fixture: the built-in final mix, lengths estimated in one process and in two."""
    from pathlib import Path

    import osprey.data.dataset
    from bench.data_index import main as data_index

    monkeypatch.setattr(osprey.data.dataset, "_LENGTH_CHUNK", 64)  # the fixture's mix is a few hundred samples
    init = tiny_model_dir  # read-only: shared
    fixture = Path(__file__).parent / "fixtures" / "synth"
    assert data_index(["--data", str(fixture), "--model", str(init), "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["same_lengths"] and report["samples"] > 64 and report["seconds_2_workers"] >= 0


def test_a_baseline_of_another_setting_is_refused():
    from bench.train_step import SAME_SETTING, scaling_fields

    one = {key: 1 for key in SAME_SETTING} | {"tokens_per_s": 100.0, "world_size": 1}
    two = one | {"tokens_per_s": 180.0, "world_size": 2}
    assert scaling_fields(two, one, "one.json")["scaling_efficiency"] == pytest.approx(0.9)
    with pytest.raises(SystemExit, match="batch_size_per_gpu: 1 there, 4 here"):
        scaling_fields(two | {"batch_size_per_gpu": 4}, one, "one.json")


@pytest.mark.slow
def test_the_scaling_script_runs_one_and_two_cpu_ranks(tmp_path):
    """bench/train_scaling.sh as the GPU machine runs it, on CPU ranks (torchrun, gloo): the 2-rank result holds its
    throughput per rank over the 1-rank run's."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "train_scaling.sh"
    env = os.environ | {"GPUS": "1 2", "SETTING": "--preset tiny --device cpu --no-bf16", "STEPS": "2", "WARMUP": "1",
                        "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    one, two = (json.loads((tmp_path / f"gpus{n}.json").read_text()) for n in (1, 2))
    assert one["world_size"] == 1 and two["world_size"] == 2 and "scaling_efficiency" not in one
    assert two["baseline"]["world_size"] == 1
    assert two["scaling_efficiency"] == pytest.approx(two["tokens_per_s"] / 2 / one["tokens_per_s"])
    assert f"| 2 | {two['tokens_per_s']:,.0f} |" in done.stdout


def test_a_baseline_of_another_command_line_is_refused_before_the_run(tmp_path):
    one = tmp_path / "one.json"
    main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--no-bf16", "--out", str(one)])
    # `--device cuda` on this GPU-less machine: only a check made before the run can answer with the setting
    with pytest.raises(SystemExit, match="batch_size_per_gpu: 1 there, 2 here"):
        main(["--preset", "tiny", "--device", "cuda", "--steps", "1", "--warmup", "0", "--no-bf16", "--batch-size", "2",
              "--baseline", str(one)])
    with pytest.raises(SystemExit, match="No such file"):
        main(["--preset", "tiny", "--device", "cpu", "--baseline", str(tmp_path / "missing.json")])
    (tmp_path / "other.json").write_text('{"loss": 1}')
    with pytest.raises(SystemExit, match="not a bench/train_step.py result"):
        main(["--preset", "tiny", "--device", "cpu", "--baseline", str(tmp_path / "other.json")])
