"""Which data dir is backed by which bucket, in this process.

With ``object_store_url`` set, a process's data dir is private: what other processes must see (images, index
snapshots, hashtag models, heads, fine-tuned backbones) lives in the bucket under the same relative names
(``blobs/ab/cd/<sha>``, ``index/v000007.faiss``, ``models/heads/food/CURRENT``), and the data dir holds this
process's copies of it. ``attach(settings)`` binds the data dir to its bucket once per process (the CLI, the worker,
the API and the scraper do it where they load their settings); the stores find the binding from the paths they are
given, so a head saved under ``<data_dir>/models/heads`` is published to the bucket without every caller passing it.
Several deployments in one process (tests) stay apart: each binding is keyed by its own data dir.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # boto3 loads only in a process that has a bucket: the embedded default never imports it
    from deeptarget.core.settings import Settings
    from deeptarget.store.bucket import Bucket

_LOCK = threading.Lock()
_BOUND: dict[Path, Bucket] = {}


@dataclass(frozen=True)
class Mirror:
    """A local directory and the bucket names of its files: ``name(file)`` is the object a local file is mirrored to."""

    bucket: Bucket
    prefix: str  # the directory's path relative to the data dir, posix, ending with "/" (or "" for the data dir)

    def name(self, relative: str) -> str:
        return self.prefix + relative


def attach(settings: Settings) -> Bucket | None:
    """Bind ``settings.data_dir`` to the settings' bucket (the same one each time); None without a bucket."""
    if not settings.object_store_url:
        return None
    from deeptarget.core.bucket_address import BucketAddress
    from deeptarget.store.bucket import Bucket

    root, address = settings.data_dir.resolve(), BucketAddress.parse(settings.object_store_url)
    with _LOCK:
        bucket = _BOUND.get(root)
        if bucket is None or bucket.address != address:
            bucket = Bucket(
                address,
                endpoint_url=settings.object_store_endpoint,
                region=settings.object_store_region,
                timeout_s=settings.object_store_timeout_s,
            )
            _BOUND[root] = bucket
        return bucket


def detach(settings: Settings) -> None:
    with _LOCK:
        _BOUND.pop(settings.data_dir.resolve(), None)


def mirror_of(directory: Path) -> Mirror | None:
    """The bucket ``directory`` is mirrored to, when it lies in an attached data dir."""
    if not _BOUND:
        return None
    path = Path(directory).resolve()
    with _LOCK:
        for root, bucket in _BOUND.items():
            if path == root or root in path.parents:
                relative = path.relative_to(root).as_posix()
                return Mirror(bucket, "" if relative == "." else f"{relative}/")
    return None


def publish_file(path: Path) -> None:
    """Upload a file written in an attached data dir to its bucket name (nothing to do otherwise)."""
    mirror = mirror_of(Path(path).parent)
    if mirror is not None:
        mirror.bucket.put_file(mirror.name(Path(path).name), Path(path))


def fetch_missing(path: Path) -> None:
    """Download a file of an attached data dir that this process does not have yet (a fine-tuned backbone another
    host trained); nothing to do for a file it has or one outside attached data dirs."""
    mirror = mirror_of(Path(path).parent)
    if mirror is not None and not Path(path).is_file():
        mirror.bucket.get_file(mirror.name(Path(path).name), Path(path))
