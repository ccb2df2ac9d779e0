"""/v1/regions/classify and /v1/regions/query on the real server (uvicorn, tiny model), compared with osprey.scoring
in-process on the same masks; every bad input a clear 4xx; and the `osprey classify` / `osprey query` commands."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from helpers import png_b64
from PIL import Image

from osprey import masks as mask_codecs
from osprey.scoring import DEFAULT_QUERY_THRESHOLD, AnswerScorer
from serve.background import BackgroundServer
from serve.config import ServeConfig
from serve.schemas import MAX_LABELS

H, W = 40, 56
IMAGE = Image.fromarray((np.random.default_rng(1).random((H, W, 3)) * 255).astype(np.uint8))
MASKS = np.zeros((2, H, W), dtype=bool)
MASKS[0, 5:20, 8:30] = True
MASKS[1, 22:38, 30:50] = True
REGIONS = [{"rle": mask_codecs.encode_rle(m)} for m in MASKS]
LABELS = ["circle", "red square", "x"]
VOCABULARY = ["square", "x", "star"]  # the tiny model folder has no vocabulary.txt


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    config = ServeConfig(model=str(tiny_model_dir), served_model_name="tiny", max_regions=4, request_timeout_s=60)
    with BackgroundServer(config) as srv:
        yield srv
        assert 'status="500"' not in httpx.get(srv.url + "/metrics").text


@pytest.fixture(scope="module")
def scored(tiny_model_dir):
    from osprey.inference import OspreyPipeline

    pipe = OspreyPipeline.from_pretrained(tiny_model_dir, device="cpu")
    scorer = AnswerScorer(pipe)
    encoded = pipe.encode_image(IMAGE)
    return scorer.classify(encoded, MASKS, LABELS), scorer.query(encoded, MASKS, "circle", VOCABULARY)


def _post(server, path: str, **body) -> httpx.Response:
    return httpx.post(server.url + path, json={"image": png_b64(IMAGE), "regions": REGIONS, **body}, timeout=60)


def test_classify_returns_the_in_process_probabilities(server, scored):
    labels, _ = scored
    response = _post(server, "/v1/regions/classify", labels=LABELS, top_k=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "region.classification" and body["model"] == "tiny"
    assert [r["index"] for r in body["results"]] == [0, 1]
    for q, result in enumerate(body["results"]):
        expected = labels.top(q, 2)
        assert [item["label"] for item in result["labels"]] == [label for label, _ in expected]
        np.testing.assert_allclose([item["probability"] for item in result["labels"]], [p for _, p in expected],
                                   atol=1e-5)
    everything = _post(server, "/v1/regions/classify", labels=LABELS).json()
    total = sum(item["probability"] for item in everything["results"][0]["labels"])
    assert abs(total - 1.0) < 1e-6


def test_query_scores_and_counts(server, scored):
    _, query = scored
    response = _post(server, "/v1/regions/query", text="  circle ", vocabulary=VOCABULARY + ["circle"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "circle" and body["threshold"] == DEFAULT_QUERY_THRESHOLD and body["vocabulary"] == 3
    np.testing.assert_allclose([r["score"] for r in body["results"]], query.scores, atol=1e-5)
    assert body["count"] == sum(r["match"] for r in body["results"])
    everything = _post(server, "/v1/regions/query", text="circle", vocabulary=VOCABULARY, threshold=0.0).json()
    nothing = _post(server, "/v1/regions/query", text="circle", vocabulary=VOCABULARY, threshold=1.0).json()
    assert everything["count"] == 2 and all(r["match"] for r in everything["results"])
    assert nothing["count"] == sum(r["score"] >= 1.0 for r in body["results"])


@pytest.mark.parametrize("body, param, words", [
    ({"labels": []}, "labels", "at least 1"),
    ({"labels": ["circle", "square", "circle"]}, "labels", "labels 0 and 2"),
    ({"labels": ["circle", " circle "]}, "labels", "give each label once"),
    ({"labels": ["circle", ""]}, "labels[1]", "at least 1 character"),
    ({"labels": ["circle", "   "]}, "labels[1]", "pattern"),
    ({"labels": [f"label {i}" for i in range(MAX_LABELS + 1)]}, "labels", f"at most {MAX_LABELS}"),
    ({"labels": ["a" * 201]}, "labels[0]", "at most 200"),
    ({"labels": LABELS, "top_k": 0}, "top_k", "greater than or equal to 1"),
    ({"labels": LABELS, "top_k": 4}, None, "top_k = 4 is more than the 3 labels"),
    ({"labels": LABELS, "prompt": "nonsense"}, "prompt", "'category'"),
    ({"labels": LABELS, "regions": []}, "regions", "at least 1"),
    ({"labels": LABELS, "model": "other"}, "model", "does not exist"),
    ({"labels": LABELS, "extra": 1}, "extra", "unknown field 'extra'"),
])
def test_classify_bad_input_is_a_clear_4xx(server, body, param, words):
    response = _post(server, "/v1/regions/classify", **body)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert words in error["message"], error
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("body, param, words", [
    ({"text": ""}, "text", "at least 1 character"),
    ({"text": "  "}, "text", "pattern"),
    ({"text": "circle"}, "vocabulary", "no default vocabulary (vocabulary.txt"),
    ({"text": "circle", "vocabulary": ["circle"]}, "vocabulary", "only the text itself"),
    ({"text": "circle", "vocabulary": []}, "vocabulary", "at least 1"),
    ({"text": "circle", "threshold": 1.5}, "threshold", "less than or equal to 1"),
    ({"text": "circle", "threshold": -0.1}, "threshold", "greater than or equal to 0"),
    ({}, "text", "Field required"),
    ({"text": "circle", "regions": [{"box": [0, 0, 5, 5]}] * 5}, "regions", "too many regions: 5 > 4"),
])
def test_query_bad_input_is_a_clear_4xx(server, body, param, words):
    response = _post(server, "/v1/regions/query", **body)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == param, error


def test_classify_and_query_commands(tmp_path, tiny_model_dir, scored):
    labels, query = scored
    IMAGE.save(tmp_path / "image.png")
    (tmp_path / "masks.json").write_text(json.dumps(REGIONS))
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    base = [sys.executable, "-m", "osprey.cli"]
    common = [str(tmp_path / "image.png"), "--masks", str(tmp_path / "masks.json"), "--model", str(tiny_model_dir),
              "--dtype", "float32", "--json"]
    out = subprocess.run(base + ["classify", *common, "--labels-file", str(tmp_path / "labels.txt"), "--top-k", "3"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    np.testing.assert_allclose([item["probability"] for item in rows[0]["labels"]],
                               [p for _, p in labels.top(0, 3)], atol=1e-5)
    out = subprocess.run(base + ["query", *common, "--text", "circle", "--threshold", "0", "--vocabulary",
                                 ",".join(VOCABULARY)], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["count"] == 2
    np.testing.assert_allclose([r["score"] for r in result["results"]], query.scores, atol=1e-5)
    bad = subprocess.run(base + ["classify", *common, "--labels", "a,b,a"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "more than once: a" in bad.stderr
    bad = subprocess.run(base + ["query", *common, "--text", "circle"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "has no vocabulary.txt" in bad.stderr
    table = subprocess.run(base + ["classify", *common[:-1], "--labels", "circle,x"], capture_output=True, text=True,
                           check=True).stdout
    assert table.splitlines()[0].split()[0] == "1" and "circle" in table

