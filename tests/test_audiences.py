"""Audiences ("accounts into sushi") from stored profiles, and profile exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from deeptarget.core.errors import NotFoundError
from deeptarget.core.records import Profile
from deeptarget.models.heads import LinearHead
from deeptarget.profiles.export import export_profiles
from deeptarget.profiles.outliers import FollowerBounds
from deeptarget.query.service import QueryService
from deeptarget.store.metadata import MetadataStore
from tests.conftest import make_settings


def profile(user: str, sushi: float, posts: int = 5, hashtags: dict[str, float] | None = None) -> Profile:
    return Profile(
        user_id=user,
        username=f"name_{user}",
        post_count=posts,
        followers_count=1000,
        classes={"food": {"sushi": sushi, "pizza": round(1 - sushi, 6)}},
        hashtags=hashtags or {},
    )


@pytest.fixture
def service(tmp_path: Path, metadata_database: str) -> QueryService:
    settings = make_settings(tmp_path / "data", database_url=metadata_database)
    store = MetadataStore(settings.metadata_database)
    for p in [
        profile("u1", 0.9),
        profile("u2", 0.2, hashtags={"sushi": 0.5, "tokyo": 0.5}),
        profile("u3", 0.6),
        profile("u4", 0.95, posts=1),  # very keen, on a single post
    ]:
        store.save_profile(p)
    store.save_profile(profile("u3", 0.4))  # updated: the old interests go
    LinearHead("food", 1, ["pizza", "sushi"], np.zeros((2, 4), np.float32), np.zeros(2, np.float32), "m", {}).save(
        settings.heads_dir
    )
    return QueryService(settings, store)


def test_users_are_ranked_by_their_share_of_an_interest(service: QueryService) -> None:
    key, members = service.audience("sushi")
    assert key == "class:food:sushi"  # a class of a published head wins over the hashtag of the same name
    assert [(m.user_id, m.score) for m in members] == [("u4", 0.95), ("u1", 0.9), ("u3", 0.4), ("u2", 0.2)]
    assert [m.user_id for m in service.audience("food:sushi", min_score=0.5)[1]] == ["u4", "u1"]
    assert [m.user_id for m in service.audience("sushi", min_posts=2, limit=2)[1]] == ["u1", "u3"]
    key, members = service.audience("#Sushi")
    assert key == "hashtag:sushi" and [m.user_id for m in members] == ["u2"]


def test_an_unknown_interest_says_what_was_looked_for(service: QueryService) -> None:
    with pytest.raises(NotFoundError, match="class:food:ramen, hashtag:ramen"):
        service.audience("ramen")


def test_interests_are_backfilled_for_profiles_saved_before_the_table_existed(service: QueryService) -> None:
    db = service.store._db
    db.execute("DELETE FROM interests")
    reopened = MetadataStore(service.store.location)
    assert [a.user_id for a in reopened.audience("class:food:sushi")] == ["u4", "u1", "u3", "u2"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_profiles_export(service: QueryService, tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"profiles.{fmt}"
    assert export_profiles(service.store, path, fmt) == 4
    if fmt == "jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        rows = pq.read_table(path).to_pylist()
        for row in rows:  # maps come back as (key, value) pairs
            row["hashtags"] = dict(row["hashtags"])
            row["classes"] = {head: dict(shares) for head, shares in row["classes"]}
    assert [r["user_id"] for r in rows] == ["u1", "u2", "u3", "u4"]
    assert rows[1]["hashtags"] == {"sushi": 0.5, "tokyo": 0.5}
    assert rows[2]["classes"] == {"food": {"sushi": 0.4, "pizza": 0.6}}


def test_follower_outliers_are_marked_and_can_be_left_out(service: QueryService) -> None:
    followers = np.array([100, 120, 90, 110, 95, 105, 130, 80, 115, 100, 2_000_000, 3], dtype=np.float64)
    bounds = FollowerBounds.of(followers, k=3.0)
    assert bounds.median == 102.5 and bounds.mad == 12.5
    assert bounds.is_outlier(2_000_000) and bounds.is_outlier(3) and not bounds.is_outlier(140)
    assert bounds.is_outlier(None) is None and FollowerBounds.of(followers[:5], 3.0).is_outlier(10**9) is None
    celebrity = profile("u1", 0.9).model_copy(update={"follower_outlier": True})
    service.store.save_profile(celebrity)
    ranked = [m.user_id for m in service.audience("sushi")[1]]
    assert ranked[:2] == ["u4", "u1"]
    assert "u1" not in [m.user_id for m in service.audience("sushi", exclude_outliers=True)[1]]
