"""Instaloader download folders as a source.

Instaloader (``instaloader --no-compress-json`` or not) writes, per post, the image(s) and a metadata sidecar named
after the post's UTC time: ``2026-11-20_18-04-11_UTC.jpg`` (carousels: ``..._UTC_1.jpg``, ``_2.jpg`` ...) and
``2026-11-20_18-04-11_UTC.json.xz`` (or ``.json``): ``{"node": {GraphQL media node}, "instaloader": {"node_type":
"Post", ...}}``. A profile download adds ``<username>_<id>.json.xz`` with the profile node, which is where the follower
count comes from (``edge_followed_by.count``). Hashtag downloads have no profile file: their posts keep owner id and
username, without followers.

Posts become ``Post`` records (caption hashtags, likes, comments, time, owner); their image is read from the folder
(only from inside it) into the blob store with the same checks as a download. Videos are skipped and counted.

The folder is hostile input (issue 12, L6): whoever wrote it may have put anything there. Only regular files inside
the folder are read (a symlink that leads out of it, a FIFO or a device is refused, and files are opened with
``O_NOFOLLOW``), a sidecar is decompressed with a bound on its output (``max_sidecar_bytes``: a 61 KB ``.json.xz``
once inflated to 1.1 GB) and on the decoder's memory, and every field is checked for its type and range. A sidecar
that fails any of this is that one post's rejection (``SidecarRejected``, with a reason); the others go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import lzma
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from pydantic import ValidationError

from deeptarget.core.errors import ImageRejected
from deeptarget.core.image_header import sniff_image_type
from deeptarget.core.records import MAX_COUNT, Owner, Post, hashtags_in
from deeptarget.scraper.push import EARLIEST_TIMESTAMP, FUTURE_SKEW, ID_PATTERN, MAX_ID_CHARS, USERNAME_PATTERN
from deeptarget.store.blobs import BlobStore

LOG = logging.getLogger(__name__)

SOURCE = "instaloader"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_SIDECAR_BYTES = 8 * 1024 * 1024  # the default of Settings.max_sidecar_bytes; real sidecars are a few KB
XZ_MEMLIMIT = 128 * 1024 * 1024  # instaloader's preset needs ~9 MB; a header may ask for a 1.5 GB dictionary
_CHUNK = 64 * 1024
_ID_RE = re.compile(ID_PATTERN)
_USERNAME_RE = re.compile(USERNAME_PATTERN)
_SHORTCODE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class SidecarRejected(ValueError):
    """A sidecar that cannot be a post. ``reason`` is short and stable; the message adds what was wrong."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class FolderPost:
    post: Post | None  # None: not a usable post (video, malformed), see ``skipped``
    skipped: str | None = None


# -- reading files from inside the folder ---------------------------------------------------------------------------
def open_inside(path: Path, root: Path) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file inside ``root`` (after following any symlink). Raises
    ``SidecarRejected``: ``outside_folder``, ``not_a_regular_file``, ``hard_link``, ``unreadable``."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise SidecarRejected("unreadable", type(err).__name__) from None
    if not real.is_relative_to(Path(root).resolve()):
        raise SidecarRejected("outside_folder", "a symlink that leads out of the folder")
    try:
        if not stat.S_ISREG(real.lstat().st_mode):  # before opening: opening a device can already do something
            raise SidecarRejected("not_a_regular_file", "a FIFO, device, socket or directory")
        descriptor = os.open(real, _OPEN_FLAGS)  # O_NOFOLLOW: not swapped for a symlink since; O_NONBLOCK: no FIFO
    except OSError as err:
        raise SidecarRejected("unreadable", err.strerror or type(err).__name__) from None
    opened = os.fstat(descriptor)
    if not stat.S_ISREG(opened.st_mode):  # swapped for something else between the checks
        os.close(descriptor)
        raise SidecarRejected("not_a_regular_file", "a FIFO, device, socket or directory")
    if opened.st_nlink > 1:  # a hard link shares its inode with a file that may live anywhere on the file system
        os.close(descriptor)
        raise SidecarRejected("hard_link", "a file with other hard links, possibly outside the folder")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def read_bounded(handle: BinaryIO, limit: int, xz: bool) -> bytes:
    """At most ``limit`` bytes of the file (decompressed, for xz). Raises ``SidecarRejected``: ``too_large``,
    ``bad_xz``."""
    if not xz:
        data = handle.read(limit + 1)
        if len(data) > limit:
            raise SidecarRejected("too_large", f"more than {limit} bytes")
        return data
    decompressor = lzma.LZMADecompressor(memlimit=XZ_MEMLIMIT)
    out = bytearray()
    try:
        while not decompressor.eof:
            chunk = handle.read(_CHUNK) if decompressor.needs_input else b""
            if decompressor.needs_input and not chunk:
                raise SidecarRejected("bad_xz", "truncated")
            out += decompressor.decompress(chunk, max_length=limit + 1 - len(out))
            if len(out) > limit:
                raise SidecarRejected("too_large", f"more than {limit} bytes once decompressed")
    except lzma.LZMAError as err:
        raise SidecarRejected("bad_xz", str(err)) from None
    return bytes(out)


