"""data_tools.converters: each public format's hand-written fixture converts, gives the expected records,
and the output validates with 0 errors (images made to the fixture's sizes)."""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import register
from data_tools.converters import FORMATS, convert_to_file
from data_tools.converters.common import (
    CATEGORY_INSTRUCTION,
    PART_INSTRUCTION,
    REFERRING_INSTRUCTION,
    ConvertStats,
)
from data_tools.validate import validate_file
from osprey.data.records import read_records, record_masks, record_problems, region_refs

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def _answers(record) -> list[str]:
    return [t.value for t in record.conversations if t.speaker == "gpt"]


def _make_images(records, root: Path) -> None:
    for record in records:
        path = root / record.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (record.width, record.height), (90, 120, 150)).save(path)


def _convert_and_validate(tmp_path: Path, fmt: str, inputs: list[str], **options):
    out = tmp_path / f"{fmt}.json"
    stats = convert_to_file(fmt, inputs, out, progress=False, **options)
    records = read_records(out)
    _make_images(records, tmp_path / "images")
    report = validate_file(out, tmp_path / "images", check_images=True, strict_masks=False, progress=False)
    assert report.ok, report.summary() + "\n" + "\n".join(map(str, report.issues))
    assert report.records == len(records) == stats.records and report.regions == stats.regions
    for record in records:
        assert record_problems(record) == []
    return records, stats


def _check_stage2_layout(record, instruction: str) -> None:
    turns = record.conversations
    assert [t.speaker for t in turns] == ["human", "gpt"] * len(record.annotation)
    assert turns[0].value == f"{instruction}\n<region1>"
    for k, turn in enumerate(turns[2::2], start=2):
        assert turn.value == f"<region{k}>"


def test_coco(tmp_path):
    records, stats = _convert_and_validate(tmp_path, "coco", [str(FIXTURES / "coco/instances_val2017.json")])
    assert [r.id for r in records] == [139, 285] and stats.images == 3
    assert stats.skipped == {"iscrowd": 1, "no usable regions": 1}
    first = records[0]
    assert first.file_name == "000000000139.jpg" and (first.height, first.width) == (426, 640)
    _check_stage2_layout(first, CATEGORY_INSTRUCTION)
    assert sorted(_answers(first)) == ["person", "person", "potted plant", "tv"]
    assert _answers(first) == [r.category_name for r in first.annotation]  # turn k answers region k
    source = json.loads((FIXTURES / "coco/instances_val2017.json").read_text())
    polygons = {a["id"]: a["segmentation"] for a in source["annotations"]}
    for region in first.annotation:
        assert region.segmentation == polygons[region.ann_id]  # kept as-is
    assert first.source == "coco"


def test_coco_shuffle_is_seeded_and_capped(tmp_path):
    path = str(FIXTURES / "coco/instances_val2017.json")
    orders = {}
    for seed in range(4):
        convert_to_file("coco", [path], tmp_path / f"s{seed}.json", seed=seed, progress=False)
        orders[seed] = [r.ann_id for r in read_records(tmp_path / f"s{seed}.json")[0].annotation]
    convert_to_file("coco", [path], tmp_path / "again.json", seed=0, progress=False)
    assert [r.ann_id for r in read_records(tmp_path / "again.json")[0].annotation] == orders[0]
    assert len({tuple(o) for o in orders.values()}) > 1  # seeds change the order
    assert all(sorted(o) == [102, 103, 104, 105] for o in orders.values())
    convert_to_file("coco", [path], tmp_path / "cap.json", max_regions=2, progress=False)
    capped = read_records(tmp_path / "cap.json")
    assert [len(r.annotation) for r in capped] == [2, 1] and len(capped[0].conversations) == 4


