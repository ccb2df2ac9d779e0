"""The region index against a real PostgreSQL + pgvector (the session's embedded server, tests/conftest.py), the
`osprey index` commands, and `/v1/embeddings` + `/v1/regions/search` through the real server and the openai client."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest
from helpers import data_url

from osprey import BUILTIN_MODEL_DIR, EXAMPLE_DIR
from osprey import masks as mask_codecs
from osprey.embedding import RegionTextEmbedder
from osprey.preprocess import load_image
from osprey.region_index import (
    IndexRequestError,
    RegionIndex,
    RegionRow,
    UnknownIndex,
    VectorMismatch,
    add_regions,
    connect,
)
from serve.background import BackgroundServer
from serve.config import ServeConfig

psycopg = pytest.importorskip("psycopg", reason="the [index] extra is not installed: pip install -e '.[index]'")

H, W = 24, 32


def _rows(n: int) -> tuple[list[RegionRow], list[np.ndarray]]:
    masks = []
    for q in range(n):
        mask = np.zeros((H, W), bool)
        mask[2 + 5 * q : 6 + 5 * q, 3 + q : 20 + q] = True
        masks.append(mask)
    rows = [RegionRow(q, mask_codecs.encode_rle(m), mask_codecs.mask_to_bbox(m), f"label{q}") for q, m in enumerate(masks)]
    return rows, masks


@pytest.fixture
def conn(postgres_url):
    connection = connect(postgres_url)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def embedder():
    return RegionTextEmbedder.from_pretrained(BUILTIN_MODEL_DIR)


def test_add_then_search_round_trip(conn):
    index = RegionIndex.create(conn, "test:space", 8, "round_trip")
    rows, masks = _rows(3)
    vectors = np.eye(8, dtype=np.float32)[:3]
    assert index.add_image("/data/a.png", rows, vectors) == 3
    hits = index.search(vectors[1], k=2)
    assert hits[0].region == 1 and hits[0].score == pytest.approx(1.0)
    assert hits[0].image == "/data/a.png" and hits[0].label == "label1" and hits[0].box == rows[1].box
    assert np.array_equal(mask_codecs.decode_rle(hits[0].rle), masks[1])
    assert index.search(vectors[2], k=3, exact=True)[0].region == 2


def test_re_adding_an_image_replaces_its_rows(conn):
    index = RegionIndex.create(conn, "test:space", 8, "readd")
    rows, _ = _rows(3)
    vectors = np.eye(8, dtype=np.float32)[:3]
    index.add_image("/data/a.png", rows, vectors)
    index.add_image("/data/a.png", rows, vectors)
    index.add_image("/data/b.png", rows[:1], vectors[:1])
    assert (index.stats().regions, index.stats().images) == (4, 2)
    index.add_image("/data/a.png", rows[:2], vectors[:2])
    assert index.stats().regions == 3


def test_a_failed_add_leaves_the_image_as_it_was(conn):
    index = RegionIndex.create(conn, "test:space", 8, "atomic")
    rows, _ = _rows(2)
    index.add_image("/data/a.png", rows, np.eye(8, dtype=np.float32)[:2])
    broken = np.eye(8, dtype=np.float32)[:2]
    broken[1, 0] = np.nan  # pgvector refuses NaN: the insert fails after the delete, inside the transaction
    with pytest.raises(psycopg.Error):
        index.add_image("/data/a.png", rows, broken)
    assert index.stats().regions == 2


def test_the_vector_column_has_an_hnsw_index_that_search_uses(conn):
    index = RegionIndex.create(conn, "test:space", 8, "hnsw")
    rows, _ = _rows(3)
    index.add_image("/data/a.png", rows, np.eye(8, dtype=np.float32)[:3])
    assert index.uses_hnsw()
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")  # a 3-row table would be scanned otherwise
        plan = "\n".join(r[0] for r in conn.execute(
            f"EXPLAIN SELECT region FROM {index.table} ORDER BY embedding <=> %s LIMIT 2", (np.eye(8)[0],)))
    assert f"{index.table}_hnsw" in plan


def test_unknown_index_wrong_vectors_and_bad_names_are_refused(conn):
    with pytest.raises(UnknownIndex, match="no index named 'missing'"):
        RegionIndex.open(conn, "missing")
    index = RegionIndex.create(conn, "model-a:space", 8, "sized")
    with pytest.raises(VectorMismatch, match="holds 8-d vectors") as wrong_size:
        index.search(np.ones(16, np.float32))
    assert wrong_size.value.code == "wrong_vector_size"
    with pytest.raises(VectorMismatch, match="another model built it"):
        RegionIndex.create(conn, "model-b:space", 16, "sized")
    with pytest.raises(VectorMismatch, match="not 'model-b:space'"):
        RegionIndex.create(conn, "model-b:space", 8, "sized")
    with pytest.raises(IndexRequestError, match="index names"):
        RegionIndex.open(conn, "Robert'); DROP TABLE x;--")
    with pytest.raises(IndexRequestError, match="k must be"):
        index.search(np.ones(8, np.float32), k=0)


def test_osprey_index_add_and_search_commands(postgres_url, capsys):
    from osprey.cli import main

    args = ["--db", postgres_url, "--name", "cli"]
    image, masks = str(EXAMPLE_DIR / "image.png"), str(EXAMPLE_DIR / "sam_masks.json")
    assert main(["index", "add", image, "--masks", masks, *args]) == 0
    assert main(["index", "add", image, "--masks", masks, *args]) == 0  # idempotent
    assert "holds 6 regions of 1 images" in capsys.readouterr().out
    assert main(["index", "search", "circle", "-k", "3", "--json", *args]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[2]["score"]
    assert main(["index", "search", " ", *args]) == 2
    assert main(["index", "search", "circle", "--db", postgres_url, "--name", "nothing_here"]) == 2
    assert "no index named 'nothing_here'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(postgres_url):
    config = ServeConfig(model=str(BUILTIN_MODEL_DIR), served_model_name="builtin", index=postgres_url,
                         max_batch_size=2, request_timeout_s=60)
    with BackgroundServer(config) as srv:
        yield srv
        assert 'status="500"' not in httpx.get(srv.url + "/metrics").text


def test_embeddings_endpoint_through_the_openai_client(server, embedder):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    response = client.embeddings.create(model="builtin", input=["circle", "red square"])  # base64 on the wire
    vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert response.model == "builtin" and vectors.shape == (2, embedder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors, embedder.embed_texts(["circle", "red square"]), atol=1e-5)
    body = httpx.post(server.url + "/v1/embeddings", json={"input": "circle", "encoding_format": "float"}).json()
    assert body["space"] == embedder.space and body["dimensions"] == embedder.dim
    assert np.allclose(body["data"][0]["embedding"], vectors[0], atol=1e-5)


def test_region_items_embed_as_in_process(server, embedder):
    image = load_image(EXAMPLE_DIR / "image.png")
    box = [151, 66, 57, 59]
    r = httpx.post(server.url + "/v1/embeddings", json={
        "model": "builtin", "encoding_format": "float",
        "input": [{"image": data_url(image), "region": {"box": box}}]})
    assert r.status_code == 200, r.text
    expected = embedder.embed_regions(image, mask_codecs.decode_box(box, image.height, image.width)[None])
    assert np.allclose(r.json()["data"][0]["embedding"], expected[0], atol=1e-4)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": [1, 2, 3]}, 400, "input"),  # token ids: not accepted
    ({"input": []}, 400, "input"),
    ({"input": ["circle", {"image": "x", "region": {}}]}, 400, "input"),
    ({"input": [" "]}, 400, "input[0]"),
    ({"input": "circle", "model": "gpt-4"}, 404, "model"),
    ({"input": "circle", "dimensions": 3}, 400, "dimensions"),
    ({"input": [{"image": "bm90IGFuIGltYWdl", "region": {"box": [0, 0, 5, 5]}}]}, 400, "input[0].image"),
])
def test_bad_embedding_requests_are_4xx(server, body, status, param):
    r = httpx.post(server.url + "/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_region_search_endpoint(server, embedder, postgres_url):
    conn = connect(postgres_url)
    index = RegionIndex.create(conn, embedder.space, embedder.dim, "served")
    image = load_image(EXAMPLE_DIR / "image.png")
    masks = np.stack([mask_codecs.decode_sam(e, image.height, image.width)
                      for e in json.loads((EXAMPLE_DIR / "sam_masks.json").read_text())])
    add_regions(index, embedder, EXAMPLE_DIR / "image.png", masks)
    RegionIndex.create(conn, "another:model", 8, "other_model")
    conn.close()
    r = httpx.post(server.url + "/v1/regions/search", json={"query": "circle", "k": 3, "index": "served"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and results[0]["score"] >= results[-1]["score"]
    assert np.array_equal(mask_codecs.decode_rle(results[0]["rle"]), masks[results[0]["region"]])
    for body, status, code in [({"query": "circle", "index": "nope"}, 404, "unknown_index"),
                               ({"query": "circle", "index": "other_model"}, 400, "wrong_vector_size"),
                               ({"query": "  ", "index": "served"}, 400, "invalid_query")]:
        r = httpx.post(server.url + "/v1/regions/search", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_a_model_without_a_text_tower_is_a_400(tiny_model_dir):
    with BackgroundServer(ServeConfig(model=str(tiny_model_dir), served_model_name="tiny")) as srv:
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "circle"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "no_text_tower")
        r = httpx.post(srv.url + "/v1/regions/search", json={"query": "circle"})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "no_index")
