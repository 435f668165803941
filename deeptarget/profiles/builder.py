"""Profile arithmetic: what a user's posts say about their interests, weighted by recency and engagement.

A post's weight is ``recency * engagement``:
- recency halves every ``half_life_days`` of the post's age;
- engagement (likes / followers) relative to the user's own median, clipped to [0.25, 4]: the posts that landed
  better with their audience say more about what the account is about. Posts with unknown engagement weigh 1.

Hashtag and class interests are weight shares (they sum to 1 per taxonomy). A carousel album counts as one post: its
images share its weight, and it counts once in ``post_count``, the face share and the median engagement.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

from deeptarget.core.records import Profile
from deeptarget.profiles.outliers import FollowerBounds
from deeptarget.store.metadata import USABLE_STATUSES, MetadataStore, StoredPost

ENGAGEMENT_CLIP = (0.25, 4.0)
TOP_HASHTAGS = 25


def post_weights(posts: Sequence[StoredPost], now: datetime, half_life_days: float) -> list[float]:
    engagements = [p.post.engagement for p in posts]
    per_album = {album_key(p): e for p, e in zip(posts, engagements, strict=True) if e is not None}
    median = statistics.median(per_album.values()) if per_album else None
    weights = []
    for stored, engagement in zip(posts, engagements, strict=True):
        timestamp = stored.post.timestamp
        age_days = max(0.0, (now - timestamp).total_seconds() / 86400) if timestamp else 0.0
        recency = 0.5 ** (age_days / half_life_days)
        if engagement is None or not median:
            relative = 1.0
        else:
            relative = min(max(engagement / median, ENGAGEMENT_CLIP[0]), ENGAGEMENT_CLIP[1])
        weights.append(recency * relative)
    return weights


def album_key(stored: StoredPost) -> str:
    """What identifies the post an image belongs to: the permalink, which an album's images share."""
    return stored.post.permalink or stored.post.id


def build_profile(
    user_id: str, posts: Sequence[StoredPost], *, half_life_days: float = 30.0, now: datetime | None = None
) -> Profile:
    """The profile of ``user_id`` from their posts; rejected and unprocessed posts are ignored."""
    now = now or datetime.now(UTC)
    usable = [p for p in posts if p.status in USABLE_STATUSES]
    owner = next((p.post.owner for p in reversed(usable) if p.post.owner is not None), None)
    if not usable:
        return Profile(user_id=user_id, username=owner.username if owner else None, updated_at=now)
    # A carousel album is one post with several images (stored as several rows sharing the album's permalink): it
    # counts once, its images sharing its weight, or an account posting 10-image albums would count 10 times over.
    albums = [album_key(p) for p in usable]
    images_per_album = Counter(albums)
    weights = [w / images_per_album[a] for w, a in zip(post_weights(usable, now, half_life_days), albums, strict=True)]
    total = sum(weights) or 1.0

    hashtag_weight: dict[str, float] = defaultdict(float)
    class_weight: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for stored, weight in zip(usable, weights, strict=True):
        for tag in stored.post.hashtags:
            hashtag_weight[tag] += weight
        for head, probabilities in stored.classes.items():
            for label, p in probabilities.items():
                class_weight[head][label] += weight * p
    tag_total = sum(hashtag_weight.values()) or 1.0
    top = sorted(hashtag_weight.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_HASHTAGS]
    one_per_album = {a: p for a, p in zip(albums, usable, strict=True)}.values()  # an album's images share likes
    engagements = [p.post.engagement for p in one_per_album if p.post.engagement is not None]
    with_face = {a for a, p in zip(albums, usable, strict=True) if (p.faces or 0) > 0}
    return Profile(
        user_id=user_id,
        username=owner.username if owner else None,
        followers_count=owner.followers_count if owner else None,
        post_count=len(images_per_album),
        face_share=len(with_face) / len(images_per_album),
        median_engagement=statistics.median(engagements) if engagements else None,
        hashtags={tag: round(w / tag_total, 6) for tag, w in top},
        classes={
            head: {label: round(w / total, 6) for label, w in sorted(labels.items(), key=lambda kv: -kv[1])}
            for head, labels in class_weight.items()
        },
        updated_at=now,
    )


def rebuild_profiles(
    store: MetadataStore, user_ids: Sequence[str], half_life_days: float, bounds: FollowerBounds
) -> list[Profile]:
    """Build and save the profiles of ``user_ids`` from their stored posts."""
    profiles = []
    for user_id in user_ids:
        profile = build_profile(user_id, store.user_posts(user_id), half_life_days=half_life_days)
        profile.follower_outlier = bounds.is_outlier(profile.followers_count)
        store.save_profile(profile)
        profiles.append(profile)
    return profiles
