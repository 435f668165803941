"""What a reader serves: a sealed base snapshot, memory-mapped, plus a small delta segment that follows the writer.

The base is the newest published snapshot (``SnapshotStore.load(mapped=True)``): its pages come from the page cache
every reader on the host shares, and moving to a new base never holds two private copies. The delta takes every
change the writer made after the base (``index.deltas``: a Redis stream), within a block time of the writer's
append, so a new post is queryable in well under a second whatever the base's size. The scheme is the one of
Milvus' sealed and growing segments and Lucene's near-real-time segments:

- an added id goes into the delta; if the base holds the id, the base's copy is tombstoned (a replaced vector is
  never answered in its old form);
- a removed id leaves the delta and is tombstoned in the base;
- a query searches the base with the tombstones excluded (a FAISS ``IDSelectorNot`` in the search parameters, so the
  base still returns k live neighbours) and the delta, and merges the two by score.

The delta of an IVF base is an IVF-Flat with a copy of the base's coarse quantizer and the same ``nprobe``: its
search costs the share of the delta the probed lists hold, as the base's does, instead of a scan of every new vector
(an exact delta of 20,000 1280-d vectors is 100 MB read per query). The delta of an exact base is exact.

When the writer publishes a new base (it seals the changes into one every ``index_seal_every_s``), the reader maps
it, rebuilds a delta from the stream entries after the id the base records, and swaps both at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import redis
from prometheus_client import Counter

from deeptarget.index.deltas import Change, DeltaStream, Entry, older
from deeptarget.index.vectors import SnapshotStore, VectorIndex, add_to_lists, search_lists

LOG = logging.getLogger(__name__)

DELTA_GAPS = Counter(
    "deeptarget_index_delta_gaps_total",
    "Times a reader found index changes missing from the stream (healed by the next sealed base)",
)
MAX_BACKOFF_S = 5.0


class DeltaSegment:
    """The changes since a base: the vectors added since (searchable) and tombstones of the base ids they replaced
    or that were removed. Not thread-safe: ``LiveIndex`` guards it."""

    def __init__(self, base: VectorIndex) -> None:
        self.base = base
        self.index = _empty_like(base)
        self.tombstones: set[int] = set()
        self._exclusion: Exclusion | None = None  # the tombstones, for a base search; rebuilt when they change
        self.skipped = 0  # changes of another model's vectors (see apply)
        self.touched: dict[int, str] = {}  # id -> the last stream entry that changed it (see carried_to)
        self.present: set[int] = set()  # the ids in the delta's index (an IVF's reconstruct raises for the others)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def apply(self, change: Change, entry_id: str = "") -> None:
        ids = np.ascontiguousarray(change.ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if entry_id:
            self.touched.update(dict.fromkeys(ids.tolist(), entry_id))
        if change.vectors is not None and change.vectors.shape[1] != self.base.dim:
            # The writer's index is another model's now (a rebuild after a switch of weights): its base, which the
            # writer publishes at the rebuild's end, brings these; until then the old model's answers stand.
            if not self.skipped:
                LOG.warning("index changes of %d-d vectors for a %d-d base: skipped until the new base arrives",
                            change.vectors.shape[1], self.base.dim)  # fmt: skip
            self.skipped += len(ids)
            return
        fresh = set(ids[self.base.holds(ids)].tolist()) - self.tombstones
        if fresh:
            self.tombstones |= fresh
            self._exclusion = None
        self._remove([i for i in ids.tolist() if self._has(i)])
        if change.op == "add":
            assert change.vectors is not None
            if len(np.unique(ids)) != len(ids):  # the writer never sends a repeated id; keep the last one if so
                _, last = np.unique(ids[::-1], return_index=True)
                keep = np.sort(len(ids) - 1 - last)
                ids, vectors = ids[keep], change.vectors[keep]
            else:
                vectors = change.vectors
            ivf = faiss.try_extract_index_ivf(self.index)
            same_lists = change.lists is not None and change.trained_id == self.base.trained_id != ""
            if ivf is not None and same_lists and len(change.lists) == len(ids):  # type: ignore[arg-type]
                add_to_lists(ivf, ids, vectors, change.lists)  # type: ignore[arg-type]  # the writer's assignment
            else:
                self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
            self.present.update(ids.tolist())

    def _remove(self, present: list[int]) -> None:
        """Take these ids (each in the delta) out of it."""
        if not present:
            return
        ids = np.array(present, np.int64)
        # an IVF's hash-table direct map removes only by IDSelectorArray
        ivf = faiss.try_extract_index_ivf(self.index)
        self.index.remove_ids(faiss.IDSelectorArray(ids) if ivf is not None else faiss.IDSelectorBatch(ids))
        self.present.difference_update(present)

    def _has(self, vector_id: int) -> bool:
        return vector_id in self.present

    def search(
        self, queries: np.ndarray, k: int, probed: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the delta's vectors nearest the queries; ``probed``: the lists the base's coarse
        quantizer found for them (``VectorIndex.probe``), which are this delta's lists too."""
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is None or probed is None:
            return self.index.search(queries, k)
        return search_lists(ivf, queries, k, probed)

    def carried_to(self, base: VectorIndex, upto: str) -> DeltaSegment | None:
        """This delta made the delta of a newer ``base`` holding every change up to stream entry ``upto``: the ids
        changed only up to there leave it (the base has them), those changed since stay, and the base's copies of
        those are tombstoned. It costs a removal per id, where a delta built again from the stream costs a coarse
        assignment per vector (measured at 1M: 18,000 changes, 20 s of a core). None when the new base has another
        coarse quantizer (an IVF trained again): its delta must be built again. This delta is changed: call it under
        the lock of the index that serves it, and serve the one it returns from then on."""
        if base.dim != self.base.dim or base.kind != self.base.kind or base.trained_id != self.base.trained_id:
            return None
        carried = DeltaSegment.__new__(DeltaSegment)
        carried.base, carried.index, carried.skipped, carried._exclusion = base, self.index, 0, None
        carried.touched = {i: at for i, at in self.touched.items() if older(upto, at)}
        self._remove([i for i in self.touched if i not in carried.touched and self._has(i)])
        carried.present = self.present
        touched = np.fromiter(carried.touched, np.int64, len(carried.touched))
        carried.tombstones = set(touched[base.holds(touched)].tolist())
        return carried

    def exclusion(self) -> Exclusion:
        """The tombstones as a base search leaves them out; a new object whenever they change, so that a search
        outside the lock keeps the one it started with alive."""
        if self._exclusion is None:
            self._exclusion = Exclusion.of(np.fromiter(self.tombstones, np.int64, len(self.tombstones)))
        return self._exclusion


