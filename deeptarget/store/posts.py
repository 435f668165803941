"""Posts in the metadata store: their fields (upserts and owner merges), what the infer stage made of them
(``record_results``), deletions that stick, and reads of whole posts. Every write is an upsert keyed by post id, so a
post that is processed twice (at-least-once delivery) is overwritten, never duplicated.

Post status (``PostStatus``): ``queued`` (known, not processed) -> ``embedded`` (embedding stored) -> ``indexed`` (in
the FAISS writer's index: journal.py), or ``rejected`` with a reason at any point, or ``deleted`` for good.

Who may overwrite a post (issue 12, M4). Pushed and crawled posts share one id space, so a partner's id names the post
everywhere (``GET /similar?post_id=``, ``DELETE /posts/{id}``) and a post pushed and crawled is stored, fetched and
indexed once. The source column says who wrote a row, and decides:

- a crawl (any source but ``records.PUSHED_SOURCES``) is the truth about its own posts: it rewrites what a crawl
  stored before (owners learnt later), and a crawl that brings a post with its image replaces a pushed row whole;
- a pushed record never rewrites a stored post: not a crawled one (``known_from_a_crawl``), nor one pushed before
  (``pushed_before``: the first record of an id wins, as the scraper fetches an id once). The same record again (a
  retried task, a re-embedding: the same image) is no rewrite and goes through;
- a crawl's fields without its image (an owner merge) leave a pushed row alone (``pushed_first``), so a row never
  mixes a crawl's fields with a pushed image;
- an owner merge (``upsert_posts``) comes from the row's own source: a merge from another crawl is refused whole
  (``crawled_by_another_source``: an instaloader folder never rewrites a Graph post, nor fills its unknown owner),
  and it fills an unknown owner or refreshes the same owner's username and followers, never names another owner
  (``owner_differs``). Graph hashtag edges give no owner and the account crawl, the same source, fills it in. A
  fill from another source is refused too: the row would not say who named its owner, and the row's own source,
  naming the real one later, would then be refused as ``owner_differs``. A merge may come before the post's own
  crawl is stored (it waits on the infer queue): the row it makes is replaced whole by that crawl if it came from
  another source.

Refused writes change nothing and come back with their reason (``Recorded.refused``, ``upsert_posts``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from deeptarget.core.records import PUSHED_SOURCES, InferResult, Owner, Post, PostStatus, vector_id
from deeptarget.store.connection import StoreConnection
from deeptarget.store.databases import Database, Row

POST_COLUMNS = (
    "post_id, vector_id, source, media_url, permalink, caption, hashtags, like_count, comments_count, timestamp, "
    "owner_id, owner_username, owner_followers, blob, status, reason, faces, face_boxes, classes"
)
"""What StoredPost needs: everything but the embedding, a 5 KB blob that queries would only read to throw away."""

_PUSHED = "({})".format(", ".join(f"'{source}'" for source in sorted(PUSHED_SOURCES)))

REFUSALS = {
    "known_from_a_crawl": "a crawl stored this post: a pushed record never rewrites it",
    "pushed_before": "this id was pushed before: the first record of an id wins",
    "pushed_first": "a push stored this id first: a crawl's fields without its image do not replace it",
    "seen_before": "the scraper met this id before: a pushed record never rewrites a known post",
    "crawled_by_another_source": "another crawl stored this post: only its own source updates it",
    "owner_differs": "this post has another owner: an owner merge never replaces a known owner",
}
"""Why a write was refused (``Recorded.refused``, ``upsert_posts``): code -> what it means."""

# Owner fields only ever get better: a later observation without an owner keeps what an earlier one knew. A pushed
# record never rewrites a row, nor does anything rewrite a pushed row's fields (a crawl with its image resets the row
# first: ``_RESET_PUSHED``).
_UPSERT_POST = f"""
INSERT INTO posts (post_id, vector_id, source, media_url, permalink, caption, hashtags, like_count, comments_count,
                   timestamp, owner_id, owner_username, owner_followers, updated_at)
VALUES (:post_id, :vector_id, :source, :media_url, :permalink, :caption, :hashtags, :like_count, :comments_count,
        :timestamp, :owner_id, :owner_username, :owner_followers, :now)
