"""`osprey eval ...` end to end on a tiny random model (in-process and, when `serve` imports, over HTTP).

The answers of a random model are nonsense; these tests check that each command runs the real pipeline and
writes its results JSON and Markdown report (with plots), resumes from its partial file, and fails clearly.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from eval.cli import register
from eval.metrics.captions import java_version
from eval.runner import PartialResults, partial_path
from osprey.masks import encode_rle

H, W = 48, 64
FAST = ["--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="osprey")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def run_eval(argv: list[str]) -> int:
    args = _parse(argv)
    return args.func(args)


def _rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _poly(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two images and one small annotation file per command (deterministic)."""
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / name)

    lvis = [
        {
            "file_name": "a.png",
            "height": H,
            "width": W,
            "categories": ["dog", "traffic_light"],
            "annotations": [
                {"segmentation": _poly(2, 2, 20, 20), "bbox": [2, 2, 18, 18]},
                {"segmentation": encode_rle(_rect(30, 5, 60, 40)), "bbox": [30, 5, 30, 35]},
            ],
        },
        {
            "file_name": "b.png",
            "height": H,
            "width": W,
            "categories": ["car"],
            "annotations": [{"segmentation": _poly(10, 10, 50, 40), "bbox": [10, 10, 40, 30]}],
        },
    ]
    (root / "lvis.json").write_text(json.dumps(lvis))

    coco_caps = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W, "caption": "a dog on the left"},
            {"id": 2, "file_name": "b.png", "height": H, "width": W, "caption": "the red car"},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "segmentation": _poly(2, 2, 20, 20), "bbox": [2, 2, 18, 18]},
            {"id": 12, "image_id": 2, "segmentation": _poly(10, 10, 50, 40), "bbox": [10, 10, 40, 30]},
        ],
    }
    (root / "refcocog.json").write_text(json.dumps(coco_caps))

    describe = [
        {
            "question_id": 0,
            "image": "a.png",
            "height": H,
            "width": W,
            "category": "description",
            "text": "Could you describe the region shown as <region> in the picture in great detail?",
            "annotation": {"segmentation": _poly(2, 2, 20, 20), "bbox": [2, 2, 18, 18]},
            "answer": "A small brown dog sits on the grass.",
            "context": "A dog and a car in a park.",
        },
        {
            "question_id": 1,
            "image": "b.png",
            "height": H,
            "width": W,
            "category": "description",
            "text": "Please describe <region> in detail.",
            "annotation": {"segmentation": _poly(10, 10, 50, 40), "bbox": [10, 10, 40, 30]},
            "answer": "A red car parked by the road.",
            "context": "A street.",
        },
    ]
    (root / "describe.json").write_text(json.dumps(describe))

    pope = [
        {"question_id": i, "image": img, "text": f"Is there a {obj} in the image?", "label": label}
        for i, (img, obj, label) in enumerate(
            [("a.png", "dog", "yes"), ("a.png", "car", "no"), ("b.png", "car", "yes")]
        )
    ]
    (root / "pope.json").write_text(
        "\n".join(json.dumps(p) for p in pope) + "\n"
    )  # POPE: JSON lines in .json

    # panoptic (Cityscapes ids): road 7 (stuff), person 24, car 26 (things), 99 unknown -> void, 0 void
    pan_dir = root / "panoptic"
    pan_dir.mkdir()
    segments = []
    for image_id, name in ((1, "a.png"), (2, "b.png")):
        ids = np.zeros((H, W), dtype=np.int64)
        ids[24:, :] = 1000  # road
        ids[5:20, 5:25] = 2001  # car
        ids[5:20, 35:50] = 2002 if image_id == 1 else 3001  # car / person
        ids[30:40, 50:60] = 4000  # unknown category: void
        rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(pan_dir / f"{image_id}.png")
        info = [
            {"id": 1000, "category_id": 7, "iscrowd": 0},
            {"id": 2001, "category_id": 26, "iscrowd": 0},
            {"id": 4000, "category_id": 99, "iscrowd": 0},
        ]
        info.append(
            {"id": 2002, "category_id": 26, "iscrowd": 1}
            if image_id == 1
            else {"id": 3001, "category_id": 24, "iscrowd": 0}
        )
        segments.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": info})
    panoptic = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
        ],
        "annotations": segments,
        "categories": [
            {"id": 7, "name": "road", "isthing": 0},
            {"id": 24, "name": "person", "isthing": 1},
            {"id": 26, "name": "car", "isthing": 1},
        ],
    }
    (root / "panoptic.json").write_text(json.dumps(panoptic))
    return root


