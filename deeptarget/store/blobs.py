"""Content-addressed blob store: an image lives at ``<root>/ab/cd/<sha256>``, written whole or not at all.

A write that fails because of the store, not the image (disk full, quota, I/O error, a read-only or unwritable or
unmounted volume, no file descriptors left), raises ``StorageUnavailable``: an outage to wait out, never a reason to
reject the image. Every other ``OSError`` is that one write's (a file too big for the file system).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from deeptarget.core.errors import PASSING_DISK_ERRNOS

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
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not set(sha256) <= _HEX:
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def __contains__(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

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
        """Raises ``StorageUnavailable`` unless ``size`` bytes can be written and synced here now: what a writer
        waiting out an outage asks before it tries its image again."""
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
            if final.exists():  # identical image stored once
                self._tmp_path.unlink(missing_ok=True)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._tmp_path, final)
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
