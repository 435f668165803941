"""What the metadata store says about the system as a whole, for reports, the demo and the CLI: posts by status,
rejections by reason, posts per hashtag, follower counts, and the per-post numbers a report sums up."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from deeptarget.core.records import PostStatus
from deeptarget.store.connection import USABLE, StoreConnection
from deeptarget.store.databases import Row


class Reports:
    def __init__(self, conn: StoreConnection) -> None:
        self._conn = conn

    def status_counts(self) -> dict[str, int]:
        """Posts per status (``PostStatus`` values, as plain strings); statuses no post has are left out."""
        rows = self._conn.fetchall("SELECT status, COUNT(*) FROM posts GROUP BY status")
        return {r[0]: int(r[1]) for r in rows}

    def rejection_reasons(self) -> dict[str, int]:
        rows = self._conn.fetchall(
            "SELECT reason, COUNT(*) FROM posts WHERE status = ? GROUP BY reason ORDER BY 2 DESC",
            (PostStatus.REJECTED,),
        )
        return {r[0]: int(r[1]) for r in rows}

    def rejected_examples(self, per_reason: int = 4) -> dict[str, list[str]]:
        """A few of the latest rejected posts of each reason whose image the store holds (what the UI shows)."""
        examples: dict[str, list[str]] = {}
        for reason in self.rejection_reasons():
            rows = self._conn.fetchall(
                "SELECT post_id FROM posts WHERE status = ? AND reason = ? AND blob IS NOT NULL "
                "ORDER BY updated_at DESC, post_id LIMIT ?",
                (PostStatus.REJECTED, reason, per_reason),
            )
            examples[reason] = [r[0] for r in rows]
        return examples

    def status_activity(self, *since: float) -> dict[str, tuple[int, ...]]:
        """Posts per status, then how many of them reached it (or were written again) at or after each of ``since``
        (times, time.time()): what each stage got through lately. One pass over the table."""
        windows = "".join(", SUM(CASE WHEN updated_at >= ? THEN 1 ELSE 0 END)" for _ in since)
        rows = self._conn.fetchall(f"SELECT status, COUNT(*){windows} FROM posts GROUP BY status", since)
        return {r[0]: tuple(int(r[i] or 0) for i in range(1, len(since) + 2)) for r in rows}

    def hashtag_counts(self, limit: int = 30) -> dict[str, int]:
        """Posts per hashtag, most first (every stored post, whatever its status, but deleted ones)."""
        rows = self._conn.fetchall(
            f"SELECT tag.value, COUNT(*) FROM posts, {self._conn.db.json_elements('posts.hashtags', 'tag')} "
            "WHERE posts.status != ? GROUP BY tag.value ORDER BY 2 DESC, 1 LIMIT ?",
            (PostStatus.DELETED, limit),
        )
        return {r[0]: int(r[1]) for r in rows}

    def follower_counts(self) -> np.ndarray:
        """The latest known follower count of every account (one per owner)."""
        rows = self._conn.fetchall(
            "SELECT MAX(owner_followers) FROM posts WHERE owner_followers IS NOT NULL GROUP BY owner_id"
        )
        return np.array([r[0] for r in rows], dtype=np.float64)

    def usable_summaries(self, batch: int = 10_000) -> Iterator[list[Row]]:
        """(faces, classes, like_count, owner_followers) of every usable post, in batches: what a report counts."""
        return self._conn.pages("faces, classes, like_count, owner_followers", USABLE, (), batch)