def _no_constant(name: str) -> Any:
    raise SidecarRejected("bad_json", f"{name} is not a JSON number")


def read_json(path: Path, root: Path, limit: int = MAX_SIDECAR_BYTES) -> dict[str, Any]:
    """A sidecar's JSON object, read within the bounds. Raises ``SidecarRejected`` with the reason."""
    with open_inside(path, root) as handle:
        raw = read_bounded(handle, limit, path.suffix == ".xz")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SidecarRejected("not_utf8", f"byte {err.start + 1}") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise SidecarRejected("bad_json", f"{err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise SidecarRejected("bad_json", "nested too deeply") from None
    except SidecarRejected:
        raise
    except ValueError as err:  # an integer of more digits than Python converts
        raise SidecarRejected("bad_json", str(err).split(":")[0]) from None
    if not isinstance(value, dict):
        raise SidecarRejected("bad_shape", f"a JSON {type(value).__name__}, not an object")
    return value


# -- checked fields ---------------------------------------------------------------------------------------------------
def _bad(where: str, expected: str) -> SidecarRejected:
    return SidecarRejected("bad_field", f"{where} must be {expected}")


def _object(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{where}{key}", "an object")
    return value


def _text(parent: dict[str, Any], key: str, where: str) -> str | None:
    value = parent.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(f"{where}{key}", "a string")
    return value


def _flag(parent: dict[str, Any], key: str, where: str) -> bool:
    value = parent.get(key)
    if value is not None and not isinstance(value, bool):
        raise _bad(f"{where}{key}", "true or false")
    return bool(value)


def _identifier(parent: dict[str, Any], key: str, where: str) -> str | None:
    """An id: a string (instaloader's) or a whole number, as a post id must look (``push.ID_PATTERN``)."""
    value = parent.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        value = str(value)
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS or not _ID_RE.fullmatch(value):
        raise _bad(f"{where}{key}", f"an id: up to {MAX_ID_CHARS} letters, digits and _ . : -")
    return value


def _username(parent: dict[str, Any], where: str) -> str | None:
    value = _text(parent, "username", where)
    if value is not None and (len(value) > 30 or not _USERNAME_RE.fullmatch(value)):
        raise _bad(f"{where}username", "1 to 30 letters, digits, periods and underscores")
    return value


def _count(node: dict[str, Any], *edges: str) -> int | None:
    for edge in edges:
        value = _object(node, edge, "node.").get("count")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            raise _bad(f"node.{edge}.count", f"a whole number from 0 to {MAX_COUNT}")
        return value
    return None


def _timestamp(node: dict[str, Any]) -> datetime | None:
    value = node.get("taken_at_timestamp")
    if value is None:
        return None
    expected = f"seconds since 1970 from {EARLIEST_TIMESTAMP.date()} to a day ahead"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad("node.taken_at_timestamp", expected)
    try:
        when = datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):  # far out of range, or inf
        raise _bad("node.taken_at_timestamp", expected) from None
    if not EARLIEST_TIMESTAMP <= when <= datetime.now(UTC) + FUTURE_SKEW:
        raise _bad("node.taken_at_timestamp", expected)
    return when


def _caption(node: dict[str, Any]) -> str | None:
    edges = _object(node, "edge_media_to_caption", "node.").get("edges")
    if edges is None:
        return None
    if not isinstance(edges, list):
        raise _bad("node.edge_media_to_caption.edges", "a list")
    if not edges:
        return None
    if not isinstance(edges[0], dict):
        raise _bad("node.edge_media_to_caption.edges[0]", "an object")
    where = "node.edge_media_to_caption.edges[0]."
    return _text(_object(edges[0], "node", where), "text", f"{where}node.")


def _node_type(data: dict[str, Any], default: str | None) -> str | None:
    return _text(_object(data, "instaloader", ""), "node_type", "instaloader.") or default


# -- profiles and posts -----------------------------------------------------------------------------------------------
def _profiles(folder: Path, root: Path, limit: int) -> dict[str, Owner]:
    """Owners by id from the profile sidecars in ``folder`` (``<username>_<id>.json[.xz]``; post sidecars end in
    ``_UTC``). A broken one is logged and left out: its posts keep the owner their own node names."""
    owners = {}
    for path in sorted([*folder.glob("*.json.xz"), *folder.glob("*.json")]):
        if path.name.removesuffix(".xz").removesuffix(".json").endswith("_UTC"):
            continue
        try:
            data = read_json(path, root, limit)
            if _node_type(data, None) != "Profile":
                continue
            node = _object(data, "node", "")
            owner_id = _identifier(node, "id", "node.")
            if owner_id:
                owners[owner_id] = Owner(
                    id=owner_id, username=_username(node, "node."), followers_count=_count(node, "edge_followed_by")
                )
        except SidecarRejected as err:
            LOG.warning("%s: profile sidecar not used: %s", path, err)
    return owners


def _image_for(sidecar: Path) -> Path | None:
    """The post's (first) image beside its sidecar. Whatever is there under that name, a symlink or a FIFO too, is
    the post's image: ``LocalImages`` then says why it cannot be used, so the post is rejected with that reason."""
    stem = sidecar.name.removesuffix(".xz").removesuffix(".json")
    for suffix in IMAGE_SUFFIXES:
        for candidate in (sidecar.with_name(stem + suffix), sidecar.with_name(f"{stem}_1{suffix}")):
            if os.path.lexists(candidate) and not candidate.is_dir():
                return candidate
    return None


def post_from_sidecar(
    sidecar: Path, owners: dict[str, Owner], root: Path | None = None, limit: int = MAX_SIDECAR_BYTES
) -> FolderPost:
    """The post of one sidecar under ``root`` (default: its own folder). Raises ``SidecarRejected``."""
    data = read_json(sidecar, sidecar.parent if root is None else root, limit)
    if _node_type(data, "Post") != "Post":
        return FolderPost(None, "not_a_post")
    node = _object(data, "node", "")
    post_id = _identifier(node, "id", "node.")
    if not post_id:
        raise SidecarRejected("no_id", "post node without id")
    if _flag(node, "is_video", "node.") and _text(node, "__typename", "node.") != "GraphSidecar":
        return FolderPost(None, "video")
    caption = _caption(node)
    shortcode = _text(node, "shortcode", "node.")
    if shortcode is not None and not _SHORTCODE_RE.fullmatch(shortcode):
        raise _bad("node.shortcode", "1 to 64 letters, digits, _ and -")
    owner_node = _object(node, "owner", "node.")
    owner_id = _identifier(owner_node, "id", "node.owner.")
    owner = owners.get(owner_id) if owner_id else None
    if owner is None and owner_id:
        owner = Owner(id=owner_id, username=_username(owner_node, "node.owner."))
    like_count = _count(node, "edge_liked_by", "edge_media_preview_like")
    comments_count = _count(node, "edge_media_to_comment", "edge_media_to_parent_comment")
    timestamp = _timestamp(node)
    image = _image_for(sidecar)
    if image is None:
        return FolderPost(None, "no_image_file")
    try:
        post = Post(
            id=post_id,
            source=SOURCE,
            media_url=image.absolute().as_uri(),  # not resolved: LocalImages checks where a symlink leads
            permalink=f"https://www.instagram.com/p/{shortcode}/" if shortcode else None,
            caption=caption,
            hashtags=hashtags_in(caption),
            owner=owner,
            like_count=like_count,
            comments_count=comments_count,
            timestamp=timestamp,
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise SidecarRejected("bad_field", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return FolderPost(post)


def _folders(root: Path) -> list[Path]:
    """``root`` and the folders below it that hold sidecars; symlinked folders are not entered."""
    found = set()
    for directory, subdirectories, files in os.walk(root, followlinks=False):
        if any(name.endswith((".json", ".json.xz")) for name in files):
            found.add(Path(directory))
        subdirectories.sort()
    return sorted(found)


def scan(root: Path, max_bytes: int = MAX_SIDECAR_BYTES) -> Iterator[tuple[Path, FolderPost | ValueError]]:
    """Every post sidecar under ``root``: (sidecar, the post or why it is skipped, or why it is rejected: a
    ``SidecarRejected``). One bad sidecar never stops the others."""
    root = Path(root)
    for folder in _folders(root):
        owners = _profiles(folder, root, max_bytes)
        for sidecar in sorted([*folder.glob("*_UTC.json.xz"), *folder.glob("*_UTC.json")]):
            try:
                yield sidecar, post_from_sidecar(sidecar, owners, root, max_bytes)
            except SidecarRejected as err:
                yield sidecar, err
            except Exception as err:  # the one per-item boundary: a shape no check foresaw is still one post's
                LOG.exception("%s: unexpected failure reading the sidecar", sidecar)
                yield sidecar, SidecarRejected("unreadable", type(err).__name__)


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
        if parsed.scheme != "file":
            raise ImageRejected("not_allowed", "not a file:// URL")
        path = Path(unquote(parsed.path))
        if not Path(os.path.realpath(path)).is_relative_to(self.root):
            raise ImageRejected("not_allowed", f"{path.name} is (or leads) outside {self.root}")
        if not os.path.lexists(path):
            raise ImageRejected("no_image_file", f"{path} does not exist")
        try:
            with open_inside(path, self.root) as handle:
                data = read_bounded(handle, self.max_bytes, xz=False)
        except SidecarRejected as err:
            reason = {"outside_folder": "not_allowed", "too_large": "too_large"}.get(err.reason, err.reason)
            raise ImageRejected(reason, f"{path.name}: {err}") from None
        if not data:
            raise ImageRejected("empty_image")
        if sniff_image_type(data[:16]) is None:
            raise ImageRejected("not_an_image", f"magic bytes {data[:8]!r}")
        return self.blobs.put(data), len(data)
