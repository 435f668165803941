from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from deeptarget.core.records import Owner, Post
from deeptarget.profiles import build_profile, post_weights
from deeptarget.store.metadata import StoredPost

NOW = datetime(2026, 11, 23, tzinfo=UTC)
OWNER = Owner(id="u1", username="sushi_lover", followers_count=1000)


def stored(
    pid: str,
    tags: list[str],
    *,
    likes: int | None = 30,
    age_days: float = 0,
    faces: int = 0,
    status: str = "indexed",
    classes: dict[str, dict[str, float]] | None = None,
    permalink: str | None = None,
) -> StoredPost:
    post = Post(id=pid, hashtags=tags, like_count=likes, owner=OWNER, timestamp=NOW - timedelta(days=age_days),
                permalink=permalink)  # fmt: skip
    return StoredPost(post=post, vector_id=0, status=status, reason=None, faces=faces, classes=classes or {}, blob=None)


def test_recency_halves_the_weight_every_half_life() -> None:
    weights = post_weights([stored("a", [], age_days=0), stored("b", [], age_days=30)], NOW, half_life_days=30)
    assert weights == pytest.approx([1.0, 0.5])


def test_engagement_weighs_relative_to_the_users_median_and_is_clipped() -> None:
    posts = [
        stored("a", [], likes=10),
        stored("b", [], likes=20),
        stored("c", [], likes=40),
        stored("d", [], likes=None),
    ]
    weights = post_weights(posts, NOW, half_life_days=30)
    assert weights == pytest.approx([0.5, 1.0, 2.0, 1.0])  # median engagement is 0.02; unknown weighs 1
    extreme = post_weights(
        [stored("a", [], likes=1), stored("b", [], likes=100), stored("c", [], likes=10_000)], NOW, half_life_days=30
    )
    assert extreme == pytest.approx([0.25, 1.0, 4.0])


def test_profile_shares_counts_and_medians() -> None:
    posts = [
        stored("a", ["sushi", "dinner"], likes=20, faces=1, classes={"food": {"sushi": 0.8, "pizza": 0.2}}),
        stored("b", ["sushi"], likes=20, classes={"food": {"sushi": 0.6, "pizza": 0.4}}),
        stored("c", ["pizza"], likes=20, status="rejected"),  # rejected posts say nothing
    ]
    profile = build_profile("u1", posts, half_life_days=30, now=NOW)
    assert profile.post_count == 2 and profile.username == "sushi_lover" and profile.followers_count == 1000
    assert profile.face_share == pytest.approx(0.5)
    assert profile.median_engagement == pytest.approx(0.02)
    assert profile.hashtags == pytest.approx({"sushi": 2 / 3, "dinner": 1 / 3})
    assert profile.classes["food"] == pytest.approx({"sushi": 0.7, "pizza": 0.3})
    assert sum(profile.hashtags.values()) == pytest.approx(1.0)


def test_a_carousel_album_counts_as_one_post() -> None:
    """An album's images are stored as rows sharing its permalink: ten sushi images in one album are one post."""
    album = [
        stored(
            f"a{'' if k == 0 else f'_{k}'}",
            ["sushi"],
            likes=60,
            faces=int(k == 1),
            permalink="https://x/p/a/",
            classes={"food": {"sushi": 1.0, "pizza": 0.0}},
        )
        for k in range(10)
    ]
    single = stored(
        "b", ["pizza"], likes=40, permalink="https://x/p/b/", classes={"food": {"sushi": 0.0, "pizza": 1.0}}
    )
    profile = build_profile("u1", [*album, single], half_life_days=30, now=NOW)
    assert profile.post_count == 2 and profile.face_share == pytest.approx(0.5)
    assert profile.median_engagement == pytest.approx((0.06 + 0.04) / 2)
    # the album weighs 0.06 / 0.05 = 1.2 against the single post's 0.8, whatever its number of images
    assert profile.classes["food"] == pytest.approx({"sushi": 0.6, "pizza": 0.4})
    assert profile.hashtags == pytest.approx({"sushi": 0.6, "pizza": 0.4})


def test_a_user_without_usable_posts_has_an_empty_profile() -> None:
    profile = build_profile("u1", [stored("a", ["x"], status="rejected")], now=NOW)
    assert profile.post_count == 0 and profile.hashtags == {}
