"""Classification heads on top of embeddings: versioned linear (softmax) heads stored as ``.npz`` files.

Layout: ``<heads_dir>/<name>/v<version>.npz`` holding ``weight`` (classes x dim), ``bias`` (classes), ``classes``,
``model_id`` (the embedder the head was trained on) and optional ``metrics`` JSON. ``<name>/CURRENT`` names the
published version; without it the newest file is used. ``HeadSet.refresh()`` picks up newly published versions, so
running workers switch without a restart.

A head's name is a path segment: ``check_head_name`` holds it to ``HEAD_NAME_PATTERN`` wherever a path is made from
it, so no caller can write outside ``heads_dir`` (issue 12, L7: ``--name ../../x`` did); versions are whole numbers
from 1 to ``MAX_VERSION``. Folders in ``heads_dir`` with other names are not heads and are left alone.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeptarget.core.errors import ConfigurationError, DeepTargetError
from deeptarget.store.blobs import StorageUnavailable
from deeptarget.store.remote import mirror_of, publish_file
from deeptarget.store.versioned import VersionedDir, atomic_write

LOG = logging.getLogger(__name__)

HEAD_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MAX_VERSION = 10**9
_HEAD_NAME_RE = re.compile(HEAD_NAME_PATTERN)


class InvalidName(DeepTargetError, ValueError):
    """A name or version that cannot be a head's (or a report's): it would not stay one path segment."""


def check_head_name(name: object) -> str:
    """``name`` if it can name a head: 1 to 64 lowercase letters, digits, ``_`` and ``-``, starting with a letter or
    digit. Raises ``InvalidName`` (a ``ValueError``) otherwise."""
    if not isinstance(name, str) or not _HEAD_NAME_RE.fullmatch(name):  # fullmatch: no trailing newline either
        raise InvalidName(
            f"head name {name!r}: 1 to 64 lowercase letters, digits, _ and -, starting with a letter or digit"
        )
    return name


def check_version(version: object) -> int:
    """``version`` if it is a whole number from 1 to ``MAX_VERSION``; raises ``InvalidName`` otherwise."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidName(f"version {version!r}: a whole number from 1 to {MAX_VERSION}")
    return version


@dataclass(frozen=True)
class LinearHead:
    name: str
    version: int
    classes: list[str]
    weight: np.ndarray
    bias: np.ndarray
    model_id: str
    metrics: dict[str, float]

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, dim) -> (n, classes) probabilities."""
        logits = embeddings @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        probs: np.ndarray = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        return probs

    def save(self, heads_dir: Path) -> Path:
        """Write this version (not yet published: see ``publish_head``)."""
        versions = head_versions(heads_dir, self.name)
        check_version(self.version)
        versions.root.mkdir(parents=True, exist_ok=True)
        path = versions.path(self.version)
        atomic_write(
            path,
            lambda handle: np.savez(
                handle,
                weight=self.weight.astype(np.float32),
                bias=self.bias.astype(np.float32),
                classes=np.array(self.classes),
                model_id=np.array(self.model_id),
                metrics=np.array(json.dumps(self.metrics)),
            ),
        )
        publish_file(path)  # in the bucket too (unpublished): ``publish_head`` on any host can then point at it
        return path

    @classmethod
    def load(cls, path: Path) -> LinearHead:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                name=Path(path).parent.name,
                version=int(Path(path).stem.lstrip("v")),
                classes=[str(c) for c in data["classes"]],
                weight=data["weight"].astype(np.float32),
                bias=data["bias"].astype(np.float32),
                model_id=str(data["model_id"]),
                metrics=json.loads(str(data["metrics"])),
            )


def head_versions(heads_dir: Path, name: str) -> VersionedDir:
    """The versions of head ``name``; raises ``InvalidName`` for a name that is no head's."""
    return VersionedDir(Path(heads_dir) / check_head_name(name), ".npz")


