"""docs/finetune.md, every command in order, read out of the guide itself: on the generated-dataset fixture exported
as COCO with attributes (`osprey data synth-coco`) plus a label CSV, with the tiny model on CPU."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "finetune.md"
FIXTURE = ROOT / "tests" / "fixtures" / "synth"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)
NEEDS_ROUTE = re.compile(r"^# needs: POST (\S+)", re.MULTILINE)


def guide_blocks() -> list[str]:
    """The guide's runnable blocks (```bash), in order; the dogfood section's GPU line is a plain ``` block."""
    return BLOCK.findall(GUIDE.read_text(encoding="utf-8"))


def unclaimed_port() -> int:
    """A free port below the kernel's ephemeral range, for the guide's `osprey serve --port "$PORT"`. A port the
    kernel hands out (bind to 0, outgoing connections) comes from that range, so nothing takes this one between
    this check and the server's bind unless a process names this very port; a port from `bind(0)` could be."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()  # not the suite's seed: two runs side by side should not pick the same port
    for _ in range(200):
        port = rng.randrange(10000, max(ephemeral_low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def test_guide_blocks_are_found_and_name_their_needs():
    blocks = guide_blocks()
    assert len(blocks) >= 6, f"expected the guide's command blocks, found {len(blocks)}"
    text = "\n".join(blocks)
    for command in ("osprey data convert coco", "osprey train --stage 2", "osprey train --stage 3", "osprey serve",
                    "osprey eval classify", "osprey eval short-answer", "osprey eval pope"):
        assert command in text, f"{command!r} is not among the guide's commands"
    assert [NEEDS_ROUTE.search(b)[1] for b in blocks if NEEDS_ROUTE.search(b)] == ["/v1/regions/classify"]
    from serve.regions_score import router

    assert "/v1/regions/classify" in {route.path for route in router.routes}


@pytest.mark.slow
def test_every_guide_command_runs(tmp_path, tiny_model_dir):
    from data_tools.synth.coco_export import export_coco

    data = tmp_path / "my_data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.json").write_text(json.dumps(export_coco(FIXTURE, split)))
    (data / "labels.csv").write_text("id,labels\n1,on sale;new\n2,clearance\n")
    work = tmp_path / "work"
    blocks = guide_blocks()
    env = {**os.environ, "COCO_TRAIN": str(data / "train.json"), "COCO_TEST": str(data / "test.json"),
           "IMAGES": str(FIXTURE), "LABELS": str(data / "labels.csv"), "BASE": str(tiny_model_dir),
           "WORK": str(work), "PORT": str(unclaimed_port()), "PYTHONPATH": str(ROOT),
           "TRAIN_OPTS": "--max-steps 2 --set micro_batch_size=2 --set global_batch_size=2 --set data.num_workers=0 "
                         "--set bf16=false --set progress=false",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = "set -euo pipefail\ncd " + str(ROOT) + "\n" + "\n".join(blocks)
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=3600,
                            check=False)
    assert result.returncode == 0, f"guide failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"

    for split in ("train", "test"):  # the records: every task, every region of the split
        for task in ("categories", "short_answer", "label_list", "yes_no"):
            assert json.loads((work / "records" / f"{split}_{task}.json").read_text())
    final = work / "model" / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert '"id":"model/final"' in result.stdout.replace(" ", "")  # served under its run's name
    for question in ("What color is <region1>?", "What is the object in <region1>?", "Is <region1> red?"):
        assert f"{question} -> " in result.stdout  # answered over the chat API
    for name in ("classify", "short_answer", "label_list", "yes_no"):
        summary = json.loads((work / "eval" / f"{name}.json").read_text())["summary"]
        assert summary["items"] > 0
    assert result.stdout.count("What color is <region>? ") > 0  # the colour classification printed


@pytest.mark.slow
def test_the_dogfood_script_retrains_stage_3_then_fine_tunes_from_it(tmp_path):
    """bench/finetune_builtin.sh with RETRAIN (docs/finetune.md, the dogfood's next run) on 40 generated images, one
    step per training run: the base's stage-3 pass writes its model, the fine-tune starts from it, and the evaluation
    reports the base, the pass and the fine-tuned model side by side."""
    env = os.environ | {"N": "40", "STEPS": "1", "RETRAIN": "120", "RETRAIN_STEPS": "1", "MICRO": "4", "WORKERS": "1",
                        "EVAL_LIMIT": "2", "WORDINGS_LIMIT": "1", "CLASSIFY_LIMIT": "0", "DEVICE": "cpu",
                        "EXTRA": "--set bf16=false", "WORK": str(tmp_path)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", str(ROOT / "bench" / "finetune_builtin.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (tmp_path / "builtin_s3" / "final" / "model.safetensors").is_file()
    assert f"fine-tune from {tmp_path}/builtin_s3/final" in done.stdout
    assert "stage-3 pass done: 1 steps, 4 samples a rank" in done.stdout
    header = (tmp_path / "eval" / "region_eval.md").read_text().splitlines()[0]
    assert header == "| metric | builtin_ft | builtin_s3 | builtin |"