ON CONFLICT(post_id) DO UPDATE SET
    media_url = COALESCE(excluded.media_url, posts.media_url),
    permalink = COALESCE(excluded.permalink, posts.permalink),
    caption = COALESCE(excluded.caption, posts.caption),
    hashtags = CASE WHEN excluded.hashtags != '[]' THEN excluded.hashtags ELSE posts.hashtags END,
    like_count = COALESCE(excluded.like_count, posts.like_count),
    comments_count = COALESCE(excluded.comments_count, posts.comments_count),
    timestamp = COALESCE(excluded.timestamp, posts.timestamp),
    owner_id = COALESCE(excluded.owner_id, posts.owner_id),
    owner_username = COALESCE(excluded.owner_username, posts.owner_username),
    owner_followers = COALESCE(excluded.owner_followers, posts.owner_followers),
    updated_at = excluded.updated_at
WHERE excluded.source NOT IN {_PUSHED} AND posts.source NOT IN {_PUSHED}
"""

# A crawl brought a pushed post with its own image: the pushed fields go, the crawl's come in (the upsert after this).
_RESET_PUSHED = """UPDATE posts SET source = :source, media_url = NULL, permalink = NULL, caption = NULL,
    hashtags = '[]', like_count = NULL, comments_count = NULL, timestamp = NULL, owner_id = NULL,
    owner_username = NULL, owner_followers = NULL WHERE post_id = :post_id"""

# What the infer stage found, on the row (a deleted row stays deleted: a late result never resurrects it).
_WRITE_OUTCOME = """UPDATE posts SET blob = :blob, status = :status, reason = :reason, faces = :faces,
    face_confidence = :conf, face_boxes = :boxes, classes = :classes, model_id = :model_id,
    embedding = :embedding, indexed_seq = NULL, updated_at = :now
    WHERE post_id = :post_id AND status != :deleted"""


@dataclass(frozen=True)
class StoredPost:
    """A post row as the query side needs it."""

    post: Post
    vector_id: int
    status: PostStatus
    reason: str | None
    faces: int | None
    classes: dict[str, dict[str, float]]
    blob: str | None
    face_boxes: tuple[tuple[int, int, int, int], ...] = ()  # x, y, width, height in the stored image's pixels


@dataclass(frozen=True)
class Recorded:
    """What ``record_results`` did."""

    owners: set[str]  # owners of the posts stored (as the store knows them, which may be more than the posts said)
    refused: dict[str, str]  # post id -> why nothing of it was written (a code of ``REFUSALS``)


class Posts:
    def __init__(self, conn: StoreConnection) -> None:
        self._conn = conn

    def upsert_posts(self, posts: Iterable[Post]) -> dict[str, str]:
        """Posts' fields (no image), an owner merge's: new ones inserted, known ones updated where the rules above
        allow. Returns the refused posts: id -> a code of ``REFUSALS``."""
        posts = list(posts)
        with self._conn.transaction() as db:  # the rows read and written under the one write lock: no other writer
            stored = self._stored_sources([p.id for p in posts])
            refused = {
                p.id: why
                for p in posts
                if (why := _refusal(stored.get(p.id), p) or _merge_refusal(stored.get(p.id), p)) is not None
            }
            db.executemany(_UPSERT_POST, [_post_params(p) for p in posts if p.id not in refused])
        return refused

    def record_results(self, results: Iterable[InferResult]) -> Recorded:
        """Store what the infer task found, atomically, but for the posts the rules above refuse (nothing of them is
        written)."""
        results = [InferResult(*r) for r in results]  # a plain (post, blob, prediction, embedding) tuple too
        now = time.time()
        with self._conn.transaction() as db:  # the rows read and written under the one write lock: no other writer
            stored = self._stored_sources([r.post.id for r in results])
            refused: dict[str, str] = {}
            for r in results:
                if (why := _refusal(stored.get(r.post.id), r.post, r.blob, with_image=True)) is not None:
                    refused[r.post.id] = why
            results = [r for r in results if r.post.id not in refused]
            replaced = [
                {"post_id": r.post.id, "source": r.post.source}
                for r in results
                if not r.post.pushed and (row := stored.get(r.post.id)) is not None and _replaced_by_crawl(row, r.post)
            ]
            db.executemany(_RESET_PUSHED, replaced)
            _write_results(db, results, now)
        # The pushed owner of a replaced row loses the post: their profile is rebuilt too.
        former = {owner for r in replaced if (owner := stored[r["post_id"]]["owner_id"])}
        return Recorded(owners=self.owners_of([r.post.id for r in results]) | former, refused=refused)

    def _stored_sources(self, post_ids: list[str]) -> dict[str, Row]:
        """(source, blob, status, owner_id) of the posts stored already, by id."""
        rows = self._conn.fetch_in(
            "SELECT post_id, source, blob, status, owner_id FROM posts WHERE post_id IN", post_ids
        )
        return {r["post_id"]: r for r in rows}

    def owners_of(self, post_ids: list[str]) -> set[str]:
        rows = self._conn.fetch_in(
            "SELECT DISTINCT owner_id FROM posts WHERE owner_id IS NOT NULL AND post_id IN", post_ids
        )
        return {r[0] for r in rows}

    def delete_posts(self, post_ids: list[str]) -> tuple[list[str], set[str]]:
        """Forget posts' embeddings and predictions for good (a deleted post is never resurrected by a late infer
        result); returns (the ids that existed, their owners). The index writer removes them (``mark_removed``)."""
        rows = self._conn.fetch_in("SELECT post_id, owner_id FROM posts WHERE post_id IN", post_ids)
        with self._conn.transaction() as db:
            db.executemany(
                """UPDATE posts SET status = ?, reason = 'deleted', embedding = NULL, classes = NULL,
                   face_boxes = NULL, indexed_seq = NULL, updated_at = ? WHERE post_id = ?""",
                [(PostStatus.DELETED, time.time(), r["post_id"]) for r in rows],
            )
        return [r["post_id"] for r in rows], {r["owner_id"] for r in rows if r["owner_id"]}

    def post(self, post_id: str) -> StoredPost | None:
        row = self._conn.fetchone(f"SELECT {POST_COLUMNS} FROM posts WHERE post_id = ?", (post_id,))
        return None if row is None else stored_post(row)

    def posts_by_vector_ids(self, vector_ids: Iterable[int]) -> dict[int, StoredPost]:
        rows = self._conn.fetch_in(f"SELECT {POST_COLUMNS} FROM posts WHERE vector_id IN", [int(v) for v in vector_ids])
        return {int(r["vector_id"]): stored_post(r) for r in rows}

    def user_posts(self, user_id: str) -> list[StoredPost]:
        rows = self._conn.fetchall(f"SELECT {POST_COLUMNS} FROM posts WHERE owner_id = ? ORDER BY post_id", (user_id,))
        return [stored_post(r) for r in rows]

    def recent_user_posts(self, user_id: str, limit: int) -> list[StoredPost]:
        """A user's latest ``limit`` posts that have a stored image and are not deleted (undated ones last)."""
        rows = self._conn.fetchall(
            f"SELECT {POST_COLUMNS} FROM posts WHERE owner_id = ? AND blob IS NOT NULL AND status != ? "
            "ORDER BY timestamp IS NULL, timestamp DESC, post_id LIMIT ?",
            (user_id, PostStatus.DELETED, limit),
        )
        return [stored_post(r) for r in rows]

    def user_id_for_username(self, username: str) -> str | None:
        row = self._conn.fetchone("SELECT owner_id FROM posts WHERE owner_username = ? LIMIT 1", (username,))
        return None if row is None else str(row[0])