def _check_outputs(out: Path, command: str) -> dict:
    results = json.loads(out.read_text())
    assert results["command"] == command
    report = out.with_suffix(".md")
    text = report.read_text()
    assert text.startswith("# ")
    pngs = list(out.parent.glob(f"{out.stem}_*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)
    for p in pngs:
        assert f"]({p.name})" in text
    assert not partial_path(out).exists()  # answers moved into the results
    return results


def test_classify_in_process(tiny_model_dir, data, tmp_path):
    out = tmp_path / "classify.json"
    assert (
        run_eval(
            [
                "eval",
                "classify",
                "--data",
                str(data / "lvis.json"),
                "--images",
                str(data),
                "--model",
                str(tiny_model_dir),
                "--out",
                str(out),
                "--batch-size",
                "2",
                *FAST,
            ]
        )
        == 0
    )
    res = _check_outputs(out, "classify")
    assert res["summary"]["items"] == 3
    assert [r["label"] for r in res["items"]] == ["dog", "traffic light", "car"]  # official normalisation
    for r in res["items"]:
        assert -1.0 <= r["ss"] <= 1.0 and 0.0 <= r["siou"] <= 1.0
    assert res["summary"]["semantic_similarity"] == pytest.approx(
        100 * np.mean([r["ss"] for r in res["items"]])
    )


def test_classify_resumes_from_partial_answers(tiny_model_dir, data, tmp_path):
    from eval.tasks.common import run_meta

    out = tmp_path / "resume.json"
    argv = [
        "eval",
        "classify",
        "--data",
        str(data / "lvis.json"),
        "--images",
        str(data),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        *FAST,
    ]
    # a run that stopped after its first answer left this partial file behind
    partial = PartialResults(partial_path(out), run_meta(_parse(argv), "classify", {"task": "category"}))
    partial.append(
        [
            {
                "key": "0:0",
                "text": "zebra",
                "raw_text": "zebra",
                "completion_tokens": 1,
                "finish_reason": "stop",
            }
        ]
    )
    assert run_eval(argv) == 0
    items = {r["key"]: r for r in json.loads(out.read_text())["items"]}
    assert items["0:0"]["answer"] == "zebra"  # kept, not asked again
    assert len(items) == 3
    # a partial file from other settings is refused instead of mixed in
    other = tmp_path / "other.json"
    PartialResults(partial_path(other), {"command": "classify", "sampling": {"temperature": 0.7}})
    with pytest.raises(ValueError, match="other settings"):
        run_eval(argv[: -len(FAST)] + ["--out", str(other), *FAST])


def _ovseg(model: Path, data: Path, out: Path) -> dict:
    argv = ["eval", "ovseg", "--data", str(data / "panoptic.json"), "--panoptic-root", str(data / "panoptic"),
            "--images", str(data), "--classes", "cityscapes", "--model", str(model), "--out", str(out), *FAST]
    assert run_eval(argv) == 0
    return _check_outputs(out, "ovseg")


def _answered(first: dict, out: Path, answer) -> None:
    """A partial file for `out` with the run's settings and `answer(item)` for every region: the resumed run
    asks the model nothing, so the scores are those of these answers."""
    meta = {k: v for k, v in first["run"].items() if k not in ("backend", "items", "answer_seconds")}
    records = [{"key": it["key"], "text": answer(it), "raw_text": answer(it), "completion_tokens": 1,
                "finish_reason": "stop"} for it in first["items"]]
    partial_path(out).write_text("\n".join(json.dumps(r) for r in [{"meta": meta}, *records]) + "\n")


def test_ovseg_scores_are_the_ones_right_and_wrong_answers_must_get(tiny_model_dir, data, tmp_path):
    """The fixture: per image a road (stuff, 1436 px), a car (300 px) and a car crowd (image a) or a person
    (image b, 225 px each); an unknown segment is void. Scores computed by hand for three sets of answers: all
    right, "road" everywhere, and right but the person called a car (where PQ, SQ and RQ all differ)."""
    first = _ovseg(tiny_model_dir, data, tmp_path / "tiny.json")  # the real model answers (nonsense)
    assert first["summary"]["images"] == 2 and first["summary"]["regions"] == 6  # the unknown segment is void
    assert {it["gt"] for it in first["items"]} == {"road", "car", "person"}

    _answered(first, tmp_path / "right.json", lambda it: it["gt"])
    s = _ovseg(tiny_model_dir, data, tmp_path / "right.json")["summary"]
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "pixel_acc", "region_accuracy", "AP"):
        assert s[key] == pytest.approx(100.0), (key, s)

    _answered(first, tmp_path / "road.json", lambda it: "road")
    s = _ovseg(tiny_model_dir, data, tmp_path / "road.json")["summary"]
    assert s["region_accuracy"] == pytest.approx(100 * 2 / 5)  # the crowd car is not counted
    road_iou = 1436 / 1961  # all 1961 labelled px of an image are predicted road; 1436 are road
    assert s["pixel_acc"] == pytest.approx(100 * road_iou)
    assert s["mIoU"] == pytest.approx(100 * road_iou / 3)  # road, car, person: the two others 0
    # road: one match per image (IoU road_iou); car: 2 misses (the crowd is ignored); person: 1 miss
    assert s["PQ_st"] == pytest.approx(100 * road_iou) and s["PQ_th"] == pytest.approx(0.0)
    assert s["PQ"] == pytest.approx(100 * road_iou / 3) and s["RQ"] == pytest.approx(100 / 3)

    _answered(first, tmp_path / "car.json", lambda it: "car" if it["gt"] == "person" else it["gt"])
    s = _ovseg(tiny_model_dir, data, tmp_path / "car.json")["summary"]
    # car: 2 matches and 1 false positive (RQ 2/2.5, SQ 1); person: 1 miss; road right
    assert s["PQ"] == pytest.approx(100 * (1 + 0.8 + 0) / 3) and s["RQ"] == pytest.approx(100 * (1 + 0.8) / 3)
    assert s["SQ"] == pytest.approx(100 * (1 + 1 + 0) / 3)
    assert s["PQ_th"] == pytest.approx(100 * 0.8 / 2) and s["PQ_st"] == pytest.approx(100.0)
    assert s["region_accuracy"] == pytest.approx(100 * 4 / 5)
    assert s["pixel_acc"] == pytest.approx(100 * (3922 - 225) / 3922)
    car_iou = 825 / (825 + 225)  # 300 + 300 + the 225 px crowd are car; the person's 225 px are called car
    assert s["mIoU"] == pytest.approx(100 * (1 + car_iou + 0) / 3)


@pytest.mark.skipif(
    java_version() is None, reason="caption metrics need Java (apt-get install default-jre-headless)"
)
def test_caption_in_process(tiny_model_dir, data, tmp_path):
    out = tmp_path / "caption.json"
    assert (
        run_eval(
            [
                "eval",
                "caption",
                "--data",
                str(data / "refcocog.json"),
                "--images",
                str(data),
                "--model",
                str(tiny_model_dir),
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    res = _check_outputs(out, "caption")
    assert res["summary"]["items"] == 2
    assert {"METEOR", "CIDEr", "BLEU-4", "ROUGE-L"} <= set(res["summary"])
    assert res["items"][0]["references"] == ["a dog on the left"]


def test_pope_in_process(tiny_model_dir, data, tmp_path):
    out = tmp_path / "pope.json"
    assert (
        run_eval(
            [
                "eval",
                "pope",
                "--data",
                str(data / "pope.json"),
                "--images",
                str(data),
                "--model",
                str(tiny_model_dir),
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    res = _check_outputs(out, "pope")
    s = res["summary"]
    assert s["items"] == 3 and s["tp"] + s["fp"] + s["tn"] + s["fn"] == 3
    assert all(r["parsed"] in ("yes", "no") for r in res["items"])


class _Judge(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible judge for the test: question 0 gets a review with scores, others not."""

    seen: ClassVar[list[dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append(body)
        content = body["messages"][1]["content"]
        review = "8 6\nAssistant 1 is more accurate." if "great detail" in content else "I cannot judge this."
        payload = json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": review}}]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep test output quiet
        pass


def test_describe_prompt_is_the_official_one():
    from eval.tasks.describe import model_prompt
    from osprey.prompts import task_prompt

    prompt = task_prompt(model_prompt("Could you describe <region> in great detail?"))
    assert (
        prompt
        == "<image>\n.\nThis provides an overview of the picture.\nCould you describe <mask><pos> in great detail?"
    )


def test_describe_with_judge_endpoint(tiny_model_dir, data, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = tmp_path / "describe.json"
        assert (
            run_eval(
                [
                    "eval",
                    "describe",
                    "--data",
                    str(data / "describe.json"),
                    "--images",
                    str(data),
                    "--judge-url",
                    f"http://127.0.0.1:{server.server_port}/v1",
                    "--judge-model",
                    "judge",
                    "--model",
                    str(tiny_model_dir),
                    "--out",
                    str(out),
                    *FAST,
                ]
            )
            == 0
        )
    finally:
        server.shutdown()
    res = _check_outputs(out, "describe")
    s = res["summary"]
    assert s["scored"] == 1 and s["errors"] == 1  # the unparseable review is recorded, not fatal
    assert s["relative_score"] == pytest.approx(100 * 6 / 8)
    first = _Judge.seen[0]["messages"][1]["content"]
    assert first.startswith("[Context]\nA dog and a car in a park.\n\n[Question]\n")
    assert "[Assistant 1]\nA small brown dog sits on the grass.\n\n[End of Assistant 1]" in first
    assert "two values indicating the scores for Assistant 1 and 2" in first


def test_bad_inputs_fail_clearly(data, tmp_path):
    with pytest.raises(ValueError, match="--model DIR"):
        run_eval(
            [
                "eval",
                "pope",
                "--data",
                str(data / "pope.json"),
                "--images",
                str(data),
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
    with pytest.raises(ValueError, match="not a POPE set"):
        run_eval(
            [
                "eval",
                "pope",
                "--data",
                str(data / "lvis.json"),
                "--out",
                str(tmp_path / "y.json"),
                "--model",
                "m",
            ]
        )
    with pytest.raises(FileNotFoundError, match="class list"):
        run_eval(
            [
                "eval",
                "ovseg",
                "--data",
                str(data / "panoptic.json"),
                "--classes",
                "nope",
                "--model",
                "m",
                "--out",
                str(tmp_path / "z.json"),
            ]
        )


def test_eval_against_server(tiny_model_dir, data, tmp_path):
    background = pytest.importorskip(
        "serve.background", reason="the server package (serve) is not importable yet"
    )
    from serve.config import ServeConfig

    config = ServeConfig(model=str(tiny_model_dir), dtype="float32")
    with background.BackgroundServer(config) as srv:
        out = tmp_path / "classify_http.json"
        assert (
            run_eval(
                [
                    "eval",
                    "classify",
                    "--data",
                    str(data / "lvis.json"),
                    "--images",
                    str(data),
                    "--endpoint",
                    srv.url,
                    "--out",
                    str(out),
                    "--max-new-tokens",
                    "3",
                ]
            )
            == 0
        )
        res = _check_outputs(out, "classify")
        assert res["summary"]["items"] == 3 and res["run"]["endpoint"] == srv.url
        out = tmp_path / "pope_http.json"  # image-level questions go as a full-image box region
        assert (
            run_eval(
                [
                    "eval",
                    "pope",
                    "--data",
                    str(data / "pope.json"),
                    "--images",
                    str(data),
                    "--endpoint",
                    srv.url,
                    "--out",
                    str(out),
                    "--max-new-tokens",
                    "3",
                ]
            )
            == 0
        )
        assert _check_outputs(out, "pope")["summary"]["items"] == 3
        # the server's error message reaches the user (a mask of another size than the image)
        bad = [
            {
                "file_name": "a.png",
                "height": 10,
                "width": 10,
                "categories": ["dog"],
                "annotations": [
                    {"segmentation": encode_rle(np.ones((10, 10), bool)), "bbox": [0, 0, 10, 10]}
                ],
            }
        ]
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(RuntimeError, match="answered 400: .*size"):
            run_eval(
                [
                    "eval",
                    "classify",
                    "--data",
                    str(tmp_path / "bad.json"),
                    "--images",
                    str(data),
                    "--endpoint",
                    srv.url,
                    "--out",
                    str(tmp_path / "bad_out.json"),
                    "--max-new-tokens",
                    "3",
                ]
            )
    with pytest.raises(RuntimeError, match="cannot reach"):  # the server is gone
        run_eval(
            [
                "eval",
                "classify",
                "--data",
                str(data / "lvis.json"),
                "--images",
                str(data),
                "--endpoint",
                srv.url,
                "--out",
                str(tmp_path / "gone.json"),
                "--max-new-tokens",
                "3",
            ]
        )


def test_classify_and_ovseg_by_likelihood(tiny_model_dir, data, tmp_path):
    """`--scoring likelihood`: every region's answer is the data's label of highest likelihood (osprey.scoring,
    checked here for the first region), with the calibration figures; ovseg's class probabilities likewise."""
    from eval.backends import decode_region
    from eval.datasets import load_classification
    from osprey.inference import OspreyPipeline
    from osprey.scoring import AnswerScorer

    out = tmp_path / "classify_likelihood.json"
    argv = ["eval", "classify", "--data", str(data / "lvis.json"), "--images", str(data), "--model",
            str(tiny_model_dir), "--out", str(out), "--scoring", "likelihood", *FAST]
    assert run_eval(argv) == 0
    res = _check_outputs(out, "classify")
    labels = ["car", "dog", "traffic light"]
    assert res["scoring"] == "likelihood" and res["summary"]["labels"] == 3
    assert all(r["prediction"] in labels for r in res["items"])
    assert 0 <= res["summary"]["ece"] <= 100 and 0 < res["summary"]["mean_true_probability"] < 1
    pipe = OspreyPipeline.from_pretrained(tiny_model_dir, device="cpu")
    for item in load_classification(data / "lvis.json", data):
        encoded = pipe.encode_image(item.image)
        mask = decode_region(item.segmentation, item.height, item.width)[None]
        expected = AnswerScorer(pipe).classify(encoded, mask, labels).top(0, 1)[0][0]
        assert next(r for r in res["items"] if r["key"] == item.key)["prediction"] == expected

    with pytest.raises(ValueError, match="runs in-process"):
        run_eval(["eval", "classify", "--data", str(data / "lvis.json"), "--images", str(data), "--endpoint",
                  "http://127.0.0.1:9", "--out", str(tmp_path / "x.json"), "--scoring", "likelihood"])
    ovseg = tmp_path / "ovseg_likelihood.json"
    argv = ["eval", "ovseg", "--data", str(data / "panoptic.json"), "--panoptic-root", str(data / "panoptic"),
            "--images", str(data), "--classes", "cityscapes", "--model", str(tiny_model_dir), "--out", str(ovseg),
            "--scoring", "likelihood", *FAST]
    assert run_eval(argv) == 0
    res = _check_outputs(ovseg, "ovseg")
    names = {c["name"] for c in res["per_class"]}
    assert res["scoring"] == "likelihood" and all(r["pred"] in names for r in res["items"])
