"""A small indexed deployment for the web UI's tests, made by the project's own stages in this process: sandbox
posts (real photographs, some with the astronaut's face) stored in the blob store, run through the workers'
``InferencePipeline`` (decode, face filter, embedding), recorded, indexed by the ``IndexWriter``, a hashtag model
fitted and profiles rolled up. One more post is a decompression bomb: the pipeline rejects it, and its blob stays,
so the UI has a hostile image to show (or refuse to)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from deeptarget.core.records import Owner, Post, PostRef
from deeptarget.core.settings import Settings
from deeptarget.sandbox import SandboxNetwork
from deeptarget.sandbox.network import Media
from deeptarget.store.blobs import BlobStore
from deeptarget.store.metadata import MetadataStore
from deeptarget.workers.pipeline import InferencePipeline
from tests.conftest import make_settings
from tests.helpers import publish_read_side

BOMB_ID = "bomb-1"
N_POSTS = 30


@dataclass
class UiDeployment:
    settings: Settings
    media: dict[str, Media]  # post id -> the sandbox's post
    images: dict[str, bytes]  # post id -> the image stored for it

    @property
    def store(self) -> MetadataStore:
        return MetadataStore(self.settings.metadata_database)


def bomb_png() -> bytes:
    """A 1-bit PNG of 20,000 x 20,000 pixels in about 50 KB: 400M pixels, ten times ``max_image_pixels``."""
    out = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(out, "PNG")
    return out.getvalue()


def post_of(media: Media) -> Post:
    return Post(
        id=media.id,
        source="graph",
        media_url=f"https://scontent.cdninstagram.com/{media.id}.jpg",
        permalink=f"https://www.instagram.com/p/{media.id}/",
        caption=media.caption,
        hashtags=list(media.hashtags),
        like_count=media.like_count,
        comments_count=media.comments_count,
        timestamp=media.timestamp,
        owner=Owner(id=media.owner.id, username=media.owner.username, followers_count=media.owner.followers_count),
    )


def build_ui_deployment(data_dir: Path, redis_url: str, **overrides: object) -> UiDeployment:
    settings = make_settings(data_dir, redis_url, face_policy="tag", **overrides)
    network = SandboxNetwork(seed=11, n_posts=2 * N_POSTS, n_users=8, corrupt_share=0.0, hidden_run=0)
    chosen = [m for m in network.media if m.kind == "IMAGE" and m.visible][:N_POSTS]
    blobs = BlobStore(settings.blob_dir)
    images = {m.id: m.image_bytes() for m in chosen}
    refs = [PostRef(post=post_of(m), blob=blobs.put(images[m.id])) for m in chosen]
    refs.append(PostRef(post=Post(id=BOMB_ID, hashtags=["bomb"]), blob=blobs.put(bomb_png())))
    results = InferencePipeline(settings, blobs)(refs)
    store = MetadataStore(settings.metadata_database)
    store.record_results(results)
    publish_read_side(settings, store, [m.id for m in chosen], sorted({m.owner.id for m in chosen}))
    return UiDeployment(settings, {m.id: m for m in chosen}, images)
