"""A small deterministic social network: accounts with follower counts and interests, posts with captions, hashtags,
likes, comments and pictures. Same seed and sizes, same network (timestamps are relative to ``now``).

Some media are not ``visible``: the Graph API pages first and filters what the caller may not see afterwards, so the
server leaves them out of the pages they fall on (sandbox/paging.py). A share of the regular posts is restricted at
random, and after the ``n_posts`` regular ones ``media`` holds two runs of removed media, placed early in the biggest
hashtag's and the biggest account's result sets so that pages there come back empty. ``offered`` is what a client
following some targets can collect: the post ids of the visible images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TypedDict

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


class _Format(TypedDict, total=False):
    """What ``Media`` takes beside its defaults for a video or an album."""

    kind: str
    children: int
    child_kinds: tuple[str, ...]


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
    children: int = 0  # image children of an album
    # An album's children in order ("IMAGE" / "VIDEO"); empty: its ``children`` images, then one video.
    child_kinds: tuple[str, ...] = ()
    # False: restricted or removed, so the caller may not see it; it still takes its place when pages are cut.
    visible: bool = True

    @property
    def has_face(self) -> bool:
        return self.selfie or (self.topic.face and self.corruption is None)

    @property
    def layout(self) -> tuple[str, ...]:
        """An album's children in order; () for anything else."""
        if self.kind != "CAROUSEL_ALBUM":
            return ()
        return self.child_kinds or ("IMAGE",) * self.children + ("VIDEO",)

    @property
    def image_ids(self) -> list[str]:
        """The post ids its images become: an album's first image keeps the album's id, the others get ``_k`` (k
        counts image children only, the way the scraper names them); videos and albums of videos give none."""
        if self.kind == "VIDEO" or (self.kind == "CAROUSEL_ALBUM" and self.children == 0):
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


# Album layouts in turn, so that any network with a few albums has each: the old one first (images, then a video),
# then an album of videos only, one whose first child (whose URL the album's own media_url is) is a video, and one of
# images only.
_ALBUM_LAYOUTS = ("images_then_video", "videos", "video_first", "images")
EDGES = ("recent_media", "top_media")


def recent_media(media: Iterable[Media], hashtag: str, now: datetime) -> list[Media]:
    """A hashtag's recent_media result set, unfiltered and in page order."""
    # IG Hashtag Recent Media, Limitations: "Only returns media objects published within 24 hours of query
    # execution."
    cutoff = now - timedelta(hours=24)
    tagged = (m for m in media if hashtag in m.hashtags and m.timestamp >= cutoff)
    return sorted(tagged, key=lambda m: (m.timestamp, m.id), reverse=True)


def top_media(media: Iterable[Media], hashtag: str) -> list[Media]:
    """A hashtag's top_media result set ("the most popular"), unfiltered and in page order."""
    return sorted((m for m in media if hashtag in m.hashtags), key=lambda m: (-m.like_count, m.id))


def account_media(media: Iterable[Media], account: Account) -> list[Media]:
    """An account's media edge (business discovery), unfiltered and newest first."""
    return sorted((m for m in media if m.owner.id == account.id), key=lambda m: (m.timestamp, m.id), reverse=True)


