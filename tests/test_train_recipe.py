"""The training recipe on the tiny preset through DeepSpeed's CPU accelerator: each stage trains exactly its
declared parts and overfits one batch, LoRA merges on save, a killed run resumes exactly, fully masked samples
are counted and contribute no loss."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from osprey.checkpoint import load_pretrained, read_config, to_official
from osprey.prompts import multi_region_prefix
from osprey.tokenization import IGNORE_INDEX, build_example
from train.config import load_config
from train.recipe import Recipe
from train.trainable import STAGE_PARTS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class RegionDataset(torch.utils.data.Dataset):
    """Tokenized multi-region conversations with random images and masks; `repeat` copies one sample (overfit)."""

    ANSWERS = ("a red circle", "the blue square on the left", "a green star", "small yellow tree", "a black car")

    def __init__(self, tokenizer, config, n: int = 8, repeat: bool = False, seed: int = 0, fully_masked: bool = False):
        gen = torch.Generator().manual_seed(seed)
        side = config.vision.image_size
        self.items = []
        for i in range(n):
            k = 0 if repeat else i
            regions = 1 + k % 3
            messages = [("human", multi_region_prefix(regions) + " What is region1?"), ("gpt", self.ANSWERS[k % 5])]
            example = build_example(tokenizer, messages, num_image_tokens=config.vision.num_image_tokens,
                                    image_token_id=config.image_token_id)
            labels = torch.tensor(example.labels)
            if fully_masked:
                labels[:] = IGNORE_INDEX
            if repeat and self.items:
                self.items.append(self.items[0])
                continue
            self.items.append({
                "input_ids": torch.tensor(example.input_ids), "labels": labels,
                "pixel_values": torch.randn(3, side, side, generator=gen),
                "masks": torch.rand(regions, 48, 40, generator=gen) > 0.5, "truncated": example.truncated,
            })
        self.lengths = [len(item["input_ids"]) for item in self.items]
        self.epoch = 0
        self.epochs_set: list[int] = []  # what the recipe told this dataset, in order

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Like osprey.data's datasets: per-sample randomness (here the masks) is reseeded per epoch."""
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        if self.epoch == 0:
            return item
        gen = torch.Generator().manual_seed(1000 * self.epoch + index)
        return item | {"masks": item["masks"] ^ (torch.rand(item["masks"].shape, generator=gen) > 0.5)}


def collate(items: list[dict]) -> dict:
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX)
    attention = torch.zeros(len(items), longest, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n], labels[row, :n], attention[row, :n] = item["input_ids"], item["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention,
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "masks": [item["masks"] for item in items], "truncated": torch.tensor([item["truncated"] for item in items])}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    folder = tiny_model_dir
    _, tokenizer, _ = load_pretrained(folder)
    return folder, tokenizer, read_config(folder)


def make_config(model: Path, out: Path, stage: int, **changes):
    raw = {"stage": stage, "model": str(model), "output_dir": str(out), "max_steps": 4, "micro_batch_size": 2,
           "global_batch_size": 2, "bf16": False, "gradient_checkpointing": stage == 3, "save_steps": 0,
           "progress": False, "data": {"num_workers": 0}, "optim": {"lr": 1e-3, "warmup_ratio": 0.0}}
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return load_config(raw=raw)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def changed_parts(before: dict, after: dict) -> tuple[set[str], list[str]]:
    """Parts with changed tensors, and tensors of changed parts that did not change."""
    official_part = {to_official(f"{part}x").removesuffix("x"): part
                     for part in ("vision_tower.vision_tower.", "mm_projector.", "mask_extractor.")}

    def part_of(name: str) -> str:
        return next((part.split(".")[0] for prefix, part in official_part.items() if name.startswith(prefix)),
                    "language_model")

    changed, unchanged = set(), []
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        (changed.add(part_of(name)) if not torch.equal(tensor, after[name]) else unchanged.append(name))
    return changed, [n for n in unchanged if part_of(n) in changed]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_trains_declared_parts_and_overfits(tiny, tmp_path, stage):
    folder, tokenizer, config = tiny
    dataset = RegionDataset(tokenizer, config, n=24, repeat=True)
    cfg = make_config(folder, tmp_path / f"stage{stage}", stage, max_steps=12, optim={"lr": 1e-2 if stage < 3 else 3e-3})
    recipe = Recipe(cfg, dataset=dataset, collate_fn=collate)
    final = recipe.run()

    changed, unchanged = changed_parts(weights(folder), weights(final))
    assert changed == set(STAGE_PARTS[stage])
    assert not unchanged, f"trainable tensors that did not move: {unchanged[:5]}"
    losses = recipe.state.losses
    # Stage 2 moves only the two region tokens, which a random 2-layer LM barely reads: its loss floor is close.
    drop = 0.005 if stage == 2 else 0.2
    assert len(losses) == 12 and losses[-1] < losses[0] - drop, losses
    assert all(b <= a + 1e-4 for a, b in itertools.pairwise(losses)), losses  # the same batch: (nearly) monotone
    load_pretrained(final, strict=True)  # the saved folder is a complete model
    from osprey.checkpoint import read_config

    assert read_config(final).training_data[-1] == {"root": None, "split": "train", "stage": stage}  # provenance
    log = [json.loads(line) for line in (tmp_path / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] is not None for r in log)


