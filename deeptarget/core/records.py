"""Records that cross process boundaries. They travel as JSON only (Celery's JSON serializer, Redis streams, HTTP)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import numpy as np

MAX_COUNT = 2**63 - 1  # counts go into int64 columns (SQLite, PostgreSQL): one above would fail a whole batch
PUSHED_SOURCES = frozenset({"push", "feed"})
"""Sources whose posts a partner hands over (``POST /ingest``, ``deeptarget enqueue``, partner feeds), as the server
names them. Every other source is a crawl (the Graph API, instaloader folders): the truth about its own posts, which a
pushed record never rewrites (store/posts.py)."""
_HASHTAG_RE = re.compile(r"#(\w+)", re.UNICODE)


def normalise_hashtag(tag: str) -> str:
    """'#Sushi', 'sushi ', '＃ＳＵＳＨＩ' -> 'sushi' (NFKC, casefold, no leading '#')."""
    tag = unicodedata.normalize("NFKC", tag).strip()
    return tag.lstrip("#").casefold()


def hashtags_in(caption: str | None) -> list[str]:
    """Normalised hashtags of a caption, first occurrence order, no repeats."""
    if not caption:
        return []
    seen: dict[str, None] = {}
    for match in _HASHTAG_RE.finditer(unicodedata.normalize("NFKC", caption)):
        seen.setdefault(normalise_hashtag(match.group(1)), None)
    return list(seen)


def vector_id(post_id: str) -> int:
    """The stable int64 FAISS id of a post: the same on every host and across rebuilds, no lookup table needed.

    63 bits of blake2b. Birthday bound n^2 / 2^64: 5e-8 for a million posts, 5e-2 for a billion.
    """
    digest = hashlib.blake2b(post_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


class Owner(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    username: str | None = None
    followers_count: int | None = Field(None, ge=0, le=MAX_COUNT)


class Post(BaseModel):
    """A post as a source described it, normalised. Owner fields are missing where the source does not give them."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1, max_length=200)
    source: str = "graph"
    media_url: str | None = None
    permalink: str | None = None
    caption: str | None = None
    hashtags: list[str] = Field(default_factory=list)
    like_count: int | None = Field(None, ge=0, le=MAX_COUNT)
    comments_count: int | None = Field(None, ge=0, le=MAX_COUNT)
    timestamp: datetime | None = None

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        """A time without an offset is taken as UTC: compared with aware ones it made every since/until query fail."""
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    owner: Owner | None = None

    @property
    def pushed(self) -> bool:
        """Handed over by a partner rather than crawled (``PUSHED_SOURCES``)."""
        return self.source in PUSHED_SOURCES

    @property
    def engagement(self) -> float | None:
        """likes / followers, as in the likability study; None when either is unknown."""
        if self.like_count is None or self.owner is None or not self.owner.followers_count:
            return None
        return self.like_count / self.owner.followers_count


class PostStatus(StrEnum):
    """Where a stored post stands (the store's ``posts.status`` column holds these values): ``queued`` (known, not
    processed) -> ``embedded`` (embedding stored) -> ``indexed`` (in the FAISS writer's index), or ``rejected`` with a
    reason at any point, or ``deleted`` for good."""

    QUEUED = "queued"
    EMBEDDED = "embedded"
    INDEXED = "indexed"
    REJECTED = "rejected"
    DELETED = "deleted"


class PostRef(BaseModel):
    """What the scraper puts on the infer queue: the post, and either its stored image or why there is none."""

    post: Post
    blob: str | None = Field(None, description="sha256 of the image in the blob store")
    rejected: str | None = Field(None, description="reason the scraper could not fetch a usable image")


class Prediction(BaseModel):
    """What the infer task found in one image."""

    post_id: str
    status: Literal[PostStatus.EMBEDDED, PostStatus.REJECTED]
    reason: str | None = None
    faces: int = 0
    face_confidence: float | None = None
    face_boxes: list[tuple[int, int, int, int]] = Field(default_factory=list)
    classes: dict[str, dict[str, float]] = Field(default_factory=dict, description="head -> class -> probability")
    model_id: str | None = None


class InferResult(NamedTuple):
    """What the infer stage made of one post, as the store records it (``MetadataStore.record_results``). The one
    record here that stays in its process (it holds an array); a plain 4-tuple in this order is one too."""

    post: Post
    blob: str | None  # sha256 of the image in the blob store
    prediction: Prediction
    embedding: np.ndarray | None


class Profile(BaseModel):
    """A user's interest profile, rolled up from their posts."""

    user_id: str
    username: str | None = None
    followers_count: int | None = None
    post_count: int = 0
    face_share: float = 0.0
    median_engagement: float | None = None
    follower_outlier: bool | None = Field(
        None, description="follower count outside median +- k*MAD of the accounts seen (None: unknown)"
    )
    hashtags: dict[str, float] = Field(default_factory=dict, description="hashtag -> weight share, summing to 1")
    classes: dict[str, dict[str, float]] = Field(default_factory=dict, description="head -> class -> weight share")
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
