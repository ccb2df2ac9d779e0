"""`osprey train` end to end on the generated-dataset fixture (config-driven data through osprey.data), and
`osprey train plot`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from osprey.checkpoint import init_model_folder, load_pretrained
from osprey.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "synth"
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_train_stage1_then_stage2_from_its_output_and_plot(tmp_path, capsys):
    init = init_model_folder("tiny", tmp_path / "init", seed=0)
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
    assert printed["optim"]["lr"] == 2e-5 and printed["stage"] == 3
    with pytest.raises(SystemExit, match="contradicts stage: 3"):
        main(["train", "--stage", "2", "--config", "osprey7b_stage3"])
    with pytest.raises(SystemExit, match=r"unknown config keys: \['optim.learning_rate'\]"):
        main(["train", "--config", "osprey7b_stage3", "--set", "optim.learning_rate=1", "--print-config"])