def test_train_vision_option_trains_the_tower(tiny, tmp_path):
    folder, tokenizer, config = tiny
    cfg = make_config(folder, tmp_path / "vision", 1, max_steps=2, train_vision=True)
    final = Recipe(cfg, dataset=RegionDataset(tokenizer, config, n=4), collate_fn=collate).run()
    changed, _ = changed_parts(weights(folder), weights(final))
    assert changed == {"mm_projector", "vision_tower"}


def test_lora_stage3_merges_on_save(tiny, tmp_path):
    folder, tokenizer, config = tiny
    dataset = RegionDataset(tokenizer, config, n=6)
    cfg = make_config(folder, tmp_path / "lora", 3, max_steps=3,
                      lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    recipe = Recipe(cfg, dataset=dataset, collate_fn=collate)
    recipe.setup()
    recipe.train()
    final = recipe.save_final()
    recipe.close()

    merged, _, report = load_pretrained(final, strict=True)
    assert report.ok
    changed, _ = changed_parts(weights(folder), weights(final))
    assert changed == {"language_model", "mm_projector", "mask_extractor"}
    before, after = weights(folder), weights(final)
    moved = {n for n in before if n.startswith("model.layers.") and not torch.equal(before[n], after[n])}
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for n in moved)
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # LoRA leaves the base head frozen

    batch = collate([dataset[0], dataset[1]])
    live = recipe.model.eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        expected = live(**inputs, masks=batch["masks"]).logits
        got = merged(**inputs, masks=batch["masks"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path):
    """Killed in the second epoch and resumed from a checkpoint taken there: the resumed run reseeds the dataset
    for that epoch (not epoch 0) and continues exactly as the uninterrupted run, which reseeded it per epoch."""
    folder, tokenizer, config = tiny
    # micro batch 1, global 2: gradient accumulation; 11 samples = 5 steps per epoch (the 11th micro-batch is a
    # partial accumulation, dropped), so step 6 is in epoch 1 and its checkpoint is taken there.
    changes = {"max_steps": 8, "micro_batch_size": 1, "global_batch_size": 2, "save_steps": 3}
    full_data = RegionDataset(tokenizer, config, n=11)
    full = Recipe(make_config(folder, tmp_path / "full", 3, **changes), dataset=full_data, collate_fn=collate)
    full.run()
    assert full_data.epochs_set == [0, 1]

    dataset = RegionDataset(tokenizer, config, n=11)
    killed = Recipe(make_config(folder, tmp_path / "resumed", 3, **changes), dataset=dataset, collate_fn=collate)
    killed.setup()
    killed.train(until_step=7)  # "killed" after step 7: the step-6 checkpoint (epoch 1) is the newest
    killed.close()
    resumed_data = RegionDataset(tokenizer, config, n=11)
    resumed = Recipe(make_config(folder, tmp_path / "resumed", 3, **changes), dataset=resumed_data,
                     collate_fn=collate)
    resumed.run(resume=True)
    assert resumed_data.epochs_set == [1]
    assert resumed.state.losses[:6] == full.state.losses[:6]  # restored with the checkpoint
    with pytest.raises(FileExistsError, match="pass --resume"):  # a fresh run must not mix with old checkpoints
        Recipe(make_config(folder, tmp_path / "resumed", 3, **changes), dataset=dataset, collate_fn=collate).setup()

    def log(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    full_log, resumed_log = log("full"), log("resumed")
    assert [r["step"] for r in resumed_log] == list(range(1, 9))
    for a, b in zip(full_log, resumed_log):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and a["lr"] == b["lr"], (a, b)
    a, b = weights(tmp_path / "full" / "final"), weights(tmp_path / "resumed" / "final")
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_fully_masked_samples_are_counted_and_give_no_loss(tiny, tmp_path):
    folder, tokenizer, config = tiny
    dataset = RegionDataset(tokenizer, config, n=4, fully_masked=True)
    recipe = Recipe(make_config(folder, tmp_path / "masked", 2, max_steps=2), dataset=dataset, collate_fn=collate)
    final = recipe.run()
    assert recipe.state.fully_masked_samples == 4
    assert recipe.state.losses == [0.0, 0.0]
    changed, _ = changed_parts(weights(folder), weights(final))
    assert not changed


def test_compile_regions_wraps_every_decoder_layer_and_tower_stage(tiny, tmp_path):
    from osprey.checkpoint import build_model
    from train.recipe import compile_regions

    _, _, config = tiny
    model = build_model(config)
    layers = config.text["num_hidden_layers"]
    assert compile_regions(model) == layers + len(model.vision_tower.trunk.stages)
    assert all(layer._compiled_call_impl is not None for layer in model.language_model.model.layers)
    with pytest.raises(ValueError, match="ZeRO-3"):
        Recipe(make_config(tiny[0], tmp_path / "run", 3, compile=True, deepspeed="zero3")).setup_model()


def test_part_lr_gives_a_part_its_own_learning_rate(tiny, tmp_path):
    cfg = make_config(tiny[0], tmp_path / "run", 3, optim={"lr": 1e-3, "part_lr": {"mask_extractor": 2e-5}})
    _, tokenizer, config = tiny
    recipe = Recipe(cfg, dataset=RegionDataset(tokenizer, config), collate_fn=collate)
    recipe.setup()
    try:
        # DeepSpeed flattens each group: count the elements at each rate
        elements: dict[float, int] = {}
        for group in recipe.optimizer.param_groups:
            elements[group["initial_lr"]] = elements.get(group["initial_lr"], 0) + sum(p.numel() for p in group["params"])
        extractor = sum(p.numel() for p in recipe.model.mask_extractor.parameters())
        trainable = sum(p.numel() for p in recipe.model.parameters() if p.requires_grad)
        assert elements == {1e-3: trainable - extractor, 2e-5: extractor}
        assert recipe.optimizer.param_groups[0]["initial_lr"] == 1e-3
    finally:
        recipe.close()
    with pytest.raises(ValueError, match="unknown parts"):
        make_config(tiny[0], tmp_path / "x", 3, optim={"part_lr": {"extractor": 1e-4}})


def test_cosine_with_warmup_is_transformers_schedule():
    from transformers import get_cosine_schedule_with_warmup

    from train.schedule import cosine_with_warmup

    for warmup, total in ((0, 10), (3, 10), (5, 7), (0, 1)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        reference = get_cosine_schedule_with_warmup(optimizer, warmup, total).lr_lambdas[0]
        for step in range(total + 2):
            assert cosine_with_warmup(step, warmup, total) == pytest.approx(reference(step), abs=1e-12), (warmup, step)


class SteppingClock:
    """A clock that advances `tick` seconds each time it is read: one read per optimiser step in TimeBox."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_time_box_fits_the_horizon_to_the_measured_pace():
    from train.schedule import TimeBox

    clock = SteppingClock(0.0)
    box = TimeBox(20.0, start_step=100, clock=clock)  # resumed at step 100: 20 s from now
    clock.tick = 2.0  # warm steps: slow, not measured
    assert [box.fit(step, 300, 500) for step in (101, 102, 103)] == [(300, False)] * 3  # unchanged until measured
    clock.tick = 1.0  # from step 103 (t = 6): 1 s a step
    assert [box.fit(step, 300, 500) for step in range(104, 108)] == [(300, False)] * 4  # not yet PACE_STEPS measured
    assert box.fit(108, 300, 500) == (108 + 20 - 11, False)  # t = 11: 9 s left at 1 s/step
    assert box.fit(109, 117, 110) == (110, False)  # t = 12: 8 s left, more than fit before the planned 110 steps
    clock.tick = 10.0
    assert box.fit(110, 110, 117) == (110, True)  # t = 22 > 20: out of time


def test_time_box_corrects_a_pessimistic_first_estimate():
    """The first measured steps wait for the data loader's workers: the horizon they give must not stick."""
    from train.schedule import TimeBox

    clock = SteppingClock(0.0)
    box = TimeBox(100.0, start_step=0, clock=clock)
    clock.tick = 4.0  # t = 4, 8, 12: warm steps
    assert [box.fit(step, 1000, 1000) for step in (1, 2, 3)] == [(1000, False)] * 3
    for step in range(4, 8):
        box.fit(step, 1000, 1000)
    horizon, _ = box.fit(8, 1000, 1000)  # t = 32: 4 s a step, 68 s left
    assert horizon == 8 + 17
    clock.tick = 0.5  # the workers are warm: steps are 8 times faster
    horizons = [box.fit(step, horizon, 1000)[0] for step in range(9, 60)]
    assert horizons[-1] > 3 * horizon  # the horizon follows the faster pace up
    assert box.fit(60, horizons[-1], 100) == (100, False)  # never past the planned steps (112 fit)


def test_time_limit_ends_the_schedule_within_it_and_a_resume_keeps_it(tiny, tmp_path):
    folder, tokenizer, config = tiny
    dataset = RegionDataset(tokenizer, config, n=8)
    changes = {"max_steps": 50, "save_steps": 10, "time_limit": 20.0}
    run = Recipe(make_config(folder, tmp_path / "run", 3, **changes), dataset=dataset, collate_fn=collate)
    run.clock = SteppingClock(1.0)  # one second a step: the pace is measured over steps 3..8, 12 s are left
    run.run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert run.state.step == run.total_steps == run.state.horizon == summary["total_steps"] == 20
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    from train.schedule import cosine_with_warmup

    for record in log[9:]:  # from the first estimate on, the rate follows the 20-step cosine to its end
        assert record["lr"] == pytest.approx(1e-3 * cosine_with_warmup(record["step"] - 1, 0, 20), rel=1e-6)
    assert log[-1]["lr"] < 1e-5
    checkpoint = json.loads((tmp_path / "run" / "checkpoints" / "step-000010" / "trainer_state.json").read_text())
    assert checkpoint["horizon"] == 20

    # killed after step 10: a resume without the limit keeps the shortened schedule and ends where it did
    (tmp_path / "again").mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoints", tmp_path / "again" / "checkpoints")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step-000020", ignore_errors=True)
    resumed = Recipe(make_config(folder, tmp_path / "again", 3, max_steps=50, save_steps=10), dataset=dataset,
                     collate_fn=collate)
    resumed.run(resume=True)
    assert resumed.state.step == resumed.total_steps == 20
    again = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in again] == [r["lr"] for r in log[10:]]


def test_clip_pretraining_fits_its_schedule_into_the_time_limit(tiny_model_dir, tmp_path, monkeypatch):
    """`osprey train clip --time-limit` uses the same time box: on a clock of one second a step, a 20 s limit ends
    the 50-step schedule at step 20 with the rate annealed to 0, and the weights are written."""
    import train.schedule
    from osprey.cli import main

    class SteppedTimeBox(train.schedule.TimeBox):
        def __init__(self, limit, start_step, clock=None):
            super().__init__(limit, start_step, SteppingClock(1.0))

    monkeypatch.setattr(train.schedule, "TimeBox", SteppedTimeBox)
    init = tiny_model_dir  # read-only: shared
    fixture = Path(__file__).parent / "fixtures" / "synth"
    assert main(["train", "clip", "--data", str(fixture), "--tokenizer", str(init), "--out", str(tmp_path / "clip"),
                 "--preset", "tiny", "--steps", "50", "--batch-size", "4", "--warmup-steps", "1", "--num-workers", "0",
                 "--log-steps", "5", "--time-limit", "20", "--no-progress", "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the rate after the last step: the cosine's end
    assert (tmp_path / "clip" / "open_clip.safetensors").is_file()
