"""Embeddings in the metadata store and what is learnt from them: the embeddings themselves (by post, by model,
sampled), the models that made them (``models``: how to build each embedder again), the heads' class probabilities
written back over them, a model switch's stale posts, and the rows the hashtag model and the likability study fit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from deeptarget.store.connection import USABLE, StoreConnection
from deeptarget.store.databases import Row
from deeptarget.store.posts import POST_COLUMNS, StoredPost, stored_post

# Usable posts with a stored image that another model than the ``?`` one embedded (a model switch re-embeds them).
_STALE = f"{USABLE} AND blob IS NOT NULL AND (model_id IS NULL OR model_id != ?)"


@dataclass(frozen=True)
class EmbeddingRows:
    post_ids: list[str]
    vector_ids: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float32 (n, d)
    model_ids: list[str]


@dataclass(frozen=True)
class EngagementRows:
    post_ids: list[str]
    owner_ids: list[str]
    likes: np.ndarray  # float64 (n,)
    followers: np.ndarray  # float64 (n,)
    blobs: list[str | None]
    vectors: np.ndarray  # float32 (n, d)


class Embeddings:
    def __init__(self, conn: StoreConnection) -> None:
        self._conn = conn

    def embeddings(self, post_ids: list[str]) -> EmbeddingRows:
        """Embeddings of these posts (those that have one), in the order asked."""
        rows = self._conn.fetch_in(
            "SELECT post_id, vector_id, embedding, model_id FROM posts WHERE embedding IS NOT NULL AND post_id IN",
            post_ids,
        )
        by_id = {r["post_id"]: r for r in rows}
        return embedding_rows([by_id[p] for p in post_ids if p in by_id])

    def embeddings_of_model(self, model_id: str, batch: int = 4096) -> Iterator[EmbeddingRows]:
        """Every usable stored embedding made by ``model_id`` (what a head trained on that model can classify)."""
        return scan_embeddings(self._conn, f"{USABLE} AND model_id = ?", (model_id,), batch)

    def count_embeddings(self, model_id: str) -> int:
        row = self._conn.fetchone(f"SELECT COUNT(*) FROM posts WHERE {USABLE} AND model_id = ?", (model_id,))
        assert row is not None
        return int(row[0])

    def sample_embeddings(self, n: int, model_id: str, seed: int = 0) -> EmbeddingRows:
        """``n`` embeddings of this model drawn uniformly (ids first: the blobs of the rest are never read)."""
        ids = [
            r[0]
            for r in self._conn.fetchall(
                f"SELECT vector_id FROM posts WHERE {USABLE} AND model_id = ? AND embedding IS NOT NULL "
                "ORDER BY vector_id",
                (model_id,),
            )
        ]
        chosen = np.random.default_rng(seed).permutation(len(ids))[:n]
        rows = self._conn.fetch_in(
            "SELECT post_id, vector_id, embedding, model_id FROM posts WHERE vector_id IN", [ids[i] for i in chosen]
        )
        return embedding_rows(rows)

    def model_ids(self) -> dict[str, int]:
        """Usable embeddings per embedder model id, most first."""
        rows = self._conn.fetchall(
            f"SELECT model_id, COUNT(*) FROM posts WHERE {USABLE} AND embedding IS NOT NULL "
            "GROUP BY model_id ORDER BY 2 DESC"
        )
        return {r[0]: int(r[1]) for r in rows}

    def stale_posts(self, model_id: str, batch: int = 1000) -> Iterator[list[StoredPost]]:
        """Usable posts with an image whose embedding another model made: what a switch to ``model_id`` re-embeds."""
        for rows in self._conn.pages(POST_COLUMNS, _STALE, (model_id,), batch):
            yield [stored_post(r) for r in rows]

    def count_stale(self, model_id: str) -> int:
        row = self._conn.fetchone(f"SELECT COUNT(*) FROM posts WHERE {_STALE}", (model_id,))
        assert row is not None
        return int(row[0])

    def register_model(self, model_id: str, spec: dict[str, Any]) -> None:
        """Records how to build the embedder behind ``model_id`` (the latest registration wins: a moved file)."""
        with self._conn.transaction() as db:
            db.execute(
                "INSERT INTO models (model_id, spec, registered_at) VALUES (?, ?, ?) "
                "ON CONFLICT(model_id) DO UPDATE SET spec = excluded.spec, registered_at = excluded.registered_at",
                (model_id, json.dumps(spec), time.time()),
            )

    def model_spec(self, model_id: str) -> dict[str, Any] | None:
        row = self._conn.fetchone("SELECT spec FROM models WHERE model_id = ?", (model_id,))
        return json.loads(row[0]) if row else None

    def set_head_predictions(self, head: str, predictions: dict[str, dict[str, float]]) -> None:
        """Replace one head's class probabilities of these posts, keeping the other heads' and the embeddings."""
        key = self._conn.db.json_key(head)
        with self._conn.transaction() as db:
            db.executemany(
                f"UPDATE posts SET classes = {db.json_set('classes')}, updated_at = ? WHERE post_id = ?",
                [(key, json.dumps(classes), time.time(), post_id) for post_id, classes in predictions.items()],
            )

    def image_hashtags(self) -> tuple[np.ndarray, list[list[str]]]:
        """(vector ids, hashtags) of every usable post: the rows of the hashtag model's matrix."""
        rows = self._conn.fetchall(f"SELECT vector_id, hashtags FROM posts WHERE {USABLE} ORDER BY vector_id")
        ids = np.array([r["vector_id"] for r in rows], dtype=np.int64)
        return ids, [json.loads(r["hashtags"]) for r in rows]

    def engagement_rows(self, model_id: str) -> EngagementRows:
        """Usable posts of ``model_id`` whose likes and owner's followers (> 0) are known, with their embeddings."""
        rows = self._conn.fetchall(
            "SELECT post_id, owner_id, like_count, owner_followers, blob, embedding FROM posts "
            f"WHERE {USABLE} AND model_id = ? AND embedding IS NOT NULL AND like_count IS NOT NULL "
            "AND owner_followers > 0 ORDER BY vector_id",
            (model_id,),
        )
        return EngagementRows(
            post_ids=[r["post_id"] for r in rows],
            owner_ids=[r["owner_id"] for r in rows],
            likes=np.array([r["like_count"] for r in rows], np.float64),
            followers=np.array([r["owner_followers"] for r in rows], np.float64),
            blobs=[r["blob"] for r in rows],
            vectors=_vectors(rows),
        )


def scan_embeddings(conn: StoreConnection, where: str, params: tuple[Any, ...], batch: int) -> Iterator[EmbeddingRows]:
    """The embeddings of the posts ``where`` says, in pages of ``batch`` (``StoreConnection.pages``)."""
    columns = "post_id, vector_id, embedding, model_id"
    for rows in conn.pages(columns, f"embedding IS NOT NULL AND {where}", params, batch):
        yield embedding_rows(rows)


def embedding_rows(rows: list[Row]) -> EmbeddingRows:
    return EmbeddingRows(
        post_ids=[r["post_id"] for r in rows],
        vector_ids=np.array([r["vector_id"] for r in rows], dtype=np.int64),
        vectors=_vectors(rows),
        model_ids=[r["model_id"] for r in rows],
    )


def _vectors(rows: list[Row]) -> np.ndarray:
    """The rows' ``embedding`` blobs as one (n, d) float32 array; (0, 0) for no rows."""
    if not rows:
        return np.zeros((0, 0), np.float32)
    return np.stack([np.frombuffer(r["embedding"], dtype=np.float32) for r in rows])