def _write_results(db: Database, results: list[InferResult], now: float) -> None:
    outcomes = [
        {
            "post_id": r.post.id,
            "blob": r.blob,
            "status": r.prediction.status,
            "reason": r.prediction.reason,
            "faces": r.prediction.faces,
            "conf": r.prediction.face_confidence,
            "boxes": json.dumps(r.prediction.face_boxes),
            "classes": json.dumps(r.prediction.classes),
            "model_id": r.prediction.model_id,
            "embedding": None if r.embedding is None else np.asarray(r.embedding, np.float32).tobytes(),
            "now": now,
            "deleted": PostStatus.DELETED,
        }
        for r in results
    ]
    # two statements for the batch, not two per post (one round trip each)
    db.executemany(_UPSERT_POST, [_post_params(r.post) for r in results])
    db.executemany(_WRITE_OUTCOME, outcomes)


def _refusal(stored: Row | None, post: Post, blob: str | None = None, with_image: bool = False) -> str | None:
    """Why this write may not touch the stored row (a code of ``REFUSALS``), or None (the module's docstring)."""
    if stored is None:
        return None
    stored_pushed = stored["source"] in PUSHED_SOURCES
    if not post.pushed:
        return "pushed_first" if stored_pushed and not with_image else None
    if not stored_pushed:
        return "known_from_a_crawl"
    # The same pushed post again (a retried task, a re-embedding) brings the same image; another image is a new record.
    return None if with_image and stored["blob"] == blob else "pushed_before"


