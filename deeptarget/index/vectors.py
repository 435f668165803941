"""FAISS index of L2-normalised embeddings under stable int64 ids, and its on-disk snapshots.

Inner product on unit vectors is cosine similarity. ``IndexIDMap2`` over ``IndexFlatIP`` keeps exact search, lets
an id be replaced (remove then add) and can give back a stored vector (``reconstruct``), which is how a query by post
id finds the post's own embedding.

A snapshot is ``v<version>.faiss`` plus ``v<version>.json`` (model id, dim, count, the writer's sequence number),
published through ``CURRENT`` (see ``deeptarget.versioned``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from deeptarget.errors import IndexMismatchError
from deeptarget.versioned import VersionedDir, atomic_write

LOG = logging.getLogger(__name__)

# Brute-force search uses BLAS from this many queries on. faiss-cpu 1.15 ships 128000, which keeps batched queries
# on the slow per-query path; at 20 they go through BLAS (measured 10x faster here, DESIGN.md).
faiss.cvar.distance_compute_blas_threshold = 20


@dataclass
class VectorIndex:
    dim: int
    model_id: str
    index: faiss.IndexIDMap2
    seq: int = 0  # the writer's sequence number of the last added vector (see IndexWriter)

    @classmethod
    def empty(cls, dim: int, model_id: str) -> VectorIndex:
        return cls(dim, model_id, faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def check_compatible(self, dim: int, model_id: str) -> None:
        if dim != self.dim or model_id != self.model_id:
            raise IndexMismatchError(
                f"index holds {self.model_id} ({self.dim}-d) embeddings, refusing {model_id} ({dim}-d): "
                "rebuild the index (deeptarget index rebuild) after changing backbone or weights"
            )

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under ids; an id already present is replaced, never duplicated."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {vectors.shape}")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):  # keep the last occurrence of a repeated id
            _, last = np.unique(ids[::-1], return_index=True)
            keep = np.sort(len(ids) - 1 - last)
            ids, vectors = ids[keep], vectors[keep]
        self.remove(ids)
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        if self.ntotal == 0 or len(ids) == 0:
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k); missing neighbours have id -1."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.ntotal == 0:
            n = len(queries)
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        return self.index.search(queries, k)

    def reconstruct(self, vector_id: int) -> np.ndarray | None:
        try:
            return self.index.reconstruct(int(vector_id))
        except RuntimeError:  # faiss raises when the id is absent
            return None

    def __contains__(self, vector_id: int) -> bool:
        return self.reconstruct(vector_id) is not None


class SnapshotStore:
    """Versioned index snapshots in a directory."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.versions = VersionedDir(root, ".faiss")
        self.keep = keep

    def save(self, index: VectorIndex) -> int:
        self.versions.root.mkdir(parents=True, exist_ok=True)
        version = self.versions.next_version()
        meta = {
            "version": version,
            "model_id": index.model_id,
            "dim": index.dim,
            "ntotal": index.ntotal,
            "seq": index.seq,
            "created": time.time(),
        }
        # The metadata goes first: CURRENT is replaced last, so a reader finds both files or the old version.
        atomic_write(self.versions.path(version, ".json"), lambda h: h.write(json.dumps(meta).encode()))
        buffer = faiss.serialize_index(index.index)
        atomic_write(self.versions.path(version), lambda h: h.write(buffer.tobytes()))
        self.versions.publish(version)
        self.versions.prune(self.keep, ".json")
        LOG.info("index snapshot v%d: %d vectors, seq %d", version, index.ntotal, index.seq)
        return version

    def load(self, version: int | None = None) -> VectorIndex | None:
        version = self.versions.current() if version is None else version
        if version is None:
            return None
        meta = json.loads(self.versions.path(version, ".json").read_text())
        index = faiss.read_index(str(self.versions.path(version)))
        return VectorIndex(int(meta["dim"]), str(meta["model_id"]), index, int(meta["seq"]))


class SnapshotReader:
    """The newest published snapshot for readers (API, CLI); reloads when a new version is published.

    Checking costs one stat of CURRENT, at most every ``check_interval_s``.
    """

    def __init__(self, store: SnapshotStore, check_interval_s: float = 0.5) -> None:
        self.store = store
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._index: VectorIndex | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    def get(self) -> VectorIndex | None:
        now = time.monotonic()
        if now - self._checked < self.check_interval_s:
            return self._index
        with self._lock:
            self._checked = now
            stamp = self.store.versions.stamp()
            if stamp != self._stamp:
                loaded = self.store.load()
                self._index, self._stamp = loaded, stamp
                if loaded is not None:
                    LOG.info("reader loaded index v%s (%d vectors)", self.store.versions.current(), loaded.ntotal)
        return self._index
