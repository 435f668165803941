"""The single index writer: adds embeddings from the metadata store to FAISS and snapshots it.

Exactly one process runs this (the ``index`` queue has one consumer). Durability comes from the metadata store, not
from the snapshot: every add is first recorded in the store with the writer's increasing sequence number, and on
start the writer loads the newest snapshot and replays every row that is not indexed yet or was indexed after that
snapshot. A crash between snapshots therefore loses nothing, and replaying is idempotent (ids are replaced).

When the collection outgrows exact search (``IndexPolicy``), an IVF index is built from the metadata store on a
background thread while adds go on into the current index; the finished index then catches up with what was added
meanwhile (by sequence number, the same replay) and replaces the current one under the writer's lock, and a snapshot
publishes it to the readers, who never stop answering.

With a change stream (``deltas``: Redis, which every deployment has), each change is appended to it the moment it
is in the index, under the writer's lock, and readers apply it to their delta segment (``index.segments``): a new
post is queryable within a fraction of a second whatever the index's size. Snapshots are then seals of a new base,
every ``seal_every_s`` or ``seal_every_changes``, left to the publisher thread so that no add waits for one; a base
records the id of the last stream entry it holds. A large index is written by a forked child
(``SnapshotStore.begin``): the lock is held only for the fork, and adds go on while the file is written. While the
stream cannot be reached, changes are published as without one (below), and the first append that works again
brings a seal soon.

Without a stream, snapshots are the publication, bounded in time and at most once per ``snapshot_every_s``: a
change made when the last snapshot is older than that is published at once; a change made sooner arms a deferred
snapshot for when that interval is over (the publisher thread), which takes every change made meanwhile;
``snapshot_every_adds`` changes publish at once. A trickle of posts is therefore queryable within ``snapshot_every_s``
(plus the readers' check interval), a lone post at once, with no further add, flush task or batch needed. In both
modes, when a snapshot takes a good share of its interval, the interval stretches so that snapshots keep at most
``MAX_SNAPSHOT_SHARE`` of the writer's time.

A snapshot that fails (a full disk) never fails the change that asked for it: the change is in the index and in the
store's journal already, so the snapshot is deferred and tried again with a growing delay (``RETRY_FAILED_SNAPSHOT_S``
doubling up to ``MAX_RETRY_FAILED_SNAPSHOT_S``) until it succeeds. Only an explicit ``snapshot()`` raises.

The store is the journal while the writer runs too, not only at its start: ``catch_up`` indexes the embedded posts
that no index task brought (an infer task that died, or could not reach Redis, after its store write) and removes the
deleted posts no remove task did; the worker calls it every few seconds (``workers/upkeep.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import redis

from deeptarget.core.errors import IndexMismatchError
from deeptarget.core.records import vector_id
from deeptarget.core.settings import Settings
from deeptarget.index.builder import IndexPolicy, Tuning, build_ivf
from deeptarget.index.deltas import Change, DeltaStream
from deeptarget.index.vectors import SnapshotStore, VectorIndex
from deeptarget.store.metadata import EmbeddingRows, MetadataStore

LOG = logging.getLogger(__name__)

# Snapshots may take at most about this share of the writer's time (and of its disk): one starts at least
# 1 / share times the last one's duration after the last one started.
MAX_SNAPSHOT_SHARE = 0.25
RETRY_FAILED_SNAPSHOT_S = 5.0  # a snapshot that failed (disk full?) is tried again this much later, doubling
MAX_RETRY_FAILED_SNAPSHOT_S = 120.0
# A snapshot of an index larger than this is written by a forked child (SnapshotStore.begin), so adds go on meanwhile
FORK_FROM_BYTES = 64 * 2**20
MAX_STREAM_RETRY_S = 30.0  # the longest pause between tries of a change stream that failed


class IndexWriter:
    def __init__(
        self,
        store: MetadataStore,
        snapshots: SnapshotStore,
        snapshot_every_adds: int = 1000,
        snapshot_every_s: float = 0.5,
        policy: IndexPolicy | None = None,
        deltas: DeltaStream | None = None,
        seal_every_s: float = 60.0,
        seal_every_changes: int = 50_000,
    ) -> None:
        self.store = store
        self.snapshots = snapshots
        self.snapshot_every_adds = snapshot_every_adds
        self.snapshot_every_s = snapshot_every_s  # changes are published at most this long after they are made
        self.policy = policy or IndexPolicy()
        # With a change stream, readers follow every change through it and a snapshot (a sealed base) is needed only
        # every seal_every_s or seal_every_changes; while the stream fails, snapshots publish as without one.
        self.deltas = deltas
        self.seal_every_s = seal_every_s
        self.seal_every_changes = seal_every_changes
        self._stream_ok = deltas is not None
        self._stream_failures = 0  # appends failed in a row; the next try waits longer each time
        self._stream_retry_at = 0.0
        self._stream_last: str | None = None  # the id of the last change appended to the stream
        self._sealed_ids: deque[str] = deque(maxlen=2)  # the stream ids of the last bases: older entries are trimmed
        self._sealing = False  # a snapshot is being written (one at a time; see snapshot)
        self._lock = threading.RLock()  # adds, snapshots and the swap to a newly built index
        self._wake = threading.Condition(self._lock)  # the publisher waits on it for the next deferred snapshot
        self._publish_at: float | None = None  # monotonic time of the deferred snapshot; None: nothing pending
        self._publisher: threading.Thread | None = None  # started on the first deferred snapshot (after any fork)
        self._closed = False
        self._last_save_s = 0.0
        self._last_snapshot = float("-inf")  # monotonic time the last snapshot was published
        self._snapshot_failures = 0  # in a row; the retry delay doubles with each
        self.version: int | None = snapshots.versions.current()  # the last snapshot published
        self.published_at: float | None = None  # and when (time.time())
        if not snapshots.lock_for_writing():
            LOG.error("another live process holds the writer lock of %s: two index writers overwrite each "
                      "other's snapshots (the index queue needs one consumer)", snapshots.versions.root)  # fmt: skip
        snapshots.sweep_temporary()  # left by a writer that died mid-snapshot
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="index-build")
        self.build: Future[Tuning | None] | None = None
        self._next_build_at = 0  # after a failed build, wait for growth before trying again
        self.index: VectorIndex | None = snapshots.load()
        self.published_at = self.index.created if self.index else None
        self._adds_since_snapshot = 0
        self._find_stream_end()
        self._seq = max(self.index.seq if self.index else 0, store.max_indexed_seq())
        snapshot_seq = self.index.seq if self.index else 0
        replayed = sum(self.add(rows, snapshot=False) for rows in store.embeddings_to_index(after_seq=snapshot_seq))
        if self.index is not None:  # deletions since the snapshot (or not yet applied)
            removals = store.removals_after(snapshot_seq)
            replayed += self.index.remove(removals)
            self._publish(Change("remove", np.asarray(removals, np.int64)))
        LOG.info(
            "index writer ready: %d vectors from snapshot, %d replayed from the metadata store",
            (self.index.ntotal - replayed) if self.index else 0,
            replayed,
        )
        if replayed:
            with self._lock:
                self._seal_soon() if self.streaming else self._snapshot_or_defer()

    @classmethod
    def from_settings(cls, settings: Settings, store: MetadataStore, deltas: DeltaStream | None = None) -> IndexWriter:
        return cls(
            store,
            SnapshotStore(settings.index_dir, keep=settings.snapshots_kept),
            snapshot_every_adds=settings.snapshot_every_adds,
            snapshot_every_s=settings.snapshot_every_s,
            policy=IndexPolicy.from_settings(settings),
            deltas=deltas,
            seal_every_s=settings.index_seal_every_s,
            seal_every_changes=settings.index_seal_every_changes,
        )

    # -- the change stream -----------------------------------------------------------------------------------------
    def _find_stream_end(self) -> None:
        """Where the stream ends now: a snapshot taken before this writer's first append holds the changes up to
        there (and readers chain this writer's entries to it)."""
        if self.deltas is None:
            return
        try:
            self._stream_last = self.deltas.resume()
        except redis.RedisError as err:
            self._stream_failed(err)

    def _publish(self, change: Change) -> None:
        """Append a change (under the lock, after it is in the index) for the readers to apply. After a failure the
        stream is tried again only after a capped, doubling pause: a Redis that hangs would otherwise cost every
        add the socket timeout."""
        if self.deltas is None or len(change.ids) == 0:
            return
        if not self._stream_ok and time.monotonic() < self._stream_retry_at:
            return  # the next snapshot holds it (they come every snapshot_every_s while the stream is down)
        try:
            if self._stream_last is None:  # never reached the stream yet: learn where it ends first
                self._stream_last = self.deltas.resume()
            self._stream_last = self.deltas.append(change)
        except redis.RedisError as err:
            self._stream_failed(err)
            return
        if not self._stream_ok:  # readers chain on from here; a base soon brings what the stream missed meanwhile
            LOG.warning("index writer reaches the change stream again")
            self._stream_ok, self._stream_failures = True, 0
            self._seal_soon()

    def _stream_failed(self, err: Exception) -> None:
        """Readers miss this change until a snapshot holds it: publish snapshots as without a stream meanwhile."""
        if self._stream_ok:
            LOG.error("index writer cannot append to the change stream (%s: %s); readers get the changes through "
                      "snapshots every %.1f s until it can", type(err).__name__, err,
                      self.snapshot_every_s)  # fmt: skip
        self._stream_ok = False
        self._stream_failures += 1
        self._stream_retry_at = time.monotonic() + min(MAX_STREAM_RETRY_S, 0.5 * 2 ** (self._stream_failures - 1))

    def add(self, rows: EmbeddingRows, snapshot: bool = True) -> int:
        """Index these rows (replacing ids already present); returns how many were added."""
        with self._lock:
            added = self._add(rows, snapshot)
            self._maybe_start_build()
            return added

    def _add(self, rows: EmbeddingRows, snapshot: bool, publish: bool = True) -> int:
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
        lists = self.index.upsert(ids, vectors)
        self.index.seq = self._seq
        if publish:
            self._publish(Change("add", ids, vectors, lists, self.index.trained_id))
        self._adds_since_snapshot += len(post_ids)
        if snapshot:
            self._changed()
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
            # Expected while `deeptarget reembed` runs (the rebuild it ends with takes them); a mistake otherwise.
            LOG.warning(
                "%s (a switch of weights? `deeptarget reembed` re-embeds the stored posts and rebuilds the index)",
                IndexMismatchError(f"index holds {self.index.model_id}; {int((~keep).sum())} rows from {bad} skipped"),
            )
        return keep

    def remove(self, post_ids: list[str]) -> int:
        """Take deleted posts out of the index (the store has already forgotten them); returns how many were in it."""
        with self._lock:
            if self.index is None or not post_ids:
                return 0
            # Store first, as for adds: a crash after this line is repaired by the replay on the next start.
            self.store.mark_removed(post_ids, first_seq=self._seq + 1)
            self._seq += len(post_ids)
            ids = np.array([vector_id(p) for p in post_ids], np.int64)
            removed = self.index.remove(ids)
            self.index.seq = self._seq
            self._publish(Change("remove", ids))
            self._adds_since_snapshot += len(post_ids)
            self._changed()
            return removed

    # -- growing into an IVF index ----------------------------------------------------------------------------------
    def _maybe_start_build(self) -> None:
        index = self.index
        building = self.build is not None and not self.build.done()
        if building or index is None or index.ntotal < self._next_build_at:
            return
        if self.policy.wants_rebuild(index):
            LOG.info("%s index with %d vectors: building an IVF index in the background", index.kind, index.ntotal)
            self.build = self._builder.submit(self._build_and_swap, index.dim, index.model_id, self._seq)

    def _build_and_swap(self, dim: int, model_id: str, from_seq: int) -> Tuning | None:
        try:
            total = self.store.count_embeddings(model_id)
            sample = self.store.sample_embeddings(self.policy.nlist_for(total) * self.policy.vectors_per_list, model_id)
            every = lambda: ((r.vector_ids, r.vectors) for r in self.store.embeddings_of_model(model_id))  # noqa: E731
            new, tuning = build_ivf(dim, model_id, sample.vectors, sample.vector_ids, every, total, self.policy)
            with self._lock:
                caught_up = 0
                for ids, vectors in _of_model(self.store.embeddings_to_index(after_seq=from_seq), model_id):
                    new.upsert(ids, vectors)
                    caught_up += len(ids)
                caught_up += new.remove(self.store.removals_after(from_seq))
                assert self.index is not None
                new.seq = self.index.seq
                self.index = new
                LOG.info("switched to IVF%d (%d vectors, %d caught up)", new.nlist, new.ntotal, caught_up)
                if self.streaming:  # readers keep their old base and its changes until the seal maps the new one
                    self._seal_soon()
                    return tuning
            self._snapshot_or_defer()
            return tuning
        except Exception:  # the current index keeps serving; try again after some growth
            LOG.exception("building the IVF index failed; staying on the current index")
            with self._lock:
                self._next_build_at = int((self.index.ntotal if self.index else 0) * 1.25) + 1
            return None

    def wait_for_build(self, timeout_s: float | None = None) -> Tuning | None:
        build = self.build
        return None if build is None else build.result(timeout_s)

    # -- publishing ------------------------------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        """Readers follow the changes through the stream now (so snapshots are seals, needed seldom)."""
        return self.deltas is not None and self._stream_ok

    def _changed(self) -> None:
        """After a change (under the lock): publish now when enough changes wait or the last snapshot is an interval
        old, else when the interval is over. While streaming, the snapshot (a seal) is always left to the publisher
        thread, so that an add never waits for one."""
        threshold = self.publish_after_changes
        if self._publish_at is not None and self._adds_since_snapshot < threshold:
            return  # the deferred snapshot takes this change too
        now = time.monotonic()
        publish_at = self._last_snapshot + self.publish_interval_s
        if self._adds_since_snapshot >= threshold or publish_at <= now:
            self._seal_soon() if self.streaming else self._snapshot_or_defer()
        else:
            self._defer(publish_at)

    def _seal_soon(self) -> None:
        self._defer(time.monotonic())

    def _defer(self, publish_at: float) -> None:
        if self._publish_at is None or publish_at < self._publish_at:
            self._publish_at = publish_at
        self._start_publisher()
        self._wake.notify_all()

    def _snapshot_or_defer(self, due_only: bool = False) -> int | None:
        """A snapshot now; when it fails, one later (the change it publishes is safe: see the module's docstring).
        ``due_only``: none if, by the time it could start, another snapshot took the changes and none is due."""
        try:
            return self.snapshot(due_only=due_only)
        except (OSError, RuntimeError) as err:  # RuntimeError: FAISS's own I/O errors
            with self._lock:
                self._snapshot_failures += 1
                delay = min(MAX_RETRY_FAILED_SNAPSHOT_S, RETRY_FAILED_SNAPSHOT_S * 2 ** (self._snapshot_failures - 1))
                LOG.error("index snapshot failed (%s: %s, %d in a row); the changes are journalled, trying again in "
                          "%.0f s", type(err).__name__, err, self._snapshot_failures, delay)  # fmt: skip
                self._publish_at = None
                self._defer(time.monotonic() + delay)
            return None

    @property
    def publish_after_changes(self) -> int:
        """How many changes make a snapshot due at once: ``snapshot_every_adds``, or ``seal_every_changes`` while
        streaming."""
        return self.seal_every_changes if self.streaming else self.snapshot_every_adds

    @property
    def publish_interval_s(self) -> float:
        """The least time between two snapshots, and the most a change waits for one: ``snapshot_every_s`` (or
        ``seal_every_s`` while streaming), stretched when snapshots get slow."""
        every = self.seal_every_s if self.streaming else self.snapshot_every_s
        return max(every, self._last_save_s / MAX_SNAPSHOT_SHARE)  # counted from the last one's start

    def _start_publisher(self) -> None:
        if self._closed or (self._publisher is not None and self._publisher.is_alive()):
            return
        # A daemon: a stop never waits for it (close() publishes what is pending; a crash is covered by the replay).
        self._publisher = threading.Thread(target=self._publish_loop, name="index-publisher", daemon=True)
        self._publisher.start()

    def _publish_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (self._publish_at is None or self._publish_at > time.monotonic()):
                    self._wake.wait(None if self._publish_at is None else self._publish_at - time.monotonic())
                if self._closed:
                    return
            try:  # outside the lock: a forked snapshot lets adds go on while it is written
                self._snapshot_or_defer(due_only=True)
            except Exception:  # keep the thread: the next change, or this retry, tries again
                LOG.exception("deferred index snapshot failed; trying again in %.0f s", MAX_RETRY_FAILED_SNAPSHOT_S)
                with self._lock:
                    self._publish_at = time.monotonic() + MAX_RETRY_FAILED_SNAPSHOT_S

    def close(self) -> int | None:
        """Stop the publisher and snapshot what it had not published yet (a clean stop of the worker)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            pending = self._adds_since_snapshot > 0
        publisher = self._publisher
        if publisher is not None and publisher is not threading.current_thread():
            publisher.join(timeout=10)
        try:
            return self.snapshot() if pending else None
        finally:
            self.snapshots.unlock()

    def maybe_snapshot(self) -> int | None:
        """Snapshot when changes wait and are due (by count, or their deferred snapshot's time has come): the beat's
        periodic flush, a safety net behind the publisher thread."""
        with self._lock:
            due_by_count = self._adds_since_snapshot >= self.publish_after_changes
            due_by_time = self._publish_at is not None and time.monotonic() >= self._publish_at
            if not (due_by_count or due_by_time) or self._sealing:
                return None
        return self._snapshot_or_defer()

    def snapshot(self, due_only: bool = False) -> int | None:
        """Write and publish a snapshot of the index as it is now; returns its version. One at a time: a call while
        another is written waits for it. The index is frozen only while the write starts (a fork, for a large
        index: ``SnapshotStore.begin``); changes made while the file is written go to the next snapshot.
        ``due_only`` (the publisher's): None, and no snapshot, unless one is due by now; the publisher decides
        outside the lock, and an explicit snapshot may have published the changes since."""
        with self._lock:
            while self._sealing:
                self._wake.wait()
            if due_only and (self._publish_at is None or self._publish_at > time.monotonic()):
                return None
            if self.index is None:
                self._publish_at = None
                return None
            started = time.monotonic()
            pending = self._adds_since_snapshot
            stream_id = self._stream_last
            fork = self.index.memory_bytes >= FORK_FROM_BYTES
            self._sealing = True
            try:
                write = self.snapshots.begin(self.index, stream_id, fork=fork)
            except BaseException:
                self._sealing = False
                self._wake.notify_all()
                raise
            self._adds_since_snapshot = 0
            self._publish_at = None
            # from its start: a change made while it is written schedules the next one an interval after this one
            # began, not at once (back-to-back seals of a large base would keep the disk writing)
            self._last_snapshot = started
        try:
            version = write.finish()
        except BaseException:
            with self._lock:
                self._adds_since_snapshot += pending  # still unpublished
                self._sealing = False
                self._wake.notify_all()
            raise
        with self._lock:
            self._sealing = False
            self._wake.notify_all()
            if self._snapshot_failures:
                LOG.warning("index snapshot v%d written after %d failed attempts", version, self._snapshot_failures)
            self._snapshot_failures = 0
            self._last_save_s = time.monotonic() - started
            self.version, self.published_at = version, time.time()
            if self._adds_since_snapshot and self._publish_at is None:  # changes made while it was written
                self._changed()
        self._trim_stream(stream_id)
        return version

    def _trim_stream(self, sealed_id: str | None) -> None:
        """Drop the stream's entries that no reader needs: those before the previous base's id (a reader still on
        that base needs the entries after it until it has mapped the new one)."""
        if self.deltas is None or sealed_id is None:
            return
        self._sealed_ids.append(sealed_id)
        if len(self._sealed_ids) == self._sealed_ids.maxlen:
            try:
                self.deltas.trim_before(self._sealed_ids[0])
            except redis.RedisError as err:  # the next seal trims
                LOG.warning("could not trim the index change stream (%s); trying at the next seal", err)

    # -- catching up from the store while running ------------------------------------------------------------------
    def catch_up(self, older_than_s: float, before_add: Callable[[EmbeddingRows], None] | None = None) -> int:
        """Index the embedded posts stored more than ``older_than_s`` ago that no index task brought, and remove the
        deleted ones no remove task did; returns how many changed. ``before_add(rows)`` runs before each batch is
        added (the worker sends the owners' profile updates there: a failure leaves the batch for the next call)."""
        before = time.time() - older_than_s
        model_id = self.index.model_id if self.index is not None else None
        changed = 0
        for rows in self.store.embeddings_not_indexed(before, model_id):
            if before_add is not None:
                before_add(rows)
            changed += self.add(rows)
        if self.index is not None and (deleted := self.store.deletions_not_removed(before)):
            changed += self.remove(deleted)
        if changed:
            LOG.warning("index writer caught up with %d changes that no task brought (their task died or could "
                        "not reach Redis after the store write)", changed)  # fmt: skip
        return changed

    def status(self) -> dict[str, object]:
        """What the heartbeat tells /healthz: the index's size and journal position, and the last snapshot."""
        with self._lock:
            return {
                "vectors": self.index.ntotal if self.index is not None else 0,
                "seq": self._seq,
                "version": self.version,
                "published_at": self.published_at,
                "unpublished": self._adds_since_snapshot,
                "snapshot_failures": self._snapshot_failures,
            }

    def rebuild(self) -> int:
        """A fresh index from every embedding in the metadata store, published as a new snapshot (and, when the
        collection is large enough, the IVF index built from it before this returns). The index is for the model
        that made most of the stored embeddings: after a switch of backbone or weights, the new one once the posts
        are re-embedded (``deeptarget reembed``)."""
        self.wait_for_build()  # outside the lock: the build takes it to swap
        models = self.store.model_ids()
        if len(models) > 1:
            LOG.warning("embeddings of %d models in the store %s: the index takes %s", len(models), models,
                        next(iter(models)))  # fmt: skip
        with self._lock:
            self.index = None
            self._adds_since_snapshot = 0
            majority = next(iter(models), "")
            # not through the stream: the snapshot below carries the whole index to the readers at once
            added = sum(
                self._add(rows, snapshot=False, publish=False) for rows in self.store.embeddings_of_model(majority)
            )
            self.snapshot()
            self._maybe_start_build()
        self.wait_for_build()
        return added


def _of_model(batches: Iterable[EmbeddingRows], model_id: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of the rows that ``model_id`` embedded, batch by batch."""
    for rows in batches:
        keep = np.array([m == model_id for m in rows.model_ids], bool)
        yield rows.vector_ids[keep], rows.vectors[keep]
