"""Graph API JSON -> the project's Post record, in one place.

What a Graph answer says is checked as a pushed record is (push.py; issue 12, L8/L9): a media id, a child id and an
owner id match ``push.ID_PATTERN`` (Graph ids are numeric strings), so every stored id can be named on the command
line and in a URL path (``deeptarget delete``, ``query --post-id``, ``DELETE /posts/{id}``); a username is 1 to 30
letters, digits, periods and underscores (Instagram's rule as publishers document it, see push.py: no Instagram
reference page states it, so this is our assumption). A bad media or child id makes the node malformed
(``ValueError``: the scraper's ``malformed_media``); a bad owner makes the owner unknown.

A caption is cut to Instagram's 2,200 characters and its hashtags to Instagram's 30, an album to ``MAX_ALBUM_CHILDREN``
images: what a real post cannot have, a hostile answer does not get stored either, and the post's image is kept.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from datetime import datetime
from typing import Any

from deeptarget.core.records import MAX_COUNT, Owner, Post, hashtags_in
from deeptarget.scraper.push import (
    ID_PATTERN,
    MAX_CAPTION_CHARS,
    MAX_HASHTAG_CHARS,
    MAX_HASHTAGS,
    MAX_ID_CHARS,
    MAX_USERNAME_CHARS,
    USERNAME_PATTERN,
)

LOG = logging.getLogger(__name__)

MEDIA_FIELDS = (
    "id,caption,media_type,media_url,permalink,timestamp,like_count,comments_count,children{media_type,media_url}"
)
IMAGE_TYPES = {"IMAGE", "CAROUSEL_ALBUM"}
# The Content Publishing API takes albums of up to 10 items and Instagram's apps up to 20 (since 2024, as publishers
# report it; the Graph reference says nothing): our assumption, with room to spare.
MAX_ALBUM_CHILDREN = 20
_ID_RE = re.compile(ID_PATTERN)
_USERNAME_RE = re.compile(USERNAME_PATTERN)
_KEPT_CONTROLS = "\t\n\r"


def shown(value: object) -> str:
    """A hostile value as a log line may show it: 40 characters at most, escapes for anything not printable ASCII
    (an ANSI sequence, bidi controls, rich markup's brackets stay inert text)."""
    return ascii(value if not isinstance(value, str) else value[:40])[:60]


def graph_id(value: object) -> str | None:
    """A Graph id as we store ids (``push.ID_PATTERN``, at most ``MAX_ID_CHARS``), or None if it cannot be one. A
    whole number is taken as its digits (Graph ids are numeric strings; a source may send them as numbers)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        value = str(value)
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS and _ID_RE.fullmatch(value):
        return value
    return None


def username(value: object) -> str | None:
    """An Instagram username (1 to 30 letters, digits, periods and underscores), or None if it cannot be one."""
    if isinstance(value, str) and len(value) <= MAX_USERNAME_CHARS and _USERNAME_RE.fullmatch(value):
        return value
    return None


def owner_from_account(account: dict[str, Any], target: str) -> Owner | None:
    """The owner a Business Discovery answer describes (the account asked for by username ``target``), or None when
    its id or username is not one: the account's posts are kept, with the unknown owner a hashtag crawl gives them
    too, rather than stored under a name no command can reach or print. A followers count out of bounds is unknown."""
    if not isinstance(account, dict):
        return None
    owner_id = graph_id(account.get("id") or target)
    name = username(account.get("username") or target)
    if owner_id is None or name is None:
        LOG.warning("account %s: the answer's owner id %s or username %s is not one; its posts keep no owner",
                    shown(target), shown(account.get("id")), shown(account.get("username")))  # fmt: skip
        return None
    followers = account.get("followers_count")
    valid = isinstance(followers, int) and not isinstance(followers, bool) and 0 <= followers <= MAX_COUNT
    return Owner(id=owner_id, username=name, followers_count=followers if valid else None)


def checked_owner(owner: Owner | None) -> Owner | None:
    """``owner`` if its id and username can be stored as they are, else None (see ``owner_from_account``)."""
    if owner is None:
        return None
    if graph_id(owner.id) is None or (owner.username is not None and username(owner.username) is None):
        LOG.warning("owner %s (%s) is not an id and username; the post keeps no owner",
                    shown(owner.id), shown(owner.username))  # fmt: skip
        return None
    return owner


def parse_timestamp(value: str | None) -> datetime | None:
    """Graph timestamps look like ``2026-11-23T07:00:00+0000``."""
    if not value:
        return None
    if not isinstance(value, str):
        raise ValueError(f"timestamp is not a string: {shown(value)}")
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
        for child in children:
            if isinstance(child, dict) and child.get("id") is not None and graph_id(child["id"]) is None:
                raise ValueError(f"album {post.id}: a child's id is not an id: {shown(child['id'])}")
        urls = [c.get("media_url") for c in children if isinstance(c, dict) and c.get("media_type") == "IMAGE"]
        urls = [u for u in urls if isinstance(u, str) and u]
    else:  # children not given: the album's own media_url is its first image, as far as we can know
        urls = [post.media_url] if post.media_url else []
    if len(urls) > MAX_ALBUM_CHILDREN:
        LOG.warning("album %s: %d images, the first %d kept", post.id, len(urls), MAX_ALBUM_CHILDREN)
        urls = urls[:MAX_ALBUM_CHILDREN]
    return [
        post.model_copy(update={"id": post.id if k == 0 else f"{post.id}_{k}", "media_url": url})
        for k, url in enumerate(urls)
    ]


def post_from_media(node: dict[str, Any], *, source: str, owner: Owner | None = None) -> Post:
    """One media node as a Post. Raises ``ValueError`` (pydantic's or ours) on a node that makes no sense."""
    if not isinstance(node, dict) or node.get("id") is None:
        raise ValueError("media node without id")
    post_id = graph_id(node["id"])
    if post_id is None:
        raise ValueError(f"media node id is not an id (letters, digits and _ . : -): {shown(node['id'])}")
    caption = _caption(node.get("caption"), post_id)
    return Post(
        id=post_id,
        source=source,
        media_url=node.get("media_url"),
        permalink=node.get("permalink"),
        caption=caption,
        hashtags=_hashtags(caption, post_id),
        like_count=node.get("like_count"),
        comments_count=node.get("comments_count"),
        timestamp=parse_timestamp(node.get("timestamp")),
        owner=checked_owner(owner),
    )


def _caption(caption: object, post_id: str) -> str | None:
    """The caption as stored: control characters but tab and line breaks left out (they show as nothing and can
    only act on a terminal), cut to Instagram's limit. A lone surrogate cannot be stored: the node is malformed."""
    if caption is None:
        return None
    if not isinstance(caption, str):
        raise ValueError(f"caption is not a string: {type(caption).__name__}")
    if len(caption) > MAX_CAPTION_CHARS:
        LOG.warning("post %s: caption of %d characters cut to %d", post_id, len(caption), MAX_CAPTION_CHARS)
        caption = caption[:MAX_CAPTION_CHARS]
    if any(unicodedata.category(c) == "Cs" for c in caption):
        raise ValueError("caption is not valid Unicode (a lone surrogate)")
    return "".join(c for c in caption if c in _KEPT_CONTROLS or unicodedata.category(c) != "Cc")


def _hashtags(caption: str | None, post_id: str) -> list[str]:
    """The caption's hashtags, as many as Instagram allows a post, each at most ``MAX_HASHTAG_CHARS``."""
    tags = [t for t in hashtags_in(caption) if len(t) <= MAX_HASHTAG_CHARS]
    if len(tags) > MAX_HASHTAGS:
        LOG.warning("post %s: %d hashtags, the first %d kept", post_id, len(tags), MAX_HASHTAGS)
    return tags[:MAX_HASHTAGS]


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
