"""Versioned artefacts in a directory: ``v000001<suffix>`` files written atomically, and a ``CURRENT`` pointer.

Writers write a new version to a temporary name, fsync, rename, then replace ``CURRENT``. Readers follow ``CURRENT``
and never see a half-written file. Used for FAISS snapshots, hashtag models and classification heads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

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
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionedDir:
    def __init__(self, root: Path, suffix: str) -> None:
        self.root = Path(root)
        self.suffix = suffix

    def path(self, version: int, suffix: str | None = None) -> Path:
        return self.root / f"v{version:06d}{self.suffix if suffix is None else suffix}"

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = {int(m.group(1)) for p in self.root.glob(f"v*{self.suffix}") if (m := _VERSION_RE.match(p.name))}
        return sorted(found)

    def current(self) -> int | None:
        """The published version, or None when nothing was published yet."""
        try:
            return int((self.root / "CURRENT").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stamp(self) -> tuple[int, int] | None:
        """Cheap change detector for readers: (inode, mtime_ns) of CURRENT."""
        try:
            st = (self.root / "CURRENT").stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def next_version(self) -> int:
        existing = self.versions()
        return max([*existing, self.current() or 0]) + 1

    def publish(self, version: int) -> None:
        if not self.path(version).is_file():
            raise FileNotFoundError(f"cannot publish {self.path(version)}: it does not exist")
        atomic_write(self.root / "CURRENT", lambda h: h.write(str(version).encode()))

    def prune(self, keep: int, *extra_suffixes: str) -> None:
        """Delete all but the newest ``keep`` versions (never the published one)."""
        current = self.current()
        for version in self.versions()[:-keep] if keep > 0 else []:
            if version == current:
                continue
            for suffix in (self.suffix, *extra_suffixes):
                self.path(version, suffix).unlink(missing_ok=True)
