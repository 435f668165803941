"""A small deterministic social network: accounts with follower counts and interests, posts with captions, hashtags,
likes, comments and pictures. Same seed and sizes, same network (timestamps are relative to ``now``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property

import numpy as np

from deeptarget.sandbox import images


@dataclass(frozen=True)
class Topic:
    hashtag: str
    sources: tuple[str, ...]  # scikit-image photo names or generator names
    related: tuple[str, ...]
    face: bool = False
    captions: tuple[str, ...] = ("",)


TOPICS: tuple[Topic, ...] = (
    Topic("astronaut", ("astronaut",), ("space", "nasa", "portrait"), face=True, captions=("Suited up", "Crew day")),
    Topic("coffee", ("coffee",), ("cafe", "morning", "latteart"), captions=("First cup", "Flat white o'clock")),
    Topic("cats", ("chelsea",), ("catsofinstagram", "pets", "kitten"), captions=("Nap time", "The boss")),
    Topic("rocket", ("rocket",), ("space", "launch", "engineering"), captions=("Liftoff", "On the pad")),
    Topic("motorcycle", ("motorcycle",), ("bikelife", "ride", "garage"), captions=("Sunday ride", "New pipes")),
    Topic("galaxy", ("hubble_deep_field",), ("space", "astrophotography", "stars"), captions=("Deep field", "So far")),
    Topic("sunset", ("sunset",), ("sky", "goldenhour", "nature"), captions=("Golden hour", "Evening sky")),
    Topic("geometry", ("geometry",), ("art", "design", "minimal"), captions=("Shapes", "New print")),
    Topic("texture", ("brick", "gravel", "grass"), ("pattern", "urban", "minimal"), captions=("Details", "Close up")),
    Topic("blackandwhite", ("camera",), ("photography", "bnw", "portrait"), captions=("Classic", "Film look")),
)
GENERIC_TAGS = ("instagood", "photooftheday", "love")
_NAME_PARTS = (
    ("sunny", "urban", "wild", "quiet", "bold", "lazy", "happy", "misty", "cosmic", "retro", "little", "golden"),
    ("fox", "lens", "trail", "brew", "pixel", "orbit", "rider", "paws", "studio", "atlas", "nomad", "frame"),
)


@dataclass(frozen=True)
class Account:
    id: str
    username: str
    followers_count: int
    hides_likes: bool
    interests: tuple[tuple[int, float], ...]  # (topic index, weight)


@dataclass(frozen=True)
class Media:
    id: str
    owner: Account
    topic: Topic
    caption: str
    hashtags: tuple[str, ...]
    like_count: int
    comments_count: int
    timestamp: datetime
    image_seed: int
    selfie: bool
    corruption: str | None = None  # "truncated", "html" or "garbage": served broken on purpose
    kind: str = "IMAGE"  # or "VIDEO" (never fetched; every other one has no media_url) or "CAROUSEL_ALBUM"
    children: int = 0  # image children of an album (it also holds one video child)

    @property
    def has_face(self) -> bool:
        return self.selfie or (self.topic.face and self.corruption is None)

    @property
    def image_ids(self) -> list[str]:
        """The post ids its images become: an album's first image keeps the album's id, the others get ``_k``."""
        if self.kind == "VIDEO":
            return []
        if self.kind == "CAROUSEL_ALBUM":
            return [self.id] + [f"{self.id}_{k}" for k in range(1, self.children)]
        return [self.id]

    def image_bytes(self, child: int = 0) -> bytes:
        seed = self.image_seed + child
        picture = images.render(seed, self.topic.sources, face=self.topic.face, selfie=self.selfie)
        data = images.jpeg_bytes(picture, seed)
        if self.corruption == "truncated":
            return data[: len(data) * 3 // 5]
        if self.corruption == "garbage":
            return b"\xff\xd8\xff\xe0" + np.random.default_rng(self.image_seed).bytes(4096)
        if self.corruption == "html":
            return b"<!doctype html><html><body><h1>Sorry, this page isn't available.</h1></body></html>"
        return data


@dataclass
class SandboxNetwork:
    seed: int = 7
    n_posts: int = 300
    n_users: int = 30
    n_hashtags: int = 10
    corrupt_share: float = 0.03
    video_share: float = 0.0
    carousel_share: float = 0.0
    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    def __post_init__(self) -> None:
        if not 1 <= self.n_hashtags <= len(TOPICS):
            raise ValueError(f"n_hashtags must be between 1 and {len(TOPICS)}")

    @property
    def topics(self) -> tuple[Topic, ...]:
        return TOPICS[: self.n_hashtags]

    @property
    def hashtags(self) -> list[str]:
        return [t.hashtag for t in self.topics]

    @cached_property
    def accounts(self) -> list[Account]:
        rng = np.random.default_rng([self.seed, 1])
        accounts = []
        for i in range(self.n_users):
            name = f"{_NAME_PARTS[0][i % 12]}_{_NAME_PARTS[1][(i * 5 + i // 12) % 12]}{i // 12 or ''}"
            followers = int(np.exp(rng.normal(np.log(2500), 1.0)))
            if i % 15 == 14:  # a few celebrity outliers, as any real sample has
                followers *= 400
            n_interests = int(rng.integers(1, 4))
            chosen = rng.choice(self.n_hashtags, size=min(n_interests, self.n_hashtags), replace=False)
            weights = rng.dirichlet(np.ones(len(chosen)) * 2)
            accounts.append(
                Account(
                    id=str(17841400100000000 + i * 7919),
                    username=name,
                    followers_count=max(10, followers),
                    hides_likes=bool(rng.random() < 0.1),
                    interests=tuple((int(t), float(w)) for t, w in zip(chosen, weights, strict=True)),
                )
            )
        return accounts

    @cached_property
    def media(self) -> list[Media]:
        rng = np.random.default_rng([self.seed, 2])
        activity = np.exp(rng.normal(0.0, 0.8, size=self.n_users))  # some accounts post far more than others
        activity /= activity.sum()
        kinds = ("truncated", "html", "garbage")
        formats = np.random.default_rng([self.seed, 3])  # its own stream: the other draws stay as they were
        out: list[Media] = []
        for i in range(self.n_posts):
            owner = self.accounts[int(rng.choice(self.n_users, p=activity))]
            topic_ids, weights = zip(*owner.interests, strict=True)
            topic = self.topics[int(rng.choice(topic_ids, p=np.array(weights) / sum(weights)))]
            tags = [topic.hashtag, *rng.choice(topic.related, size=int(rng.integers(1, 3)), replace=False)]
            if rng.random() < 0.3:
                tags.append(str(rng.choice(GENERIC_TAGS)))
            caption = f"{rng.choice(topic.captions)} " + " ".join(f"#{t}" for t in tags)
            rate = float(np.exp(rng.normal(np.log(0.03), 0.6)))
            likes = int(owner.followers_count * rate)
            corruption = None
            if rng.random() < self.corrupt_share:
                corruption = kinds[sum(m.corruption is not None for m in out) % len(kinds)]
            out.append(
                Media(
                    id=str(17900000000000000 + i * 104729),
                    owner=owner,
                    topic=topic,
                    caption=caption,
                    hashtags=tuple(dict.fromkeys(tags)),
                    like_count=likes,
                    comments_count=int(rng.binomial(max(likes, 0), 0.04)),
                    timestamp=self.now - timedelta(seconds=float(rng.uniform(60, 23 * 3600))),
                    image_seed=int(rng.integers(2**31)),
                    selfie=not topic.face and bool(rng.random() < 0.12),
                    corruption=corruption,
                    **self._format(formats, corruption),
                )
            )
        return out

    def _format(self, rng: np.random.Generator, corruption: str | None) -> dict[str, object]:
        draw = rng.random()
        if corruption is None and draw < self.video_share:
            return {"kind": "VIDEO"}
        if corruption is None and draw < self.video_share + self.carousel_share:
            return {"kind": "CAROUSEL_ALBUM", "children": int(rng.integers(2, 4))}
        return {}

    @cached_property
    def media_by_id(self) -> dict[str, Media]:
        return {m.id: m for m in self.media}

    @cached_property
    def account_by_username(self) -> dict[str, Account]:
        return {a.username: a for a in self.accounts}

    def hashtag_id(self, hashtag: str) -> str | None:
        names = self.hashtags
        return str(17843800000000000 + names.index(hashtag)) if hashtag in names else None

    def hashtag_by_id(self, hashtag_id: str) -> str | None:
        names = self.hashtags
        try:
            index = int(hashtag_id) - 17843800000000000
        except ValueError:
            return None
        return names[index] if 0 <= index < len(names) else None