@dataclass
class SandboxNetwork:
    seed: int = 7
    n_posts: int = 300
    n_users: int = 30
    n_hashtags: int = 10
    corrupt_share: float = 0.03
    video_share: float = 0.1
    carousel_share: float = 0.15
    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))
    hidden_share: float = 0.2  # media the caller may not see (restricted, removed), drawn at random
    # Besides those, the biggest hashtag (recent_media) and the biggest account each get a run of 2 * hidden_run - 1
    # removed media early in their result set (media appended to ``media`` after the n_posts regular ones): at every
    # page size up to hidden_run, some page there comes back empty with a next link. 0: none.
    hidden_run: int = 25

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
        albums = 0
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
            media_format = self._format(formats, corruption, albums)
            albums += media_format.get("kind") == "CAROUSEL_ALBUM"
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
                    **media_format,
                )
            )
        return self._with_visibility(out)

    def _format(self, rng: np.random.Generator, corruption: str | None, albums: int) -> _Format:
        draw = rng.random()
        if corruption is None and draw < self.video_share:
            return {"kind": "VIDEO"}
        if corruption is None and draw < self.video_share + self.carousel_share:
            n = int(rng.integers(2, 4))
            layout = _ALBUM_LAYOUTS[albums % len(_ALBUM_LAYOUTS)]
            child_kinds = {
                "images_then_video": ("IMAGE",) * n + ("VIDEO",),
                "videos": ("VIDEO",) * n,
                "video_first": ("VIDEO",) + ("IMAGE",) * n,
                "images": ("IMAGE",) * n,
            }[layout]
            return {"kind": "CAROUSEL_ALBUM", "children": child_kinds.count("IMAGE"), "child_kinds": child_kinds}
        return {}

    def _with_visibility(self, media: list[Media]) -> list[Media]:
        """Marks a share of the media at random as not visible, then adds the runs of removed media that make empty
        pages."""
        rng = np.random.default_rng([self.seed, 4])  # its own stream, as above
        hidden = {m.id for m in media if rng.random() < self.hidden_share}
        media = [replace(m, visible=False) if m.id in hidden else m for m in media]
        if self.hidden_run > 0 and media:
            biggest_tag = max(self.hashtags, key=lambda t: (len(recent_media(media, t, self.now)), t))
            media += self._removed_run(media, recent_media(media, biggest_tag, self.now), (biggest_tag,), len(media))
            owners = {m.owner.id: m.owner for m in media}
            biggest = max(owners.values(), key=lambda a: (len(account_media(media, a)), a.id))
            media += self._removed_run(media, account_media(media, biggest), None, len(media))
        return media

    def _removed_run(
        self, media: list[Media], ordered: list[Media], hashtags: tuple[str, ...] | None, first_index: int
    ) -> list[Media]:
        """2 * hidden_run - 1 removed media (not visible, no pictures fetched) that fall right after the first
        min(hidden_run, len - 1) media of ``ordered`` (a result set, newest first): every page size up to hidden_run
        then has a page inside the run, empty, with more after it. ``hashtags``: theirs (None: none, and the owner of
        ``ordered``). Appended after the regular media, so ``media[:n]`` stays as it was."""
        if len(ordered) < 2:
            return []
        at = min(self.hidden_run, len(ordered) - 1)
        newer, older = ordered[at - 1].timestamp, ordered[at].timestamp
        count = 2 * self.hidden_run - 1
        return [
            replace(
                ordered[at],
                id=str(17900000000000000 + (first_index + j) * 104729),
                caption="",
                hashtags=hashtags or (),
                timestamp=older + (newer - older) * (count - j) / (count + 1),
                visible=False,
            )
            for j in range(count)
        ]

    def hashtag_media(self, hashtag: str, edge: str = "recent_media") -> list[Media]:
        """A hashtag's result set on ``edge`` (recent_media or top_media), unfiltered, in page order."""
        if edge == "recent_media":
            return recent_media(self.media, hashtag, self.now)
        if edge == "top_media":
            return top_media(self.media, hashtag)
        raise ValueError(f"no hashtag edge {edge!r}")

    def account_media(self, account: Account) -> list[Media]:
        """An account's media edge, unfiltered, newest first."""
        return account_media(self.media, account)

    def offered(
        self, hashtags: Iterable[str] = (), accounts: Iterable[str] = (), edge: str = "recent_media"
    ) -> set[str]:
        """The post ids a client following these hashtags (on ``edge``) and accounts (usernames) should collect, each
        once: the images of the visible media in their result sets, named as the scraper names them (an album's
        image children ``<id>`` and ``<id>_<k>``); videos and albums of videos give none. Unknown names give none."""
        media: dict[str, Media] = {}
        for hashtag in hashtags:
            name = hashtag.lstrip("#").casefold()
            if name in self.hashtags:
                media.update((m.id, m) for m in self.hashtag_media(name, edge))
        for username in accounts:
            account = self.account_by_username.get(username)
            if account is not None:
                media.update((m.id, m) for m in self.account_media(account))
        return {image_id for m in media.values() if m.visible for image_id in m.image_ids}

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
