"""The read side, shared by the API and the query CLI: similar images, hashtag suggestions, user profiles, audiences.

Reads the newest published index snapshot and hashtag model (both reload when a new version is published) and the
metadata store. Needs neither Celery nor Redis.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import numpy as np

from deeptarget.core.errors import ConfigurationError, ModelNotReadyError, NotFoundError
from deeptarget.core.records import Profile, normalise_hashtag, vector_id
from deeptarget.core.settings import Settings
from deeptarget.index.deltas import DeltaStream
from deeptarget.index.segments import LiveIndex, LiveReader
from deeptarget.index.vectors import SnapshotStore
from deeptarget.models.decode import decode_image
from deeptarget.models.embedder import Embedder, EmbedderSpec
from deeptarget.models.hashtags import HashtagModel
from deeptarget.models.heads import head_names
from deeptarget.store.metadata import Audience, MetadataStore, StoredPost
from deeptarget.store.remote import attach
from deeptarget.store.versioned import VersionedDir

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbour:
    post_id: str
    score: float
    hashtags: list[str]
    owner: str | None
    permalink: str | None
    faces: int | None

    @classmethod
    def of(cls, stored: StoredPost, score: float) -> Neighbour:
        owner = stored.post.owner
        return cls(
            post_id=stored.post.id,
            score=round(float(score), 6),
            hashtags=stored.post.hashtags,
            owner=(owner.username or owner.id) if owner else None,
            permalink=stored.post.permalink,
            faces=stored.faces,
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PostFilter:
    """Conditions on neighbours: all given ones must hold."""

    hashtag: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    has_face: bool | None = None

    @classmethod
    def parse(
        cls,
        hashtag: str | None = None,
        since: str | None = None,
        until: str | None = None,
        has_face: bool | None = None,
    ) -> PostFilter:
        """From user input: the hashtag normalised, ISO dates (UTC unless they say otherwise). ValueError names the
        bad one."""
        return cls(
            hashtag=normalise_hashtag(hashtag) if hashtag else None,
            since=_iso("since", since),
            until=_iso("until", until),
            has_face=has_face,
        )

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.hashtag, self.since, self.until, self.has_face))

    def __call__(self, stored: StoredPost) -> bool:
        post = stored.post
        if self.hashtag is not None and self.hashtag not in post.hashtags:
            return False
        if self.since is not None and (post.timestamp is None or post.timestamp < self.since):
            return False
        if self.until is not None and (post.timestamp is None or post.timestamp >= self.until):
            return False
        return self.has_face is None or ((stored.faces or 0) > 0) == self.has_face


def _iso(name: str, raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{name} must be an ISO date or time, e.g. 2026-11-01") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


NO_FILTER = PostFilter()
MAX_FILTERED_CANDIDATES = 20_000  # a filter that rejects nearly everything stops here instead of scanning it all


class QueryService:
    def __init__(self, settings: Settings, store: MetadataStore | None = None) -> None:
        self.settings = settings
        attach(settings)  # the index and the models come from the bucket, when there is one
        self.store = store or MetadataStore(settings.metadata_database)
        # Without Redis (a notebook), snapshots only: new posts show when the writer publishes one
        deltas = DeltaStream.from_url(settings.redis_url) if settings.redis_url else None
        self.snapshots = LiveReader(SnapshotStore(settings.index_dir), deltas, gpu=settings.device != "cpu")
        self._model_versions = VersionedDir(settings.hashtag_model_dir, ".npz")
        self._model: HashtagModel | None = None
        self._model_stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._index_embedders: dict[str, Embedder | None] = {}  # another model's, for the index being served
        self._embedder_lock = threading.Lock()  # building one takes seconds: hashtag queries need not wait

    @cached_property
    def embedder(self) -> Embedder:
        """Built on first use: only image queries need it."""
        return Embedder.from_settings(self.settings)

    def query_embedder(self, index: LiveIndex | None) -> Embedder:
        """The embedder for query images: the one the settings describe, unless the index being served was made by
        another model that workers recorded and that can still be built (its weights file unchanged). So an API
        answers image queries right through a switch of weights: with the old model until the index is rebuilt for
        the new one, then with the new one, with or without a restart."""
        configured = self.embedder
        if index is None or index.model_id == configured.model_id:
            return configured
        with self._embedder_lock:
            if index.model_id not in self._index_embedders:
                self._index_embedders = {index.model_id: self._build_recorded(index.model_id)}  # keep only one
            return self._index_embedders[index.model_id] or configured

    def _build_recorded(self, model_id: str) -> Embedder | None:
        spec = self.store.model_spec(model_id)
        if spec is None:
            LOG.warning("index model %s was never recorded by a worker: image queries need it configured", model_id)
            return None
        try:
            embedder = Embedder.from_spec(EmbedderSpec(**spec), self.settings)
        except (ConfigurationError, OSError, RuntimeError, TypeError) as err:
            LOG.warning("index model %s cannot be built again (%s): image queries need it configured", model_id, err)
            return None
        if embedder.model_id != model_id:  # the weights file changed since
            LOG.warning("index model %s: its weights file now makes %s", model_id, embedder.model_id)
            return None
        LOG.info("image queries use %s, the model of the index being served (configured: %s)", model_id,
                 self.embedder.model_id)  # fmt: skip
        return embedder

    def index(self) -> LiveIndex:
        index = self.snapshots.get()
        if index is None:
            raise ModelNotReadyError("no index snapshot yet: nothing has been indexed")
        return index

    def hashtag_model(self) -> HashtagModel:
        stamp = self._model_versions.stamp()
        with self._lock:
            if self._model is None or stamp != self._model_stamp:
                self._model = HashtagModel.load(self.settings.hashtag_model_dir)
                self._model_stamp = stamp
            return self._model

    # -- queries --------------------------------------------------------------------------------------------------
    def embed_image(self, data: bytes) -> np.ndarray:
        """Raises ImageRejected for bytes that are not a usable image (size, pixel and decode-cost limits included)."""
        s = self.settings
        image = decode_image(
            data, max_pixels=s.max_image_pixels, long_side=s.decode_long_side, max_decode_bytes=s.max_decode_bytes
        )
        index = self.snapshots.get()
        embedder = self.query_embedder(index)
        embedding: np.ndarray = embedder([image])[0]
        if index is not None:
            index.check_compatible(len(embedding), embedder.model_id)
        return embedding

    def similar_to_vector(self, vector: np.ndarray, k: int = 10, where: PostFilter = NO_FILTER) -> list[Neighbour]:
        """The k nearest posts that pass ``where`` (``similar_posts``), as the API answers them."""
        return [Neighbour.of(stored, score) for stored, score in self.similar_posts(vector, k, where)]

    def similar_posts(
        self, vector: np.ndarray, k: int = 10, where: PostFilter = NO_FILTER
    ) -> list[tuple[StoredPost, float]]:
        """The k nearest posts that pass ``where``, with their scores, best first. With a filter, candidates are
        fetched in growing rounds (4k, 16k, ...) until k pass or the index (or ``MAX_FILTERED_CANDIDATES``) is
        exhausted. From a quantized base (``index_memory_budget``), ``index.rerank`` times as many candidates (a
        depth tuned with nprobe) are scored again exactly, from the float embeddings the metadata store keeps (a
        quantized code alone finds about 0.86 of the exact top 10 at SQ4)."""
        index = self.index()
        rerank = index.rerank > 1
        fetch = (k * 4 if where.active else k) * index.rerank
        while True:
            scores, ids = index.search(vector[None, :], min(fetch, max(index.ntotal, 1)))
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
            posts = self.store.posts_by_vector_ids(i for i, _ in found)
            if rerank:
                found = self._exactly(vector, found, posts)
            passing = [(posts[i], s) for i, s in found if i in posts and where(posts[i])]
            if len(passing) >= k or fetch >= index.ntotal or fetch >= MAX_FILTERED_CANDIDATES:
                return passing[:k]
            fetch *= 4

    def _exactly(
        self, vector: np.ndarray, found: list[tuple[int, float]], posts: dict[int, StoredPost]
    ) -> list[tuple[int, float]]:
        """Candidates scored by their stored float embeddings, best first (a candidate without one keeps the
        index's score)."""
        rows = self.store.embeddings([posts[i].post.id for i, _ in found if i in posts])
        if rows.vectors.ndim != 2 or rows.vectors.shape[1] != len(vector):  # another model's: nothing to compare
            return found
        exact = dict(zip(rows.vector_ids.tolist(), (rows.vectors @ vector).tolist(), strict=True))
        rescored = [(i, float(exact.get(i, s))) for i, s in found]
        return sorted(rescored, key=lambda pair: -pair[1])

    def similar_to_post(self, post_id: str, k: int = 10, where: PostFilter = NO_FILTER) -> list[Neighbour]:
        return self.similar_to_vector(self.post_vector(post_id), k, where)

    def post_vector(self, post_id: str) -> np.ndarray:
        """An indexed post's vector, as the index holds it (``NotFoundError`` when it does not)."""
        vector = self.index().reconstruct(vector_id(post_id))
        if vector is None:
            raise NotFoundError(f"post {post_id} is not in the index")
        return vector

    def similar_to_image(self, data: bytes, k: int = 10, where: PostFilter = NO_FILTER) -> list[Neighbour]:
        return self.similar_to_vector(self.embed_image(data), k, where)

    def suggest_hashtags(self, data: bytes, n: int = 10) -> tuple[list[tuple[str, float]], list[Neighbour]]:
        """Hashtags for a new image: FAISS neighbours -> their mean ALS factors -> hashtag scores."""
        return self._suggest(self.embed_image(data), n)

    def suggest_hashtags_for_vector(self, vector: np.ndarray, n: int = 10) -> list[tuple[str, float]]:
        """``suggest_hashtags`` for an image embedded already (the UI embeds an upload once for both)."""
        return self._suggest(vector, n)[0]

    def _suggest(self, vector: np.ndarray, n: int) -> tuple[list[tuple[str, float]], list[Neighbour]]:
        neighbours = self.similar_to_vector(vector, self.settings.als_neighbours)
        if not neighbours:
            raise ModelNotReadyError("the index is empty")
        model = self.hashtag_model()
        tags = model.suggest(
            np.array([vector_id(nb.post_id) for nb in neighbours], np.int64), n=n, exclude=self.settings.stop_hashtags
        )
        return tags, neighbours

    def profile(self, user: str) -> Profile:
        """A profile by user id or username."""
        profile = self.store.profile(user)
        if profile is None:
            user_id = self.store.user_id_for_username(user)
            profile = self.store.profile(user_id) if user_id else None
        if profile is None:
            raise NotFoundError(f"no profile for user {user!r}")
        return profile

    def resolve_interest(self, interest: str) -> str:
        """``#sushi`` -> hashtag; ``food:sushi`` -> class of head food; ``sushi`` -> a class of any published head
        called that, else the hashtag. Raises NotFoundError when no profile has it."""
        name = interest.strip()
        if name.startswith("#"):
            candidates = [f"hashtag:{normalise_hashtag(name)}"]
        elif ":" in name:
            candidates = [f"class:{name}"]
        else:
            heads = head_names(self.settings.heads_dir)
            candidates = [f"class:{head}:{name}" for head in heads] + [f"hashtag:{normalise_hashtag(name)}"]
        for key in candidates:
            if self.store.has_interest(key):
                return key
        raise NotFoundError(f"no profile shows interest {interest!r} (looked for {', '.join(candidates)})")

    def audience(
        self,
        interest: str,
        min_score: float = 0.0,
        min_posts: int = 1,
        limit: int = 100,
        exclude_outliers: bool = False,
    ) -> tuple[str, list[Audience]]:
        """(the interest key used, users ranked by their share of it), optionally without follower-count outliers."""
        key = self.resolve_interest(interest)
        return key, self.store.audience(key, min_score, min_posts, limit, exclude_outliers)
