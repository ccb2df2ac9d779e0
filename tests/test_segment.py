"""SAM paths: osprey.segment on tiny random SAM / SAM 3 folders loaded by the real loader, and the /v1/segment
routes of the real server (uvicorn): masks at the image size, RLE round trips, scores, bad prompts refused with a
400 naming the field, servers without SAM answering 404 with the flag to pass, and the offline /docs page."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from helpers import data_url
from PIL import Image
from sam_folders import SAM_QUERIES

from osprey import masks as mask_codecs
from osprey.segment import (
    ConceptSegmenter,
    Prompt,
    PromptError,
    PromptSegmenter,
    SegmenterLoadError,
    Segmenters,
    check_prompt,
)
from serve.background import BackgroundServer
from serve.config import ServeConfig

H, W = 50, 80
IMAGE = Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def sam(tiny_sam_dir):
    return PromptSegmenter.from_folder(tiny_sam_dir)


@pytest.fixture(scope="module")
def sam3(tiny_sam3_dir):
    return ConceptSegmenter.from_folder(tiny_sam3_dir)


# ---------------------------------------------------------------------------------------------- osprey.segment


def test_points_give_one_mask_at_the_image_size(sam):
    segments = sam.segment(IMAGE, Prompt(points=((10, 20), (60, 30)), labels=(1, 0)), "img")
    assert len(segments) == 1
    assert segments[0].mask.shape == (H, W) and segments[0].mask.dtype == bool
    assert np.isfinite(segments[0].score)


def test_one_click_multimask_gives_three_candidates_best_first(sam):
    segments = sam.segment(IMAGE, Prompt(points=((40, 25),), labels=(1,)), "img", multimask=True)
    assert len(segments) == 3
    scores = [s.score for s in segments]
    assert scores == sorted(scores, reverse=True)
    best = sam.segment(IMAGE, Prompt(points=((40, 25),), labels=(1,)), "img")
    assert len(best) == 1 and best[0].score == pytest.approx(scores[0])
    assert np.array_equal(best[0].mask, segments[0].mask)


def test_each_box_is_one_object(sam):
    segments = sam.segment(IMAGE, Prompt(boxes=((5, 5, 20, 20), (40, 10, 30, 30))), "img")
    assert len(segments) == 2 and all(s.mask.shape == (H, W) for s in segments)


def test_cached_embedding_gives_the_same_mask(sam):
    prompt = Prompt(points=((30, 30),), labels=(1,))
    first = sam.segment(IMAGE, prompt, "cache-key")
    again = sam.segment(IMAGE, prompt, "cache-key")  # the image encoder is skipped: the cached embedding
    assert np.array_equal(first[0].mask, again[0].mask) and first[0].score == again[0].score


def test_everything_finds_masks_at_the_image_size(sam):
    segments = sam.everything(IMAGE, points_per_side=4, min_score=0.0, min_stability=0.0, max_masks=5)
    assert 1 <= len(segments) <= 5
    assert all(s.mask.shape == (H, W) and s.mask.any() for s in segments)
    assert [s.score for s in segments] == sorted((s.score for s in segments), reverse=True)


def test_text_concept_gives_instances_above_the_threshold(sam3):
    every = sam3.segment_text(IMAGE, "bottle", threshold=0.0)
    assert 1 <= len(every) <= SAM_QUERIES
    assert all(s.mask.shape == (H, W) and 0.0 <= s.score <= 1.0 for s in every)
    ranked = sorted(s.score for s in every)
    assert len(set(ranked)) > 1
    cut = (ranked[0] + ranked[-1]) / 2  # between two scores: no instance sits on the threshold
    kept = sam3.segment_text(IMAGE, "bottle", threshold=cut)
    assert {round(s.score, 6) for s in kept} == {round(s.score, 6) for s in every if s.score > cut}
    assert 0 < len(kept) < len(every)
    assert sam3.segment_text(IMAGE, "bottle", threshold=1.0) == []


@pytest.mark.parametrize(("prompt", "field"), [
    (Prompt(), "points"),
    (Prompt(points=((1, 1), (2, 2)), labels=(1,)), "labels"),
    (Prompt(points=((W, 10),), labels=(1,)), "points[0]"),
    (Prompt(points=((10, -1),), labels=(1,)), "points[0]"),
    (Prompt(points=((10, 10),), labels=(2,)), "labels[0]"),
    (Prompt(points=((10, 10),), labels=(0,)), "labels"),
    (Prompt(boxes=((W, 0, 5, 5),)), "boxes[0]"),
    (Prompt(points=((10, 10),), labels=(1,), boxes=((0, 0, 5, 5), (5, 5, 5, 5))), "boxes"),
])
def test_bad_prompts_name_the_field(prompt, field):
    with pytest.raises(PromptError) as caught:
        check_prompt(prompt, H, W)
    assert caught.value.field == field


def test_loading_refuses_other_folders(tmp_path, tiny_sam_dir, tiny_sam3_dir):
    with pytest.raises(SegmenterLoadError, match="no config.json"):
        PromptSegmenter.from_folder(tmp_path)
    with pytest.raises(SegmenterLoadError, match="'sam3' is not one of"):
        PromptSegmenter.from_folder(tiny_sam3_dir)
    with pytest.raises(SegmenterLoadError, match="'sam' is not one of"):
        ConceptSegmenter.from_folder(tiny_sam_dir)


# ---------------------------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def server(tiny_model_dir, sam, sam3):
    config = ServeConfig(model=str(tiny_model_dir), max_tokens_limit=8, max_batch_size=4, request_timeout_s=60)
    with BackgroundServer(config, segmenters=Segmenters(sam, sam3)) as srv:
        yield srv
        assert 'status="500"' not in httpx.get(srv.url + "/metrics").text


@pytest.fixture(scope="module")
def bare_server(tiny_model_dir):
    with BackgroundServer(ServeConfig(model=str(tiny_model_dir), max_tokens_limit=8)) as srv:
        yield srv


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def test_segment_route_returns_rle_that_decodes_to_the_models_mask(server, sam):
    response = _post(server, "/v1/segment", {"image": data_url(IMAGE), "points": [[10, 20], [60, 30]], "labels": [1, 0]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == sam.name and len(body["segments"]) == 1
    segment = body["segments"][0]
    mask = mask_codecs.decode_rle(segment["segmentation"], H, W)
    expected = sam.segment(IMAGE, Prompt(points=((10, 20), (60, 30)), labels=(1, 0)), "x")[0]
    assert np.array_equal(mask, expected.mask)
    assert segment["area"] == int(mask.sum()) and segment["bbox"] == mask_codecs.mask_to_bbox(mask)
    assert segment["predicted_iou"] == pytest.approx(expected.score, abs=1e-5)


def test_a_segment_is_a_region_the_describe_endpoint_accepts(server):
    box = _post(server, "/v1/segment", {"image": data_url(IMAGE), "boxes": [[5, 5, 40, 30]]}).json()["segments"]
    assert box and box[0]["area"] > 0
    described = _post(server, "/v1/regions/describe", {"image": data_url(IMAGE), "regions": box, "max_tokens": 4})
    assert described.status_code == 200, described.text
    assert described.json()["notes"] == []  # the area we send agrees with the mask


def test_everything_and_text_routes(server):
    every = _post(server, "/v1/segment/everything", {"image": data_url(IMAGE), "points_per_side": 4,
                                                      "min_score": 0, "min_stability": 0, "max_masks": 3})
    assert every.status_code == 200, every.text
    assert 1 <= len(every.json()["segments"]) <= 3
    text = _post(server, "/v1/segment", {"image": data_url(IMAGE), "text": "bottle", "threshold": 0})
    assert text.status_code == 200, text.text
    for segment in text.json()["segments"]:
        assert mask_codecs.decode_rle(segment["segmentation"], H, W).sum() == segment["area"] > 0


@pytest.mark.parametrize(("body", "param"), [
    ({"points": [[100, 10]], "labels": [1]}, "points[0]"),
    ({"points": [[10, 10], [20, 20]], "labels": [1]}, "labels"),
    ({}, "points"),
    ({"points": [[10, 10]], "labels": [3]}, "labels[0]"),
    ({"boxes": [[0, 0, -5, 5]]}, "boxes[0][2]"),
    ({"text": "cup", "points": [[10, 10]], "labels": [1]}, "text"),
    ({"text": ""}, "text"),
    ({"points": [[10, 10]], "labels": [1], "colour": "red"}, "colour"),
])
def test_bad_segment_requests_are_400_naming_the_field(server, body, param):
    response = _post(server, "/v1/segment", {"image": data_url(IMAGE), **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_capabilities(server, bare_server, sam, sam3):
    on = httpx.get(server.url + "/v1/segment").json()
    assert on == {"points": True, "everything": True, "text": True, "sam": sam.name, "sam3": sam3.name, "hint": None}
    off = httpx.get(bare_server.url + "/v1/segment").json()
    assert not off["points"] and not off["text"] and "--sam PATH" in off["hint"] and "--sam3 PATH" in off["hint"]


@pytest.mark.parametrize(("path", "body", "flag"), [
    ("/v1/segment", {"points": [[1, 1]], "labels": [1]}, "--sam PATH"),
    ("/v1/segment", {"text": "cup"}, "--sam3 PATH"),
    ("/v1/segment/everything", {}, "--sam PATH"),
])
def test_without_sam_the_routes_say_how_to_enable_them(bare_server, path, body, flag):
    response = _post(bare_server, path, {"image": data_url(IMAGE), **body})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "segmentation_not_enabled" and flag in error["message"]


def test_docs_and_page_are_served_from_this_server(bare_server):
    page = httpx.get(bare_server.url + "/", follow_redirects=True)
    assert page.status_code == 200 and "Osprey playground" in page.text
    docs = httpx.get(bare_server.url + "/docs")
    assert docs.status_code == 200
    assert "cdn" not in docs.text.lower() and "https://" not in docs.text
    for asset in ("/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css", "/ui/static/playground.js",
                  "/ui/static/playground.css"):
        assert httpx.get(bare_server.url + asset).status_code == 200, asset
    assert httpx.get(bare_server.url + "/ui/static/..%2Fplayground.py").status_code == 404
    schema = httpx.get(bare_server.url + "/openapi.json").json()
    assert {"/v1/segment", "/v1/segment/everything"} <= set(schema["paths"])
    assert "/docs" not in schema["paths"] and "/ui/" not in schema["paths"]
    json.dumps(schema)


def test_query_without_regions_counts_what_sam3_finds(server, sam3, bare_server):
    """"Count the bottles" from the image alone: SAM 3's instances are the regions the model verifies; each result
    carries its instance's mask and confidence. A server without SAM 3 asks for regions."""
    body = {"image": data_url(IMAGE), "text": "bottle", "vocabulary": ["cup", "box"], "segment_threshold": 0.0}
    response = _post(server, "/v1/regions/query", body)
    assert response.status_code == 200, response.text
    found = sam3.segment_text(IMAGE, "bottle", threshold=0.0)
    results = response.json()["results"]
    assert found and len(results) == len(found)
    for result, segment in zip(results, found):
        assert np.array_equal(mask_codecs.decode_rle(result["segmentation"], H, W), segment.mask)
        assert result["segment_score"] == pytest.approx(segment.score, abs=1e-5)
    assert response.json()["count"] == sum(r["match"] for r in results)
    none = _post(server, "/v1/regions/query", {**body, "segment_threshold": 1.0})
    assert none.status_code == 200 and none.json()["count"] == 0 and none.json()["results"] == []
    refused = _post(bare_server, "/v1/regions/query", body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "regions"
    assert "--sam3" in refused.json()["error"]["message"]
