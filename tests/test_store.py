from __future__ import annotations

from pathlib import Path

import numpy as np

from deeptarget.schema import Owner, Post, Prediction
from deeptarget.store import MetadataStore


def embedded(pid: str, vector: np.ndarray) -> tuple[Post, str, Prediction, np.ndarray]:
    return Post(id=pid, hashtags=["a"]), "0" * 64, Prediction(post_id=pid, status="embedded", model_id="m"), vector


def test_processing_a_post_twice_overwrites_it(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "m.sqlite3")
    store.record_results([embedded("p1", np.ones(4, np.float32))])
    store.record_results([embedded("p1", np.full(4, 2.0, np.float32))])
    rows = store.embeddings(["p1"])
    assert rows.post_ids == ["p1"] and rows.vectors.tolist() == [[2.0] * 4]
    assert store.status_counts() == {"embedded": 1}


def test_owner_details_only_ever_improve(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "m.sqlite3")
    owner = Owner(id="u1", username="ann", followers_count=500)
    store.upsert_posts([Post(id="p1", caption="#a", hashtags=["a"], owner=owner)])  # met through the account
    owners = store.record_results([embedded("p1", np.ones(4, np.float32))])  # then inferred from a hashtag crawl
    assert owners == {"u1"}
    post = store.post("p1")
    assert post is not None and post.post.owner == owner and post.status == "embedded"


def test_rejections_are_counted_by_reason(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "m.sqlite3")
    store.record_results(
        (Post(id=f"r{i}"), None, Prediction(post_id=f"r{i}", status="rejected", reason=reason), None)
        for i, reason in enumerate(["corrupt_image", "corrupt_image", "not_an_image"])
    )
    assert store.rejection_reasons() == {"corrupt_image": 2, "not_an_image": 1}
    assert store.embeddings(["r0"]).post_ids == []


def test_two_connections_share_the_file(tmp_path: Path) -> None:
    first, second = MetadataStore(tmp_path / "m.sqlite3"), MetadataStore(tmp_path / "m.sqlite3")
    first.record_results([embedded("p1", np.ones(4, np.float32))])
    assert second.status_counts() == {"embedded": 1}