@dataclass(frozen=True)
class Exclusion:
    """Ids a base search leaves out: a FAISS ``IDSelectorNot(IDSelectorBatch)`` and what it points to. Per-query
    selectors in ``SearchParameters(IVF)`` are FAISS's documented way to filter a search (faiss wiki, "Setting search
    parameters for one query"; IndexIDMap translates them to the inner index's ids); GPU indexes do not take them."""

    ids: np.ndarray
    selector: Any
    _parts: tuple[Any, ...]

    @classmethod
    def of(cls, ids: np.ndarray) -> Exclusion:
        if not len(ids):
            return cls(ids, None, ())
        batch = faiss.IDSelectorBatch(ids)
        return cls(ids, faiss.IDSelectorNot(batch), (batch,))  # the Not keeps a bare pointer to the batch

    def params(self, base: VectorIndex) -> Any:
        if base.kind == "ivf":
            ivf_params = faiss.SearchParametersIVF()
            ivf_params.sel, ivf_params.nprobe = self.selector, max(1, base.nprobe)
            return ivf_params
        params = faiss.SearchParameters()
        params.sel = self.selector
        return params


def _empty_like(base: VectorIndex) -> faiss.Index:
    """An empty index of the base's family, small and changeable: IVF-Flat on a copy of its coarse quantizer (and
    its input transform, for an OPQ/PCA base), else exact."""
    ivf = faiss.try_extract_index_ivf(base.index)
    if ivf is None or isinstance(base.index, faiss.IndexPreTransform):  # (a transformed base: exact, for now)
        return faiss.IndexIDMap2(faiss.IndexFlatIP(base.dim))
    # faiss's Python layer keeps the quantizer alive as long as the index (referenced_objects)
    delta = faiss.IndexIVFFlat(faiss.clone_index(ivf.quantizer), ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    delta.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
    delta.nprobe = max(1, ivf.nprobe)
    return delta


@dataclass
class LiveIndex:
    """A base and its delta, searched together; what ``LiveReader.get`` returns. Thread-safe."""

    base: VectorIndex
    delta: DeltaSegment
    position: str  # the id of the last stream entry applied ("" when there is no stream)
    heard_at: float | None = None  # when the stream last answered (time.time()); None: no stream
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _successor: LiveIndex | None = field(default=None, repr=False)  # took over this one's delta (see carried_to)

    @classmethod
    def of(cls, base: VectorIndex, position: str = "") -> LiveIndex:
        return cls(base, DeltaSegment(base), position)

    # the VectorIndex interface the query service and the API use
    dim = property(lambda self: self.base.dim)
    model_id = property(lambda self: self.base.model_id)
    kind = property(lambda self: self.base.kind)
    codec = property(lambda self: self.base.codec)
    nprobe = property(lambda self: self.base.nprobe)
    rerank = property(lambda self: self.base.rerank)
    version = property(lambda self: self.base.version)
    seq = property(lambda self: self.base.seq)

    @property
    def created(self) -> float | None:
        """How current the answers are: when the stream last answered, else when the base was written."""
        return self.heard_at if self.heard_at is not None else self.base.created

    @property
    def ntotal(self) -> int:
        with self._lock:
            if self._successor is None:
                return self.base.ntotal - len(self.delta.tombstones) + self.delta.ntotal
        return self._successor.ntotal

    def hand_over(self, base: VectorIndex, upto: str) -> LiveIndex | None:
        """A live index on a newer ``base`` that takes this one's delta over (``DeltaSegment.carried_to``); this one
        forwards every query to it from then on. None when the delta cannot be carried."""
        with self._lock:
            delta = self.delta.carried_to(base, upto)
            if delta is None:
                return None
            successor = LiveIndex(base, delta, self.position, self.heard_at)
            self._successor = successor
            return successor

    def check_compatible(self, dim: int, model_id: str) -> None:
        self.base.check_compatible(dim, model_id)

    def apply(self, entries: list[Entry]) -> None:
        with self._lock:
            for entry in entries:
                self.delta.apply(entry.change, entry.id)
                self.position = entry.id

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k), best first; missing neighbours have id -1. The delta is searched under the
        lock (the follower changes it); the base, which nothing changes, outside it, so that concurrent queries
        share the cores, with the tombstones as they were when the delta was searched."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        # the base's coarse quantizer finds the lists once, for the base and the delta (which shares it)
        probed = None if self.base.on_gpu_now else self.base.probe(queries)
        with self._lock:
            successor = self._successor
            if successor is None:
                exclusion = self.delta.exclusion()
                found = self.delta.search(queries, k, probed) if self.delta.ntotal else None
        if successor is not None:
            return successor.search(queries, k)
        base_scores, base_ids = self._search_base(queries, k, exclusion, probed)
        if found is None:
            return base_scores, base_ids
        scores = np.hstack([base_scores, found[0]])
        ids = np.hstack([base_ids, found[1]])
        scores = np.where(ids >= 0, scores, -np.inf)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)

    def _search_base(
        self, queries: np.ndarray, k: int, exclusion: Exclusion, probed: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        base = self.base
        if base.ntotal == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        if probed is not None:
            return base.search_lists(queries, k, probed, exclusion.selector)
        if exclusion.selector is None:
            return base.search(queries, k)
        if base.on_gpu_now:  # GPU indexes take no selector: ask for more, then filter
            scores, ids = base.search(queries, min(k + len(exclusion.ids), 2048))
            dead = np.isin(ids, exclusion.ids)
            scores, ids = np.where(dead, -np.inf, scores), np.where(dead, -1, ids)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        result: tuple[np.ndarray, np.ndarray] = base.index.search(queries, k, params=exclusion.params(base))
        return result

    def reconstruct(self, vector_id: int) -> np.ndarray | None:
        with self._lock:
            if self._successor is not None:
                successor = self._successor
            elif self.delta._has(int(vector_id)):
                return self.delta.index.reconstruct(int(vector_id), np.empty(self.base.dim, np.float32))
            elif int(vector_id) in self.delta.tombstones:
                return None
            else:
                successor = None
        if successor is not None:
            return successor.reconstruct(vector_id)
        return self.base.reconstruct(vector_id)

    def __contains__(self, vector_id: int) -> bool:
        return self.reconstruct(vector_id) is not None


class LiveReader:
    """The newest base snapshot and, when there is a stream of changes, the changes after it: ``get()`` returns a
    ``LiveIndex`` (or None before the first snapshot).

    Without a stream (no Redis: notebooks, some tests) it serves snapshots as they are published, checking
    ``CURRENT`` at most every ``check_interval_s``. With one, a daemon thread follows it (started by the first
    ``get``): it waits up to ``block_ms`` for new entries, applies them, and checks for a new base between reads.
    Losing Redis leaves the reader serving what it has while it retries with capped backoff; the ``created`` it
    reports (the API's index age) then grows, which is what ``/metrics`` shows.
    """

    def __init__(
        self,
        store: SnapshotStore,
        deltas: DeltaStream | None = None,
        check_interval_s: float = 0.1,
        gpu: bool = False,
        block_ms: int = 200,
    ) -> None:
        self.store = store
        self.deltas = deltas
        self.check_interval_s = check_interval_s
        self.gpu = gpu  # search the base on a GPU copy when FAISS has a GPU build and sees a GPU
        self.block_ms = block_ms
        self._lock = threading.Lock()
        self._live: LiveIndex | None = None
        self._stamp: tuple[int, int] | None = None
        self._mapper: threading.Thread | None = None  # maps a new base while the follower goes on
        self._mapped: tuple[VectorIndex, tuple[int, int] | None] | None = None  # what it mapped, to install
        self._checked = 0.0
        self._follower: threading.Thread | None = None
        self._stopped = threading.Event()
        self._failures = 0

    def get(self) -> LiveIndex | None:
        if self.deltas is None:
            now = time.monotonic()
            if now - self._checked >= self.check_interval_s:
                with self._lock:
                    self._checked = now
                    self._load_new_base()
            return self._live
        if self._follower is None:
            with self._lock:
                if self._follower is None:
                    try:  # the first caller gets the index as of now, not as of the thread's first turn
                        self._refresh()
                    except (redis.RedisError, OSError) as err:  # the follower keeps trying
                        LOG.warning("index reader cannot reach the writer's changes yet (%s: %s)",
                                    type(err).__name__, err)  # fmt: skip
                    self._follower = threading.Thread(target=self._follow, name="index-follower", daemon=True)
                    self._follower.start()
        return self._live

    def close(self) -> None:
        self._stopped.set()

    # -- following -------------------------------------------------------------------------------------------------
    def _follow(self) -> None:
        # Applying a batch is small work: an OpenMP team for it would only contend with the query threads' cores
        faiss.omp_set_num_threads(1)
        while not self._stopped.is_set():
            try:
                self._refresh(block_ms=self.block_ms)
                self._failures = 0
            except (redis.RedisError, OSError) as err:  # Redis (or the bucket, for a base) away: keep serving
                self._failures += 1
                delay = min(MAX_BACKOFF_S, 0.1 * 2**self._failures)
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    LOG.warning("index reader cannot follow the writer's changes (%s: %s); serving what it has, "
                                "retrying in %.1f s", type(err).__name__, err, delay)  # fmt: skip
                self._stopped.wait(delay)
            except Exception:  # never let the thread die: a reader that stops following serves stale answers
                LOG.exception("index reader failed to apply changes; retrying")
                self._stopped.wait(MAX_BACKOFF_S)

    def _refresh(self, block_ms: int | None = None) -> None:
        if self._live is None or self.deltas is None:  # nothing served yet (or no stream): map it here and now
            if self._load_new_base():
                return
        elif self._install_mapped():
            return
        live, deltas = self._live, self.deltas
        if live is None or deltas is None:
            if block_ms:
                self._stopped.wait(block_ms / 1000)
            return
        entries, position = deltas.read_after(live.position, block_ms=block_ms)
        self._check_chain(live.position, entries)
        live.apply(entries)
        live.position = position
        live.heard_at = time.time()

    def _install_mapped(self) -> bool:
        """While following: a new base is mapped by a thread of its own (a large one takes seconds, during which
        the follower goes on applying changes to the index it serves), then installed here; True when it was."""
        mapped, self._mapped = self._mapped, None
        if mapped is not None:
            return self._install(*mapped)
        if self.store.versions.stamp() != self._stamp and (self._mapper is None or not self._mapper.is_alive()):
            self._mapper = threading.Thread(target=self._map_in_background, name="index-mapper", daemon=True)
            self._mapper.start()
        return False

    def _map_in_background(self) -> None:
        faiss.omp_set_num_threads(1)
        stamp = self.store.versions.stamp()  # before the load: a newer version than this is mapped again later
        base = self._map()
        if base is not None:
            self._mapped = (base, stamp)

    def _map(self) -> VectorIndex | None:
        try:
            base = self.store.load(mapped=True)
        except (OSError, RuntimeError) as err:  # pruned while read (faiss raises RuntimeError): next turn
            LOG.warning("reader could not load index v%s (%s); still serving the one it has",
                        self.store.versions.current(), err)  # fmt: skip
            return None
        if base is not None:
            base.index_ids()  # here, before the base serves: the follower and queries never wait for these
            if not (self.gpu and base.on_gpu()):
                base.index_centroids()
        return base

    def _load_new_base(self) -> bool:
        """Map a newly published base and install it; True when it swapped."""
        stamp = self.store.versions.stamp()
        if stamp == self._stamp:
            return False
        base = self._map()
        return base is not None and self._install(base, stamp)

    def _install(self, base: VectorIndex, stamp: tuple[int, int] | None) -> bool:
        """Serve ``base`` with the changes after it: the served delta carried over when it can be, else one built
        again from the stream; True when it swapped."""
        served = self._live
        if self.deltas is not None and served is not None and base.stream_id:
            self._catch_up(served, until=base.stream_id)  # what the base holds, first, if it is ahead
            if not older(served.position, base.stream_id) and (handed := served.hand_over(base, base.stream_id)):
                self._live, self._stamp = handed, stamp
                LOG.info("reader serves index v%s (%d vectors in the base, %d changes after it, carried over)",
                         base.version, base.ntotal, len(handed.delta.touched))  # fmt: skip
                return True
        live = LiveIndex.of(base)
        if self.deltas is not None:
            # Every change after the base, page by page. When Redis fails meanwhile, the new base is served as far as
            # it got if that is not behind the index served now (a base holds every change up to its stream id, and
            # those the writer made while the stream was down), else the old one; the follower goes on from there.
            try:
                live.position = base.stream_id or self.deltas.last_id()  # a base from before the stream: no changes
                self._catch_up(live)
            except redis.RedisError:
                served = self._live
                if live.position and (served is None or not older(live.position, served.position)):
                    self._live, self._stamp = live, stamp
                    LOG.info("reader serves index v%s (%d vectors) without the changes after it while the stream "
                             "is away", base.version, base.ntotal)  # fmt: skip
                raise
            live.heard_at = time.time()
        self._live, self._stamp = live, stamp
        LOG.info("reader serves index v%s (%d vectors in the base, %d changes after it)", base.version,
                 base.ntotal, live.delta.ntotal + len(live.delta.tombstones))  # fmt: skip
        return True

    def _catch_up(self, live: LiveIndex, until: str | None = None) -> None:
        """Apply the stream's entries after ``live``'s position, page by page: all of them, or up to ``until``."""
        assert self.deltas is not None
        while until is None or older(live.position, until):
            entries, position = self.deltas.read_after(live.position)
            if not entries and position == live.position:
                return
            self._check_chain(live.position, entries)
            live.apply(entries)
            live.position = position

    def _check_chain(self, position: str, entries: list[Entry]) -> None:
        if entries and entries[0].prev != position and entries[0].prev:
            DELTA_GAPS.inc()
            LOG.warning("index changes between %s and %s are missing from the stream (Redis lost them?); the next "
                        "sealed base brings them", position, entries[0].id)  # fmt: skip
