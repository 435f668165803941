"""Metadata store: posts, their predictions and embeddings, rejections, user profiles. SQLite by default (several
processes on one host share the file: WAL mode, busy timeout); PostgreSQL when several hosts share it
(``database_url = "postgresql://..."``; databases.py holds what differs).

``MetadataStore`` opens the database, creates the tables (schema.py) and hands out one object per concern, all over
the one connection and lock (connection.py):

- ``posts`` (posts.py): upserts and owner merges, the infer stage's results, deletions, whole posts; who may
  overwrite a post is told there;
- ``journal`` (journal.py): the index writer's adds and removals, what it must replay or catch up on;
- ``vectors`` (embeddings.py): embeddings, the models that made them, head predictions, the rows models are fit on;
- ``audiences`` (profiles.py): profiles, their interests, audience queries;
- ``reports`` (reports.py): counts by status, reason, hashtag; follower counts; report summaries;
- ``tables`` (rows.py): whole rows, for a copy of the store (copy.py).

Its methods of the same names (``store.mark_indexed(...)`` for ``store.journal.mark_indexed(...)``) delegate to
them, as the callers across the code base, the tests and the benches use those; but for ``tables``, whose one
caller is copy.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deeptarget.core.records import InferResult, Post, Profile
from deeptarget.core.settings import without_password
from deeptarget.store.connection import USABLE_STATUSES, StoreConnection
from deeptarget.store.databases import Database, Row, open_database
from deeptarget.store.embeddings import EmbeddingRows, Embeddings, EngagementRows
from deeptarget.store.journal import IndexJournal
from deeptarget.store.posts import REFUSALS, Posts, Recorded, StoredPost
from deeptarget.store.profiles import Audience, Profiles, profile_interests
from deeptarget.store.reports import Reports
from deeptarget.store.rows import TableRows
from deeptarget.store.schema import create_schema

__all__ = [
    "REFUSALS",
    "USABLE_STATUSES",
    "Audience",
    "EmbeddingRows",
    "EngagementRows",
    "MetadataStore",
    "Recorded",
    "StoredPost",
    "profile_interests",
]


class MetadataStore:
    def __init__(self, location: str | Path) -> None:
        """``location``: a SQLite file's path, or a ``postgresql://`` URL (``Settings.metadata_database``)."""
        self.location = location
        self._conn = StoreConnection(open_database(location))
        self.posts = Posts(self._conn)
        self.journal = IndexJournal(self._conn)
        self.vectors = Embeddings(self._conn)
        self.audiences = Profiles(self._conn)
        self.reports = Reports(self._conn)
        self.tables = TableRows(self._conn)
        with self._conn.lock:
            create_schema(self._conn.db)
            self.audiences.backfill_interests()

    @property
    def _db(self) -> Database:  # for tests that reach past the store
        return self._conn.db

    def __repr__(self) -> str:  # the location may be a URL with a password
        return f"MetadataStore({without_password(str(self.location))!r})"

    def close(self) -> None:
        with self._conn.lock:
            self._conn.db.close()

    # -- posts ----------------------------------------------------------------------------------------------------
    def upsert_posts(self, posts: Iterable[Post]) -> dict[str, str]:
        return self.posts.upsert_posts(posts)

    def record_results(self, results: Iterable[InferResult]) -> Recorded:
        return self.posts.record_results(results)

    def owners_of(self, post_ids: list[str]) -> set[str]:
        return self.posts.owners_of(post_ids)

    def delete_posts(self, post_ids: list[str]) -> tuple[list[str], set[str]]:
        return self.posts.delete_posts(post_ids)

    def post(self, post_id: str) -> StoredPost | None:
        return self.posts.post(post_id)

    def posts_by_vector_ids(self, vector_ids: Iterable[int]) -> dict[int, StoredPost]:
        return self.posts.posts_by_vector_ids(vector_ids)

    def user_posts(self, user_id: str) -> list[StoredPost]:
        return self.posts.user_posts(user_id)

    def recent_user_posts(self, user_id: str, limit: int) -> list[StoredPost]:
        return self.posts.recent_user_posts(user_id, limit)

    def user_id_for_username(self, username: str) -> str | None:
        return self.posts.user_id_for_username(username)

    # -- the index writer's journal -------------------------------------------------------------------------------
    def mark_indexed(self, post_ids: list[str], first_seq: int) -> None:
        self.journal.mark_indexed(post_ids, first_seq)

    def mark_removed(self, post_ids: list[str], first_seq: int) -> None:
        self.journal.mark_removed(post_ids, first_seq)

    def max_indexed_seq(self) -> int:
        return self.journal.max_indexed_seq()

    def embeddings_to_index(self, after_seq: int, batch: int = 4096) -> Iterator[EmbeddingRows]:
        return self.journal.embeddings_to_index(after_seq, batch)

    def embeddings_not_indexed(
        self, stored_before: float, model_id: str | None = None, batch: int = 4096
    ) -> Iterator[EmbeddingRows]:
        return self.journal.embeddings_not_indexed(stored_before, model_id, batch)

    def removals_after(self, seq: int) -> np.ndarray:
        return self.journal.removals_after(seq)

    def deletions_not_removed(self, deleted_before: float, limit: int = 10_000) -> list[str]:
        return self.journal.deletions_not_removed(deleted_before, limit)

    def index_backlog(self) -> tuple[int, float | None]:
        return self.journal.index_backlog()

    # -- embeddings, their models, what is learnt from them -------------------------------------------------------
    def embeddings(self, post_ids: list[str]) -> EmbeddingRows:
        return self.vectors.embeddings(post_ids)

    def embeddings_of_model(self, model_id: str, batch: int = 4096) -> Iterator[EmbeddingRows]:
        return self.vectors.embeddings_of_model(model_id, batch)

    def count_embeddings(self, model_id: str) -> int:
        return self.vectors.count_embeddings(model_id)

    def sample_embeddings(self, n: int, model_id: str, seed: int = 0) -> EmbeddingRows:
        return self.vectors.sample_embeddings(n, model_id, seed)

    def model_ids(self) -> dict[str, int]:
        return self.vectors.model_ids()

    def stale_posts(self, model_id: str, batch: int = 1000) -> Iterator[list[StoredPost]]:
        return self.vectors.stale_posts(model_id, batch)

    def count_stale(self, model_id: str) -> int:
        return self.vectors.count_stale(model_id)

    def register_model(self, model_id: str, spec: dict[str, Any]) -> None:
        self.vectors.register_model(model_id, spec)

    def model_spec(self, model_id: str) -> dict[str, Any] | None:
        return self.vectors.model_spec(model_id)

    def set_head_predictions(self, head: str, predictions: dict[str, dict[str, float]]) -> None:
        self.vectors.set_head_predictions(head, predictions)

    def image_hashtags(self) -> tuple[np.ndarray, list[list[str]]]:
        return self.vectors.image_hashtags()

    def engagement_rows(self, model_id: str) -> EngagementRows:
        return self.vectors.engagement_rows(model_id)

    # -- profiles and audiences -----------------------------------------------------------------------------------
    def save_profile(self, profile: Profile) -> None:
        self.audiences.save_profile(profile)

    def profile(self, user_id: str) -> Profile | None:
        return self.audiences.profile(user_id)

    def iter_profiles(self, batch: int = 1000) -> Iterator[list[Profile]]:
        return self.audiences.iter_profiles(batch)

    def profiles(self) -> list[Profile]:
        return self.audiences.profiles()

    def audience(
        self,
        interest: str,
        min_score: float = 0.0,
        min_posts: int = 1,
        limit: int = 100,
        exclude_outliers: bool = False,
    ) -> list[Audience]:
        return self.audiences.audience(interest, min_score, min_posts, limit, exclude_outliers)

    def has_interest(self, interest: str) -> bool:
        return self.audiences.has_interest(interest)

    def owner_ids(self) -> list[str]:
        return self.audiences.owner_ids()

    def profile_backlog(self) -> int:
        return self.audiences.profile_backlog()

    # -- reports --------------------------------------------------------------------------------------------------
    def status_counts(self) -> dict[str, int]:
        return self.reports.status_counts()

    def rejection_reasons(self) -> dict[str, int]:
        return self.reports.rejection_reasons()

    def rejected_examples(self, per_reason: int = 4) -> dict[str, list[str]]:
        return self.reports.rejected_examples(per_reason)

    def status_activity(self, *since: float) -> dict[str, tuple[int, ...]]:
        return self.reports.status_activity(*since)

    def hashtag_counts(self, limit: int = 30) -> dict[str, int]:
        return self.reports.hashtag_counts(limit)

    def follower_counts(self) -> np.ndarray:
        return self.reports.follower_counts()

    def usable_summaries(self, batch: int = 10_000) -> Iterator[list[Row]]:
        return self.reports.usable_summaries(batch)
