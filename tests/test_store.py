"""The metadata store, on each database it supports (the ``metadata_database`` fixture: SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import psycopg
import pytest

from deeptarget.core.records import Owner, Post, Prediction, Profile
from deeptarget.store.metadata import MetadataStore
from tests.postgres import LocalPostgres


def embedded(pid: str, vector: np.ndarray) -> tuple[Post, str, Prediction, np.ndarray]:
    return Post(id=pid, hashtags=["a"]), "0" * 64, Prediction(post_id=pid, status="embedded", model_id="m"), vector


def test_processing_a_post_twice_overwrites_it(metadata_database: str) -> None:
    store = MetadataStore(metadata_database)
    store.record_results([embedded("p1", np.ones(4, np.float32))])
    store.record_results([embedded("p1", np.full(4, 2.0, np.float32))])
    rows = store.embeddings(["p1"])
    assert rows.post_ids == ["p1"] and rows.vectors.tolist() == [[2.0] * 4]
    assert store.status_counts() == {"embedded": 1}


def test_owner_details_only_ever_improve(metadata_database: str) -> None:
    store = MetadataStore(metadata_database)
    owner = Owner(id="u1", username="ann", followers_count=500)
    store.upsert_posts([Post(id="p1", caption="#a", hashtags=["a"], owner=owner)])  # met through the account
    owners = store.record_results([embedded("p1", np.ones(4, np.float32))]).owners  # then inferred from a hashtag crawl
    assert owners == {"u1"}
    post = store.post("p1")
    assert post is not None and post.post.owner == owner and post.status == "embedded"


def test_rejections_are_counted_by_reason(metadata_database: str) -> None:
    store = MetadataStore(metadata_database)
    store.record_results(
        (Post(id=f"r{i}"), None, Prediction(post_id=f"r{i}", status="rejected", reason=reason), None)
        for i, reason in enumerate(["corrupt_image", "corrupt_image", "not_an_image"])
    )
    assert store.rejection_reasons() == {"corrupt_image": 2, "not_an_image": 1}
    assert store.embeddings(["r0"]).post_ids == []


def test_two_connections_share_the_database(metadata_database: str) -> None:
    first, second = MetadataStore(metadata_database), MetadataStore(metadata_database)
    first.record_results([embedded("p1", np.ones(4, np.float32))])
    assert second.status_counts() == {"embedded": 1}


FOOD = {"food": {"a": 1.0}}


def test_every_read_and_write_of_the_store(metadata_database: str) -> None:
    """The queries whose SQL differs between the databases (JSON, paging, upserts) give the same answers on both."""
    store = MetadataStore(metadata_database)
    owner = Owner(id="u1", username="ann", followers_count=2_000_000_000)  # past 32 bits in neither column
    posts = [
        Post(id=f"p{i}", hashtags=["sushi", "tokyo"][: 1 + i % 2], like_count=10 * i, owner=owner) for i in range(7)
    ]
    store.record_results(
        (post, f"{i:064d}", Prediction(post_id=post.id, status="embedded", model_id="old", classes=FOOD),
         np.full(4, i, np.float32))
        for i, post in enumerate(posts)
    )  # fmt: skip
    assert store.hashtag_counts() == {"sushi": 7, "tokyo": 3}
    assert store.follower_counts().tolist() == [2_000_000_000.0]
    pages = list(store.stale_posts("new", batch=3))
    assert [len(page) for page in pages] == [3, 3, 1]
    assert sorted(p.post.id for page in pages for p in page) == sorted(p.id for p in posts)
    assert store.count_stale("new") == 7 and store.count_stale("old") == 0
    assert sum(len(rows.post_ids) for rows in store.embeddings_of_model("old", batch=2)) == 7
    sample = store.sample_embeddings(4, "old", seed=1)
    assert len(set(sample.post_ids)) == 4 and sample.post_ids == store.sample_embeddings(4, "old", seed=1).post_ids
    engagement = store.engagement_rows("old")
    assert sorted(engagement.likes.tolist()) == [10.0 * i for i in range(7)] and engagement.vectors.shape == (7, 4)

    store.set_head_predictions("likable", {"p1": {"yes": 0.8, "no": 0.2}})
    classes = store.post("p1").classes  # type: ignore[union-attr]
    assert classes == {**FOOD, "likable": {"yes": 0.8, "no": 0.2}}

    store.register_model("old", {"backbone": "mobilenet_v2", "weights": "none"})
    store.register_model("old", {"backbone": "mobilenet_v2", "weights": "/moved.pth"})
    assert store.model_spec("old") == {"backbone": "mobilenet_v2", "weights": "/moved.pth"}
    assert store.model_spec("x") is None

    for user, share, outlier in [("u1", 0.9, False), ("u2", 0.95, True), ("u3", 0.5, None)]:  # None: unknown
        profile = Profile(user_id=user, post_count=3, classes={"food": {"a": share}}, follower_outlier=outlier)
        store.save_profile(profile)
    assert [a.user_id for a in store.audience("class:food:a")] == ["u2", "u1", "u3"]
    assert [a.user_id for a in store.audience("class:food:a", exclude_outliers=True)] == ["u1", "u3"]
    assert store.audience("class:food:a", min_posts=4) == []

    deleted, owners = store.delete_posts(["p0", "missing"])
    assert deleted == ["p0"] and owners == {"u1"}
    assert store.removals_after(0).tolist() == [store.post("p0").vector_id]  # type: ignore[union-attr]
    store.mark_indexed([p.id for p in posts[1:]], first_seq=5)
    assert store.max_indexed_seq() == 10 and store.status_counts() == {"deleted": 1, "indexed": 6}
    assert sorted(pid for rows in store.embeddings_to_index(after_seq=8) for pid in rows.post_ids) == ["p5", "p6"]


def test_a_postgresql_restart_costs_one_failed_call_not_the_store() -> None:
    """A worker's store outlives a database restart: the call that meets the broken connection fails with a transient
    error (the task is retried), and the next one reconnects. No write is half done."""
    server = LocalPostgres().start()
    try:
        store = MetadataStore(server.create_database())
        store.record_results([embedded("p1", np.ones(4, np.float32))])
        server.restart()
        with pytest.raises(psycopg.OperationalError):
            store.record_results([embedded("p2", np.ones(4, np.float32))])
        store.record_results([embedded("p2", np.ones(4, np.float32))])
        assert store.status_counts() == {"embedded": 2}
    finally:
        server.stop()


def test_what_the_web_ui_reads_of_the_store(metadata_database: str) -> None:
    """The UI's queries: a user's latest posts with an image (undated last, deleted and imageless left out), rejected
    examples that have an image, and each status's activity in one pass."""
    store = MetadataStore(metadata_database)
    owner = Owner(id="u1", username="ann", followers_count=10)
    dated = [Post(id=f"p{d}", owner=owner, timestamp=datetime(2026, 1, d, tzinfo=UTC)) for d in (3, 1, 2)]
    undated = Post(id="p-undated", owner=owner)
    box = [(1, 2, 3, 4)]
    store.record_results(
        [(p, "a" * 64, Prediction(post_id=p.id, status="embedded", model_id="m", faces=1, face_boxes=box),
          np.ones(4, np.float32)) for p in [*dated, undated]]
        + [(Post(id="no-image", owner=owner), None, Prediction(post_id="no-image", status="rejected",
                                                               reason="blob_missing"), None),
           (Post(id="bad", owner=owner), "b" * 64, Prediction(post_id="bad", status="rejected",
                                                              reason="not_an_image"), None)]
    )  # fmt: skip
    store.delete_posts(["p2"])
    recent = store.recent_user_posts("u1", 10)
    ids = [p.post.id for p in recent]
    assert ids[:2] == ["p3", "p1"] and "p2" not in ids and "no-image" not in ids and ids.index("p-undated") > 1
    assert recent[0].face_boxes == ((1, 2, 3, 4),)
    assert [p.post.id for p in store.recent_user_posts("u1", 1)] == ["p3"]
    assert store.rejected_examples() == {"blob_missing": [], "not_an_image": ["bad"]}
    activity = store.status_activity(time.time() - 60, time.time() + 60)
    assert activity == {"embedded": (3, 3, 0), "deleted": (1, 1, 0), "rejected": (2, 2, 0)}
