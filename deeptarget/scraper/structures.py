"""Graph API JSON -> the project's Post record, in one place."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from deeptarget.schema import Owner, Post, hashtags_in

MEDIA_FIELDS = (
    "id,caption,media_type,media_url,permalink,timestamp,like_count,comments_count,children{media_type,media_url}"
)
IMAGE_TYPES = {"IMAGE", "CAROUSEL_ALBUM"}


def parse_timestamp(value: str | None) -> datetime | None:
    """Graph timestamps look like ``2026-11-23T07:00:00+0000``."""
    if not value:
        return None
    if not isinstance(value, str):
        raise ValueError(f"timestamp is not a string: {str(value)[:40]}")
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return datetime.fromisoformat(value)


def posts_from_media(node: dict[str, Any], *, source: str, owner: Owner | None = None) -> list[Post]:
    """The posts one media node becomes: one per image. A carousel album gives one per image child (the first keeps
    the album's id, the others ``<album id>_<k>``, so both ways of meeting an album name its images alike); videos
    and video children give none. Raises ``ValueError`` on a node that makes no sense."""
    post = post_from_media(node, source=source, owner=owner)
    if node.get("media_type") != "CAROUSEL_ALBUM":
        return [post]
    children_edge = node.get("children")
    children = children_edge.get("data") if isinstance(children_edge, dict) else None
    if isinstance(children, list) and children:
        # The children say what the album holds: an album of videos has no image, whatever its own media_url is
        # (that is the first child's, a video's cover or nothing).
        urls = [c.get("media_url") for c in children if isinstance(c, dict) and c.get("media_type") == "IMAGE"]
        urls = [u for u in urls if isinstance(u, str) and u]
    else:  # children not given: the album's own media_url is its first image, as far as we can know
        urls = [post.media_url] if post.media_url else []
    return [
        post.model_copy(update={"id": post.id if k == 0 else f"{post.id}_{k}", "media_url": url})
        for k, url in enumerate(urls)
    ]


def post_from_media(node: dict[str, Any], *, source: str, owner: Owner | None = None) -> Post:
    """One media node as a Post. Raises ``ValueError`` (pydantic's or ours) on a node that makes no sense."""
    if not isinstance(node, dict) or not node.get("id"):
        raise ValueError(f"media node without id: {str(node)[:200]}")
    caption = node.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"caption is not a string: {type(caption).__name__}")
    return Post(
        id=str(node["id"]),
        source=source,
        media_url=node.get("media_url"),
        permalink=node.get("permalink"),
        caption=caption,
        hashtags=hashtags_in(caption),
        like_count=node.get("like_count"),
        comments_count=node.get("comments_count"),
        timestamp=parse_timestamp(node.get("timestamp")),
        owner=owner,
    )


def is_image(node: dict[str, Any]) -> bool:
    media_type = node.get("media_type", "IMAGE")
    return isinstance(media_type, str) and media_type in IMAGE_TYPES


def is_video_album(node: dict[str, Any]) -> bool:
    """A carousel album whose children are all videos: skipped as a video."""
    if node.get("media_type") != "CAROUSEL_ALBUM" or not isinstance(node.get("children"), dict):
        return False
    children = node["children"].get("data")
    return (
        isinstance(children, list)
        and bool(children)
        and all(isinstance(c, dict) and c.get("media_type") == "VIDEO" for c in children)
    )