REFS = [  # the refer toolkit's refs(unc).p entries: plain dicts, as pickled by the toolkit
    {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000581857_1719310.jpg", "ann_id": 1719310, "ref_id": 0,
     "image_id": 581857, "split": "train", "category_id": 1,
     "sentences": [{"tokens": ["the", "lady", "with", "the", "blue", "shirt"], "raw": "THE LADY with the blue shirt",
                    "sent_id": 0, "sent": "the lady with the blue shirt"},
                   {"tokens": ["lady", "with", "back", "to", "us"], "raw": "lady w back to us", "sent_id": 1,
                    "sent": "lady with back to us"}]},
    {"sent_ids": [2], "file_name": "COCO_train2014_000000581857_1719311.jpg", "ann_id": 1719311, "ref_id": 1,
     "image_id": 581857, "split": "train", "category_id": 1,
     "sentences": [{"tokens": ["man", "on", "right"], "raw": "man on right", "sent_id": 2, "sent": "man on right"}]},
    {"sent_ids": [3], "file_name": "COCO_train2014_000000000073_1719312.jpg", "ann_id": 1719312, "ref_id": 2,
     "image_id": 73, "split": "testA", "category_id": 4,
     "sentences": [{"tokens": ["red", "motorcycle"], "raw": "red motorcycle", "sent_id": 3, "sent": "red motorcycle"}]},
]


@pytest.fixture
def refcoco_dir(tmp_path) -> Path:
    folder = tmp_path / "refcoco"
    folder.mkdir()
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(REFS, f, protocol=2)
    shutil.copy(FIXTURES / "refcoco/instances.json", folder / "instances.json")
    return folder


def test_refcoco(tmp_path, refcoco_dir):
    inputs = [str(refcoco_dir / "refs(unc).p"), str(refcoco_dir / "instances.json")]
    records, _ = _convert_and_validate(tmp_path, "refcoco", inputs)  # split train by default
    assert len(records) == 1 and records[0].id == 581857 and records[0].split == "train"
    record = records[0]
    assert record.file_name == "COCO_train2014_000000581857.jpg" and record.source == "refcoco"
    _check_stage2_layout(record, REFERRING_INSTRUCTION)
    sentences = {0: {"the lady with the blue shirt", "lady with back to us"}, 1: {"man on right"}}
    for region, answer in zip(record.annotation, _answers(record)):
        assert answer in sentences[region.ref_id]
    test_a, _ = _convert_and_validate(tmp_path, "refcoco", inputs, split="testA")
    assert [r.id for r in test_a] == [73] and _answers(test_a[0]) == ["red motorcycle"]
    with pytest.raises(ValueError, match="split 'val' not in"):
        convert_to_file("refcoco", inputs, tmp_path / "x.json", split="val", progress=False)


def test_lvis(tmp_path):
    records, _ = _convert_and_validate(tmp_path, "lvis", [str(FIXTURES / "lvis/lvis_v1_val.json")])
    by_id = {r.id: r for r in records}
    assert by_id[397133].file_name == "val2017/000000397133.jpg"  # derived from coco_url
    assert by_id[37777].file_name == "train2017/000000037777.jpg"
    assert sorted(_answers(by_id[397133])) == ["baseball bat", "teddy bear"]
    assert _answers(by_id[37777]) == ["orange (fruit)", "orange (fruit)"]
    teddy = next(r for r in by_id[397133].annotation if r.category_name == "teddy_bear")
    assert teddy.synonyms == ["teddy_bear", "teddy"]
    _check_stage2_layout(by_id[397133], CATEGORY_INSTRUCTION)


def test_paco(tmp_path):
    path = str(FIXTURES / "paco/paco_lvis_v1_val.json")
    parts, _ = _convert_and_validate(tmp_path, "paco", [path], kind="part")
    assert sorted(a for r in parts for a in _answers(r)) == ["bucket:rim", "dog:ear", "dog:eye"]
    _check_stage2_layout(parts[0], PART_INSTRUCTION)
    objects, _ = _convert_and_validate(tmp_path, "paco", [path], kind="object")
    assert sorted(a for r in objects for a in _answers(r)) == ["bucket", "dog"]
    both, stats = _convert_and_validate(tmp_path, "paco", [path])
    assert stats.regions == 5 and both[0].file_name == "val2017/000000000415.jpg"


