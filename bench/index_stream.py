"""How fresh the index is under a stream, as it works today: whole snapshots (issue 17's baseline).

    .venv/bin/python bench/index_stream.py                 # 100,000 vectors, adds at 1,000/s for 60 s
    .venv/bin/python bench/index_stream.py -n 300000 --seconds 90

What it runs is the writer's and the reader's code, not a model of it: a ``VectorIndex`` holding ``n`` clustered
synthetic vectors (``index.synthetic``), a writer thread that upserts new vectors at ``--rate`` a second in batches of
``--batch`` with ``--remove-share`` of that rate removed, and publishes a snapshot (``SnapshotStore.save``, the whole
index) every ``--snapshot-every`` seconds as the index writer does; and a reader thread that follows the published
snapshots with ``LiveReader`` (stat of CURRENT, then ``faiss.read_index`` of the whole file) and runs single
queries between its checks. An added vector is *visible* when the reader serves a snapshot that holds it; the time
from its upsert to then is its visibility latency.

Printed: visibility p50/p99, the writer's save time per snapshot, the reader's load time, single-query p50/p99 while
the stream runs, the process's peak RSS (writer and reader share it here: the reader holds a second full copy, and a
third while it loads), and the snapshot's bytes per vector. The last lines are ``visible p99 = Z s`` and
``reader RSS = W GB`` at this size: what segments and a delta stream (issue 17) must bring under 1 s and 8 GB.
The index is the exact one (IDMap2 Flat) throughout: the baseline of the snapshot path, not of IVF's search.

Measured here (2 cores), defaults: 100,000 -> 151,961 vectors, visible after an add p50 4.17 s / p99 6.95 s; a
snapshot saved in 0.98 s (p99 1.60) and loaded in 0.50 s; single queries p50 75 ms / p99 137 ms while the stream
runs; 5,128 bytes a vector on disk; peak RSS 2.60 GB.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from deeptarget.index.segments import LiveReader
from deeptarget.index.synthetic import ClusteredVectors
from deeptarget.index.vectors import SnapshotStore, VectorIndex


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class Stream:
    """The writer's side: upserts and removals at a steady rate, a whole snapshot every ``snapshot_every_s``."""

    def __init__(self, index: VectorIndex, store: SnapshotStore, data: ClusteredVectors, args: argparse.Namespace,
                 first_id: int) -> None:  # fmt: skip
        self.index, self.store, self.data, self.args = index, store, data, args
        self.next_id = first_id
        self.added_at: dict[int, float] = {}  # vector id -> when it was upserted (monotonic)
        self.saves_s: list[float] = []
        self.lock = threading.Lock()  # the writer's lock: adds and saves (as IndexWriter holds one)
        self.done = threading.Event()
        self.rng = np.random.default_rng(3)

    def run(self) -> None:
        args = self.args
        interval = args.batch / args.rate
        next_batch = next_snapshot = time.monotonic()
        next_snapshot += args.snapshot_every
        end = time.monotonic() + args.seconds
        stream = 10
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_snapshot:
                started = time.perf_counter()
                with self.lock:
                    self.store.save(self.index)
                self.saves_s.append(time.perf_counter() - started)
                next_snapshot = time.monotonic() + args.snapshot_every
                continue
            if now < next_batch:
                time.sleep(min(next_batch, next_snapshot) - now)
                continue
            vectors = self.data.sample(args.batch, stream=stream)
            stream += 1
            ids = np.arange(self.next_id, self.next_id + args.batch, dtype=np.int64)
            self.next_id += args.batch
            removals = self.rng.integers(0, self.next_id - args.batch, int(args.batch * args.remove_share))
            with self.lock:
                self.index.upsert(ids, vectors)
                self.index.remove(removals.astype(np.int64))
                stamp = time.monotonic()
            for vector_id in ids[:: max(1, args.batch // 4)]:  # a few of each batch are followed
                self.added_at[int(vector_id)] = stamp
            next_batch += interval
        self.done.set()


def follow(reader: LiveReader, stream: Stream, queries: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """The reader's side until the stream ends: (visibility latencies s, single-query ms, snapshot loads s)."""
    visible: list[float] = []
    query_ms: list[float] = []
    loads: list[float] = []
    pending: dict[int, float] = {}
    served = None
    flushed = False
    i = 0
    while not stream.done.is_set() or pending:
        started = time.perf_counter()
        index = reader.get()
        if index is not served and index is not None:
            loads.append(time.perf_counter() - started)
            served, now = index, time.monotonic()
            pending.update(stream.added_at)
            for vector_id, at in list(pending.items()):
                if vector_id in index:
                    visible.append(now - at)
                    del pending[vector_id]
                    stream.added_at.pop(vector_id, None)
        if stream.done.is_set() and not pending:
            break
        if stream.done.is_set() and not flushed:  # the last adds reach readers with the next snapshot: publish it
            flushed = True
            with stream.lock:
                stream.store.save(stream.index)
            gone = [v for v in stream.added_at if v not in stream.index]  # removed since their add: never visible
            for vector_id in gone:
                stream.added_at.pop(vector_id, None)
            pending = {v: t for v, t in pending.items() if v in stream.index}
        if index is not None:
            q = time.perf_counter()
            index.search(queries[i % len(queries)][None], 10)
            query_ms.append((time.perf_counter() - q) * 1000)
            i += 1
        time.sleep(0.01)
    return visible, query_ms, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="vectors indexed before the stream starts")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--rate", type=float, default=1000.0, help="vectors added a second")
    parser.add_argument("--batch", type=int, default=100, help="vectors per upsert")
    parser.add_argument("--remove-share", type=float, default=0.1, help="removals, as a share of the add rate")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the stream runs")
    parser.add_argument("--snapshot-every", type=float, default=5.0, help="the writer's snapshot_every_s")
    args = parser.parse_args()
    console = Console()
    data = ClusteredVectors(dim=args.dim, n_clusters=2000, seed=0)
    index = VectorIndex.empty(args.dim, "bench")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("indexing", total=args.n)
        for start, chunk in zip(range(0, args.n, 65_536), data.chunks(args.n, 65_536), strict=True):
            index.upsert(np.arange(start, start + len(chunk), dtype=np.int64), chunk)
            progress.advance(task, len(chunk))
    with tempfile.TemporaryDirectory() as folder:
        store = SnapshotStore(Path(folder))
        store.save(index)
        disk = sum(p.stat().st_size for p in Path(folder).glob("v*.faiss")) / index.ntotal
        reader = LiveReader(SnapshotStore(Path(folder)), check_interval_s=0.1)
        reader.get()
        stream = Stream(index, store, data, args, first_id=args.n)
        writer = threading.Thread(target=stream.run, name="writer")
        plan = (f"adding {args.rate:,.0f}/s for {args.seconds:.0f} s, removing {args.remove_share:.0%} of that, "
                f"a snapshot every {args.snapshot_every:.0f} s")  # fmt: skip
        console.print(f"{args.n:,} vectors ({args.dim}-d); {plan}")
        writer.start()
        visible, query_ms, loads = follow(reader, stream, data.sample(200, stream=1))
        writer.join()
    table = Table("what", "p50", "p99", "n")
    table.add_row("visible after add (s)", f"{np.percentile(visible, 50):.2f}", f"{np.percentile(visible, 99):.2f}",
                  str(len(visible)))  # fmt: skip
    table.add_row("writer: save a snapshot (s)", f"{np.percentile(stream.saves_s, 50):.2f}",
                  f"{np.percentile(stream.saves_s, 99):.2f}", str(len(stream.saves_s)))  # fmt: skip
    table.add_row("reader: load a snapshot (s)", f"{np.percentile(loads, 50):.2f}", f"{np.percentile(loads, 99):.2f}",
                  str(len(loads)))  # fmt: skip
    table.add_row("single query while streaming (ms)", f"{np.percentile(query_ms, 50):.2f}",
                  f"{np.percentile(query_ms, 99):.2f}", str(len(query_ms)))  # fmt: skip
    console.print(table)
    console.print(f"final size {index.ntotal:,} vectors; snapshot {disk:,.0f} bytes a vector on disk")
    print(f"visible p99 = {np.percentile(visible, 99):.2f} s")
    print(f"reader RSS = {peak_rss_gb():.2f} GB (peak of the process: writer and reader together)")


if __name__ == "__main__":
    main()