def _replaced_by_crawl(row: Row, post: Post) -> bool:
    """Whether this crawl, with its image, replaces the stored row whole: a pushed row, or the row an owner merge of
    another source made before the post's own crawl stored it (``queued``: only a merge writes that). The scraper
    sends a merge for a post it met before, which may still wait on the infer queue: the crawl that met it first is
    its source, not the merge that reached the store first."""
    if row["status"] == PostStatus.DELETED:  # deletions stick
        return False
    return row["source"] in PUSHED_SOURCES or (row["source"] != post.source and row["status"] == PostStatus.QUEUED)


def _merge_refusal(stored: Row | None, post: Post) -> str | None:
    """Why a crawl's fields without its image (an owner merge) may not touch the stored crawled row, or None: only
    the row's own source updates it, and never to another owner (the module's docstring)."""
    if stored is None or post.pushed or stored["source"] in PUSHED_SOURCES:
        return None  # a new row, or ``_refusal``'s rules
    if stored["source"] != post.source:
        return "crawled_by_another_source"
    if post.owner is not None and stored["owner_id"] is not None and stored["owner_id"] != post.owner.id:
        return "owner_differs"
    return None


def _post_params(post: Post) -> dict[str, Any]:
    owner = post.owner
    return {
        "post_id": post.id,
        "vector_id": vector_id(post.id),
        "source": post.source,
        "media_url": post.media_url,
        "permalink": post.permalink,
        "caption": post.caption,
        "hashtags": json.dumps(post.hashtags),
        "like_count": post.like_count,
        "comments_count": post.comments_count,
        "timestamp": post.timestamp.isoformat() if post.timestamp else None,
        "owner_id": owner.id if owner else None,
        "owner_username": owner.username if owner else None,
        "owner_followers": owner.followers_count if owner else None,
        "now": time.time(),
    }


def stored_post(row: Row) -> StoredPost:
    """A row of ``POST_COLUMNS`` as a StoredPost."""
    owner = None
    if row["owner_id"] is not None:
        owner = Owner(id=row["owner_id"], username=row["owner_username"], followers_count=row["owner_followers"])
    post = Post(
        id=row["post_id"],
        source=row["source"],
        media_url=row["media_url"],
        permalink=row["permalink"],
        caption=row["caption"],
        hashtags=json.loads(row["hashtags"]),
        like_count=row["like_count"],
        comments_count=row["comments_count"],
        timestamp=datetime.fromisoformat(row["timestamp"]) if row["timestamp"] else None,
        owner=owner,
    )
    return StoredPost(
        post=post,
        vector_id=int(row["vector_id"]),
        status=PostStatus(row["status"]),
        reason=row["reason"],
        faces=row["faces"],
        classes=json.loads(row["classes"]) if row["classes"] else {},
        blob=row["blob"],
        face_boxes=_boxes(row["face_boxes"]),
    )


def _boxes(raw: str | None) -> tuple[tuple[int, int, int, int], ...]:
    """The stored face boxes; a row written before boxes were kept (or a malformed one) has none."""
    try:
        boxes = json.loads(raw) if raw else []
        return tuple((int(x), int(y), int(w), int(h)) for x, y, w, h in boxes)
    except (ValueError, TypeError):
        return ()
