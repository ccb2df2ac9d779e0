"""osprey.data.records: schema, text checks, streaming reader and atomic writer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from osprey.data.records import (
    Record,
    RecordError,
    RecordWriter,
    decode_region_mask,
    iter_json_items,
    iter_records,
    parse_record,
    read_records,
    record_masks,
    record_problems,
    region_refs,
    write_records,
)
from osprey.masks import encode_rle


def _record(i: int = 0, **overrides) -> dict:
    base = {
        "id": 139 + i,
        "file_name": f"{139 + i:012d}.jpg",
        "height": 6,
        "width": 8,
        "annotation": [
            {"segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]], "bbox": [1, 1, 2, 2], "category_id": 1, "iscrowd": 0},
            {"segmentation": {"size": [6, 8], "counts": [40, 8]}, "bbox": [6, 4, 2, 2]},
        ],
        "conversations": [
            {"from": "human", "value": "What is <region1> doing next to <region2>?"},
            {"from": "gpt", "value": "The cat in <region1> sleeps."},
        ],
        "extra_field": {"kept": [1, None, "x"]},
    }
    base.update(overrides)
    return base


def test_parse_and_round_trip_keeps_extras():
    raw = _record()
    record = parse_record(raw)
    assert record.conversations[0].speaker == "human"
    out = record.to_json()
    assert out["extra_field"] == {"kept": [1, None, "x"]}
    assert out["annotation"][0]["iscrowd"] == 0 and "description" not in out
    assert out["conversations"][1] == {"from": "gpt", "value": "The cat in <region1> sleeps."}
    assert parse_record(json.loads(json.dumps(out))).to_json() == out
    assert record_problems(record) == []


def test_description_record():
    raw = {k: v for k, v in _record().items() if k != "conversations"}
    record = parse_record(raw | {"description": ["<region1>: a cat", "<region2>: a box"]})
    assert record.texts() == ["<region1>: a cat", "<region2>: a box"]
    assert record_problems(record) == []


@pytest.mark.parametrize(
    "change, match",
    [
        ({"description": ["<region1>: x"]}, "exactly one of 'conversations' or 'description'"),
        ({"height": 0}, "height"),
        ({"file_name": ""}, "file_name"),
        ({"annotation": [{"segmentation": [[1, 1, 3, 1, 3, 3]]}]}, r"annotation\.0\.bbox"),
        ({"conversations": [{"from": "robot", "value": "hi"}]}, r"conversations\.0\.from"),
        ({"annotation": [{"segmentation": [["1", 1, 3, 1, 3, 3]], "bbox": [1, 1, 2, 2]}]}, "segmentation"),
        ({"annotation": [{"segmentation": {"size": [6, 8], "counts": [40.0, 8]}, "bbox": [1, 1, 2, 2]}]},
         "segmentation"),
        ({"annotation": [{"segmentation": [[1, 1, 3, 1, 3, 3]], "bbox": [1, 1, "2", 2]}]}, r"bbox\.2"),
    ],
)
def test_schema_errors_name_the_field(change, match):
    with pytest.raises(RecordError, match=match) as info:
        parse_record(_record(**change), index=7)
    assert info.value.index == 7 and str(info.value).startswith("record 7: schema:")


def test_schema_requires_one_text_kind():
    raw = {k: v for k, v in _record().items() if k != "conversations"}
    with pytest.raises(RecordError, match="exactly one"):
        parse_record(raw)
    with pytest.raises(RecordError, match="expected a JSON object"):
        parse_record([1, 2])


def test_region_refs():
    assert region_refs("<region2> left of <region10>, <region2> again; region3 is not a ref") == [2, 10, 2]
    assert region_refs("no regions") == []


@pytest.mark.parametrize(
    "change, kind, fragment",
    [
        ({"conversations": [{"from": "human", "value": "<region3>?"}, {"from": "gpt", "value": "x"}]},
         "region-ref", "refers to <region3> but the record has 2"),
        ({"conversations": [{"from": "human", "value": "<region0>?"}, {"from": "gpt", "value": "x"}]},
         "region-ref", "<region0>"),
        ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}, "roles",
         "conversations[0] is from 'gpt'"),
        ({"conversations": [{"from": "human", "value": "a"}]}, "last-turn", "ends with a 'human' turn"),
        ({"conversations": []}, "empty-conversation", "empty"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]}, "empty-text",
         "conversations[1]"),
        ({"annotation": [], "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
         "no-regions", "annotation is empty"),
    ],
)
def test_record_problems(change, kind, fragment):
    problems = record_problems(parse_record(_record(**change)))
    assert kind in [k for k, _ in problems]
    assert any(fragment in message for k, message in problems if k == kind)


def test_description_problems():
    raw = {k: v for k, v in _record().items() if k != "conversations"}
    bad = parse_record(raw | {"description": ["region1: a cat", "<region2>:", "<region5>: far"]})
    problems = record_problems(bad)
    kinds = [k for k, _ in problems]
    assert kinds.count("description-format") == 2 and "region-ref" in kinds


def test_region_masks():
    record = parse_record(_record())
    first = decode_region_mask(record.annotation[0], 6, 8)
    expected = np.zeros((6, 8), bool)
    expected[1:3, 1:3] = True
    assert (first == expected).all()
    masks = record_masks(record)
    second = np.zeros((6, 8), bool)  # counts [40, 8], column-major: column 6 from row 4, then column 7
    second[4:, 6] = True
    second[:, 7] = True
    assert masks.shape == (2, 6, 8) and (masks[1] == second).all()
    assert (decode_region_mask(_record()["annotation"][1], 6, 8) == masks[1]).all()  # plain dicts work too


def _write_list(path, items, indent=None):
    with open(path, "w") as f:
        json.dump(items, f, indent=indent)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1 << 20])
def test_iter_json_items_chunking(tmp_path, chunk_size):
    items = [_record(i) for i in range(20)] + [12345, "text with ] and , inside", [1, [2]], None, 3.5e-7]
    path = tmp_path / "a.json"
    _write_list(path, items, indent=2)
    assert [obj for _, obj in iter_json_items(path, chunk_size=chunk_size)] == items
    assert [i for i, _ in iter_json_items(path, chunk_size=chunk_size)] == list(range(len(items)))


def test_iter_json_lines_and_empty(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(_record(i)) for i in range(3)) + "\n")
    assert [obj["id"] for _, obj in iter_json_items(path, chunk_size=5)] == [139, 140, 141]
    empty = tmp_path / "empty.json"
    empty.write_text("[ ]\n")
    assert list(iter_json_items(empty)) == []


@pytest.mark.parametrize(
    "text, match, good_items",
    [
        ('[{"a": 1}, {"a": 2}', "unexpected end of file", 2),
        ('[{"a": 1}, {"a": 2},]', "trailing comma", 2),
        ('[{"a": 1}] extra', "data after the closing", 1),
        ('[{"a": 1} {"a": 2}]', r"expected ',' or '\]' after item 0", 1),
        ('[{"a": 1}, {"a": tru}]', "record 1: .*invalid JSON", 1),
        ("", "file is empty", 0),
    ],
)
def test_iter_json_items_errors(tmp_path, text, match, good_items):
    path = tmp_path / "bad.json"
    path.write_text(text)
    seen = []
    with pytest.raises(RecordError, match=match):
        for _, obj in iter_json_items(path, chunk_size=4):
            seen.append(obj)
    assert len(seen) == good_items  # items before the damage were streamed out


def test_reader_streams_before_the_damage(tmp_path):
    path = tmp_path / "big.json"
    text = json.dumps([_record(i) for i in range(2000)])
    path.write_text(text[:-1] + ', {"broken": ')  # damaged at the very end
    items = iter_records(path, chunk_size=4096)
    index, first = next(items)
    assert index == 0 and isinstance(first, Record)


def test_iter_records_reports_index(tmp_path):
    path = tmp_path / "a.json"
    _write_list(path, [_record(0), _record(1, height=-3)])
    with pytest.raises(RecordError, match="record 1: schema: height"):
        list(iter_records(path))


def test_writer_round_trip(tmp_path):
    records = [parse_record(_record(i)) for i in range(5)]
    out = tmp_path / "sub" / "out.json"
    assert write_records(out, records) == 5
    assert json.loads(out.read_text()) == [r.to_json() for r in records]
    assert [r.to_json() for r in read_records(out)] == [r.to_json() for r in records]
    jsonl = tmp_path / "out.jsonl"
    write_records(jsonl, [_record(0)])
    assert len(jsonl.read_text().splitlines()) == 1
    empty = tmp_path / "empty.json"
    assert write_records(empty, []) == 0 and json.loads(empty.read_text()) == []


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("previous content")
    with pytest.raises(RuntimeError, match="boom"), RecordWriter(out) as writer:
        writer.write(_record(0))
        raise RuntimeError("boom")
    assert out.read_text() == "previous content"
    assert os.listdir(tmp_path) == ["out.json"]  # no temp file left behind
    with pytest.raises(RecordError, match="record 1: schema"), RecordWriter(out) as writer:
        writer.write(_record(0))
        writer.write(_record(1, width=0))
    assert out.read_text() == "previous content"


def test_rle_bytes_counts_become_text():
    mask = np.zeros((6, 8), bool)
    mask[2:4, 2:6] = True
    rle = encode_rle(mask)
    raw = _record(annotation=[{"segmentation": {"size": rle["size"], "counts": rle["counts"].encode()},
                               "bbox": [2, 2, 4, 2]}],
                  conversations=[{"from": "human", "value": "<region1>"}, {"from": "gpt", "value": "x"}])
    record = parse_record(raw)
    assert record.to_json()["annotation"][0]["segmentation"] == rle
    assert (record_masks(record)[0] == mask).all()


def test_reader_tolerates_byte_order_mark(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([_record(0)]).encode())
    assert [r.id for r in read_records(path)] == [139]
