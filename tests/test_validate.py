"""data_tools.validate: a deliberately bad file's errors come back with their record indices."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import register
from data_tools.validate import validate_file


def _good(i: int) -> dict:
    return {
        "id": i,
        "file_name": f"img{i}.png",
        "height": 10,
        "width": 12,
        "annotation": [{"segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]], "bbox": [1, 1, 4, 4]},
                       {"segmentation": {"size": [10, 12], "counts": [50, 10, 60]}, "bbox": [5, 0, 1, 10]}],
        "conversations": [{"from": "human", "value": "Compare <region1> and <region2>."},
                          {"from": "gpt", "value": "They differ."}],
    }


def _bad_records() -> tuple[list[dict], dict[int, set[str]]]:
    records = [_good(i) for i in range(14)]
    expected: dict[int, set[str]] = {}

    del records[1]["file_name"]
    expected[1] = {"schema"}
    records[2]["conversations"][0]["value"] = "What is <region3>?"
    expected[2] = {"region-ref"}
    records[3]["conversations"] = [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]
    expected[3] = {"roles", "last-turn"}
    records[4]["annotation"][1]["segmentation"] = {"size": [10, 12], "counts": [50, 10, 61]}
    expected[4] = {"mask"}
    records[5]["annotation"][0]["segmentation"] = [[20, 20, 30, 20, 30, 30, 20, 30]]  # all outside
    records[5]["annotation"][0]["bbox"] = [20, 20, 10, 10]
    expected[5] = {"empty-mask", "outside-image"}
    del records[6]["conversations"]
    records[6]["description"] = ["<region1> missing colon", "<region2>: fine"]
    expected[6] = {"description-format"}
    records[7]["file_name"] = "missing.png"
    expected[7] = {"image-missing"}
    records[8]["file_name"] = "wrong_size.png"
    expected[8] = {"image-size"}
    records[9]["annotation"][0]["segmentation"] = [[1, 1, 5, 1, 5]]
    expected[9] = {"mask"}
    records[10]["annotation"] = []
    records[10]["conversations"] = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    expected[10] = {"no-regions"}
    records[11]["annotation"][0]["segmentation"] = [[1, 1, 5, 5, 5, 1, 1, 5]]  # self-intersecting: warning only
    records[12]["annotation"][0]["bbox"] = [1, 1, 0, 4]
    expected[12] = {"bbox"}
    return records, expected


@pytest.fixture
def bad_file(tmp_path) -> tuple[Path, Path, dict[int, set[str]]]:
    records, expected = _bad_records()
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records, indent=1))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(14):
        Image.new("RGB", (12, 10)).save(images / f"img{i}.png")
    Image.new("RGB", (10, 12)).save(images / "wrong_size.png")  # width/height swapped
    return path, images, expected


def test_report_names_every_bad_record(bad_file):
    path, images, expected = bad_file
    report = validate_file(path, images, check_images=True, progress=False)
    found: dict[int, set[str]] = {}
    for issue in report.issues:
        found.setdefault(issue.index, set()).add(issue.kind)
    assert found == expected
    assert report.records == 14 and report.bad_records == len(expected) and not report.ok
    assert report.warning_counts == {"self-intersecting polygon": 1}
    assert report.regions == 2 * 14 - 2  # record 10 has none
    messages = {i.index: i.message for i in report.issues}
    assert "file_name" in messages[1] and "<region3>" in messages[2]
    assert "counts sum to 121 but size 10x12 needs 120" in messages[4]
    assert "is 10x12 (WxH) but the record says 12x10" in messages[8]
    assert str(next(i for i in report.issues if i.index == 9)).startswith("record 9 (id 9): [mask] <region1>:")


def test_strict_masks_and_no_image_checks(bad_file):
    path, _, _ = bad_file
    report = validate_file(path, None, strict_masks=True, progress=False)
    kinds = {i.index: i.kind for i in report.issues}
    assert kinds[11] == "mask" and 7 not in kinds and 8 not in kinds  # no image folder: no image checks
    without_size_check = validate_file(path, bad_file[1], check_images=False, progress=False)
    assert {i.index for i in without_size_check.issues if i.kind.startswith("image")} == {7}


def test_max_errors_bounds_details_not_counts(bad_file):
    path, images, _ = bad_file
    full = validate_file(path, images, check_images=True, progress=False)
    report = validate_file(path, images, check_images=True, max_errors=3, progress=False)
    assert len(report.issues) == 3 and report.num_errors == full.num_errors == len(full.issues)
    assert report.error_counts == full.error_counts


def test_broken_json_is_reported(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps([_good(0), _good(1)])[:-40])
    report = validate_file(path, None, progress=False)
    assert report.records == 1 and report.error_counts == {"json": 1}
    assert report.issues[0].index == 1


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="osprey")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_exit_codes_and_json(bad_file, tmp_path, capsys):
    path, images, expected = bad_file
    assert _cli(["data", "validate", str(path), "--images", str(images), "--check-images", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "record 2 (id 2): [region-ref]" in out and "14 records, 26 regions (1.86 per record), 11 bad records" in out
    assert _cli(["data", "validate", str(path), "--images", str(images), "--json", "--no-progress"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["errors"]["schema"] == 1 and "image-size" not in data["errors"]
    assert {i["index"] for i in data["issues"]} == set(expected) - {8}
    good = tmp_path / "good.json"
    good.write_text(json.dumps([_good(0)]))
    assert _cli(["data", "validate", str(good), "--images", str(images), "--check-images", "--no-progress"]) == 0
    assert _cli(["data", "validate", str(good), "--check-images", "--no-progress"]) == 2
