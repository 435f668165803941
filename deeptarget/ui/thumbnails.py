"""Thumbnails of stored posts' images: made once from the blob store, cached on disk, served by post id.

A request names a post, never a path: the post's row gives the blob's sha256, the blob store the bytes (the local
folder, or the bucket through this process's cache), and the cache file's name is that digest and the size. So no
text from the client reaches the file system, and a post the store does not know, or whose image it does not hold,
is a 404.

The image is decoded by the workers' own hardened decoder (``models.decode.decode_image``: pixel, memory and CPU
limits checked from the header first) at the workers' ``decode_long_side``, so that the face boxes the store
records, which are in that decoded image's pixels, land where the faces are; then it is reduced to the thumbnail
size and written as a JPEG. An image that fails to decode is answered 422 with the reason, and the failure is
remembered for a while, so that a hostile blob costs one decode, not one a request.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Thumbnail:
    path: Path
    etag: str


class Thumbnails:
    def __init__(self, settings: Settings, blobs: BlobStore, cache_dir: Path) -> None:
        self.settings = settings
        self.blobs = blobs
        self.cache_dir = cache_dir
        self._failures: dict[tuple[str, int, bool], tuple[float, ImageRejected]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> Thumbnails:
        return cls(settings, BlobStore.for_settings(settings), settings.data_dir / "thumbnails")

    def get(self, post: StoredPost, size: int, faces: bool) -> Thumbnail:
        """The post's thumbnail (``size`` one of ``SIZES``; with its face boxes drawn when ``faces``), made now if it
        is not cached. Raises ``NotFoundError`` when the store holds no image of the post, ``ImageRejected`` when
        the image does not decode."""
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}")
        if not post.blob:
            raise NotFoundError(f"post {post.post.id} has no stored image")
        boxed = faces and bool(post.face_boxes)
        key = (post.blob, size, boxed)
        path = self.cache_dir / post.blob[:2] / f"{post.blob}-{size}{'-faces' if boxed else ''}.jpg"
        etag = f'"{path.stem}"'
        if path.is_file():
            return Thumbnail(path, etag)
        with self._lock:
            failed = self._failures.get(key)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_MEMORY_S:
            raise failed[1]
        try:
            data = self.blobs.get(post.blob)
        except (FileNotFoundError, ValueError):
            raise NotFoundError(f"the image of post {post.post.id} is not in the blob store") from None
        try:
            jpeg = self._render(data, size, post.face_boxes if boxed else ())
        except ImageRejected as err:
            with self._lock:
                if len(self._failures) >= MAX_FAILURES_KEPT:  # many hostile blobs: forget the oldest half
                    for old in sorted(self._failures, key=lambda k: self._failures[k][0])[: MAX_FAILURES_KEPT // 2]:
                        del self._failures[old]
                self._failures[key] = (time.monotonic(), err)
            raise
        _write_atomically(path, jpeg)
        return Thumbnail(path, etag)

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
