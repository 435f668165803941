"""``deeptarget store-copy``: a SQLite store moved to PostgreSQL (and back) keeps every post, embedding, status,
index sequence number, profile, interest and embedder record; running it again changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from deeptarget.core.records import Owner, Post, Prediction, Profile
from deeptarget.store.copy import copy_store
from deeptarget.store.metadata import MetadataStore
from tests.postgres import LocalPostgres


def filled_store(location: str) -> MetadataStore:
    store = MetadataStore(location)
    owner = Owner(id="u1", username="ann", followers_count=3_000_000_000)
    outcomes = ["embedded"] * 5 + ["rejected"]
    store.record_results(
        (Post(id=f"p{i}", caption=f"post {i}", hashtags=["sushi"], like_count=i, owner=owner), f"{i:064d}",
         Prediction(post_id=f"p{i}", status=status, reason="corrupt_image" if status == "rejected" else None,
                    model_id="m", classes={"food": {"sushi": 0.9}}, faces=i % 2, face_boxes=[[1, 2, 3, 4]]),
         np.arange(8, dtype=np.float32) + i if status == "embedded" else None)
        for i, status in enumerate(outcomes)
    )  # fmt: skip
    store.mark_indexed(["p0", "p1", "p2"], first_seq=7)
    store.delete_posts(["p3"])
    store.save_profile(Profile(user_id="u1", username="ann", post_count=4, classes={"food": {"sushi": 1.0}}))
    store.register_model("m", {"backbone": "mobilenet_v2", "weights": "none", "normalization": "imagenet"})
    return store


def assert_same(copy: MetadataStore, source: MetadataStore) -> None:
    ids = [f"p{i}" for i in range(6)]
    assert copy.status_counts() == source.status_counts() == {"indexed": 3, "embedded": 1, "deleted": 1, "rejected": 1}
    assert [copy.post(i) for i in ids] == [source.post(i) for i in ids]
    copied, original = copy.embeddings(ids), source.embeddings(ids)
    assert copied.post_ids == original.post_ids and np.array_equal(copied.vectors, original.vectors)
    assert copy.max_indexed_seq() == source.max_indexed_seq() == 9
    assert copy.removals_after(0).tolist() == source.removals_after(0).tolist()
    assert copy.profiles() == source.profiles()
    assert [a.user_id for a in copy.audience("class:food:sushi")] == ["u1"]
    assert copy.model_spec("m") == source.model_spec("m")


def test_store_copy_to_postgresql_and_back(tmp_path: Path, postgres_server: LocalPostgres) -> None:
    source = filled_store(str(tmp_path / "data" / "metadata.sqlite3"))
    url = postgres_server.create_database()
    with_password = url.replace("postgres@", "postgres:hunter2@")  # trust auth ignores it; the output must not show it
    env = {**os.environ, "DEEPTARGET_DATA_DIR": str(tmp_path / "data")}
    for _ in range(2):  # the second run upserts the same rows: nothing doubles
        done = subprocess.run([sys.executable, "-m", "deeptarget", "store-copy", "--to", with_password], env=env,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "copied 6 posts, 1 profiles, 1 embedder records" in done.stdout
        assert "hunter2" not in done.stdout + done.stderr and ":***@" in done.stdout
    assert_same(MetadataStore(url), source)

    back = MetadataStore(str(tmp_path / "back.sqlite3"))
    counts = copy_store(MetadataStore(url), back)
    assert (counts.posts, counts.profiles, counts.models) == (6, 1, 1)
    assert_same(back, source)
