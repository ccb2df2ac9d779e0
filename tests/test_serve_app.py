"""The real server (uvicorn, tiny model) through the official `openai` client and httpx: every endpoint,
both region conventions, streaming, stop strings, and bad inputs of every kind (a 4xx in OpenAI's shape, never a
500, and the next good request still succeeds). Answers are compared with the in-process pipeline on the same
masks. Load behaviour (queue overflow, cancellation) is in test_serve_engine.py, where the test holds the worker."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from helpers import data_url, png_b64
from PIL import Image

from osprey import BUILTIN_MODEL_DIR
from osprey import masks as mask_codecs
from osprey.prompts import (
    REGION_PLACEHOLDER,
    clean_answer,
    inline_region_question,
    multi_region_question,
)
from serve.background import BackgroundServer
from serve.config import ServeConfig

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
H, W = 40, 56
NAME = "tiny-osprey"


IMAGE = Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8))
MASK_A = np.zeros((H, W), dtype=bool)
MASK_A[5:20, 8:30] = True
MASK_B = np.zeros((H, W), dtype=bool)
MASK_B[22:38, 30:50] = True


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def server(model_dir):
    """The module's server. When the module is done (whatever order its tests ran in), it must never have
    answered 500: every bad input above is a 4xx."""
    config = ServeConfig(model=str(model_dir), served_model_name=NAME, api_key=KEY, max_regions=8,
                         max_tokens_limit=32, max_body_bytes=2 * 1024 * 1024, max_image_pixels=1024 * 1024,
                         max_batch_size=4, max_queue=4, request_timeout_s=60)
    with BackgroundServer(config) as srv:
        yield srv
        assert 'status="500"' not in httpx.get(srv.url + "/metrics").text


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pipe(model_dir):
    from osprey.inference import OspreyPipeline

    return OspreyPipeline.from_pretrained(model_dir, device="cpu")


# The built-in (trained) model on a generated image: its answers depend on the masks (the tiny random model's do
# not), so comparing the server with the pipeline on the same masks can tell a wrong mask from a right one.
SYNTH = json.loads((Path(__file__).parent / "fixtures/synth/test/stage2_categories.json").read_text())[0]
SYNTH_IMAGE = Image.open(Path(__file__).parent / "fixtures/synth" / SYNTH["file_name"]).convert("RGB")
STAR, ROBOT = (mask_codecs.decode_rle(SYNTH["annotation"][i]["segmentation"]) for i in (0, 3))


@pytest.fixture(scope="module")
def builtin(builtin_pipeline):
    """(client, pipeline) for a server of the built-in model."""
    config = ServeConfig(model=str(BUILTIN_MODEL_DIR), served_model_name=NAME, max_tokens_limit=32)
    with BackgroundServer(config) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60), builtin_pipeline


def greedy_reference(pipe, turns: list[tuple[str, str]], masks: np.ndarray, max_tokens: int) -> str:
    """What the chat endpoint must answer for these turns and masks on SYNTH_IMAGE (greedy), in process."""
    from osprey.inference import SamplingParams

    prepared = pipe.prepare(pipe.encode_image(SYNTH_IMAGE), turns, masks)
    return pipe.generate([prepared], SamplingParams(max_new_tokens=max_tokens))[0].raw_text.strip()


def synth_messages(text: str, *extra_images: str, image: Image.Image = SYNTH_IMAGE) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in (data_url(image), *extra_images)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def chat_messages(text: str, *extra_images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in extra_images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def describe(server, **body) -> httpx.Response:
    payload = {"image": data_url(IMAGE), "regions": [{"box": [8, 5, 22, 15]}], "max_tokens": 2} | body
    return httpx.post(server.url + "/v1/regions/describe", json=payload, headers=AUTH, timeout=60)


# ---------------------------------------------------------------------------------------------- plain endpoints


def test_health_models_metrics(server, client):
    assert httpx.get(server.url + "/health").json() == {
        "status": "ok", "replicas": [{"replica": 0, "device": "cpu", "status": "ok", "open_rows": 0}]}
    assert [m.id for m in client.models.list().data] == [NAME]
    describe(server)
    text = httpx.get(server.url + "/metrics").text
    for name in ("osprey_requests_total", "osprey_queue_depth", "osprey_batch_size_bucket",
                 "osprey_request_latency_seconds_bucket", "osprey_generated_tokens_total", "osprey_tokens_per_second"):
        assert name in text
    assert 'endpoint="/v1/regions/describe",status="200"' in text


# ---------------------------------------------------------------------------------------------- chat


def test_chat_with_regions_in_extra_body(client):
    r = client.chat.completions.create(
        model=NAME, messages=chat_messages("What is <region1> next to <region2>?"), max_tokens=5, seed=1,
        extra_body={"regions": [{"rle": mask_codecs.encode_rle(MASK_A)}, {"polygon": [[30, 22, 50, 22, 50, 38, 30, 38]]}]},
        frequency_penalty=0.0, user="someone", logprobs=False)  # common OpenAI fields are accepted and ignored
    assert r.object == "chat.completion" and r.model == NAME and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 5 or choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming_and_reports_usage(client):
    kwargs = {"model": NAME, "messages": chat_messages("Describe <region1>."), "max_tokens": 6, "temperature": 0,
                  "extra_body": {"regions": [{"box": [8, 5, 22, 15]}]}}
    full = client.chat.completions.create(n=2, **kwargs)
    stream = client.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, **kwargs)
    texts, reasons, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert set(reasons) == {0, 1}
    assert [texts[i].strip() for i in (0, 1)] == [c.message.content for c in full.choices]  # greedy: identical
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    single = client.chat.completions.create(n=1, **kwargs)
    assert full.usage.prompt_tokens == single.usage.prompt_tokens  # n choices share one prompt
    assert single.choices[0].message.content == full.choices[0].message.content


def test_stream_wire_format_ends_with_done(server):
    body = {"model": NAME, "messages": chat_messages("Describe <region1>."), "max_tokens": 3, "stream": True,
            "regions": [{"box": [8, 5, 22, 15]}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_rgba_conventions_answer_what_the_same_masks_answer_in_process(builtin):
    """The image's own alpha (one region) and extra RGBA mask images (DAM convention) give the answer the same
    masks give in process; inverted masks give another answer (so the comparison tells masks apart)."""
    client, pipe = builtin
    greedy = {"model": NAME, "max_tokens": 12, "temperature": 0}
    rgba = np.asarray(SYNTH_IMAGE.convert("RGBA")).copy()
    rgba[..., 3] = np.where(STAR, 255, 0)
    by_alpha = client.chat.completions.create(**greedy, messages=synth_messages(
        "Describe the masked region.", image=Image.fromarray(rgba, "RGBA"))).choices[0].message.content
    one = [("human", multi_region_question(1, "Describe the masked region."))]
    assert by_alpha == greedy_reference(pipe, one, STAR[None], 12)
    assert by_alpha != greedy_reference(pipe, one, ~STAR[None], 12)

    def mask_image(mask: np.ndarray) -> str:
        h, w = mask.shape
        return data_url(Image.fromarray(np.dstack([np.zeros((h, w, 3), np.uint8), mask.astype(np.uint8) * 255]), "RGBA"))

    by_images = client.chat.completions.create(**greedy, messages=synth_messages(
        "What is <region2>?", mask_image(STAR), mask_image(ROBOT))).choices[0].message.content
    turns = [("human", inline_region_question(f"What is {REGION_PLACEHOLDER}?"))]
    assert by_images == greedy_reference(pipe, turns, ROBOT[None], 12)
    assert by_images != greedy_reference(pipe, turns, ~ROBOT[None], 12)
    assert by_images != greedy_reference(pipe, turns, STAR[None], 12)  # the second image is <region2>


def test_multi_turn_keeps_regions_bound(builtin):
    """Turn two asks about <region2> after turn one's <region1>: the answer is the in-process one for masks
    [STAR, ROBOT] in mention order, not the one for [STAR, STAR]."""
    client, pipe = builtin
    regions = [{"rle": mask_codecs.encode_rle(STAR)}, {"rle": mask_codecs.encode_rle(ROBOT)}]
    greedy = {"model": NAME, "max_tokens": 12, "temperature": 0, "extra_body": {"regions": regions}}
    first = synth_messages("What is <region1>?")
    r1 = client.chat.completions.create(messages=first, **greedy)
    history = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                       {"role": "user", "content": "And what is <region2>?"}]
    r2 = client.chat.completions.create(messages=history, **greedy)
    turns = [("human", inline_region_question(f"What is {REGION_PLACEHOLDER}?")), ("gpt", r1.choices[0].message.content),
             ("human", f"And what is {REGION_PLACEHOLDER}?")]
    answer = r2.choices[0].message.content
    assert answer == greedy_reference(pipe, turns, np.stack([STAR, ROBOT]), 12)
    assert answer != greedy_reference(pipe, turns, np.stack([STAR, STAR]), 12)
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens


def test_a_stop_string_cuts_the_answer_where_it_first_appears(builtin):
    """A one-character piece of the greedy answer's middle is sent as a stop string: the answer ends just before
    its first occurrence, with finish_reason "stop". (One character: text already streamed is never taken back,
    so a longer stop string split over two tokens would leave its first part in the answer.)"""
    client, _ = builtin
    kwargs = {"model": NAME, "messages": synth_messages("Describe <region1>."), "max_tokens": 16, "temperature": 0,
              "extra_body": {"regions": [{"rle": mask_codecs.encode_rle(ROBOT)}]}}
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = next(c for c in full[len(full) // 2:] if c.isalpha())
    cut = client.chat.completions.create(stop=[stop, "\u2603"], **kwargs).choices[0]
    assert cut.finish_reason == "stop" and full.find(stop) > 0, full
    assert cut.message.content == full[:full.find(stop)].strip()


def test_sampling_is_seeded_and_tiny_temperatures_are_greedy(client):
    kwargs = {"model": NAME, "messages": chat_messages("Describe <region1>."), "max_tokens": 6,
              "extra_body": {"regions": [{"box": [8, 5, 22, 15]}]}}
    first = client.chat.completions.create(temperature=0.9, top_p=0.9, seed=7, stop=["zz"], **kwargs)
    again = client.chat.completions.create(temperature=0.9, top_p=0.9, seed=7, stop=["zz"], **kwargs)
    assert first.choices[0].message.content == again.choices[0].message.content
    greedy = client.chat.completions.create(temperature=0, **kwargs)
    tiny = client.chat.completions.create(temperature=1e-30, **kwargs)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_chat_without_regions(client):
    r = client.chat.completions.create(model=NAME, messages=chat_messages("What is in the picture?"), max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------------------------- native describe


def test_describe_every_codec_and_matches_the_pipeline(server, pipe):
    from osprey.inference import SamplingParams

    regions = [{"rle": mask_codecs.encode_uncompressed_rle(MASK_A)}, {"polygon": [[30, 22, 50, 22, 50, 38, 30, 38]]},
               {"png": mask_codecs.encode_png_base64(MASK_B)}, {"box": [8, 5, 22, 15]}]
    r = describe(server, regions=regions, max_tokens=4, task="category")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "region.description" and body["model"] == NAME and body["id"].startswith("desc-")
    assert [x["index"] for x in body["results"]] == [0, 1, 2, 3]
    for x in body["results"]:
        assert x["text"] == clean_answer(x["raw_text"]) and x["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] == sum(x["completion_tokens"] for x in body["results"])
    # the server answers what the in-process pipeline answers (same batch of 4, greedy)
    masks = np.stack([MASK_A, MASK_B, MASK_B, MASK_A])
    gens = pipe.describe(IMAGE, masks, task="category", params=SamplingParams(max_new_tokens=4))
    assert [g.raw_text for g in gens] == [x["raw_text"] for x in body["results"]]


def test_describe_streams_ndjson_with_a_sam_list(server):
    sam = [mask_codecs.encode_sam(MASK_A), mask_codecs.encode_sam(MASK_B), mask_codecs.encode_sam(MASK_A)]
    payload = {"image": data_url(IMAGE), "regions": sam, "max_tokens": 3, "stream": True, "task": "What is <region>?"}
    with httpx.stream("POST", server.url + "/v1/regions/describe", json=payload, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert sorted(x["index"] for x in lines[:-1]) == [0, 1, 2]
    assert lines[-1]["done"] is True and lines[-1]["usage"]["total_tokens"] > 0


def test_same_image_is_encoded_once(server):
    before = httpx.get(server.url + "/metrics").text
    hits = _metric(before, 'osprey_image_cache_total{result="hit"}')
    for _ in range(2):
        assert describe(server).status_code == 200
    assert _metric(httpx.get(server.url + "/metrics").text, 'osprey_image_cache_total{result="hit"}') >= hits + 2


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# ---------------------------------------------------------------------------------------------- bad inputs


def huge_png_b64(width: int, height: int) -> str:
    raw = bytearray(base64.b64decode(png_b64(Image.new("RGB", (2, 2)))))
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return base64.b64encode(bytes(raw)).decode()


TRUNCATED = png_b64(IMAGE)[:200]
GOOD_REGION = [{"box": [8, 5, 22, 15]}]
NATIVE_BAD = [
    ({"image": "not*base64"}, 400, "image"),
    ({"image": TRUNCATED}, 400, "image"),
    ({"image": huge_png_b64(50000, 50000)}, 400, "image"),
    ({"image": base64.b64encode(b"just some bytes").decode()}, 400, "image"),
    ({"image": "http://127.0.0.1:9/x.png"}, 400, "image"),
    ({"regions": [{"rle": mask_codecs.encode_rle(np.zeros((10, 10), bool))}]}, 400, "regions[0].rle"),
    ({"regions": [{"png": mask_codecs.encode_png_base64(np.zeros((H + 1, W), bool))}]}, 400, "regions[0].png"),
    ({"regions": [{"rle": {"size": [H, W], "counts": "!!!"}}]}, 400, "regions[0].rle"),
    ({"regions": [{"polygon": [[1, 2, 3, 4, 5]]}]}, 400, "regions[0].polygon[0]"),
    ({"regions": [{"box": [1000, 0, 5, 5]}]}, 400, "regions[0].box"),  # wholly outside; partly outside is clipped
    ({"regions": [{"polygon": [[0, 0, 1e300, 0, 1e300, 1e300]]}]}, 400, "regions[0].polygon"),  # crashed pycocotools
    ({"regions": [{"box": [10**30, 0, 5, 5]}]}, 400, "regions[0].box"),
    ({"regions": [{"rle": {"size": [H, W], "counts": [10**30, 5]}}]}, 400, "regions[0].rle"),
    ({"regions": [{"rle": {"size": [10**6, 10**6], "counts": "0"}}], "resize_masks": True}, 400, "regions[0].rle"),
    ({"regions": [{"segmentation": "abc"}]}, 400, "regions[0].segmentation"),
    ({"regions": GOOD_REGION * 9}, 400, "regions"),
    ({"regions": []}, 400, "regions"),
    ({"regions": "everything"}, 400, "regions"),
    ({"regions": [42]}, 400, "regions[0]"),
    ({"max_tokens": "many"}, 400, "max_tokens"),
    ({"max_tokens": 33}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"temperature": -1}, 400, "temperature"),
    ({"seed": -(2**63) - 1}, 400, "seed"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"task": "tell me a story"}, 400, "task"),
    ({"colour": "red"}, 400, "colour"),
    ({"model": "gpt-4o"}, 404, "model"),
]


@pytest.mark.parametrize(("change", "status", "param"), NATIVE_BAD)
def test_bad_native_requests(server, change, status, param):
    r = describe(server, **change)
    assert_error(r, status, param)
    assert describe(server).status_code == 200  # still serving


def test_missing_fields_and_bad_json(server):
    r = httpx.post(server.url + "/v1/regions/describe", json={"regions": GOOD_REGION}, headers=AUTH)
    assert_error(r, 400, "image")
    r = httpx.post(server.url + "/v1/regions/describe", content=b'{"image": ', headers=AUTH | {"content-type": "application/json"})
    assert_error(r, 400, None)
    r = httpx.post(server.url + "/v1/regions/describe", json=[1, 2], headers=AUTH)
    assert r.status_code == 400 and "error" in r.json()
    for raw in (b"null", b'{"image": "\xff\xfe"}', b'{"image": "x", "regions": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                b'{"image": "%s", "max_tokens": 2, "regions": [{"polygon": [[0, 0, 1e999, 0, 5, 5]]}]}' % png_b64(IMAGE).encode()):
        r = httpx.post(server.url + "/v1/regions/describe", content=raw, headers=AUTH | {"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == "regions[0].polygon[0][2]"  # the schema refuses inf before any decoder
    assert describe(server).status_code == 200


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/regions/describe", json={}, headers=headers)
        assert_error(r, 401, None)
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert describe(server).status_code == 200


def test_oversized_body_is_refused_before_parsing(server):
    blob = b'{"image": "' + b"A" * (3 * 1024 * 1024) + b'"}'
    r = httpx.post(server.url + "/v1/regions/describe", content=blob, headers=AUTH | {"content-type": "application/json"})
    assert_error(r, 413, None)
    assert describe(server).status_code == 200


CHAT_BAD = [
    ({"messages": chat_messages("What is <region3>?")}, "messages"),
    ({"messages": chat_messages("What is <region1>?"), "extra_body": {"regions": GOOD_REGION * 9}}, "regions"),
    ({"messages": chat_messages("What is <region1>?"), "extra_body": {"regions": [{"box": [99, 99, 9, 9]}]}},
     "regions[0].box"),
    ({"messages": [{"role": "user", "content": "no image here"}]}, "messages"),
    ({"messages": chat_messages("<image> and <mask>")}, "messages[0].content"),
    ({"messages": chat_messages("hi") + [{"role": "assistant", "content": "hello"}]}, "messages[1].role"),
    ({"messages": chat_messages("x" * 20000)}, "messages"),
    ({"messages": chat_messages("a long question " * 400)}, "messages"),  # > the tiny model's 1024 positions
    ({"messages": chat_messages("What is <region1>?", data_url(Image.new("L", (W + 3, H))))}, None),
    ({"messages": chat_messages("hi"), "max_tokens": 1000}, "max_tokens"),
    ({"messages": chat_messages("hi"), "max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"messages": chat_messages("hi"), "n": 100}, "n"),
    ({"messages": chat_messages("hi"), "top_p": 0}, "top_p"),
    ({"messages": chat_messages("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]"),
    ({"messages": chat_messages("hi"), "temperature": "hot"}, "temperature"),
    ({"messages": chat_messages("<region1>" * 9), "extra_body": {"regions": GOOD_REGION}}, "messages"),
    ({"messages": chat_messages("hi"), "seed": 2**64}, "seed"),
    ({"messages": []}, "messages"),
]


@pytest.mark.parametrize(("kwargs", "param"), CHAT_BAD)
def test_bad_chat_requests(client, server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, max_tokens=kwargs.pop("max_tokens", 2), **kwargs)
    err = info.value.body
    assert set(err) >= {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    ok = client.chat.completions.create(model=NAME, messages=chat_messages("hi"), max_tokens=1)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_unknown_model_and_route(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=chat_messages("hi"), max_tokens=1)
    r = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert_error(r, 404, None)


def assert_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


# ---------------------------------------------------------------------------------------------- paper cuts (#20)


def test_empty_mask_is_a_400_naming_the_region(server):
    empty = mask_codecs.encode_rle(np.zeros((H, W), bool))
    r = describe(server, regions=[{"box": [8, 5, 22, 15]}, {"rle": empty}])
    assert_error(r, 400, "regions[1]")
    assert r.json()["error"]["code"] == "empty_mask" and "empty" in r.json()["error"]["message"]
    transparent = Image.new("RGBA", (W, H), (0, 0, 0, 0))  # an alpha-channel region with no pixel inside
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "messages": chat_messages("What is <region1>?", data_url(transparent)), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_mask"
    assert r.json()["error"]["param"] == "messages[0].content[1].image_url.url"


def test_bare_coco_rle_and_clipped_boxes_are_accepted(server):
    """pycocotools' own output `{"size", "counts"}` is a region; a box partly outside is clipped, with a note."""
    r = describe(server, regions=[mask_codecs.encode_rle(MASK_A), {"box": [40, 30, 100, 100]}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body["results"]] == [0, 1]
    assert len(body["notes"]) == 1 and body["notes"][0].startswith("regions[1].box:") and "clipped" in body["notes"][0]


def test_openapi_types_regions_and_lists_400(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/regions/describe", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses and "400" in responses
    regions = schema["components"]["schemas"]["DescribeRequest"]["properties"]["regions"]
    forms = {ref["$ref"].rsplit("/", 1)[-1] for ref in regions["items"]["oneOf"]}
    assert forms == {"RLERegion", "PolygonRegion", "BoxRegion", "PNGRegion", "BitmapRegion", "CocoRLE", "SAMRegion"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_a_run_folder_is_served_under_its_run_name(tmp_path):
    final = tmp_path / "pass3" / "final"
    final.mkdir(parents=True)
    assert ServeConfig(model=str(final)).model_name == "pass3/final"
    assert ServeConfig(model=str(tmp_path / "pass3")).model_name == "pass3"
    assert ServeConfig(model=str(final), served_model_name="mine").model_name == "mine"


def test_a_custom_task_may_name_its_region_twice(server):
    r = describe(server, task="Compare <region> with itself: is <region> round?")
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["prompt_tokens"] > describe(server, task="Is <region> round?").json()["results"][0][
        "prompt_tokens"]