def test_vg(tmp_path):
    inputs = [str(FIXTURES / "vg/region_descriptions.json"), str(FIXTURES / "vg/image_data.json")]
    records, stats = _convert_and_validate(tmp_path, "vg", inputs)
    assert stats.skipped == {"empty phrase": 1, "box empty after clipping to the image": 1}
    first = records[0]
    assert first.file_name == "VG_100K_2/1.jpg" and first.source == "vg"
    by_region = {r.region_id: r for r in first.annotation}
    assert by_region[1382].segmentation == [[421, 57, 503, 57, 503, 196, 421, 196]]
    assert by_region[1385].segmentation == [[777, 320, 800, 320, 800, 356, 777, 356]]  # clipped at x = 800
    turns = first.conversations
    k = [r.region_id for r in first.annotation].index(1383) + 1
    assert turns[2 * (k - 1)].value == f"Please give me a short description of <region{k}>."
    assert turns[2 * (k - 1) + 1].value == "shade is along the street"
    mask = record_masks(first)[k - 1]
    assert mask.sum() == 182 * 109 and mask[372:481, 194:376].all()
    described, _ = _convert_and_validate(tmp_path, "vg", inputs, style="description")
    assert described[1].description == ["<region1>: white and grey bus"]


def test_panoptic(tmp_path):
    path = FIXTURES / "panoptic/panoptic_val2017.json"
    records, stats = _convert_and_validate(tmp_path, "panoptic", [str(path)])
    assert stats.regions == 6
    first = records[0]
    assert _answers(first) == ["person", "bear", "bear", "wall-other-merged"]
    assert [t.value for t in first.conversations[::2]][1] == "What is in <region2>? Using a short phrase."
    png = np.asarray(Image.open(FIXTURES / "panoptic/panoptic_val2017/000000000139.png").convert("RGB"), np.int64)
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    for region, mask in zip(first.annotation, record_masks(first)):
        assert (mask == (ids == region.segment_id)).all() and region.area == mask.sum()
    assert first.annotation[0].segment_id == 513  # R=1, G=2: 1 + 256 * 2
    _, stats = _convert_and_validate(tmp_path, "panoptic", [str(path)], include_crowd=False)
    assert stats.skipped == {"iscrowd": 1} and stats.regions == 5


def test_region_refs_match_annotation(tmp_path):
    convert_to_file("coco", [str(FIXTURES / "coco/instances_val2017.json")], tmp_path / "c.json", progress=False)
    for record in read_records(tmp_path / "c.json"):
        refs = [k for t in record.conversations for k in region_refs(t.value)]
        assert refs == list(range(1, len(record.annotation) + 1))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="osprey")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert_and_validate(tmp_path, capsys):
    out = tmp_path / "lvis.jsonl"
    assert _cli(["data", "convert", "lvis", str(FIXTURES / "lvis/lvis_v1_val.json"), "--out", str(out),
                 "--no-progress"]) == 0
    assert "records written: 2" in capsys.readouterr().out
    assert _cli(["data", "validate", str(out), "--no-progress"]) == 0
    assert "2 records, 4 regions (2.00 per record), 0 bad records, 0 errors" in capsys.readouterr().out
    assert _cli(["data", "convert", "vg", str(FIXTURES / "vg/image_data.json"), "--out", str(out)]) == 2
    assert "takes 2 input file(s)" in capsys.readouterr().err
    assert _cli(["data", "convert", "coco", str(FIXTURES / "coco/instances_val2017.json"), "--out", str(out),
                 "--split", "val"]) == 2
    assert "does not take option(s) ['split']" in capsys.readouterr().err


def test_every_format_loads():
    for name, spec in FORMATS.items():
        assert callable(spec.load()), name


def test_stats_summary_lists_skips():
    stats = ConvertStats(images=3, records=2, regions=5)
    stats.skip("iscrowd", "annotation 1 of image 2")
    text = stats.summary()
    assert "regions written: 5 (2.50 per record)" in text and "skipped (iscrowd): 1" in text
