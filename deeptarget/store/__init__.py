"""Everything a deployment keeps: the metadata store (SQLite or PostgreSQL), image blobs and versioned artefacts.

For a notebook::

    from deeptarget.store import MetadataStore, PostStatus

    store = MetadataStore("data/metadata.sqlite")  # or a postgresql:// URL
    store.status_counts()                          # {"indexed": 1200, "rejected": 31, ...}
    store.post("1789")                             # a StoredPost, or None
    store.audience("hashtag:sushi", limit=20)      # Audience rows, best first

Importing this package loads no Celery, Redis or torch (``tests/test_public_faces.py``), and each name loads its own
module when first used: the scraper's ``import deeptarget.store.blobs`` does not load the metadata store's database
drivers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deeptarget.core.lazy import lazy_exports

if TYPE_CHECKING:
    from deeptarget.core.records import PostStatus
    from deeptarget.store.blobs import BlobStore, StorageUnavailable
    from deeptarget.store.copy import CopyCounts, copy_store
    from deeptarget.store.embeddings import EmbeddingRows, EngagementRows
    from deeptarget.store.metadata import MetadataStore
    from deeptarget.store.posts import REFUSALS, Recorded, StoredPost
    from deeptarget.store.profiles import Audience, profile_interests
    from deeptarget.store.versioned import VersionedDir, atomic_write

_HOMES = {
    "PostStatus": "deeptarget.core.records",
    "BlobStore": "deeptarget.store.blobs",
    "StorageUnavailable": "deeptarget.store.blobs",
    "CopyCounts": "deeptarget.store.copy",
    "copy_store": "deeptarget.store.copy",
    "EmbeddingRows": "deeptarget.store.embeddings",
    "EngagementRows": "deeptarget.store.embeddings",
    "MetadataStore": "deeptarget.store.metadata",
    "REFUSALS": "deeptarget.store.posts",
    "Recorded": "deeptarget.store.posts",
    "StoredPost": "deeptarget.store.posts",
    "Audience": "deeptarget.store.profiles",
    "profile_interests": "deeptarget.store.profiles",
    "VersionedDir": "deeptarget.store.versioned",
    "atomic_write": "deeptarget.store.versioned",
}

__all__ = [
    "REFUSALS",
    "Audience",
    "BlobStore",
    "CopyCounts",
    "EmbeddingRows",
    "EngagementRows",
    "MetadataStore",
    "PostStatus",
    "Recorded",
    "StorageUnavailable",
    "StoredPost",
    "VersionedDir",
    "atomic_write",
    "copy_store",
    "profile_interests",
]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
