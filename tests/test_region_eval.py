"""`bench.region_eval`: category labels bind to their region by `<regionK>`, not by list position."""

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench.region_eval import area_bucket, category_scores, evaluate, renumbered, split_records, yes_no
from osprey.data.records import parse_record, record_masks


def square(x, y, size):
    return {"segmentation": [[x, y, x + size, y, x + size, y + size, x, y + size]], "bbox": [x, y, size, size]}


def record(description, regions=None):
    # region 1 (4x4) and region 2 (6x6) overlap, region 3 (2x2) stands alone; mask areas tell them apart
    regions = regions or [square(0, 0, 4), square(2, 2, 6), square(12, 12, 2)]
    return parse_record({"id": 7, "file_name": "images/x.png", "height": 16, "width": 16,
                         "annotation": regions, "description": description})


def test_labels_listed_out_of_order_bind_to_their_region():
    rec = record(["<region3>: star", "<region1>: dog", "<region2>: cat"])
    answers = ["Dog", "cat", "star"]  # in annotation order, all right
    scores = category_scores(rec, answers)
    assert [correct for correct, _ in scores] == [True, True, True]
    # each entry carries its own region's overlap flags: region 3 overlaps nothing, regions 1 and 2 overlap
    assert [flags for _, flags in scores] == [(False, False), (True, False), (True, False)]
    # a wrong answer counts against the region it belongs to, not the entry at that list position
    assert [c for c, _ in category_scores(rec, ["dog", "cat", "moon"])] == [False, True, True]


def test_description_may_skip_regions_and_bad_inputs_are_errors():
    rec = record(["<region2>: cat"])
    assert category_scores(rec, ["x", "cat", "y"]) == [(True, (True, False))]
    with pytest.raises(ValueError, match="2 answer"):
        category_scores(rec, ["x", "cat"])
    with pytest.raises(ValueError, match="region4"):
        category_scores(record(["<region4>: cat"]), ["x", "y", "z"])


class FakePipe:
    """Answers each mask with the label of the region of that area (the masks come in annotation order)."""

    def __init__(self, by_area):
        self.by_area = by_area

    def describe(self, image, masks, task, params):
        assert task == "category"
        return [SimpleNamespace(text=self.by_area[int(np.asarray(m).sum())]) for m in masks]


def test_evaluate_scores_categories_by_region(tmp_path):
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    rec = record(["<region2>: cat", "<region3>: star", "<region1>: dog"])
    (data / "test" / "stage2_categories.json").write_text(json.dumps([rec.to_json()]))
    for name in ("stage3_short_form", "stage3_pos_neg"):
        (data / "test" / f"{name}.json").write_text("[]")
    areas = [int(m.sum()) for m in record_masks(rec)]
    assert len(set(areas)) == 3
    pipe = FakePipe(dict(zip(areas, ["dog", "cat", "star"])))
    result = evaluate(pipe, data, "test", limit=None, max_new_tokens=4)
    assert result["category"] == {"accuracy": 1.0, "n": 3}
    assert result["category@overlap"] == {"accuracy": 1.0, "n": 2}
    by_name = {k: v["n"] for k, v in result.items() if k.startswith("category:") and ":area" not in k}
    assert by_name == {"category:cat": 1, "category:star": 1, "category:dog": 1}
    by_area = {k: v["n"] for k, v in result.items() if k.startswith("category:area")}
    assert by_area == dict(Counter(f"category:{area_bucket(a)}" for a in areas))
    pipe.by_area[areas[0]] = "cat"  # region 1 (a dog) called a cat: only the dog's row loses, and its area's
    result = evaluate(pipe, data, "test", limit=None, max_new_tokens=4)
    assert result["category:dog"]["accuracy"] == 0.0 and result["category:cat"]["accuracy"] == 1.0
    dog_bucket = f"category:{area_bucket(areas[0])}"
    assert result[dog_bucket]["accuracy"] == pytest.approx(1 - 1 / by_area[dog_bucket])


def test_area_buckets():
    assert [area_bucket(a) for a in (0, 499, 500, 1999, 2000, 65536)] == \
        ["area<500", "area<500", "area500-2000", "area500-2000", "area>=2000", "area>=2000"]


