"""Metadata store: posts, their predictions and embeddings, rejections, user profiles. SQLite by default (several
processes on one host share the file: WAL mode, busy timeout); PostgreSQL when several hosts share it
(``database_url = "postgresql://..."``; databases.py holds what differs). Every write is an upsert keyed by post id,
so a post that is processed twice (at-least-once delivery) is overwritten, never duplicated.

Post status: ``queued`` (known, not processed) -> ``embedded`` (embedding stored) -> ``indexed`` (in the FAISS
writer's index), or ``rejected`` with a reason at any point.

Who may overwrite a post (issue 12, M4). Pushed and crawled posts share one id space, so a partner's id names the post
everywhere (``GET /similar?post_id=``, ``DELETE /posts/{id}``) and a post pushed and crawled is stored, fetched and
indexed once. The source column says who wrote a row, and decides:

- a crawl (any source but ``schema.PUSHED_SOURCES``) is the truth about its own posts: it rewrites what a crawl
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
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from deeptarget.core.records import PUSHED_SOURCES, Owner, Post, Prediction, Profile, vector_id
from deeptarget.core.settings import without_password
from deeptarget.store.databases import Database, Row, open_database

USABLE_STATUSES = ("embedded", "indexed")
"""Posts with an embedding that queries, the hashtag model and profiles count."""
_USABLE = "status IN ({})".format(", ".join(f"'{status}'" for status in USABLE_STATUSES))

# Usable posts with a stored image that another model than the ``?`` one embedded (a model switch re-embeds them).
_STALE = f"{_USABLE} AND blob IS NOT NULL AND (model_id IS NULL OR model_id != ?)"

# What StoredPost needs: everything but the embedding, a 5 KB blob that queries would only read to throw away.
_POST_COLUMNS = (
    "post_id, vector_id, source, media_url, permalink, caption, hashtags, like_count, comments_count, timestamp, "
    "owner_id, owner_username, owner_followers, blob, status, reason, faces, classes"
)

# Column types come from the database (databases.py): INTEGER/REAL/BLOB in SQLite, BIGINT/DOUBLE PRECISION/BYTEA in
# PostgreSQL (whose INTEGER is 32 bits and REAL 4 bytes: too small for vector ids and times).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS posts (
    post_id TEXT PRIMARY KEY,
    vector_id {int} NOT NULL UNIQUE,
    source TEXT NOT NULL,
    media_url TEXT, permalink TEXT, caption TEXT,
    hashtags TEXT NOT NULL DEFAULT '[]',
    like_count {int}, comments_count {int}, timestamp TEXT,
    owner_id TEXT, owner_username TEXT, owner_followers {int},
    blob TEXT,
    status TEXT NOT NULL DEFAULT 'queued',
    reason TEXT,
    faces {int}, face_confidence {real}, face_boxes TEXT,
    classes TEXT,
    model_id TEXT,
    embedding {blob},
    indexed_seq {int},
    updated_at {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS posts_owner ON posts(owner_id);
CREATE INDEX IF NOT EXISTS posts_status ON posts(status);
CREATE INDEX IF NOT EXISTS posts_indexed_seq ON posts(indexed_seq);
CREATE TABLE IF NOT EXISTS profiles (
    user_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    updated_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value {int} NOT NULL);
CREATE TABLE IF NOT EXISTS interests (
    interest TEXT NOT NULL,  -- 'class:<head>:<label>' or 'hashtag:<tag>'
    user_id TEXT NOT NULL,
    score {real} NOT NULL,   -- the profile's weight share for it
    PRIMARY KEY (interest, user_id)
){without_rowid};
CREATE INDEX IF NOT EXISTS interests_ranked ON interests(interest, score DESC);
CREATE INDEX IF NOT EXISTS interests_user ON interests(user_id);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,      -- JSON: what builds the embedder again (models.embedder.EmbedderSpec)
    registered_at {real} NOT NULL
);
"""

