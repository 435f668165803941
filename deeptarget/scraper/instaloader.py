"""Instaloader download folders as a source.

Instaloader (``instaloader --no-compress-json`` or not) writes, per post, the image(s) and a metadata sidecar named
after the post's UTC time: ``2026-11-20_18-04-11_UTC.jpg`` (carousels: ``..._UTC_1.jpg``, ``_2.jpg`` ...) and
``2026-11-20_18-04-11_UTC.json.xz`` (or ``.json``): ``{"node": {GraphQL media node}, "instaloader": {"node_type":
"Post", ...}}``. A profile download adds ``<username>_<id>.json.xz`` with the profile node, which is where the follower
count comes from (``edge_followed_by.count``). Hashtag downloads have no profile file: their posts keep owner id and
username, without followers.

Posts become ``Post`` records (caption hashtags, likes, comments, time, owner); their image is read from the folder
(only from inside it) into the blob store with the same checks as a download. Videos are skipped and counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from deeptarget.blobs import BlobStore
from deeptarget.errors import ImageRejected
from deeptarget.models.decode import sniff_image_type
from deeptarget.schema import Owner, Post, hashtags_in

LOG = logging.getLogger(__name__)

SOURCE = "instaloader"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class FolderPost:
    post: Post | None  # None: not a usable post (video, malformed), see ``skipped``
    skipped: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _count(node: dict[str, Any], *edges: str) -> int | None:
    for edge in edges:
        value = (node.get(edge) or {}).get("count")
        if isinstance(value, int):
            return value
    return None


def _profiles(folder: Path) -> dict[str, Owner]:
    """Owners by id from the profile sidecars in ``folder``."""
    owners = {}
    for path in [*folder.glob("*.json.xz"), *folder.glob("*.json")]:
        try:
            data = _read_json(path)
        except (OSError, ValueError, lzma.LZMAError):
            continue
        if (data.get("instaloader") or {}).get("node_type") != "Profile":
            continue
        node = data.get("node") or {}
        if node.get("id"):
            owners[str(node["id"])] = Owner(
                id=str(node["id"]), username=node.get("username"), followers_count=_count(node, "edge_followed_by")
            )
    return owners


def _image_for(sidecar: Path) -> Path | None:
    stem = sidecar.name.removesuffix(".xz").removesuffix(".json")
    for suffix in IMAGE_SUFFIXES:
        for candidate in (sidecar.with_name(stem + suffix), sidecar.with_name(f"{stem}_1{suffix}")):
            if candidate.is_file():
                return candidate
    return None


def post_from_sidecar(sidecar: Path, owners: dict[str, Owner]) -> FolderPost:
    data = _read_json(sidecar)
    if (data.get("instaloader") or {}).get("node_type", "Post") != "Post":
        return FolderPost(None, "not_a_post")
    node = data.get("node") or {}
    if not node.get("id"):
        raise ValueError("post node without id")
    if node.get("is_video") and node.get("__typename") != "GraphSidecar":
        return FolderPost(None, "video")
    image = _image_for(sidecar)
    if image is None:
        return FolderPost(None, "no_image_file")
    captions = (node.get("edge_media_to_caption") or {}).get("edges") or []
    caption = (captions[0].get("node") or {}).get("text") if captions else None
    owner_node = node.get("owner") or {}
    owner = owners.get(str(owner_node.get("id"))) if owner_node.get("id") else None
    if owner is None and owner_node.get("id"):
        owner = Owner(id=str(owner_node["id"]), username=owner_node.get("username"))
    taken_at = node.get("taken_at_timestamp")
    return FolderPost(
        Post(
            id=str(node["id"]),
            source=SOURCE,
            media_url=image.resolve().as_uri(),
            permalink=f"https://www.instagram.com/p/{node['shortcode']}/" if node.get("shortcode") else None,
            caption=caption,
            hashtags=hashtags_in(caption),
            like_count=_count(node, "edge_liked_by", "edge_media_preview_like"),
            comments_count=_count(node, "edge_media_to_comment", "edge_media_to_parent_comment"),
            timestamp=datetime.fromtimestamp(taken_at, UTC) if isinstance(taken_at, int | float) else None,
            owner=owner,
        )
    )


def scan(root: Path) -> Iterator[tuple[Path, FolderPost | ValueError]]:
    """Every post sidecar under ``root``: (sidecar, the post or why it is skipped, or the parse error)."""
    for folder in sorted({p.parent for p in root.rglob("*.json*")}):
        owners = _profiles(folder)
        for sidecar in sorted([*folder.glob("*_UTC.json.xz"), *folder.glob("*_UTC.json")]):
            try:
                yield sidecar, post_from_sidecar(sidecar, owners)
            except (OSError, ValueError, lzma.LZMAError, TypeError) as err:
                yield sidecar, ValueError(f"{type(err).__name__}: {err}")


class LocalImages:
    """Fetches ``file://`` images from inside ``root`` into the blob store, with the checks a download gets."""

    def __init__(self, root: Path, blobs: BlobStore, max_bytes: int) -> None:
        self.root = Path(root).resolve()
        self.blobs = blobs
        self.max_bytes = max_bytes

    async def __call__(self, url: str) -> tuple[str, int]:
        return await asyncio.to_thread(self._store, url)

    def _store(self, url: str) -> tuple[str, int]:
        parsed = urlparse(url)
        path = Path(unquote(parsed.path)).resolve()
        if parsed.scheme != "file" or not path.is_relative_to(self.root):
            raise ImageRejected("not_allowed", f"{url} is outside {self.root}")
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise ImageRejected("too_large", f"{size} bytes > {self.max_bytes}")
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise ImageRejected("no_image_file", str(err)) from err
        if not data:
            raise ImageRejected("empty_image")
        if sniff_image_type(data[:16]) is None:
            raise ImageRejected("not_an_image", f"magic bytes {data[:8]!r}")
        return self.blobs.put(data), len(data)