def _head_folders(heads_dir: Path) -> list[Path]:
    """The folders of ``heads_dir`` that may be heads (by their name), sorted; with a bucket, those it holds too."""
    heads_dir = Path(heads_dir)
    found = {p for p in heads_dir.iterdir() if p.is_dir()} if heads_dir.is_dir() else set()
    mirror = mirror_of(heads_dir)
    if mirror is not None:
        names = mirror.bucket.names(mirror.prefix)
        found |= {heads_dir / name[len(mirror.prefix) :].split("/")[0] for name in names}
    return sorted(p for p in found if _HEAD_NAME_RE.fullmatch(p.name))


def publish_head(heads_dir: Path, name: str, version: int) -> None:
    versions = head_versions(heads_dir, name)
    check_version(version)
    if version not in versions.versions():
        raise ConfigurationError(f"head {name} has no version {version} in {versions.root}")
    versions.publish(version)


def head_names(heads_dir: Path) -> list[str]:
    """Heads that have at least one version in ``heads_dir``."""
    return [p.name for p in _head_folders(heads_dir) if head_versions(heads_dir, p.name).versions()]


class HeadSet:
    """The published version of every head in ``heads_dir`` that fits the embedder ``model_id``."""

    def __init__(self, heads_dir: Path, model_id: str, *, bucket_poll_s: float = 1.0) -> None:
        self.heads_dir = Path(heads_dir)
        self.model_id = model_id
        self.heads: dict[str, LinearHead] = {}
        self._seen: dict[str, tuple[str, float]] = {}
        # With a bucket a refresh costs requests (a LIST, a GET per head): at most one every bucket_poll_s, however
        # many batches run. A local refresh is a few stats, done every time.
        self._poll_s = bucket_poll_s if mirror_of(self.heads_dir) is not None else 0.0
        self._refreshed = float("-inf")
        self.refresh()

    def refresh(self) -> None:
        """Load heads published since the last refresh. While the bucket (if any) is away, keep the ones loaded:
        the batch needs the bucket for its images anyway, and a head must not vanish for an outage."""
        now = time.monotonic()
        if now - self._refreshed < self._poll_s:
            return
        self._refreshed = now
        try:
            folders = _head_folders(self.heads_dir)
        except StorageUnavailable as err:
            LOG.warning("heads not refreshed (%s): keeping %s", err, sorted(self.heads))
            return
        for folder in folders:
            try:
                path = published_file(head_versions(self.heads_dir, folder.name))
            except StorageUnavailable as err:
                LOG.warning("head %s not refreshed (%s)", folder.name, err)
                continue
            if path is None:
                continue
            stamp = (path.name, path.stat().st_mtime)
            if self._seen.get(folder.name) == stamp:
                continue
            self._seen[folder.name] = stamp
            head = LinearHead.load(path)
            if head.model_id != self.model_id:
                LOG.warning(
                    "head %s v%d was trained on %s, not %s: skipped",
                    head.name,
                    head.version,
                    head.model_id,
                    self.model_id,
                )
                self.heads.pop(head.name, None)
                continue
            LOG.info("head %s v%d loaded (%d classes)", head.name, head.version, len(head.classes))
            self.heads[head.name] = head

    def __call__(self, embeddings: np.ndarray) -> list[dict[str, dict[str, float]]]:
        """Per image: head -> class -> probability."""
        per_image: list[dict[str, dict[str, float]]] = [{} for _ in range(len(embeddings))]
        for name, head in self.heads.items():
            for classes, out in zip(self.predictions(head, embeddings), per_image, strict=True):
                out[name] = classes
        return per_image

    @staticmethod
    def predictions(head: LinearHead, embeddings: np.ndarray) -> list[dict[str, float]]:
        """Per image: class -> probability, as stored with the post."""
        return [{c: round(float(p), 6) for c, p in zip(head.classes, row, strict=True)} for row in head(embeddings)]


def published_file(versions: VersionedDir) -> Path | None:
    """The published version, or the newest when none was published explicitly."""
    version = versions.current()
    if version is None:
        known = versions.versions()
        version = known[-1] if known else None
    if version is None:
        return None
    try:
        return versions.fetch(version)  # from the bucket, when this host has not got it yet
    except FileNotFoundError:
        return None if not versions.path(version).is_file() else versions.path(version)