# What a copy of the store (store_copy.py) moves row by row, with each table's key; profiles go through
# ``save_profile``, which rebuilds their interests.
_COPIED_AS_ROWS = {"posts": "post_id", "counters": "name", "models": "model_id"}

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


@dataclass(frozen=True)
class StoredPost:
    """A post row as the query side needs it."""

    post: Post
    vector_id: int
    status: str
    reason: str | None
    faces: int | None
    classes: dict[str, dict[str, float]]
    blob: str | None


@dataclass(frozen=True)
class Recorded:
    """What ``record_results`` did."""

    owners: set[str]  # owners of the posts stored (as the store knows them, which may be more than the posts said)
    refused: dict[str, str]  # post id -> why nothing of it was written (a code of ``REFUSALS``)


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


@dataclass(frozen=True)
class Audience:
    user_id: str
    score: float
    profile: Profile


def profile_interests(profile: Profile) -> list[tuple[str, float]]:
    """A profile's interests as (key, share): ``class:<head>:<label>`` and ``hashtag:<tag>``."""
    keys = [
        (f"class:{head}:{label}", share) for head, labels in profile.classes.items() for label, share in labels.items()
    ]
    return keys + [(f"hashtag:{tag}", share) for tag, share in profile.hashtags.items()]


class MetadataStore:
    def __init__(self, location: str | Path) -> None:
        """``location``: a SQLite file's path, or a ``postgresql://`` URL (``Settings.metadata_database``)."""
        self.location = location
        self._lock = threading.RLock()
        self._db = open_database(location)
        with self._lock:
            self._db.create_schema(_SCHEMA.format(**self._db.types))
            self._backfill_interests()

    def __repr__(self) -> str:  # the location may be a URL with a password
        return f"MetadataStore({without_password(str(self.location))!r})"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- transactions ---------------------------------------------------------------------------------------------
    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    # -- writes ---------------------------------------------------------------------------------------------------
    def upsert_posts(self, posts: Iterable[Post]) -> dict[str, str]:
        """Posts' fields (no image), an owner merge's: new ones inserted, known ones updated where the rules above
        allow. Returns the refused posts: id -> a code of ``REFUSALS``."""
        posts = list(posts)
        with self._transaction() as db:  # the rows read and written under the one write lock: no other writer between
            stored = self._stored_sources([p.id for p in posts])
            refused = {
                p.id: why
                for p in posts
                if (why := _refusal(stored.get(p.id), p) or _merge_refusal(stored.get(p.id), p)) is not None
            }
            db.executemany(_UPSERT_POST, [_post_params(p) for p in posts if p.id not in refused])
        return refused

    def record_results(
        self,
        results: Iterable[tuple[Post, str | None, Prediction, np.ndarray | None]],
    ) -> Recorded:
        """Store what the infer task found: (post, blob sha, prediction, embedding or None) per post, atomically,
        but for the posts the rules above refuse (nothing of them is written)."""
        results = list(results)
        now = time.time()
        with self._transaction() as db:  # the rows read and written under the one write lock: no other writer between
            stored = self._stored_sources([post.id for post, *_ in results])
            refused: dict[str, str] = {}
            for post, blob, *_ in results:
                if (why := _refusal(stored.get(post.id), post, blob, with_image=True)) is not None:
                    refused[post.id] = why
            results = [r for r in results if r[0].id not in refused]
            replaced = [
                {"post_id": post.id, "source": post.source}
                for post, *_ in results
                if not post.pushed and (row := stored.get(post.id)) is not None and _replaced_by_crawl(row, post)
            ]
            db.executemany(_RESET_PUSHED, replaced)
            self._write_results(db, results, now)
        # The pushed owner of a replaced row loses the post: their profile is rebuilt too.
        former = {owner for r in replaced if (owner := stored[r["post_id"]]["owner_id"])}
        return Recorded(owners=self.owners_of([post.id for post, *_ in results]) | former, refused=refused)

    def _stored_sources(self, post_ids: list[str]) -> dict[str, Row]:
        """(source, blob, status, owner_id) of the posts stored already, by id."""
        rows = self._fetch_in("SELECT post_id, source, blob, status, owner_id FROM posts WHERE post_id IN", post_ids)
        return {r["post_id"]: r for r in rows}

    def _write_results(
        self, db: Database, results: list[tuple[Post, str | None, Prediction, np.ndarray | None]], now: float
    ) -> None:
        outcomes = [
            {
                "post_id": post.id,
                "blob": blob,
                "status": prediction.status,
                "reason": prediction.reason,
                "faces": prediction.faces,
                "conf": prediction.face_confidence,
                "boxes": json.dumps(prediction.face_boxes),
                "classes": json.dumps(prediction.classes),
                "model_id": prediction.model_id,
                "embedding": None if embedding is None else np.asarray(embedding, np.float32).tobytes(),
                "now": now,
            }
            for post, blob, prediction, embedding in results
        ]
        # two statements for the batch, not two per post (one round trip each)
        db.executemany(_UPSERT_POST, [_post_params(post) for post, *_ in results])
        db.executemany(
            """UPDATE posts SET blob = :blob, status = :status, reason = :reason, faces = :faces,
               face_confidence = :conf, face_boxes = :boxes, classes = :classes, model_id = :model_id,
               embedding = :embedding, indexed_seq = NULL, updated_at = :now
               WHERE post_id = :post_id AND status != 'deleted'""",
            outcomes,
        )

    def owners_of(self, post_ids: list[str]) -> set[str]:
        rows = self._fetch_in("SELECT DISTINCT owner_id FROM posts WHERE owner_id IS NOT NULL AND post_id IN", post_ids)
        return {r[0] for r in rows}

    def mark_indexed(self, post_ids: list[str], first_seq: int) -> None:
        """Record that the index writer added these posts, with its own increasing sequence numbers."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE posts SET status = 'indexed', indexed_seq = ? WHERE post_id = ? AND embedding IS NOT NULL",
                [(first_seq + i, pid) for i, pid in enumerate(post_ids)],
            )

    def delete_posts(self, post_ids: list[str]) -> tuple[list[str], set[str]]:
        """Forget posts' embeddings and predictions for good (a deleted post is never resurrected by a late infer
        result); returns (the ids that existed, their owners). The index writer removes them (``mark_removed``)."""
        rows = self._fetch_in("SELECT post_id, owner_id FROM posts WHERE post_id IN", post_ids)
        with self._transaction() as db:
            db.executemany(
                """UPDATE posts SET status = 'deleted', reason = 'deleted', embedding = NULL, classes = NULL,
                   face_boxes = NULL, indexed_seq = NULL, updated_at = ? WHERE post_id = ?""",
                [(time.time(), r["post_id"]) for r in rows],
            )
        return [r["post_id"] for r in rows], {r["owner_id"] for r in rows if r["owner_id"]}

    def mark_removed(self, post_ids: list[str], first_seq: int) -> None:
        """The index writer removed these deleted posts at these sequence numbers (replayed after a crash)."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE posts SET indexed_seq = ? WHERE post_id = ? AND status = 'deleted'",
                [(first_seq + i, pid) for i, pid in enumerate(post_ids)],
            )

    def removals_after(self, seq: int) -> np.ndarray:
        """Vector ids of deleted posts the writer removed after ``seq``, or has not removed yet."""
        with self._lock:
            rows = self._db.execute(
                "SELECT vector_id FROM posts WHERE status = 'deleted' AND (indexed_seq IS NULL OR indexed_seq > ?)",
                (seq,),
            ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def save_profile(self, profile: Profile) -> None:
        """Store a profile and its interests (the index that audience queries read)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO profiles (user_id, profile, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(user_id) DO UPDATE SET profile = excluded.profile, updated_at = excluded.updated_at",
                (profile.user_id, profile.model_dump_json(), time.time()),
            )
            db.execute("DELETE FROM interests WHERE user_id = ?", (profile.user_id,))
            db.executemany(
                "INSERT INTO interests (interest, user_id, score) VALUES (?, ?, ?)",
                [(interest, profile.user_id, score) for interest, score in profile_interests(profile)],
            )

    def _backfill_interests(self) -> None:
        """Profiles saved before the interests table existed get their rows once."""
        empty = self._db.execute("SELECT 1 FROM interests LIMIT 1").fetchone() is None
        if empty and self._db.execute("SELECT 1 FROM profiles LIMIT 1").fetchone() is not None:
            for profile in self.profiles():
                self.save_profile(profile)

    def register_model(self, model_id: str, spec: dict[str, Any]) -> None:
        """Records how to build the embedder behind ``model_id`` (the latest registration wins: a moved file)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO models (model_id, spec, registered_at) VALUES (?, ?, ?) "
                "ON CONFLICT(model_id) DO UPDATE SET spec = excluded.spec, registered_at = excluded.registered_at",
                (model_id, json.dumps(spec), time.time()),
            )

    def put_rows(self, table: str, rows: list[Row]) -> None:
        """Upsert rows as ``rows_of`` gives them (another store's, perhaps on the other database)."""
        if not rows:
            return
        key = _COPIED_AS_ROWS[table]
        columns = [c for c in rows[0].keys() if c != "page_key"]  # noqa: SIM118 (a row iterates its values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
        with self._transaction() as db:
            db.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                f"ON CONFLICT({key}) DO UPDATE SET {updates}",
                [tuple(row[c] for c in columns) for row in rows],
            )

    # -- reads ----------------------------------------------------------------------------------------------------
    def rows_of(self, table: str, batch: int = 1000) -> Iterator[list[Row]]:
        """Every row of a table copied as rows (``_COPIED_AS_ROWS``), whole: posts in pages by vector id."""
        if table == "posts":
            yield from self._pages("*", "1 = 1", (), batch)
            return
        assert table in _COPIED_AS_ROWS, table
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM {table}").fetchall()
        if rows:
            yield rows

    def model_spec(self, model_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT spec FROM models WHERE model_id = ?", (model_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def embeddings(self, post_ids: list[str]) -> EmbeddingRows:
        """Embeddings of these posts (those that have one), in the order asked."""
        rows = self._fetch_in(
            "SELECT post_id, vector_id, embedding, model_id FROM posts WHERE embedding IS NOT NULL AND post_id IN",
            post_ids,
        )
        by_id = {r["post_id"]: r for r in rows}
        return _embedding_rows([by_id[p] for p in post_ids if p in by_id])

    def embeddings_to_index(self, after_seq: int, batch: int = 4096) -> Iterator[EmbeddingRows]:
        """What a restarted index writer must replay: never indexed, or indexed after its snapshot."""
        return self._scan_embeddings(
            "(status = 'embedded' OR (status = 'indexed' AND indexed_seq > ?))", (after_seq,), batch
        )

    def embeddings_not_indexed(
        self, stored_before: float, model_id: str | None = None, batch: int = 4096
    ) -> Iterator[EmbeddingRows]:
        """Embedded posts stored before ``stored_before`` (a time) that no index task has brought to the writer yet
        (of ``model_id`` when given): what the writer catches up on while it runs (issue 13, item 3). Cheap: the
        status index holds only the posts in flight."""
        where, params = "status = 'embedded' AND updated_at < ?", (stored_before,)
        if model_id is not None:
            where, params = f"{where} AND model_id = ?", (stored_before, model_id)
        return self._scan_embeddings(where, params, batch)

    def deletions_not_removed(self, deleted_before: float, limit: int = 10_000) -> list[str]:
        """Posts deleted before ``deleted_before`` that the index writer has not removed yet (their remove task was
        never sent, or lost)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT post_id FROM posts WHERE status = 'deleted' AND indexed_seq IS NULL AND updated_at < ? "
                "ORDER BY vector_id LIMIT ?",
                (deleted_before, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def index_backlog(self) -> tuple[int, float | None]:
        """(embedded posts not indexed yet, when the oldest of them was stored): the index writer's lag."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*), MIN(updated_at) FROM posts WHERE status = 'embedded'").fetchone()
        return int(row[0]), None if row[1] is None else float(row[1])

    def _scan_embeddings(self, where: str, params: tuple[Any, ...], batch: int) -> Iterator[EmbeddingRows]:
        columns = "post_id, vector_id, embedding, model_id"
        for rows in self._pages(columns, f"embedding IS NOT NULL AND {where}", params, batch):
            yield _embedding_rows(rows)

    def _pages(self, columns: str, where: str, params: tuple[Any, ...], batch: int) -> Iterator[list[Row]]:
        """``SELECT columns FROM posts WHERE where`` in vector id order (unique and indexed in either database),
        ``batch`` rows at a time, each page its own short read (writers are never held up by a long scan)."""
        last = -(2**63)
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT vector_id AS page_key, {columns} FROM posts WHERE vector_id > ? AND {where} "
                    "ORDER BY vector_id LIMIT ?",
                    (last, *params, batch),
                ).fetchall()
            if not rows:
                return
            last = rows[-1]["page_key"]
            yield rows

    def embeddings_of_model(self, model_id: str, batch: int = 4096) -> Iterator[EmbeddingRows]:
        """Every usable stored embedding made by ``model_id`` (what a head trained on that model can classify)."""
        return self._scan_embeddings(f"{_USABLE} AND model_id = ?", (model_id,), batch)

    def set_head_predictions(self, head: str, predictions: dict[str, dict[str, float]]) -> None:
        """Replace one head's class probabilities of these posts, keeping the other heads' and the embeddings."""
        key = self._db.json_key(head)
        with self._transaction() as db:
            db.executemany(
                f"UPDATE posts SET classes = {db.json_set('classes')}, updated_at = ? WHERE post_id = ?",
                [(key, json.dumps(classes), time.time(), post_id) for post_id, classes in predictions.items()],
            )

    def count_embeddings(self, model_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*) FROM posts WHERE {_USABLE} AND model_id = ?", (model_id,)
            ).fetchone()
        return int(row[0])

    def sample_embeddings(self, n: int, model_id: str, seed: int = 0) -> EmbeddingRows:
        """``n`` embeddings of this model drawn uniformly (ids first: the blobs of the rest are never read)."""
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT vector_id FROM posts WHERE {_USABLE} AND model_id = ? AND embedding IS NOT NULL "
                    "ORDER BY vector_id",
                    (model_id,),
                ).fetchall()
            ]
        chosen = np.random.default_rng(seed).permutation(len(ids))[:n]
        rows = self._fetch_in(
            "SELECT post_id, vector_id, embedding, model_id FROM posts WHERE vector_id IN", [ids[i] for i in chosen]
        )
        return _embedding_rows(rows)

    def max_indexed_seq(self) -> int:
        with self._lock:
            value = self._db.execute("SELECT MAX(indexed_seq) FROM posts").fetchone()[0]
        return int(value or 0)

    def post(self, post_id: str) -> StoredPost | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_POST_COLUMNS} FROM posts WHERE post_id = ?", (post_id,)).fetchone()
        return None if row is None else _stored_post(row)

    def posts_by_vector_ids(self, vector_ids: Iterable[int]) -> dict[int, StoredPost]:
        rows = self._fetch_in(f"SELECT {_POST_COLUMNS} FROM posts WHERE vector_id IN", [int(v) for v in vector_ids])
        return {int(r["vector_id"]): _stored_post(r) for r in rows}

    def user_posts(self, user_id: str) -> list[StoredPost]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_POST_COLUMNS} FROM posts WHERE owner_id = ? ORDER BY post_id", (user_id,)
            ).fetchall()
        return [_stored_post(r) for r in rows]

    def image_hashtags(self) -> tuple[np.ndarray, list[list[str]]]:
        """(vector ids, hashtags) of every usable post: the rows of the hashtag model's matrix."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT vector_id, hashtags FROM posts WHERE {_USABLE} ORDER BY vector_id"
            ).fetchall()
        ids = np.array([r["vector_id"] for r in rows], dtype=np.int64)
        return ids, [json.loads(r["hashtags"]) for r in rows]

    def profile(self, user_id: str) -> Profile | None:
        with self._lock:
            row = self._db.execute("SELECT profile FROM profiles WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else Profile.model_validate_json(row["profile"])

    def iter_profiles(self, batch: int = 1000) -> Iterator[list[Profile]]:
        """Every profile in batches, by user id (for exports of any size)."""
        last = ""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT user_id, profile FROM profiles WHERE user_id > ? ORDER BY user_id LIMIT ?", (last, batch)
                ).fetchall()
            if not rows:
                return
            last = rows[-1]["user_id"]
            yield [Profile.model_validate_json(r["profile"]) for r in rows]

    def profiles(self) -> list[Profile]:
        with self._lock:
            rows = self._db.execute("SELECT profile FROM profiles ORDER BY user_id").fetchall()
        return [Profile.model_validate_json(r["profile"]) for r in rows]

    def audience(
        self,
        interest: str,
        min_score: float = 0.0,
        min_posts: int = 1,
        limit: int = 100,
        exclude_outliers: bool = False,
    ) -> list[Audience]:
        """Users ranked by their share of ``interest`` (a key of ``profile_interests``), best first."""
        db = self._db
        outliers = f"AND NOT {db.json_flag('p.profile', 'follower_outlier')}" if exclude_outliers else ""
        with self._lock:
            rows = db.execute(
                f"""SELECT i.user_id, i.score, p.profile FROM interests i JOIN profiles p ON p.user_id = i.user_id
                   WHERE i.interest = ? AND i.score >= ? AND {db.json_number("p.profile", "post_count")} >= ?
                   {outliers} ORDER BY i.score DESC, i.user_id LIMIT ?""",
                (interest, min_score, min_posts, limit),
            ).fetchall()
        return [Audience(r["user_id"], float(r["score"]), Profile.model_validate_json(r["profile"])) for r in rows]

    def follower_counts(self) -> np.ndarray:
        """The latest known follower count of every account (one per owner)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT MAX(owner_followers) FROM posts WHERE owner_followers IS NOT NULL GROUP BY owner_id"
            ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.float64)

    def engagement_rows(self, model_id: str) -> EngagementRows:
        """Usable posts of ``model_id`` whose likes and owner's followers (> 0) are known, with their embeddings."""
        with self._lock:
            rows = self._db.execute(
                "SELECT post_id, owner_id, like_count, owner_followers, blob, embedding FROM posts "
                f"WHERE {_USABLE} AND model_id = ? AND embedding IS NOT NULL AND like_count IS NOT NULL "
                "AND owner_followers > 0 ORDER BY vector_id",
                (model_id,),
            ).fetchall()
        return EngagementRows(
            post_ids=[r["post_id"] for r in rows],
            owner_ids=[r["owner_id"] for r in rows],
            likes=np.array([r["like_count"] for r in rows], np.float64),
            followers=np.array([r["owner_followers"] for r in rows], np.float64),
            blobs=[r["blob"] for r in rows],
            vectors=_vectors(rows),
        )

    def stale_posts(self, model_id: str, batch: int = 1000) -> Iterator[list[StoredPost]]:
        """Usable posts with an image whose embedding another model made: what a switch to ``model_id`` re-embeds."""
        for rows in self._pages(_POST_COLUMNS, _STALE, (model_id,), batch):
            yield [_stored_post(r) for r in rows]

    def count_stale(self, model_id: str) -> int:
        with self._lock:
            row = self._db.execute(f"SELECT COUNT(*) FROM posts WHERE {_STALE}", (model_id,)).fetchone()
        return int(row[0])

    def model_ids(self) -> dict[str, int]:
        """Usable embeddings per embedder model id, most first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT model_id, COUNT(*) FROM posts WHERE {_USABLE} AND embedding IS NOT NULL "
                "GROUP BY model_id ORDER BY 2 DESC"
            ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def hashtag_counts(self, limit: int = 30) -> dict[str, int]:
        """Posts per hashtag, most first (every stored post, whatever its status)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT tag.value, COUNT(*) FROM posts, {self._db.json_elements('posts.hashtags', 'tag')} "
                "WHERE posts.status != 'deleted' GROUP BY tag.value ORDER BY 2 DESC, 1 LIMIT ?",
                (limit,),
            ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def usable_summaries(self, batch: int = 10_000) -> Iterator[list[Row]]:
        """(faces, classes, like_count, owner_followers) of every usable post, in batches: what a report counts."""
        return self._pages("faces, classes, like_count, owner_followers", _USABLE, (), batch)

    def has_interest(self, interest: str) -> bool:
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM interests WHERE interest = ? LIMIT 1", (interest,)).fetchone()
                is not None
            )

    def user_id_for_username(self, username: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT owner_id FROM posts WHERE owner_username = ? LIMIT 1", (username,)
            ).fetchone()
        return None if row is None else str(row[0])

    def profile_backlog(self) -> int:
        """Owners whose stored profile does not count all their usable posts yet (0 when profiles are current)."""
        with self._lock:
            counts = self._db.execute(
                # albums count once in a profile: their images share the album's permalink (profiles.album_key)
                "SELECT owner_id, COUNT(DISTINCT COALESCE(permalink, post_id)) FROM posts "
                f"WHERE owner_id IS NOT NULL AND {_USABLE} GROUP BY owner_id"
            ).fetchall()
            stored = {
                r[0]: json.loads(r[1]).get("post_count", 0)
                for r in self._db.execute("SELECT user_id, profile FROM profiles").fetchall()
            }
        return sum(1 for owner, n in counts if stored.get(owner) != n)

    def owner_ids(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT DISTINCT owner_id FROM posts WHERE owner_id IS NOT NULL AND {_USABLE}"
            ).fetchall()
        return sorted(r[0] for r in rows)

    def status_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM posts GROUP BY status").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def rejection_reasons(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT reason, COUNT(*) FROM posts WHERE status = 'rejected' GROUP BY reason ORDER BY 2 DESC"
            ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def _fetch_in(self, sql: str, values: list[Any], chunk: int = 500) -> list[Row]:
        out: list[Row] = []
        with self._lock:
            for start in range(0, len(values), chunk):
                part = values[start : start + chunk]
                marks = ",".join("?" * len(part))
                out.extend(self._db.execute(f"{sql} ({marks})", part).fetchall())
        return out


class _Transaction:
    """A write transaction under the store's lock (the database serializes writers across processes)."""

    def __init__(self, db: Database, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> Database:
        self._lock.acquire()
        try:
            self._db.begin()
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self._db.end(commit=exc_type is None)
        finally:
            self._lock.release()


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
    if row["status"] == "deleted":  # deletions stick
        return False
    return row["source"] in PUSHED_SOURCES or (row["source"] != post.source and row["status"] == "queued")


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


def _stored_post(row: Row) -> StoredPost:
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
        status=row["status"],
        reason=row["reason"],
        faces=row["faces"],
        classes=json.loads(row["classes"]) if row["classes"] else {},
        blob=row["blob"],
    )


def _embedding_rows(rows: list[Row]) -> EmbeddingRows:
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
