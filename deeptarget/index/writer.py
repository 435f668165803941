"""The single index writer: adds embeddings from the metadata store to FAISS and snapshots it.

Exactly one process runs this (the ``index`` queue has one consumer). Durability comes from the metadata store, not
from the snapshot: every add is first recorded in the store with the writer's increasing sequence number, and on
start the writer loads the newest snapshot and replays every row that is not indexed yet or was indexed after that
snapshot. A crash between snapshots therefore loses nothing, and replaying is idempotent (ids are replaced).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from deeptarget.errors import IndexMismatchError
from deeptarget.index.vectors import SnapshotStore, VectorIndex
from deeptarget.store import EmbeddingRows, MetadataStore

LOG = logging.getLogger(__name__)


class IndexWriter:
    def __init__(
        self,
        store: MetadataStore,
        snapshots: SnapshotStore,
        snapshot_every_adds: int = 1000,
        snapshot_every_s: float = 5.0,
    ) -> None:
        self.store = store
        self.snapshots = snapshots
        self.snapshot_every_adds = snapshot_every_adds
        self.snapshot_every_s = snapshot_every_s
        self.index: VectorIndex | None = snapshots.load()
        self._adds_since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._seq = max(self.index.seq if self.index else 0, store.max_indexed_seq())
        snapshot_seq = self.index.seq if self.index else 0
        replayed = sum(self.add(rows, snapshot=False) for rows in store.embeddings_to_index(after_seq=snapshot_seq))
        LOG.info(
            "index writer ready: %d vectors from snapshot, %d replayed from the metadata store",
            (self.index.ntotal - replayed) if self.index else 0,
            replayed,
        )
        if replayed:
            self.snapshot()

    def add(self, rows: EmbeddingRows, snapshot: bool = True) -> int:
        """Index these rows (replacing ids already present); returns how many were added."""
        if not rows.post_ids:
            return 0
        keep = self._compatible(rows)
        if not keep.any():
            return 0
        post_ids = [p for p, k in zip(rows.post_ids, keep, strict=True) if k]
        ids, vectors = rows.vector_ids[keep], rows.vectors[keep]
        assert self.index is not None
        # Store first: a crash after this line is repaired by the replay on the next start.
        self.store.mark_indexed(post_ids, first_seq=self._seq + 1)
        self._seq += len(post_ids)
        self.index.upsert(ids, vectors)
        self.index.seq = self._seq
        self._adds_since_snapshot += len(post_ids)
        if snapshot:
            self.maybe_snapshot()
        return len(post_ids)

    def _compatible(self, rows: EmbeddingRows) -> np.ndarray:
        """Mask of rows that fit the index; the first rows ever added decide its model."""
        if self.index is None:
            self.index = VectorIndex.empty(rows.vectors.shape[1], rows.model_ids[0])
            LOG.info("new index for %s (%d-d)", self.index.model_id, self.index.dim)
        keep = np.array(
            [m == self.index.model_id and rows.vectors.shape[1] == self.index.dim for m in rows.model_ids], bool
        )
        if not keep.all():
            bad = sorted({m for m, k in zip(rows.model_ids, keep, strict=True) if not k})
            LOG.error(
                "%s",
                IndexMismatchError(f"index holds {self.index.model_id}; {int((~keep).sum())} rows from {bad} skipped"),
            )
        return keep

    def maybe_snapshot(self) -> int | None:
        due_by_count = self._adds_since_snapshot >= self.snapshot_every_adds
        due_by_time = self._adds_since_snapshot > 0 and time.monotonic() - self._last_snapshot >= self.snapshot_every_s
        return self.snapshot() if due_by_count or due_by_time else None

    def snapshot(self) -> int | None:
        if self.index is None:
            return None
        version = self.snapshots.save(self.index)
        self._adds_since_snapshot = 0
        self._last_snapshot = time.monotonic()
        return version

    def rebuild(self) -> int:
        """A fresh index from every embedding in the metadata store, published as a new snapshot."""
        self.index = None
        self._adds_since_snapshot = 0
        added = sum(self.add(rows, snapshot=False) for rows in self.store.all_embeddings())
        self.snapshot()
        return added
