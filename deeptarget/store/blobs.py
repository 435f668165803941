"""Content-addressed blob store: an image lives at ``<root>/ab/cd/<sha256>``, written whole or not at all.

With a bucket (``BlobStore(root, bucket=...)``, or ``BlobStore.for_settings`` when ``object_store_url`` is set) the
bucket holds every image under ``blobs/ab/cd/<sha256>`` and ``root`` is this process's cache of them, bounded to
``cache_bytes`` (the least recently used go first). A commit uploads the image (whole or absent: an S3 PUT) before
it answers, so a worker on another host can read it the moment the post is queued.

A write that fails because of the store, not the image (disk full, quota, I/O error, a read-only or unwritable or
unmounted volume, no file descriptors left), raises ``StorageUnavailable``: an outage to wait out, never a reason to
reject the image. Every other ``OSError`` is that one write's (a file too big for the file system).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from deeptarget.core.errors import PASSING_DISK_ERRNOS

if TYPE_CHECKING:
    from deeptarget.core.settings import Settings
    from deeptarget.store.bucket import Bucket

LOG = logging.getLogger(__name__)

_HEX = set("0123456789abcdef")

# The store's condition, not the image's: the same write succeeds once an operator (or time) fixes it. Permission
# and read-only errors are here too: the paths are ours, so they mean the volume changed, and rejecting every post
# until someone notices would lose them all.
OUTAGE_ERRNOS = PASSING_DISK_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT}
PROBE_BYTES = 64 * 1024


class StorageUnavailable(OSError):
    """The blob store cannot take a write now (see ``OUTAGE_ERRNOS``); the same write may succeed later."""


@contextmanager
def _outages() -> Iterator[None]:
    """``OSError`` s of the store's condition become ``StorageUnavailable``; the rest pass as they are."""
    try:
        yield
    except StorageUnavailable:
        raise
    except OSError as err:
        if err.errno in OUTAGE_ERRNOS:
            raise StorageUnavailable(err.errno, err.strerror, err.filename) from err
        raise


class BlobStore:
    def __init__(self, root: Path, *, bucket: Bucket | None = None, cache_bytes: int = 2 * 2**30) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(exist_ok=True)
        self.bucket = bucket
        self.cache = _CacheBound(self.root, cache_bytes) if bucket is not None else None

    @classmethod
    def for_settings(cls, settings: Settings) -> BlobStore:
        """The deployment's blob store: the local folder, or the bucket with the folder as this process's cache."""
        from deeptarget.store.remote import attach

        return cls(settings.blob_dir, bucket=attach(settings), cache_bytes=settings.object_cache_bytes)

    def __repr__(self) -> str:
        return f"BlobStore({self.root}{f', {self.bucket}' if self.bucket else ''})"

    def path(self, sha256: str) -> Path:
        """Where the blob lies here (with a bucket: where its cached copy lies, if it is cached)."""
        if len(sha256) != 64 or not set(sha256) <= _HEX:
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    @staticmethod
    def name(sha256: str) -> str:
        """The blob's object name in the bucket."""
        return f"blobs/{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def __contains__(self, sha256: str) -> bool:
        if self.path(sha256).is_file():
            return True
        return self.bucket is not None and self.bucket.exists(self.name(sha256))

    def get(self, sha256: str) -> bytes:
        """The blob's bytes (``FileNotFoundError`` when there is none; with a bucket, ``StorageUnavailable`` while
        it cannot be reached)."""
        return self.file(sha256).read_bytes()

    def file(self, sha256: str) -> Path:
        """A local file holding the blob: the stored one, or the bucket's copy downloaded into the cache."""
        path = self.path(sha256)
        if self.bucket is None or self.cache is None:
            return path
        if path.is_file():
            self.cache.touch(path)
            return path
        self.bucket.get_file(self.name(sha256), path)
        self.cache.added(path)
        return path

    def put(self, data: bytes) -> str:
        writer = self.writer()
        try:
            writer.write(data)
            return writer.commit()
        finally:
            writer.abort()

    def writer(self) -> BlobWriter:
        """A streaming writer: write chunks, then ``commit()`` (returns the sha256) or ``abort()``."""
        return BlobWriter(self)

    def probe(self, size: int = PROBE_BYTES) -> None:
        """Raises ``StorageUnavailable`` unless ``size`` bytes can be written and synced here now (and the bucket,
        if any, answers): what a writer waiting out an outage asks before it tries its image again."""
        if self.bucket is not None:
            self.bucket.probe()
        with _outages():
            self._tmp.mkdir(exist_ok=True)  # swept by hand: the root must exist (an unmounted volume stays down)
            fd, name = tempfile.mkstemp(dir=self._tmp, prefix="probe-")
            try:
                os.write(fd, b"\0" * size)
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(name)


class BlobWriter:
    """Streams to a temporary file in the store and renames it into place on commit.

    A crash leaves only a file under ``tmp/``, never a half-written blob under its hash.
    """

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        with _outages():
            fd, name = tempfile.mkstemp(dir=store._tmp, prefix="part-")
        self._file = os.fdopen(fd, "wb")
        self._tmp_path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, chunk: bytes) -> None:
        with _outages():
            self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def path(self) -> Path:
        """The temporary file (flushed), for checks before ``commit``."""
        with _outages():
            self._file.flush()
        return self._tmp_path

    def commit(self) -> str:
        sha = self._hash.hexdigest()
        with _outages():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final = self._store.path(sha)
        if self._store.bucket is not None:  # uploaded before the answer: whoever reads the sha finds the image
            # only when absent: the same image stored once (a server without conditional writes writes it again)
            self._store.bucket.put_bytes(self._store.name(sha), self._tmp_path.read_bytes(), if_absent=True)
        with _outages():
            if final.exists():  # identical image stored once
                self._tmp_path.unlink(missing_ok=True)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._tmp_path, final)
                if self._store.cache is not None:
                    self._store.cache.added(final)
        self._done = True
        return sha

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with suppress(OSError):  # close flushes what is buffered: on a full disk that fails too, and must not mask why
            self._file.close()
        with suppress(OSError):  # the store is down: a sweep of tmp/ takes it later
            self._tmp_path.unlink(missing_ok=True)


class _CacheBound:
    """Keeps a cache folder of blobs under ``limit`` bytes, the least recently used deleted first.

    The running total is this process's estimate (the folder is shared by a worker's pool processes); when it passes
    the limit, the folder is measured for real and the oldest files (by mtime, which a read refreshes) are deleted
    down to 80 % of it. A reader that loses a file to another process's eviction downloads it again.
    """

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self._total: int | None = None
        self._lock = threading.Lock()

    def touch(self, path: Path) -> None:
        with suppress(OSError):
            os.utime(path)

    def added(self, path: Path) -> None:
        with self._lock:
            if self._total is None:
                self._total = sum(size for _, size, _ in self._files())
            with suppress(OSError):
                self._total += path.stat().st_size
            if self._total > self.limit:
                self._evict()

    def _files(self) -> list[tuple[float, int, Path]]:
        found = []
        for path in self.root.glob("??/??/*"):
            with suppress(OSError):
                st = path.stat()
                found.append((st.st_mtime, st.st_size, path))
        return found

    def _evict(self) -> None:
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        freed = 0
        for _, size, path in files:
            if total - freed <= 0.8 * self.limit:
                break
            with suppress(OSError):
                path.unlink()
                freed += size
        self._total = total - freed
        LOG.info("blob cache %s: evicted %.1f MB, %.1f MB left", self.root, freed / 1e6, self._total / 1e6)
