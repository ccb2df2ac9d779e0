"""The generated dataset in the evals: its files read by the eval loaders, its panoptic build, ovseg on it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from eval.datasets import load_captions, load_classification, load_pope, read_panoptic_png
from eval.panoptic import BACKGROUND, records_to_panoptic
from eval.vocab import load_vocabulary
from osprey.data.records import read_records, record_masks


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from data_tools.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth")
    generate(
        SynthConfig(out=str(root), n=4, image_size=64, val_fraction=0.0, test_fraction=0.5),
        workers=1,
        progress=False,
    )
    return root


def test_loaders_read_the_generated_test_split(synth):
    test = synth / "test"
    parts = load_classification(test / "stage2_parts.json", synth)
    assert parts and all(":" in it.target for it in parts)  # PACO-style object:part labels
    cats = load_classification(test / "stage2_categories.json", synth)
    assert cats and all(it.target and ":" not in it.target for it in cats)
    caps = load_captions(test / "stage2_referring.json", synth)
    assert caps and all(len(it.target) == 1 and it.target[0] for it in caps)
    pope = load_pope(test / "stage3_pos_neg.json", synth)
    assert pope and {it.target for it in pope} <= {"yes", "no"}
    assert all(it.question.count("<region>") == 1 and it.segmentation is not None for it in pope)


def test_build_panoptic_from_object_records(synth, tmp_path):
    records_path = synth / "test" / "stage2_categories.json"
    files = records_to_panoptic(records_path, tmp_path, limit=None)
    pan_json, png_dir, classes_json = files.data, files.png_root, files.classes
    vocab = load_vocabulary(str(classes_json))
    by_id = {c.id: c for c in vocab.classes}
    pan = json.loads(pan_json.read_text())
    for rec, ann in zip(read_records(records_path), pan["annotations"]):
        ids = read_panoptic_png(str(png_dir / ann["file_name"]))
        masks = record_masks(rec)
        info = {s["id"]: s for s in ann["segments_info"]}
        for i, (region, mask) in enumerate(zip(rec.annotation, masks)):
            assert np.array_equal(ids == i + 1, mask)  # each object is exactly its own segment
            assert by_id[info[i + 1]["category_id"]].name == region.category_name
        background = ~masks.any(axis=0)
        assert np.array_equal(ids == 1000, background)
        assert (
            by_id[info[1000]["category_id"]].name == BACKGROUND
            and not by_id[info[1000]["category_id"]].isthing
        )


def test_ovseg_runs_on_the_generated_dataset(synth, tiny_model_dir, tmp_path):
    """`osprey eval ovseg --data <split>/stage2_categories.json` builds the panoptic ground truth itself (before,
    only bench/eval_all.py did, and the command stopped with a traceback)."""
    from osprey.cli import main

    out = tmp_path / "ovseg.json"
    argv = ["eval", "ovseg", "--data", str(synth / "test" / "stage2_categories.json"), "--images", str(synth),
            "--model", str(tiny_model_dir), "--out", str(out), "--max-new-tokens", "2", "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["images"] == 2 and summary["regions"] > 0 and 0 <= summary["PQ"] <= 100
    assert (tmp_path / "ovseg_panoptic_gt" / "classes.json").is_file()
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING  # no request lines under the bars
    panoptic = tmp_path / "ovseg_panoptic_gt" / "panoptic.json"
    with pytest.raises(ValueError, match="--classes is needed"):  # as the other commands' bad inputs
        main(["eval", "ovseg", "--data", str(panoptic), "--model", str(tiny_model_dir), "--out", str(out)])


def test_eval_all_sends_every_command_to_an_endpoint(tmp_path):
    """`bench.eval_all --endpoint URL` evaluates a running server: each `osprey eval` gets the URL, not a model."""
    from bench.eval_all import _command, _parse

    args = _parse(["--data", str(tmp_path), "--endpoint", "http://127.0.0.1:9", "--api-key", "k",
                   "--out", str(tmp_path / "out")])
    argv = _command("pope", "pope", tmp_path / "stage3_pos_neg.json", args, tmp_path)
    assert argv[argv.index("--endpoint") + 1] == "http://127.0.0.1:9" and "--model" not in argv
    assert argv[argv.index("--api-key") + 1] == "k"
    with pytest.raises(SystemExit):  # one of the two
        _parse(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
