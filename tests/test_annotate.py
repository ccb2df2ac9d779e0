"""`osprey annotate`: COCO / SAM / PNG inputs, in-process vs --endpoint parity, failures, resume after a kill, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osprey import masks as mask_codecs
from osprey.cli import main
from osprey.inference import SamplingParams
from serve.annotate import run_annotation
from serve.annotate_backends import AnnotateSettings, PipelineAnnotator, decode_item
from serve.annotate_io import ImageItem, JsonlOutput, RegionItem, read_input, write_coco

SIZE = 48


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)


def _mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    """3 images with 3 good regions each (polygon, RLE, bbox only), one undecodable mask and one missing image."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    images, anns = [], []
    for i in range(3):
        _image(root / "images" / f"im{i}.png", i)
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": SIZE, "width": SIZE})
        rle = mask_codecs.encode_rle(_mask(5 + i, 20, 30, 40))
        anns += [
            {"id": 10 * i + 1, "image_id": i + 1, "segmentation": [[2, 2, 20 + i, 2, 20 + i, 15, 2, 15]],
             "bbox": [2, 2, 18, 13]},
            {"id": 10 * i + 2, "image_id": i + 1, "segmentation": rle, "bbox": [0, 0, 1, 1]},
            {"id": 10 * i + 3, "image_id": i + 1, "bbox": [25, 1 + i, 20, 10]},
        ]
    anns.append({"id": 99, "image_id": 1, "segmentation": {"size": [SIZE, SIZE], "counts": "not rle!"}})
    images.append({"id": 4, "file_name": "missing.png", "height": SIZE, "width": SIZE})
    anns.append({"id": 41, "image_id": 4, "bbox": [1, 1, 5, 5]})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    return path, root / "images"


def _annotate(coco, out: Path, model: Path, *extra: str) -> int:
    path, images = coco
    return main(["annotate", str(path), "--images", str(images), "--out", str(out), "--model", str(model),
                 "--max-tokens", "6", "--no-progress", *extra])


@pytest.fixture(scope="module")
def annotator(tiny_pipeline) -> PipelineAnnotator:
    """The CLI's in-process backend on the session's pipeline (warmed once; the CLI would load it per run)."""
    return PipelineAnnotator(tiny_pipeline, AnnotateSettings("short", max_tokens=6), "tiny")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def full_run(coco, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out.jsonl"
    assert _annotate(coco, out, tiny_model_dir, "--coco", str(out.with_name("coco_out.json"))) == 1  # 2 failures
    return out


def test_in_process_writes_every_good_region_and_records_failures(full_run):
    rows = [json.loads(line) for line in _lines(full_run)]
    assert sorted(r["id"] for r in rows) == [1, 2, 3, 11, 12, 13, 21, 22, 23]
    box_only = next(r for r in rows if r["id"] == 13)
    assert box_only["box"] == [25.0, 2.0, 20.0, 10.0] and box_only["area"] == 200
    assert mask_codecs.rle_area(box_only["rle"]) == 200
    assert all(r["model"] == "tiny" and r["finish_reason"] in ("stop", "length") and "<mask>" in r["prompt"]
               for r in rows)
    failures = [json.loads(line) for line in _lines(Path(str(full_run) + ".failures.jsonl"))]
    reasons = {f["id"]: f["reason"] for f in failures}
    assert set(reasons) == {99, 41}
    assert "undecodable mask" in reasons[99] and "cannot read image" in reasons[41]


def test_coco_write_back_attaches_answers(full_run):
    data = json.loads(full_run.with_name("coco_out.json").read_text())
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in _lines(full_run)}
    answered = {a["id"]: a["osprey"]["caption"] for a in data["annotations"] if "osprey" in a}
    assert answered == texts


