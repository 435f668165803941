"""Thumbnails of stored posts' images: made once from the blob store, cached on disk, served by post id.

A request names a post, never a path: the post's row gives the blob's sha256, the blob store the bytes (the local
folder, or the bucket through this process's cache), and the cache file's name is that digest and the size. So no
text from the client reaches the file system, and a post the store does not know, or whose image it does not hold,
is a 404.

The image is decoded by the workers' own hardened decoder (``models.decode.decode_image``: pixel, memory and CPU
limits checked from the header first) at the workers' ``decode_long_side``, so that the face boxes the store
records, which are in that decoded image's pixels, land where the faces are; then it is reduced to the thumbnail
size and written as a JPEG. An image that fails to decode is answered 422 with the reason, and the failure is
remembered for a while, so that a hostile blob costs one decode, not one a request. Only the decode takes one of the
API's decode slots; a cached thumbnail is a file lookup. The cache is not evicted (a few KB a post); a deleted post's
thumbnails are never served again (its row says deleted) but stay on disk until the folder is cleared.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw

from deeptarget.core.errors import ImageRejected, NotFoundError
from deeptarget.core.settings import Settings
from deeptarget.models.decode import decode_image
from deeptarget.store.blobs import BlobStore
from deeptarget.store.posts import StoredPost

SIZES = (160, 320)  # the long sides served: grid cells and a larger view
FAILURE_MEMORY_S = 600.0
MAX_FAILURES_KEPT = 10_000
BOX_COLOUR = (255, 214, 0)


class Thumbnails:
    """Thumbnails by post: ``cached`` (a file lookup), then ``image`` (the blob) and ``make`` (the decode, the one
    step that needs a decode slot)."""

    def __init__(self, settings: Settings, blobs: BlobStore, cache_dir: Path) -> None:
        self.settings = settings
        self.blobs = blobs
        self.cache_dir = cache_dir
        self._failures: dict[Path, tuple[float, str, str]] = {}  # cache path -> (when, reason, detail)
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> Thumbnails:
        return cls(settings, BlobStore.for_settings(settings), settings.data_dir / "thumbnails")

    def path(self, post: StoredPost, size: int, faces: bool) -> Path:
        """Where the thumbnail lies: named by the blob's digest, the size and, with faces drawn, a digest of the
        boxes (so a post processed again with other boxes gets a new file)."""
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}")
        if not post.blob:
            raise NotFoundError(f"post {post.post.id} has no stored image")
        boxes = ""
        if faces and post.face_boxes:
            boxes = "-" + hashlib.sha256(json.dumps(post.face_boxes).encode()).hexdigest()[:12]
        return self.cache_dir / post.blob[:2] / f"{post.blob}-{size}{boxes}.jpg"

    def cached(self, post: StoredPost, size: int, faces: bool) -> Path | None:
        """The cached thumbnail, or None; raises the image's ``ImageRejected`` again while its failure is
        remembered (a new exception each time: one kept and raised again would keep every request's frames)."""
        path = self.path(post, size, faces)
        if path.is_file():
            return path
        with self._lock:
            failed = self._failures.get(path)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_MEMORY_S:
            raise ImageRejected(failed[1], failed[2])
        return None

    def image(self, post: StoredPost) -> bytes:
        """The post's stored image (``NotFoundError`` when the store has none; ``StorageUnavailable`` while the
        bucket cannot be reached)."""
        assert post.blob
        try:
            return self.blobs.get(post.blob)
        except (FileNotFoundError, ValueError):
            raise NotFoundError(f"the image of post {post.post.id} is not in the blob store") from None

    def make(self, post: StoredPost, size: int, faces: bool, data: bytes) -> Path:
        """Decode, draw, reduce and cache; remembers a failure for ``FAILURE_MEMORY_S``."""
        path = self.path(post, size, faces)
        try:
            jpeg = self._render(data, size, post.face_boxes if faces else ())
        except ImageRejected as err:
            with self._lock:
                if len(self._failures) >= MAX_FAILURES_KEPT:  # many hostile blobs: forget the oldest half
                    for old in sorted(self._failures, key=lambda k: self._failures[k][0])[: MAX_FAILURES_KEPT // 2]:
                        del self._failures[old]
                self._failures[path] = (time.monotonic(), err.reason, err.detail)
            raise
        _write_atomically(path, jpeg)
        return path

    def _render(self, data: bytes, size: int, boxes: tuple[tuple[int, int, int, int], ...]) -> bytes:
        s = self.settings
        pixels = decode_image(data, max_pixels=s.max_image_pixels, long_side=s.decode_long_side,
                              max_decode_bytes=s.max_decode_bytes)  # fmt: skip
        image = Image.fromarray(pixels)
        if boxes:
            draw = ImageDraw.Draw(image)
            width = max(2, round(max(image.size) / 160))  # about 2 px once reduced to the grid's size
            for x, y, w, h in boxes:
                draw.rectangle((x, y, x + w, y + h), outline=BOX_COLOUR, width=width)
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=82, optimize=True)
        return out.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside it and rename: a reader never sees half a thumbnail, and two makers of the
    same one both succeed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
