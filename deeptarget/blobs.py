"""Content-addressed blob store: an image lives at ``<root>/ab/cd/<sha256>``, written whole or not at all."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_HEX = set("0123456789abcdef")


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


class BlobWriter:
    """Streams to a temporary file in the store and renames it into place on commit.

    A crash leaves only a file under ``tmp/``, never a half-written blob under its hash.
    """

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store._tmp, prefix="part-")
        self._file = os.fdopen(fd, "wb")
        self._tmp_path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def path(self) -> Path:
        """The temporary file (flushed), for checks before ``commit``."""
        self._file.flush()
        return self._tmp_path

    def commit(self) -> str:
        sha = self._hash.hexdigest()
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
        self._file.close()
        self._tmp_path.unlink(missing_ok=True)