def test_rerun_skips_everything_already_written(coco, full_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(full_run.read_text())
    _annotate(coco, out, tiny_model_dir)
    assert _lines(out) == _lines(full_run)
    assert "0 regions" in capsys.readouterr().err


def test_partial_run_then_torn_line_then_resume_equals_one_run(coco, full_run, annotator, tmp_path):
    out = tmp_path / "out.jsonl"
    items = read_input(str(coco[0]), str(coco[1]))
    first = run_annotation(items, annotator, out, max_images=1, progress=False)
    assert first.regions == 3 and len(_lines(out)) == 3
    with open(out, "a") as f:  # what a kill in the middle of a write leaves
        f.write('{"image": "im1.png", "image_id": 2, "id": 11, "rle": {"si')
    second = run_annotation(items, annotator, out, progress=False)
    assert (second.skipped, second.regions, len(second.failures)) == (3, 6, 2)
    assert sorted(_lines(out)) == sorted(_lines(full_run))


def test_torn_line_is_dropped_on_open_and_a_corrupt_line_is_an_error(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"image": "a", "id": 1}\n{"image": "a", "id"')
    output = JsonlOutput(out)
    output.close()
    assert output.dropped_torn_line and out.read_text() == '{"image": "a", "id": 1}\n'
    out.write_text('not json\n')
    with pytest.raises(ValueError, match="o.jsonl:1"):
        JsonlOutput(out)


def test_endpoint_gives_the_in_process_greedy_answers(coco, full_run, tiny_model_dir, tmp_path):
    from serve.background import BackgroundServer
    from serve.config import ServeConfig

    out = tmp_path / "http.jsonl"
    with BackgroundServer(ServeConfig(model=str(tiny_model_dir), cpu_threads=1)) as server:
        path, images = coco
        rc = main(["annotate", str(path), "--images", str(images), "--out", str(out), "--max-tokens", "6",
                   "--endpoint", f"{server.url},{server.url}/", "--no-progress"])
    assert rc == 1
    assert sorted(_lines(out)) == sorted(_lines(full_run))


def test_sam_and_png_folders(annotator, tmp_path):
    sam, png = tmp_path / "sam", tmp_path / "png"
    for folder in (sam, png):
        folder.mkdir()
        _image(folder / "a.png", 0)
    masks = [_mask(0, 0, 10, 10), _mask(10, 10, 40, 30)]
    (sam / "a.json").write_text(json.dumps([mask_codecs.encode_sam(m) for m in masks]))
    (png / "a").mkdir()
    for name, m in zip(("left", "right"), masks):
        (png / "a" / f"{name}.png").write_bytes(mask_codecs.encode_png(m))
    assert [r.id for r in read_input(str(sam))[0].regions] == [0, 1]
    assert [r.id for r in read_input(str(png))[0].regions] == ["left", "right"]
    outs = []
    for folder in (sam, png):
        out = tmp_path / f"{folder.name}.jsonl"
        assert not run_annotation(read_input(str(folder)), annotator, out, progress=False).failures
        outs.append([json.loads(line) for line in _lines(out)])
    assert [r["text"] for r in outs[0]] == [r["text"] for r in outs[1]]
    assert [r["area"] for r in outs[1]] == [100, 600]


def test_coco_panoptic_regions_are_its_segments(annotator, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "panoptic").mkdir()
    _image(tmp_path / "images" / "a.jpg", 3)
    ids = np.zeros((SIZE, SIZE, 3), np.uint8)
    ids[:10, :10] = (7, 0, 0)  # segment 7
    ids[20:30, 5:45] = (4, 1, 0)  # segment 4 + 256 = 260
    Image.fromarray(ids).save(tmp_path / "panoptic" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": SIZE, "width": SIZE}],
            "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 7}, {"id": 260}]}],
            "categories": []}
    source = tmp_path / "panoptic.json"
    source.write_text(json.dumps(data))
    out = tmp_path / "out.jsonl"
    run_annotation(read_input(str(source), str(tmp_path / "images")), annotator, out, progress=False)
    rows = [json.loads(line) for line in _lines(out)]
    assert [(r["id"], r["area"]) for r in rows] == [(7, 100), (260, 400)]
    write_coco(source, out, tmp_path / "back.json", "category")
    segments = json.loads((tmp_path / "back.json").read_text())["annotations"][0]["segments_info"]
    assert [s["osprey"]["category"] for s in segments] == [r["text"] for r in rows]


@pytest.mark.parametrize("argv, message", [
    (["nowhere.json"], "does not exist"),
    (["{coco}"], "needs --images"),
    (["{bad}", "--images", "."], "not a COCO file"),
    (["{coco}", "--images", ".", "--task", "hello"], "unknown task"),
    (["{coco}", "--images", "{images}", "--ray", "--actors-per-gpu", "0"], "actors_per_gpu must be >= 1, got 0"),
])
def test_bad_input_exits_2_with_a_message(argv, message, coco, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    argv = [a.format(coco=coco[0], images=coco[1], bad=bad) for a in argv]
    assert main(["annotate", *argv, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- in-process engine


def _box_items(folder: Path, regions_per_image: list[int]) -> list[ImageItem]:
    """Images with box regions given as RLE, ids 0..n-1 per image."""
    rng = np.random.default_rng(5)
    items = []
    for i, count in enumerate(regions_per_image):
        _image(folder / f"b{i}.png", 100 + i)
        regions = []
        for q in range(count):
            x, y = (int(v) for v in rng.integers(0, SIZE - 12, 2))
            w, h = (int(v) for v in rng.integers(4, 12, 2))
            regions.append(RegionItem(q, segmentation=mask_codecs.encode_rle(_mask(x, y, x + w, y + h))))
        items.append(ImageItem(f"b{i}.png", str(folder / f"b{i}.png"), i, tuple(regions)))
    return items


def test_rows_join_the_batch_in_progress_and_images_come_out_in_input_order(builtin_pipeline, monkeypatch, tmp_path):
    """More regions than rows: one engine session for the whole run, new images' rows added while earlier rows
    decode (the built-in model stops its answers at different lengths), the images admitted together encoded in one
    vision pass, answers equal to describing each image alone, results in input order."""
    items = _box_items(tmp_path, [2, 2, 1, 3, 2, 2, 1])
    params = SamplingParams(max_new_tokens=12)
    expected = [[g.text for g in builtin_pipeline.describe(
        Image.open(item.path).convert("RGB"), np.stack([decode_item(item).regions[q].mask for q in range(len(item.regions))]),
        "short", params)] for item in items]
    sessions, live_rows_at_add = [], []
    make_session = builtin_pipeline.session

    def spied_session(pool, fast_kernels=True):
        session = make_session(pool, fast_kernels)
        add = session.add
        monkeypatch.setattr(session, "add", lambda groups: (live_rows_at_add.append(session.live_rows), add(groups)))
        sessions.append(session)
        return session

    monkeypatch.setattr(builtin_pipeline, "session", spied_session)
    vision_passes = []  # images per vision pass
    encode = builtin_pipeline.model.get_image_features
    monkeypatch.setattr(builtin_pipeline.model, "get_image_features",
                        lambda pixels: vision_passes.append(pixels.shape[0]) or encode(pixels))
    annotator = PipelineAnnotator(builtin_pipeline, AnnotateSettings("short", max_tokens=12), "builtin", max_rows=4)
    results = list(annotator.map(items))
    assert [[r.image for r in res.records] for res in results] == [[i.image] * len(i.regions) for i in items]
    assert [[r.id for r in res.records] for res in results] == [list(range(len(i.regions))) for i in items]
    assert [[r.text for r in res.records] for res in results] == expected
    assert len(sessions) == 1 and len(live_rows_at_add) == len(items)
    assert max(live_rows_at_add) > 0  # continuous batching: rows joined while others were decoding
    assert sum(vision_passes) == len(items) and vision_passes[0] == 2  # images admitted together: one pass


def test_a_prompt_too_long_for_the_engine_fails_its_regions_with_the_reason(coco, tiny_pipeline):
    long_prompt = "Describe <region>" + " in great detail, naming every part and colour" * 60
    annotator = PipelineAnnotator(tiny_pipeline, AnnotateSettings(long_prompt, max_tokens=6), "tiny")
    results = list(annotator.map(read_input(str(coco[0]), str(coco[1]))))
    assert not any(res.records for res in results)
    reasons = {f.id: f.reason for res in results for f in res.failures}
    assert sorted(reasons) == [1, 2, 3, 11, 12, 13, 21, 22, 23, 41, 99]
    assert all("tokens of its own" in reasons[i] for i in (1, 2, 3, 11, 12, 13, 21, 22, 23))
    assert "undecodable mask" in reasons[99] and "cannot read image" in reasons[41]


def test_a_consumer_that_stops_early_leaves_the_engine_ready_for_the_next_run(tiny_pipeline, coco, full_run):
    annotator = PipelineAnnotator(tiny_pipeline, AnnotateSettings("short", max_tokens=6), "tiny", max_rows=3)
    items = read_input(str(coco[0]), str(coco[1]))
    stream = annotator.map(items)
    next(stream)
    stream.close()  # rows of later images are still decoding: they are cancelled
    annotator.session.step()  # the step that drops cancelled rows
    assert not annotator.session.has_work
    texts = {r.id: r.text for res in annotator.map(items) for r in res.records}
    assert texts == {json.loads(line)["id"]: json.loads(line)["text"] for line in _lines(full_run)}


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(coco, full_run, tiny_model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    path, images = coco
    cmd = [sys.executable, "-m", "osprey.cli", "annotate", str(path), "--images", str(images), "--out", str(out),
           "--model", str(tiny_model_dir), "--max-tokens", "6", "--no-progress", "--max-batch-size", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    deadline = time.monotonic() + 120
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_lines(out)) < len(_lines(full_run))  # killed before the end
    assert main(cmd[3:]) == 1
    assert sorted(_lines(out)) == sorted(_lines(full_run))


@pytest.mark.slow
def test_ray_two_cpu_actors_give_the_in_process_answers(coco, full_run, tiny_model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "ray.jsonl"
    try:
        assert _annotate(coco, out, tiny_model_dir, "--ray", "--actors", "2", "--images-per-call", "2") == 1
    finally:
        ray.shutdown()
    assert sorted(_lines(out)) == sorted(_lines(full_run))
