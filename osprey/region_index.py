"""A region index in PostgreSQL with pgvector: regions (image, mask as COCO RLE, box, embedding, label, caption) and
text -> region search by cosine distance over an HNSW index.

The database is any `postgresql://` URL, or a folder where an embedded PostgreSQL (the `pgserver` package, with
pgvector) keeps its data and is started on demand. Each named index is one table, `osprey_regions_<name>`, with a
`vector(dim)` column and an HNSW index (`vector_cosine_ops`); `osprey_indexes` records each index's space
(osprey.embedding.RegionTextEmbedder.space) and width, so vectors of another model are refused rather than compared.
Adding an image replaces its rows in one transaction: re-adding is idempotent, and a failed add leaves nothing.

psycopg, pgvector and pgserver are the `[index]` extra.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_DB_ENV = "OSPREY_INDEX_DB"
DEFAULT_DB_DIR = "osprey-index"  # the embedded database's folder when neither --db nor $OSPREY_INDEX_DB is given
DEFAULT_INDEX = "regions"
MAX_K = 1000  # pgvector's largest hnsw.ef_search: an HNSW scan returns at most that many rows
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_EXTRA = "pip install 'osprey-regions[index]'"


class IndexRequestError(ValueError):
    """A request the index cannot serve; `code` says which kind (the server maps it to a 4xx)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class UnknownIndex(IndexRequestError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no index named {name!r} in this database (`osprey index add` creates it)", "unknown_index")


class VectorMismatch(IndexRequestError):
    """Vectors of another width or space than the index holds: another model built it."""


@dataclass(frozen=True)
class RegionRow:
    """One region to store: its mask as COCO RLE (`counts` a str), box [x, y, w, h], and optional texts."""

    region: int  # its number within the image (0-based, in the masks' order)
    rle: dict[str, Any]
    box: list[float]
    label: str | None = None
    caption: str | None = None


@dataclass(frozen=True)
class SearchHit:
    image: str
    region: int
    rle: dict[str, Any]
    box: list[float]
    label: str | None
    caption: str | None
    score: float  # cosine similarity (1 - cosine distance)


@dataclass(frozen=True)
class IndexInfo:
    name: str
    space: str
    dim: int
    regions: int = 0
    images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_db(db: str | None) -> str:
    """`--db`, else $OSPREY_INDEX_DB, else the folder `osprey-index` in the working directory."""
    return db or os.environ.get(DEFAULT_DB_ENV) or DEFAULT_DB_DIR


def is_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def connect(db: str):
    """A psycopg connection (autocommit off) with pgvector registered: to a URL, or to the embedded PostgreSQL of a
    folder (started, and created on first use, by pgserver; as root it runs the server as the `pgserver` user)."""
    try:
        import psycopg
        from pgvector.psycopg import register_vector
    except ImportError as exc:
        raise ImportError(f"the region index needs psycopg and pgvector ({exc}): {_EXTRA}") from exc
    if is_url(db):
        url = db
    else:
        try:
            import pgserver
        except ImportError as exc:
            raise ImportError(f"an embedded database needs pgserver ({exc}): {_EXTRA}, or pass a postgresql:// URL")
        Path(db).mkdir(parents=True, exist_ok=True)
        url = pgserver.get_server(Path(db).resolve(), cleanup_mode="stop").get_uri()
    conn = psycopg.connect(url)
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.commit()
    register_vector(conn)
    return conn


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise IndexRequestError(f"index names are 1-40 lower-case letters, digits or _, starting with a letter; got "
                          f"{name!r}", "invalid_index_name")
    return name


class RegionIndex:
    """One named index in an open database; `open` finds it, `create` makes it (or finds it, if it fits)."""

    def __init__(self, conn, info: IndexInfo) -> None:
        self.conn = conn
        self.info = info
        self.table = f"osprey_regions_{info.name}"

    @staticmethod
    def _catalogue(conn) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS osprey_indexes (name text PRIMARY KEY, space text NOT NULL, "
                     "dim integer NOT NULL, created timestamptz NOT NULL DEFAULT now())")

    @classmethod
    def open(cls, conn, name: str = DEFAULT_INDEX) -> RegionIndex:
        check_name(name)
        cls._catalogue(conn)
        row = conn.execute("SELECT space, dim FROM osprey_indexes WHERE name = %s", (name,)).fetchone()
        conn.commit()
        if row is None:
            raise UnknownIndex(name)
        return cls(conn, IndexInfo(name, row[0], row[1]))

    @classmethod
    def create(cls, conn, space: str, dim: int, name: str = DEFAULT_INDEX) -> RegionIndex:
        """The index `name` for vectors of `space` (created with its table and HNSW index if new)."""
        check_name(name)
        with conn.transaction():
            cls._catalogue(conn)
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"osprey_index:{name}",))
            row = conn.execute("SELECT space, dim FROM osprey_indexes WHERE name = %s", (name,)).fetchone()
            if row is None:
                table = f"osprey_regions_{name}"
                conn.execute("INSERT INTO osprey_indexes (name, space, dim) VALUES (%s, %s, %s)", (name, space, dim))
                conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, image text NOT NULL, "
                             "region integer NOT NULL, rle jsonb NOT NULL, box double precision[] NOT NULL, "
                             f"label text, caption text, embedding vector({int(dim)}) NOT NULL, "
                             "UNIQUE (image, region))")
                conn.execute(f"CREATE INDEX {table}_hnsw ON {table} USING hnsw (embedding vector_cosine_ops)")
                row = (space, dim)
        index = cls(conn, IndexInfo(name, row[0], row[1]))
        index.check_vectors(dim, space)
        return index

    def check_vectors(self, dim: int, space: str | None = None) -> None:
        """Refuse vectors of another width (or, when given, another space) than this index holds."""
        if dim != self.info.dim:
            raise VectorMismatch(f"index {self.info.name!r} holds {self.info.dim}-d vectors of {self.info.space!r}; "
                                 f"got {dim}-d vectors (another model built it)", "wrong_vector_size")
        if space is not None and space != self.info.space:
            raise VectorMismatch(f"index {self.info.name!r} holds vectors of {self.info.space!r}, not {space!r} "
                                 "(another model built it)", "wrong_space")

    def add_image(self, image: str, regions: Sequence[RegionRow], vectors: np.ndarray) -> int:
        """Replace the rows of `image` by these regions in one transaction; returns the number stored."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(regions):
            raise ValueError(f"{len(regions)} regions but vectors of shape {vectors.shape}")
        self.check_vectors(vectors.shape[1])
        from psycopg.types.json import Jsonb

        with self.conn.transaction():
            self.conn.execute(f"DELETE FROM {self.table} WHERE image = %s", (image,))
            with self.conn.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO {self.table} (image, region, rle, box, label, caption, embedding) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [(image, r.region, Jsonb(r.rle), [float(v) for v in r.box], r.label, r.caption, vector)
                     for r, vector in zip(regions, vectors, strict=True)])
        return len(regions)

    def search(self, vector: np.ndarray, k: int = 10, exact: bool = False) -> list[SearchHit]:
        """The k regions nearest to `vector` by cosine distance: through the HNSW index (approximate, at most
        MAX_K), or `exact` by a full scan (evaluation)."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        self.check_vectors(len(vector))
        if not 1 <= k <= (1 << 31) - 1 or (not exact and k > MAX_K):
            raise IndexRequestError(f"k must be 1..{MAX_K}, got {k}", "invalid_k")
        with self.conn.transaction():
            if exact:
                self.conn.execute("SET LOCAL enable_indexscan = off")
            else:
                self.conn.execute(f"SET LOCAL hnsw.ef_search = {max(40, int(k))}")
            rows = self.conn.execute(
                f"SELECT image, region, rle, box, label, caption, 1 - (embedding <=> %s) FROM {self.table} "
                "ORDER BY embedding <=> %s LIMIT %s", (vector, vector, k)).fetchall()
        return [SearchHit(image, region, rle, list(box), label, caption, float(score))
                for image, region, rle, box, label, caption, score in rows]

    def stats(self) -> IndexInfo:
        row = self.conn.execute(f"SELECT count(*), count(DISTINCT image) FROM {self.table}").fetchone()
        self.conn.commit()
        return IndexInfo(self.info.name, self.info.space, self.info.dim, row[0], row[1])

    def uses_hnsw(self) -> bool:
        """Whether the table's vector column has its HNSW index (pg_indexes)."""
        row = self.conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexdef ILIKE %s",
                                (self.table, "%USING hnsw%")).fetchone()
        self.conn.commit()
        return row is not None


def add_regions(index: RegionIndex, embedder, image: str | Path, masks: np.ndarray,
                labels: Sequence[str | None] | None = None, captions: Sequence[str | None] | None = None) -> np.ndarray:
    """Embed the regions `masks (Q, H, W) bool` of one image file and store them under its resolved path
    (replacing what that path had); returns their vectors (Q, dim)."""
    from osprey.masks import encode_rle, mask_to_bbox

    index.check_vectors(embedder.dim, embedder.space)
    vectors = embedder.embed_regions(image, masks)
    labels = list(labels) if labels is not None else [None] * len(masks)
    captions = list(captions) if captions is not None else [None] * len(masks)
    rows = [RegionRow(q, encode_rle(mask), mask_to_bbox(mask), label, caption)
            for q, (mask, label, caption) in enumerate(zip(masks, labels, captions, strict=True))]
    index.add_image(str(Path(image).resolve()), rows, vectors)
    return vectors
