"""`osprey train` end to end on the generated-dataset fixture (config-driven data through osprey.data), and
`osprey train plot`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from osprey.checkpoint import load_pretrained
from osprey.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "synth"
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_train_stage1_then_stage2_from_its_output_and_plot(tiny_model_dir, tmp_path, capsys):
    init = tiny_model_dir  # read-only: shared
    common = ["--max-steps", "2", "--set", f"data.root={FIXTURE}", "--set", "data.num_workers=0",
              "--set", "micro_batch_size=2", "--set", "global_batch_size=4", "--set", "progress=false"]
    assert main(["train", "--stage", "1", "--config", "tiny_stage1", "--model", str(init),
                 "--output", str(tmp_path / "s1"), *common]) == 0
    assert main(["train", "--stage", "2", "--config", "tiny_stage2", "--model", str(tmp_path / "s1" / "final"),
                 "--output", str(tmp_path / "s2"), *common]) == 0
    _, _, report = load_pretrained(tmp_path / "s2" / "final", strict=True)
    assert report.ok
    summary = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert summary["step"] == 2 and summary["samples_seen"] == 8 and summary["parts"]["mask_extractor"][0] > 0

    log = tmp_path / "s2" / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    # tiny configs log every 5 steps (and the last): one record, its loss the mean of the 2 steps
    assert [(r["step"], r["loss_steps"]) for r in records] == [(2, 2)]
    assert records[0]["loss"] == pytest.approx(sum(summary["losses"]) / 2)
    assert main(["train", "plot", str(log), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_print_config_and_argument_errors(capsys):
    assert main(["train", "--stage", "3", "--config", "osprey7b_stage3", "--set", "optim.lr=2e-5", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 2e-5 and printed["stage"] == 3 and printed["time_limit"] == 0
    assert main(["train", "--config", "osprey7b_stage3", "--time-limit", "450", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["time_limit"] == 450
    with pytest.raises(SystemExit, match="need time_limit >= 0"):
        main(["train", "--config", "osprey7b_stage3", "--time-limit", "-1", "--print-config"])
    with pytest.raises(SystemExit, match="contradicts stage: 3"):
        main(["train", "--stage", "2", "--config", "osprey7b_stage3"])
    with pytest.raises(SystemExit, match=r"unknown config keys: \['optim.learning_rate'\]"):
        main(["train", "--config", "osprey7b_stage3", "--set", "optim.learning_rate=1", "--print-config"])


def test_clip_pretraining_writes_weights_the_stage_configs_load(tiny_model_dir, tmp_path):
    """`osprey train clip`: contrastive steps on the fixture's captions and region phrases, an open_clip file whose `visual.*` tensors
    fill the tower exactly (load_pretrained(clip_weights=)), a refusal to overwrite a run, and the metrics log."""
    from safetensors.torch import load_file

    from train.clip_pretrain import LEVEL_HEAD

    init = tiny_model_dir  # read-only: shared
    args = ["train", "clip", "--data", str(FIXTURE), "--tokenizer", str(init), "--out", str(tmp_path / "clip"),
            "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--warmup-steps", "1", "--num-workers", "0",
            "--log-steps", "1", "--save-steps", "2", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    weights = tmp_path / "clip" / "open_clip.safetensors"
    state = load_file(str(weights))
    assert any(k.startswith("visual.trunk.") for k in state) and any(k.startswith("transformer.") for k in state)
    assert not any(k.startswith(f"{LEVEL_HEAD}.") for k in state)  # trained, not exported (as the CLIP head)
    assert json.loads((tmp_path / "clip" / "clip_config.json").read_text())["region_levels"] == "all"
    records = [json.loads(line) for line in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    # the fixture's referring records give every image its regions: the region-phrase term is in the loss
    assert all(r["region_loss"] > 0 and r["regions_per_step"] > 4 for r in records)
    # ... and so is the category-name term (the fixture's category records share the referring regions)
    assert all(r["category_loss"] > 0 for r in records)
    assert all(r["loss"] == pytest.approx(r["image_loss"] + r["region_loss"] + r["category_loss"]) for r in records)
    assert not (tmp_path / "clip" / "checkpoints").exists()  # removed once the weights are written

    model, _, report = load_pretrained(init, clip_weights=weights, strict=True)
    assert report.ok
    tower = {k.removeprefix("vision_tower.vision_tower."): v
             for k, v in model.state_dict().items() if k.startswith("vision_tower.vision_tower.visual.")}
    assert all(torch.equal(tower[k], state[k].to(tower[k].dtype)) for k in tower)

    # a stage that loads the tower records the CLIP step's data as stage 0 (osprey.data.provenance)
    from osprey.checkpoint import read_config
    from osprey.data.provenance import training_entry
    from train.clip_pretrain import clip_training_entry

    assert main(["train", "--stage", "1", "--config", "tiny_stage1", "--model", str(init), "--output", str(tmp_path / "s1"),
                 "--max-steps", "1", "--set", f"data.root={FIXTURE}", "--set", "data.num_workers=0",
                 "--set", "micro_batch_size=2", "--set", "global_batch_size=2", "--set", "progress=false",
                 "--set", f"clip_weights={weights}"]) == 0
    recorded = read_config(tmp_path / "s1" / "final").training_data
    assert recorded == (training_entry(FIXTURE, "train", 0), training_entry(FIXTURE, "train", 1))
    assert clip_training_entry(weights) == recorded[0] and recorded[0]["stage"] == 0
    (tmp_path / "bare").mkdir()
    assert clip_training_entry(tmp_path / "bare" / "open_clip.safetensors") is None  # not ours: unknown

    (tmp_path / "clip" / "checkpoints" / "step-000002").mkdir(parents=True)  # an earlier run's checkpoint
    with pytest.raises(SystemExit, match="--resume"):
        main(args)


def test_distinct_text_loss_merges_duplicate_names_and_skips_regions_without_one():
    """Each region's target is its own name among the batch's distinct names: two regions named alike share one
    column (ClipLoss would make each the other's negative), and rows of pad ids take no part."""
    import torch.nn.functional as F

    from train.clip_pretrain import distinct_text_loss

    torch.manual_seed(0)
    pad = 0
    names = torch.tensor([[5, 6, 1], [7, 1, 0], [5, 6, 1], [0, 0, 0]])  # regions 0 and 2 share a name; 3 has none
    table = F.normalize(torch.randn(10, 4), dim=-1)

    def encode_text(ids, normalize=True):
        return F.normalize(table[ids].sum(1), dim=-1)

    regions = F.normalize(torch.randn(4, 4), dim=-1)
    scale = torch.tensor(10.0)
    loss = distinct_text_loss(regions, names, encode_text, scale, pad)
    distinct = encode_text(torch.tensor([[5, 6, 1], [7, 1, 0]]))
    expected = F.cross_entropy(scale * regions[:3] @ distinct.T, torch.tensor([0, 1, 0]))
    assert torch.allclose(loss, expected)
    assert distinct_text_loss(regions, names[[0, 2, 3]], encode_text, scale, pad) is None  # one distinct name
    assert distinct_text_loss(regions, names[[3]], encode_text, scale, pad) is None


def test_region_embeddings_read_every_level_as_the_extractor_does():
    """With a LevelRegionHead the region embedding is the sum of per-level linear maps of the mask-pooled levels
    the model's VisionTower gives (the extractor's inputs); without it, the last map through the CLIP head."""
    from osprey.config import OspreyConfig
    from osprey.mask_extractor import masked_mean_pool_batch
    from osprey.vision import VisionTower, open_clip_model_config
    from train.clip_pretrain import (
        LevelRegionHead,
        image_and_region_embeddings,
        region_embeddings_from_pooled,
    )

    torch.manual_seed(0)
    vision_config = OspreyConfig.from_preset("tiny").vision
    tower = VisionTower(vision_config).eval()
    visual = tower.vision_tower.visual
    size = vision_config.image_size
    images = torch.randn(2, 3, size, size)
    masks = [torch.zeros(2, size, size, dtype=torch.bool), torch.ones(1, size, size, dtype=torch.bool)]
    masks[0][0, : size // 2, : size // 3] = True
    masks[0][1, size // 2 :, size // 4 :] = True
    head = LevelRegionHead(vision_config.level_channels, open_clip_model_config(vision_config)["embed_dim"])
    with torch.no_grad():
        images_out, regions = image_and_region_embeddings(visual, images, masks, head)
        levels = tower(images)
        expected = sum(layer(masked_mean_pool_batch(level, masks)) for layer, level in zip(head.levels, levels))
        _, final_regions = image_and_region_embeddings(visual, images, masks)
        expected_final = region_embeddings_from_pooled(visual, masked_mean_pool_batch(levels[-1], masks))
    assert regions.shape == (3, head.levels[0].out_features) and images_out.shape[0] == 2
    assert torch.allclose(regions, expected, atol=1e-5)
    assert torch.allclose(final_regions, expected_final, atol=1e-5)
    assert not torch.allclose(regions[0], regions[1])  # the two masks of image 0 pool different features


def test_clip_pretraining_time_limit_stops_and_writes_the_weights(tiny_model_dir, tmp_path):
    """--time-limit: the run stops after the step that crosses it and still writes a loadable weight file."""
    from safetensors.torch import load_file

    init = tiny_model_dir  # read-only: shared
    out = tmp_path / "clip"
    assert main(["train", "clip", "--data", str(FIXTURE), "--tokenizer", str(init), "--out", str(out),
                 "--preset", "tiny", "--steps", "50", "--batch-size", "4", "--warmup-steps", "1", "--num-workers", "0",
                 "--log-steps", "1", "--time-limit", "1e-6", "--no-progress", "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    first = load_file(str(out / "open_clip.safetensors"))
    assert any(k.startswith("visual.trunk.") for k in first)

    # --init carries on from those weights (the region level head starts fresh): at lr ~0 they barely move
    again = tmp_path / "again"
    common = ["--preset", "tiny", "--steps", "1", "--batch-size", "4", "--warmup-steps", "0", "--num-workers", "0",
              "--no-progress", "--device", "cpu", "--lr", "1e-12"]
    assert main(["train", "clip", "--data", str(FIXTURE), "--tokenizer", str(init), "--out", str(again),
                 "--init", str(out / "open_clip.safetensors"), *common]) == 0
    carried = load_file(str(again / "open_clip.safetensors"))
    assert carried.keys() == first.keys()
    assert all(torch.allclose(carried[k], first[k], atol=1e-6) for k in first)
    fresh = tmp_path / "fresh"  # another seed: the weights above came from the file, not from the seed's init
    assert main(["train", "clip", "--data", str(FIXTURE), "--tokenizer", str(init), "--out", str(fresh), *common,
                 "--seed", "1"]) == 0
    assert not torch.allclose(load_file(str(fresh / "open_clip.safetensors"))["visual.trunk.stem.0.weight"],
                              first["visual.trunk.stem.0.weight"])
    with pytest.raises(SystemExit, match="does not fit this CLIP"):
        main(["train", "clip", "--data", str(FIXTURE), "--tokenizer", str(init), "--out", str(tmp_path / "bad"),
              "--init", str(out / "open_clip.safetensors"), *common, "--text-width", "32"])


def test_clip_pretraining_refuses_a_dataset_smaller_than_a_batch(tiny_model_dir, tmp_path):
    init = tiny_model_dir  # read-only: shared
    with pytest.raises(SystemExit, match="no full batch"):
        main(["train", "clip", "--data", str(FIXTURE), "--tokenizer", str(init), "--out", str(tmp_path / "clip"),
              "--preset", "tiny", "--batch-size", "64", "--device", "cpu", "--no-progress"])


def test_data_template_selects_the_system_prompt(tiny_model_dir, tmp_path):
    from train.config import load_config
    from train.recipe import dataset_from_config

    init = tiny_model_dir  # read-only: shared
    model, tokenizer, _ = load_pretrained(init)
    for template, words in (("train", "curious user"), ("infer", "curious human")):
        cfg = load_config(raw={"stage": 3, "model": str(init), "output_dir": str(tmp_path / "o"),
                               "data": {"root": str(FIXTURE), "template": template}})
        dataset, _, _ = dataset_from_config(cfg, tokenizer, model.config)
        ids = [t for t in dataset[0]["input_ids"].tolist() if t >= 0]
        assert words in tokenizer.decode(ids)
    with pytest.raises(ValueError, match="data.template"):
        load_config(raw={"stage": 3, "model": "x", "output_dir": "o", "data": {"template": "chat"}})


def test_data_files_repeat_puts_a_file_k_times_in_an_epoch(tiny_model_dir, tmp_path):
    """`repeat: k` in a data.files entry (with or without a kind) mixes that file in k times."""
    from train.config import load_config
    from train.recipe import dataset_from_config

    init = tiny_model_dir  # read-only: shared
    model, tokenizer, _ = load_pretrained(init)

    def size(files):
        cfg = load_config(raw={"stage": 3, "model": str(init), "output_dir": str(tmp_path / "o"),
                               "data": {"root": str(FIXTURE), "files": files}})
        return len(dataset_from_config(cfg, tokenizer, model.config)[0])

    pos_neg = {"path": "train/stage3_pos_neg.json", "kind": "pos_neg"}
    once, detailed = size([pos_neg]), size(["train/stage3_detailed.json"])
    assert once > 0 and detailed > 0
    assert size([{**pos_neg, "repeat": 3}, "train/stage3_detailed.json"]) == 3 * once + detailed
    assert size([{"path": "train/stage3_detailed.json", "repeat": 2}]) == 2 * detailed  # kind from the manifest


def test_builtin_stage3_configs_build_their_mixes_on_a_generated_dataset(tiny_model_dir, tmp_path):
    """The built-in model's three stage-3 configs name files and kinds the generator writes, in the shares they
    document: the yes/no sub-set 1x, 20x (the pass that teaches the comparison), then 8x with the category prompt 2x."""
    from train.config import load_config, parse_override
    from train.recipe import dataset_from_config

    init = tiny_model_dir  # read-only: shared
    model, tokenizer, _ = load_pretrained(init)
    sizes = {}
    for name in ("builtin_stage3", "builtin_stage3_yesno", "builtin_stage3_final"):
        cfg = load_config(name, [parse_override(f"data.root={FIXTURE}")])
        sizes[name] = len(dataset_from_config(cfg, tokenizer, model.config)[0])
    pos_neg = len(json.loads((FIXTURE / "train/stage3_pos_neg.json").read_text()))
    categories = len(json.loads((FIXTURE / "train/stage2_categories.json").read_text()))
    assert sizes["builtin_stage3_yesno"] == sizes["builtin_stage3"] + 19 * pos_neg
    assert sizes["builtin_stage3_final"] == sizes["builtin_stage3"] + 7 * pos_neg + categories


@pytest.mark.slow
def test_two_ranks_agree_on_the_time_limit(tmp_path):
    """Two CPU ranks (torchrun, gloo, ZeRO-2) with a time limit: rank 0's clock decides, both ranks shorten the
    schedule to the same step and the run ends there with final/ written (a disagreement would hang a collective)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    # --standalone: the rendezvous store binds port 0 and keeps it (no free-port race with other runs)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "osprey.cli", "train", "--stage", "3", "--config", "tiny_stage3",
               "--model", "tiny", "--set", f"data.root={FIXTURE}", "--set", "progress=false", "--set", "bf16=false",
               "--set", "micro_batch_size=2", "--set", "global_batch_size=4", "--set", "save_steps=0",
               "--max-steps", "500", "--time-limit", "6", "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == summary["total_steps"] == summary["horizon"] < 500
    shortened = [line.split("INFO", 1)[1] for line in done.stderr.splitlines() if "the schedule now ends at step" in line]
    # however often a slow machine makes rank 0 shorten the schedule, both ranks log each new end: the same lines
    assert shortened and all(shortened.count(line) == 2 for line in shortened)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_two_cpu_ranks(tmp_path):
    """The documented launcher line (docs/train.md: `deepspeed --num_gpus N --no_local_rank $(which osprey) train
    ...`) on the CPU: two ranks (DeepSpeed's CPU accelerator, gloo, ZeRO-2) take the global batch together and rank 0
    writes the final folder."""
    import shutil
    import socket
    import subprocess

    with socket.socket() as probe:  # the launcher's rendezvous port: a free one, not the default 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    command = [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--no_local_rank",
               shutil.which("osprey"), "train", "--stage", "3", "--config", "tiny_stage3", "--model", "tiny",
               "--set", f"data.root={FIXTURE}", "--set", "progress=false", "--set", "bf16=false",
               "--set", "micro_batch_size=2", "--set", "global_batch_size=4", "--set", "save_steps=0",
               "--max-steps", "3", "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "(global batch 4 = 2 x 2 ranks x 1 accumulation)" in log
    assert json.loads((out / "summary.json").read_text())["step"] == 3
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_hostfile_of_two_nodes_trains_without_ssh(tmp_path):
    """The documented multi-node line without ssh (docs/train.md: one `deepspeed --hostfile ... --no_ssh --node_rank K
    --master_addr NODE0` per node, as a scheduler starts it on each node): two "nodes" of the hostfile, one CPU rank
    each, both started on this machine. They form one world of 2 ranks (global batch 4 = 2 x 2), write one checkpoint
    together (each rank its RNG state, rank 0 renames it) and rank 0 writes the final folder."""
    import shutil
    import socket
    import subprocess

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"

    def node(rank: int) -> subprocess.Popen:
        command = [shutil.which("deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank",
                   shutil.which("osprey"), "train", "--stage", "3", "--config", "tiny_stage3", "--model", "tiny",
                   "--set", f"data.root={FIXTURE}", "--set", "progress=false", "--set", "bf16=false",
                   "--set", "micro_batch_size=2", "--set", "global_batch_size=4", "--set", "save_steps=2",
                   "--max-steps", "3", "--output", str(out)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    nodes = [node(0), node(1)]
    logs = [process.communicate(timeout=600)[0] for process in nodes]
    for process, log in zip(nodes, logs):
        assert process.returncode == 0, log[-3000:]
    assert all("nnodes=2, num_local_procs=1" in log for log in logs)
    assert "(global batch 4 = 2 x 2 ranks x 1 accumulation)" in logs[0]
    assert json.loads((out / "summary.json").read_text())["step"] == 3
    checkpoint = out / "checkpoints" / "step-000002"
    assert {p.name for p in checkpoint.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert (out / "final" / "model.safetensors").is_file()


def _clip_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_clip_pretraining_on_two_ranks_takes_the_same_steps_as_one_process(tiny_model_dir, tmp_path):
    """torchrun, two CPU ranks (gloo) of 2 images each against one process of 4: the same images per step (each rank
    takes its share of one order), the image-caption loss over the gathered batch and averaged gradients give the
    same losses, gradient norms and weights. Then both ranks with the region losses on and a time limit: rank 0's
    clock decides, so both stop at the same step (a disagreement would hang a collective) and the weights are written."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    init = tiny_model_dir  # read-only: shared
    common = ["train", "clip", "--data", str(FIXTURE), "--tokenizer", str(init), "--preset", "tiny",
              "--batch-size", "4", "--warmup-steps", "0", "--lr", "1e-3", "--num-workers", "0", "--log-steps", "1",
              "--save-steps", "0", "--no-progress", "--device", "cpu"]
    without_regions = ["--steps", "3", "--region-weight", "0", "--category-weight", "0"]
    assert main([*common, *without_regions, "--out", str(tmp_path / "one")]) == 0

    def torchrun(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                   "osprey.cli", *common, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    done = torchrun(*without_regions, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _clip_metrics(tmp_path / "one"), _clip_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["samples_per_s"] > 0
    weights_one = load_file(str(tmp_path / "one" / "open_clip.safetensors"))
    weights_two = load_file(str(tmp_path / "two" / "open_clip.safetensors"))
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    done = torchrun("--steps", "500", "--time-limit", "4", "--out", str(tmp_path / "regions"))
    assert done.returncode == 0, done.stderr[-3000:]
    records = _clip_metrics(tmp_path / "regions")
    assert 1 <= records[-1]["step"] < 500 and records[-1]["region_loss"] is not None
    assert (tmp_path / "regions" / "open_clip.safetensors").is_file()
    assert not (tmp_path / "regions" / "checkpoints").exists()
    done = torchrun("--steps", "1", "--batch-size", "3", "--out", str(tmp_path / "odd"))
    assert done.returncode != 0 and "--batch-size 3 does not split over 2 processes" in done.stderr


def test_clip_pretraining_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, tiny_model_dir):
    """A run killed after its step-2 checkpoint continues from it with --resume (train.checkpoints, as the stage
    recipe's): the schedule goes on where it was (same rates as an uninterrupted run), the log holds each step once,
    and the checkpoints go once the weights are written."""
    from train.clip_recipe import ClipRecipe

    args = ["train", "clip", "--data", str(FIXTURE), "--tokenizer", str(tiny_model_dir), "--preset", "tiny", "--steps", "4",
            "--batch-size", "4", "--warmup-steps", "1", "--num-workers", "0", "--log-steps", "1", "--save-steps", "2",
            "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    class Killed(Exception):
        pass

    save = ClipRecipe.save_checkpoint

    def save_then_die(self):
        save(self)
        raise Killed

    monkeypatch.setattr(ClipRecipe, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    assert (tmp_path / "cut" / "checkpoints" / "step-000002" / "clip_state.pt").is_file()
    with pytest.raises(SystemExit, match="--resume"):
        main([*args, "--out", str(tmp_path / "cut")])
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0

    def log(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in log("cut")] == [1, 2, 3, 4]
    assert [r["lr"] for r in log("cut")] == pytest.approx([r["lr"] for r in log("whole")])
    assert [r["loss"] for r in log("cut")][:2] == pytest.approx([r["loss"] for r in log("whole")][:2])
    assert (tmp_path / "cut" / "open_clip.safetensors").is_file() and not (tmp_path / "cut" / "checkpoints").exists()