def test_evaluate_runs_the_tiny_model_on_every_sub_set(tiny_pipeline):
    """The real pipeline through all three parts on the fixture's test split: every question is scored, and the
    yes/no part reports the share answered yes beside the share whose truth is yes."""
    fixture = Path(__file__).parent / "fixtures" / "synth"
    result = evaluate(tiny_pipeline, fixture, "test", limit=2, max_new_tokens=3, inline=["color"])
    regions = sum(len(r.annotation) for r in split_records(fixture, "test", "stage2_categories", 2))
    assert result["inline:color"]["n"] == regions  # every region asked its colour alone
    truths = [yes_no(t.value) for r in split_records(fixture, "test", "stage3_pos_neg", 2)
              for t in r.conversations if t.speaker == "gpt"]
    assert result["pos_neg"]["n"] == len(truths) > 0
    assert result["pos_neg:truth_yes"] == {"accuracy": truths.count("yes") / len(truths), "n": len(truths)}
    assert result["pos_neg:answered_yes"]["n"] == len(truths)
    assert 0 <= result["pos_neg:answered_yes"]["accuracy"] <= 1
    by_type = {k: v["n"] for k, v in result.items() if k.startswith("pos_neg:") and "_yes" not in k}
    assert sum(by_type.values()) == len(truths) and "pos_neg:other" not in by_type  # every question has a type
    assert result["category"]["n"] > 0 and any(k.startswith("short_form:") for k in result)
    # every short-form question that names a region is counted once more, under region 1 or a later region
    types = {k.split(":")[1] for k in result if k.startswith("short_form:") and "@" not in k}
    for qtype in types - {"count"}:  # "How many of the regions are red?" names none
        slots = [result.get(f"short_form:{qtype}:{slot}", {"n": 0})["n"] for slot in ("region1", "region2+")]
        assert sum(slots) == result[f"short_form:{qtype}"]["n"], qtype
        # the same questions again with the regions renumbered
        assert result[f"short_form_renumbered:{qtype}"]["n"] == result[f"short_form:{qtype}"]["n"], qtype


def test_renumbered_records_ask_about_the_same_regions_under_other_numbers():
    """Every question of the renumbered copy names the region it named before (same mask, same answer), and the
    copies do list the regions in other orders."""
    fixture = Path(__file__).parent / "fixtures" / "synth"
    rng = np.random.default_rng(0)
    moved = 0
    for record in split_records(fixture, "train", "stage3_short_form", None):
        copy = renumbered(record, rng)
        assert sorted(a.bbox for a in copy.annotation) == sorted(a.bbox for a in record.annotation)
        for before, after in zip(record.conversations, copy.conversations, strict=True):
            assert re.sub(r"region\d+", "R", before.value) == re.sub(r"region\d+", "R", after.value)
            for old, new in zip(re.findall(r"region(\d+)", before.value), re.findall(r"region(\d+)", after.value)):
                assert record.annotation[int(old) - 1] == copy.annotation[int(new) - 1]
        moved += [a.bbox for a in copy.annotation] != [a.bbox for a in record.annotation]
    assert moved > 0


class AttributePipe:
    """Answers a custom question about one region with that region's colour (or texture), looked up by the mask's
    pixels in a table built from the referring expressions; records every question it is asked."""

    def __init__(self, by_mask: dict[bytes, dict[str, str]]):
        self.by_mask, self.asked = by_mask, []

    def encode_image(self, path):
        return path

    def describe(self, image, masks, task, params):
        self.asked.append((task, len(masks)))
        name = "color" if "color" in task else "texture"
        return [SimpleNamespace(text=f"The {self.by_mask[np.asarray(m).tobytes()][name].upper()}") for m in masks]


def test_inline_attributes_ask_each_region_alone_and_score_by_region():
    """--inline: every region of a category record is asked its colour alone (the converted records' own wording,
    `<region>` for the region), scored against its own referring expression (article and case ignored); a
    composite object is not asked its texture; one wrong answer costs exactly its region."""
    from data_tools.synth.coco_export import referring_attributes
    from data_tools.synth.vocab import COMPOSITES
    from osprey.data.samples import region_descriptions

    fixture = Path(__file__).parent / "fixtures" / "synth"
    records = list(split_records(fixture, "test", "stage2_categories", 2))
    referring = {r.id: r for r in split_records(fixture, "test", "stage2_referring", None)}
    by_mask, regions, shapes = {}, 0, 0
    for rec in records:
        phrases, categories = dict(region_descriptions(referring[rec.id])), dict(region_descriptions(rec))
        for k, mask in enumerate(record_masks(rec), start=1):
            by_mask[mask.tobytes()] = referring_attributes(phrases[k], categories[k])
            regions, shapes = regions + 1, shapes + (categories[k] not in COMPOSITES)
    assert len(by_mask) == regions and shapes < regions  # masks tell regions apart; some have no texture

    from bench.region_eval import Tally, inline_scores

    pipe, tally = AttributePipe(by_mask), Tally()
    inline_scores(pipe, fixture, "test", records, ["color", "texture"], None, tally)
    result = tally.result()
    assert result["inline:color"] == {"accuracy": 1.0, "n": regions}
    assert result["inline:texture"] == {"accuracy": 1.0, "n": shapes}
    assert ("What is the color of <region>?", len(records[0].annotation)) in pipe.asked
    first = record_masks(records[0])[0].tobytes()
    by_mask[first] = {**by_mask[first], "color": "not-a-colour"}
    tally = Tally()
    inline_scores(pipe, fixture, "test", records, ["color"], None, tally)
    assert tally.result()["inline:color"] == {"accuracy": pytest.approx(1 - 1 / regions), "n": regions}
