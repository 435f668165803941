"""Versioned artefacts in a directory: ``v000001<suffix>`` files written atomically, and a ``CURRENT`` pointer.

Writers write a new version to a temporary name, fsync, rename, then replace ``CURRENT``. Readers follow ``CURRENT``
and never see a half-written file. Used for FAISS snapshots, hashtag models and classification heads.

When the directory lies in a data dir attached to a bucket (``store.remote``), the bucket is the truth and the
directory this process's copy: ``publish`` uploads the version's files, then the bucket's ``CURRENT`` (objects
are whole or absent, so a reader on another host finds the old version or the new one whole); ``current`` and
``stamp`` read the bucket's pointer (at most every ``poll_s``); ``fetch`` downloads a version's files before a
reader opens them; ``prune`` deletes old versions in both places. A bucket outage raises ``StorageUnavailable``
from ``publish``, ``current`` and ``fetch``; ``stamp`` answers what it last saw, so readers keep serving.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from deeptarget.store.blobs import StorageUnavailable
from deeptarget.store.remote import Mirror, mirror_of

LOG = logging.getLogger(__name__)
POINTER = "CURRENT"

_VERSION_RE = re.compile(r"^v(\d{6,})")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync it, rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionedDir:
    def __init__(self, root: Path, suffix: str, *, poll_s: float = 1.0) -> None:
        self.root = Path(root)
        self.suffix = suffix
        self.mirror: Mirror | None = mirror_of(self.root)
        self.poll_s = poll_s  # how often the bucket's pointer is read for ``stamp`` (a GET each time)
        self._seen: tuple[float, int | None] | None = None  # (monotonic time, the bucket's pointer then)

    def path(self, version: int, suffix: str | None = None) -> Path:
        return self.root / self.name(version, suffix)

    def name(self, version: int, suffix: str | None = None) -> str:
        return f"v{version:06d}{self.suffix if suffix is None else suffix}"

    def versions(self) -> list[int]:
        """Versions with a file of ``suffix`` here (and, mirrored, in the bucket)."""
        found = set(self._local_versions())
        if self.mirror is not None:
            found |= {v for v, suffix in self._remote_files() if suffix == self.suffix}
        return sorted(found)

    def _local_versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = {int(m.group(1)) for p in self.root.glob(f"v*{self.suffix}") if (m := _VERSION_RE.match(p.name))}
        return sorted(found)

    def _remote_files(self) -> list[tuple[int, str]]:
        """(version, suffix) of every version file in the bucket."""
        assert self.mirror is not None
        files = []
        for name in self.mirror.bucket.names(self.mirror.name("v")):
            base = name[len(self.mirror.prefix) :]
            if "/" not in base and (m := _VERSION_RE.match(base)):
                files.append((int(m.group(1)), base[m.end() :]))
        return files

    def current(self) -> int | None:
        """The published version, or None when nothing was published yet."""
        if self.mirror is not None:
            try:
                version = _version(self.mirror.bucket.get_bytes(self.mirror.name(POINTER), max_bytes=64))
            except FileNotFoundError:
                version = None
            self._seen = (time.monotonic(), version)
            return version
        try:
            return _version((self.root / POINTER).read_bytes())
        except FileNotFoundError:
            return None

    def stamp(self) -> tuple[int, int] | None:
        """Cheap change detector for readers: (inode, mtime_ns) of CURRENT; mirrored, (version, 0) of the bucket's
        pointer, read at most every ``poll_s`` (during an outage: what it last read)."""
        if self.mirror is not None:
            if self._seen is None or time.monotonic() - self._seen[0] >= self.poll_s:
                try:
                    self.current()
                except StorageUnavailable as err:
                    LOG.warning("cannot read %s from the bucket (%s); keeping v%s", self.mirror.name(POINTER), err,
                                self._seen[1] if self._seen else None)  # fmt: skip
                    self._seen = (time.monotonic(), self._seen[1] if self._seen else None)
            assert self._seen is not None
            return None if self._seen[1] is None else (self._seen[1], 0)
        try:
            st = (self.root / POINTER).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def next_version(self) -> int:
        existing = self.versions()
        return max([*existing, self.current() or 0]) + 1

    def fetch(self, version: int, *suffixes: str) -> Path:
        """Make this version's files (``suffix`` and ``suffixes``) present here; returns the main file's path.
        Local only: nothing to do. Mirrored: each missing file is downloaded whole (``FileNotFoundError`` when the
        bucket has none: pruned, or never published)."""
        if self.mirror is not None:
            fetched = False
            for suffix in (self.suffix, *suffixes):
                path = self.path(version, suffix)
                if not path.is_file():
                    self.mirror.bucket.get_file(self.mirror.name(path.name), path)
                    fetched = True
            if fetched:
                self._drop_local_copies(keep=version)
        return self.path(version)

    def _drop_local_copies(self, keep: int) -> None:
        """A reader's copies of versions older than the one it just fetched go; without this an API replica's disk
        fills with old snapshots. A served copy may go too: a reader holds it in memory or maps it, and on Linux a
        mapping outlives the file. A writer's own files stay (those from its local ``CURRENT`` on): ``prune`` keeps
        its last versions."""
        try:
            published_here = _version((self.root / POINTER).read_bytes())
        except FileNotFoundError:
            published_here = None
        below = keep if published_here is None else min(keep, published_here)
        for path in self.root.glob("v*"):
            m = _VERSION_RE.match(path.name)
            if m and int(m.group(1)) < below:
                path.unlink(missing_ok=True)

    def publish(self, version: int) -> None:
        """Point ``CURRENT`` at ``version``. Mirrored, its files here are uploaded first; a version this host has
        not got may be published when the bucket has it (saved on another host)."""
        here = self.path(version).is_file()
        if not here and self.mirror is None:
            raise FileNotFoundError(f"cannot publish {self.path(version)}: it does not exist")
        if not here and self.mirror is not None and not self.mirror.bucket.exists(self.mirror.name(self.name(version))):
            raise FileNotFoundError(f"cannot publish {self.name(version)}: not here, and not in {self.mirror.bucket}")
        if self.mirror is not None:
            # Every file of the version first, the pointer last: a reader elsewhere sees all of them or the old one.
            for path in sorted(self.root.glob(f"{self.name(version, '')}*")) if here else []:
                if path.is_file() and not path.name.startswith("."):
                    self.mirror.bucket.put_file(self.mirror.name(path.name), path)
            self.mirror.bucket.put_bytes(self.mirror.name(POINTER), str(version).encode())
            self._seen = (time.monotonic(), version)
        if here:
            atomic_write(self.root / POINTER, lambda h: h.write(str(version).encode()))

    def prune(self, keep: int, *extra_suffixes: str) -> None:
        """Delete all but the newest ``keep`` versions (never the published one), here and in the bucket."""
        current = self.current()
        suffixes = (self.suffix, *extra_suffixes)
        for version in self._local_versions()[:-keep] if keep > 0 else []:
            if version == current:
                continue
            for suffix in suffixes:
                self.path(version, suffix).unlink(missing_ok=True)
        if self.mirror is None or keep <= 0:
            return
        remote = self._remote_files()
        old = sorted({v for v, s in remote if s == self.suffix})[:-keep]
        for version, suffix in remote:
            if version in old and version != current and suffix in suffixes:
                self.mirror.bucket.delete(self.mirror.name(self.name(version, suffix)))


def _version(pointer: bytes) -> int | None:
    try:
        return int(pointer.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
