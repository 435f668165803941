"""The index writer's journal in the metadata store: which posts it added (``indexed``, with its own increasing
sequence numbers in ``indexed_seq``) and which deleted posts it removed, so that a restarted writer replays what its
newest snapshot lacks, and a running one catches up on posts stored but never sent to it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from deeptarget.core.records import PostStatus
from deeptarget.store.connection import StoreConnection
from deeptarget.store.embeddings import EmbeddingRows, scan_embeddings


class IndexJournal:
    def __init__(self, conn: StoreConnection) -> None:
        self._conn = conn

    def mark_indexed(self, post_ids: list[str], first_seq: int) -> None:
        """Record that the index writer added these posts, with its own increasing sequence numbers."""
        with self._conn.transaction() as db:
            db.executemany(
                "UPDATE posts SET status = ?, indexed_seq = ? WHERE post_id = ? AND embedding IS NOT NULL",
                [(PostStatus.INDEXED, first_seq + i, pid) for i, pid in enumerate(post_ids)],
            )

    def mark_removed(self, post_ids: list[str], first_seq: int) -> None:
        """The index writer removed these deleted posts at these sequence numbers (replayed after a crash)."""
        with self._conn.transaction() as db:
            db.executemany(
                "UPDATE posts SET indexed_seq = ? WHERE post_id = ? AND status = ?",
                [(first_seq + i, pid, PostStatus.DELETED) for i, pid in enumerate(post_ids)],
            )

    def max_indexed_seq(self) -> int:
        row = self._conn.fetchone("SELECT MAX(indexed_seq) FROM posts")
        assert row is not None
        return int(row[0] or 0)

    def embeddings_to_index(self, after_seq: int, batch: int = 4096) -> Iterator[EmbeddingRows]:
        """What a restarted index writer must replay: never indexed, or indexed after its snapshot."""
        return scan_embeddings(
            self._conn,
            "(status = ? OR (status = ? AND indexed_seq > ?))",
            (PostStatus.EMBEDDED, PostStatus.INDEXED, after_seq),
            batch,
        )

    def embeddings_not_indexed(
        self, stored_before: float, model_id: str | None = None, batch: int = 4096
    ) -> Iterator[EmbeddingRows]:
        """Embedded posts stored before ``stored_before`` (a time) that no index task has brought to the writer yet
        (of ``model_id`` when given): what the writer catches up on while it runs (issue 13, item 3). Cheap: the
        status index holds only the posts in flight."""
        where: str = "status = ? AND updated_at < ?"
        params: tuple[PostStatus | float | str, ...] = (PostStatus.EMBEDDED, stored_before)
        if model_id is not None:
            where, params = f"{where} AND model_id = ?", (*params, model_id)
        return scan_embeddings(self._conn, where, params, batch)

    def removals_after(self, seq: int) -> np.ndarray:
        """Vector ids of deleted posts the writer removed after ``seq``, or has not removed yet."""
        rows = self._conn.fetchall(
            "SELECT vector_id FROM posts WHERE status = ? AND (indexed_seq IS NULL OR indexed_seq > ?)",
            (PostStatus.DELETED, seq),
        )
        return np.array([r[0] for r in rows], dtype=np.int64)

    def deletions_not_removed(self, deleted_before: float, limit: int = 10_000) -> list[str]:
        """Posts deleted before ``deleted_before`` that the index writer has not removed yet (their remove task was
        never sent, or lost)."""
        rows = self._conn.fetchall(
            "SELECT post_id FROM posts WHERE status = ? AND indexed_seq IS NULL AND updated_at < ? "
            "ORDER BY vector_id LIMIT ?",
            (PostStatus.DELETED, deleted_before, limit),
        )
        return [r[0] for r in rows]

    def index_backlog(self) -> tuple[int, float | None]:
        """(embedded posts not indexed yet, when the oldest of them was stored): the index writer's lag."""
        row = self._conn.fetchone(
            "SELECT COUNT(*), MIN(updated_at) FROM posts WHERE status = ?", (PostStatus.EMBEDDED,)
        )
        assert row is not None
        return int(row[0]), None if row[1] is None else float(row[1])
