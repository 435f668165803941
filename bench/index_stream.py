"""The index under a stream, as deployed: a sealed base, the writer's change stream, readers in their own processes.

    .venv/bin/python bench/index.py --stream -n 1000000            # what bench/index.py --stream runs
    .venv/bin/python bench/index_stream.py -n 100000 --seconds 30  # the same, directly

What runs is the project's code, not a model of it: a real ``redis-server`` (the embedded one); a base index of ``n``
clustered synthetic vectors (``index.synthetic``) built as the writer builds one (``IndexPlan`` for the memory
budget, ``build_index``), sealed with ``SnapshotStore.begin`` (a forked write) and published; then a writer loop
that upserts new vectors at ``--rate`` a second (batches of 100), removes ``--remove-share`` of that rate of random
live ids, appends each change to the ``DeltaStream`` and seals a new base every ``--seal-every`` changes, as
``IndexWriter`` does (without its metadata-store journal, which at 10M would be 51 GB of SQLite rows; the journal's
cost is bench/store.py's). One reader process follows with ``LiveReader`` (the API's reader) and runs single
queries from ``--clients`` concurrent threads while the stream runs.

Freshness: after each batch the writer hands one of its vectors, with the time it was added, to the reader
(a Redis list, after the change is in the stream); the reader looks the id up every 2 ms and, once it is there,
queries the vector, which must return the id. The time from the add to that answer is the visibility latency.
(Querying every few ms instead would add hundreds of queries a second to the clients' load.)

A quantized base (past the memory budget: SQ4 at 10M) is served as the query service serves it: ``rerank`` (tuned
with nprobe) times the candidates, re-scored from the float embeddings of the metadata store. Its stand-in here is a
float16 file of every vector (``EmbeddingFile``: 25.6 GB at 10M x 1280-d, where float32 would not fit this disk),
read with one ``pread`` a candidate, as the store reads rows, so none of it counts in the reader's RSS.

At the end the stream stops, the reader catches up, and recall@10 of its answers to fresh queries is measured against
exact search over the same live set (the base's vectors generated again, less the removed ones, plus the added).
Printed: recall@10, single-query p50/p99 and QPS with concurrent clients, visibility p50/p99, the writer's and the
reader's RSS, seal times, disk per vector; last ``recall@10 = X``, ``p99 = Y ms``, ``visible p99 = Z s``,
``reader RSS = W GB``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from deeptarget.index.builder import ExactNeighbours, IndexPolicy, build_ivf, recall_at_k, reranked, tune_nprobe
from deeptarget.index.deltas import Change, DeltaStream, older
from deeptarget.index.segments import LiveIndex, LiveReader
from deeptarget.index.synthetic import ClusteredVectors
from deeptarget.index.vectors import SnapshotStore, SnapshotWrite, VectorIndex
from deeptarget.runtime.embedded_redis import EmbeddedRedis

CHUNK = 65_536
PROBES = "bench:probes"
STOP = "bench:stop"
K = 10
NEW_IDS = 10**15  # the stream's new ids start here, apart from the base's


def memory_gb(field: str = "VmRSS", pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def mapped_files_gb(pid: str = "self") -> dict[str, float]:
    """The resident GB of each file this process maps (from /proc/PID/smaps): which bases a reader still holds."""
    resident: dict[str, float] = {}
    name = ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 6:  # a mapping's header: address perms ... path
                name = Path(fields[5]).name + (" (deleted)" if fields[-1] == "(deleted)" else "")
            elif fields and fields[0] == "Rss:" and name.split(" ")[0].endswith(".faiss"):
                resident[name] = resident.get(name, 0.0) + int(fields[1]) / 1024**2
    return resident


def base_ids(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) * 7919 + 13  # arbitrary int64 ids, as the blake2b ones are


class EmbeddingFile:
    """The metadata store's float embeddings, stood in by float16 rows in two files: the base's, in the order
    ``base_ids`` numbers them, and the stream's additions, in the order of their ids from ``NEW_IDS``."""

    def __init__(self, folder: Path, n: int, dim: int) -> None:
        self.base_path, self.added_path = folder / "base.f16", folder / "added.f16"
        self.n, self.row_bytes = n, dim * 2
        self._fds: tuple[int, int] | None = None

    def writer(self, which: str) -> Any:
        return open(self.base_path if which == "base" else self.added_path, "ab")

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the ids found, their float32 vectors)."""
        if self._fds is None:
            self._fds = os.open(self.base_path, os.O_RDONLY), os.open(self.added_path, os.O_RDONLY)
        found, rows = [], []
        for vector_id in ids.tolist():
            if vector_id >= NEW_IDS:
                fd, row = self._fds[1], vector_id - NEW_IDS
            elif (vector_id - 13) % 7919 == 0 and 0 <= (row := (vector_id - 13) // 7919) < self.n:
                fd = self._fds[0]
            else:
                continue
            raw = os.pread(fd, self.row_bytes, row * self.row_bytes)
            if len(raw) == self.row_bytes:
                found.append(vector_id)
                rows.append(np.frombuffer(raw, np.float16))
        if not rows:
            return np.empty(0, np.int64), np.empty((0, self.row_bytes // 2), np.float32)
        return np.array(found, np.int64), np.stack(rows).astype(np.float32)


def answer(index: LiveIndex, query: np.ndarray, embeddings: EmbeddingFile) -> np.ndarray:
    """The top K ids for one query, as ``QueryService.similar_to_vector`` answers: from a quantized base,
    ``index.rerank`` x K candidates re-scored exactly."""
    if index.rerank <= 1:
        return index.search(query[None], K)[1][0]
    scores, ids = index.search(query[None], K * index.rerank)
    keep = ids[0] >= 0
    candidates, approximate = ids[0][keep], scores[0][keep]
    found, vectors = embeddings.vectors(candidates)
    exact = dict(zip(found.tolist(), (vectors @ query).tolist(), strict=True))
    rescored = np.array([exact.get(i, s) for i, s in zip(candidates.tolist(), approximate.tolist(), strict=True)])
    return candidates[np.argsort(-rescored, kind="stable")[:K]]


# -- the reader process --------------------------------------------------------------------------------------------
def reader_main(folder: str, url: str, clients: int, out: str, n: int, dim: int, clusters: int,
                recall_queries: int, cpus: str) -> None:  # fmt: skip
    import faiss

    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})

    faiss.omp_set_num_threads(1)  # as the API's query threads (one OpenMP thread each)
    # the reader's own log (each base it installs), timed, to set beside the slowest probes
    logging.basicConfig(level=logging.INFO, format="%(created).3f reader %(threadName)s: %(message)s")
    client = redis.Redis.from_url(url)
    reader = LiveReader(SnapshotStore(Path(folder)), DeltaStream.from_url(url), block_ms=100)
    assert reader.get() is not None
    data = ClusteredVectors(dim=dim, n_clusters=clusters, seed=0)
    embeddings = EmbeddingFile(Path(folder).parent, n, dim)
    queries = data.sample(2000, stream=1)
    latencies: list[list[tuple[float, float]]] = [[] for _ in range(clients)]  # (when it started, seconds)
    visible: list[tuple[float, float]] = []  # (when the probe was added, how long until a query found it)
    stop = threading.Event()

    def query_client(slot: int) -> None:
        faiss.omp_set_num_threads(1)  # per thread, as the API's executor threads set it
        i = slot
        while not stop.is_set():
            index = reader.get()
            assert index is not None
            at, started = time.time(), time.perf_counter()
            answer(index, queries[i % len(queries)], embeddings)
            latencies[slot].append((at, time.perf_counter() - started))
            i += clients

    def follow_probes() -> None:
        faiss.omp_set_num_threads(1)
        while not stop.is_set():
            popped: Any = client.blpop([PROBES], timeout=1)
            if popped is None:
                continue
            probe = json.loads(popped[1])
            vector = np.frombuffer(base64.b64decode(probe["vector"]), np.float32)[None]
            deadline = time.time() + 30
            while time.time() < deadline:  # a cheap look by id every 2 ms, then the query that must find it
                index = reader.get()
                if index is not None and probe["id"] in index and probe["id"] in answer(index, vector[0], embeddings):
                    visible.append((probe["added"], time.time() - probe["added"]))
                    break
                time.sleep(0.002)
            else:
                visible.append((probe["added"], float("inf")))

    threads = [threading.Thread(target=query_client, args=(s,), daemon=True) for s in range(clients)]
    threads.append(threading.Thread(target=follow_probes, daemon=True))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    final: Any = client.blpop([STOP], timeout=24 * 3600)  # the writer's last stream id
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    assert final is not None
    last = final[1].decode()
    while (index := reader.get()) is None or older(index.position, last):
        time.sleep(0.05)
    found = [answer(index, query, embeddings).tolist() for query in data.sample(recall_queries, stream=2)]
    alone = []  # one query at a time, nothing else running: the latency without the clients' queueing
    for query in queries[:1000]:
        started = time.perf_counter()
        answer(index, query, embeddings)
        alone.append((time.perf_counter() - started) * 1000)
    all_latencies = [x for slot in latencies for x in slot]
    slowest = sorted(all_latencies, key=lambda x: -x[1])[:10]
    Path(out).write_text(json.dumps({
        "latencies_ms": [x * 1000 for _, x in all_latencies], "alone_ms": alone, "qps": len(all_latencies) / elapsed,
        "slowest": slowest,
        "visible_s": visible,
        "rss_gb": memory_gb("VmRSS"), "peak_rss_gb": memory_gb("VmHWM"), "found": found,
        "anon_gb": memory_gb("RssAnon"), "file_gb": memory_gb("RssFile"), "mapped": mapped_files_gb(),
        "ntotal": index.ntotal, "delta": index.delta.ntotal, "tombstones": len(index.delta.tombstones),
    }))  # fmt: skip


# -- the writer ----------------------------------------------------------------------------------------------------
class Writer:
    """Upserts and removals at a steady rate into the base index, each change appended to the stream, and a seal
    (a forked snapshot) every ``seal_every`` changes, as ``IndexWriter`` does."""

    def __init__(self, index: VectorIndex, store: SnapshotStore, deltas: DeltaStream, client: redis.Redis,
                 data: ClusteredVectors, embeddings: EmbeddingFile, args: argparse.Namespace) -> None:  # fmt: skip
        self.index, self.store, self.deltas, self.client, self.data, self.args = (
            index,
            store,
            deltas,
            client,
            data,
            args,
        )
        self.next_id = NEW_IDS
        self.embeddings = embeddings.writer("added")  # the store has a post's embedding before the index does
        self.added: dict[int, np.ndarray] = {}
        self.removed: set[int] = set()
        self.probes: set[int] = set()  # never removed: the reader waits for each
        self.live_base = args.n
        self.seals_s: list[float] = []
        self.published_at: list[float] = []  # when each seal was published (time.time())
        self.started_at = 0.0
        self.fork_ms: list[float] = []
        self.changes_since_seal = 0
        self.sealing: threading.Thread | None = None
        self.rng = np.random.default_rng(3)
        self.last_id = "0-0"
        self.sealed_ids: list[str] = []

    def run(self, progress: Progress) -> None:
        args = self.args
        task = progress.add_task("streaming", total=args.seconds)
        interval = args.batch / args.rate
        start = next_batch = time.monotonic()
        self.started_at = time.time()
        stream = 10
        while (now := time.monotonic()) < start + args.seconds:
            if now < next_batch:
                time.sleep(next_batch - now)
                continue
            vectors = self.data.sample(args.batch, stream=stream)
            stream += 1
            ids = np.arange(self.next_id, self.next_id + args.batch, dtype=np.int64)
            self.next_id += args.batch
            added_at = time.time()
            self.embeddings.write(vectors.astype(np.float16).tobytes())
            self.embeddings.flush()
            lists = self.index.upsert(ids, vectors)
            self.last_id = self.deltas.append(Change("add", ids, vectors, lists, self.index.trained_id))
            self.added.update(zip(ids.tolist(), vectors, strict=True))
            gone = self._pick_removals(int(args.batch * args.remove_share))
            self.index.remove(gone)
            self.last_id = self.deltas.append(Change("remove", gone))
            self.probes.add(int(ids[0]))
            probe = {"id": int(ids[0]), "added": added_at, "vector": base64.b64encode(vectors[0].tobytes()).decode()}
            self.client.rpush(PROBES, json.dumps(probe))
            self.changes_since_seal += len(ids) + len(gone)
            if self.changes_since_seal >= args.seal_every and (self.sealing is None or not self.sealing.is_alive()):
                self._seal()
            next_batch += interval
            progress.update(task, completed=now - start)
        if self.sealing is not None:
            self.sealing.join()

    def _pick_removals(self, count: int) -> np.ndarray:
        picked = []
        for _ in range(count):  # from the base's ids and the added ones, live ones only
            if self.added and self.rng.random() < 0.5:
                candidate = int(self.rng.choice(list(self.added)[-5000:]))
            else:
                candidate = int(base_ids(self.args.n)[self.rng.integers(0, self.args.n)])
            if candidate not in self.removed and candidate not in self.probes:
                picked.append(candidate)
                self.removed.add(candidate)
                self.added.pop(candidate, None)
        return np.array(picked, np.int64)

    def _seal(self) -> None:
        started = time.perf_counter()
        sealed_id = self.last_id
        write: SnapshotWrite = self.store.begin(self.index, sealed_id, fork=True)
        self.fork_ms.append((time.perf_counter() - started) * 1000)
        self.changes_since_seal = 0

        def finish() -> None:
            write.finish()
            self.seals_s.append(time.perf_counter() - started)
            self.published_at.append(time.time())
            self.sealed_ids.append(sealed_id)
            if len(self.sealed_ids) >= 2:  # as IndexWriter: a reader still on the previous base needs what follows it
                self.deltas.trim_before(self.sealed_ids[-2])

        self.sealing = threading.Thread(target=finish, daemon=True)
        self.sealing.start()


def build_base(args: argparse.Namespace, data: ClusteredVectors, embeddings: EmbeddingFile,
               console: Console) -> VectorIndex:  # fmt: skip
    """The base as the writer builds one: an IVF trained on a sample, the codec the memory budget allows, every
    vector added, nprobe tuned (``build_ivf``); the float16 stand-in for the store's embeddings written alongside."""
    ids = base_ids(args.n)
    policy = IndexPolicy(target_recall=args.target_recall, memory_budget=int(args.budget_gb * 2**30))
    # rows are independent draws, so the first ones are a uniform sample (and cost no pass over 10M)
    sample_size = min(args.n, policy.nlist_for(args.n) * policy.vectors_per_list)
    sample = np.concatenate(list(data.chunks(sample_size, CHUNK)))
    with_rescoring = reranked(policy.codec_for(args.n, args.dim))

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with embeddings.writer("base") as rows:
            for i, chunk in enumerate(data.chunks(args.n, CHUNK)):
                if with_rescoring:
                    rows.write(chunk.astype(np.float16).tobytes())
                yield ids[i * CHUNK : i * CHUNK + len(chunk)], chunk

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building the base", total=args.n)
        started = time.perf_counter()
        index, tuning = build_ivf(args.dim, "bench", sample, ids[:sample_size], chunks, args.n, policy,
                                  progress=lambda m: progress.advance(task, m))  # fmt: skip
    console.print(f"IVF{index.nlist},{index.codec} built in {time.perf_counter() - started:.0f} s; nprobe "
                  f"{tuning.nprobe} for in-collection recall@10 {tuning.recall:.3f}"
                  f"{' of re-scored candidates' if with_rescoring else ''} {tuning.curve}")  # fmt: skip
    return index


def exact_over_live_set(writer: Writer, data: ClusteredVectors, queries: np.ndarray, n: int) -> np.ndarray:
    exact = ExactNeighbours(queries, K)
    ids = base_ids(n)
    removed = np.fromiter(writer.removed, np.int64, len(writer.removed))
    for i, chunk in enumerate(data.chunks(n, CHUNK)):
        chunk_ids = ids[i * CHUNK : i * CHUNK + len(chunk)]
        keep = ~np.isin(chunk_ids, removed)
        exact.update(chunk_ids[keep], chunk[keep])
    if writer.added:
        exact.update(np.fromiter(writer.added, np.int64, len(writer.added)), np.stack(list(writer.added.values())))
    return exact.ids


def run(args: argparse.Namespace) -> None:
    console = Console()
    data = ClusteredVectors(dim=args.dim, n_clusters=args.clusters, seed=0)
    # a reused folder (a previous run's base and float16 file) is kept; a new run's is a temporary one
    place = contextlib.nullcontext(args.reuse) if args.reuse else tempfile.TemporaryDirectory(dir=args.work_dir)
    with place as name:
        folder = Path(name)
        shutil.rmtree(folder / "redis", ignore_errors=True)  # a fresh Redis, and a fresh stand-in of the adds
        (folder / "added.f16").unlink(missing_ok=True)
        server = EmbeddedRedis(folder / "redis").start()
        try:
            _run(args, console, data, folder, server.url)
        finally:
            server.stop()


def reused_base(args: argparse.Namespace, data: ClusteredVectors, folder: Path, console: Console) -> VectorIndex:
    """The base a previous run sealed into ``folder`` (the n vectors it was built with), with nprobe and the
    re-scoring depth tuned again, as ``build_ivf`` tunes them: a pass over the collection for the tuning queries'
    exact neighbours instead of a build."""
    started = time.perf_counter()
    index = SnapshotStore(folder / "index").load()
    assert index is not None and index.ntotal == args.n, f"{folder} holds no base of {args.n:,} vectors"
    policy = IndexPolicy(target_recall=args.target_recall, memory_budget=int(args.budget_gb * 2**30))
    ids = base_ids(args.n)
    queries = data.sample(policy.tuning_queries)  # the collection's first rows, as build_base's sample starts
    exact = ExactNeighbours(queries, policy.k + 1)
    for i, chunk in enumerate(data.chunks(args.n, CHUNK)):
        exact.update(ids[i * CHUNK : i * CHUNK + len(chunk)], chunk)
    tuning = tune_nprobe(index, queries, ids[: len(queries)], exact.ids, policy)
    console.print(f"IVF{index.nlist},{index.codec} of {index.ntotal:,} loaded and tuned in "
                  f"{time.perf_counter() - started:.0f} s: nprobe {tuning.nprobe}, re-scoring {tuning.rerank}x, "
                  f"in-collection recall@10 {tuning.recall:.3f} {tuning.curve}")  # fmt: skip
    return index


def _run(args: argparse.Namespace, console: Console, data: ClusteredVectors, folder: Path, url: str) -> None:
    embeddings = EmbeddingFile(folder, args.n, args.dim)
    embeddings.writer("added").close()  # the reader opens both
    index = reused_base(args, data, folder, console) if args.reuse else build_base(args, data, embeddings, console)
    deltas = DeltaStream.from_url(url)
    client = redis.Redis.from_url(url)
    store = SnapshotStore(folder / "index", keep=2)
    started = time.perf_counter()
    store.begin(index, deltas.last_id(), fork=True).finish()
    first_seal = time.perf_counter() - started
    newest = max((folder / "index").glob("v*.faiss"), key=lambda p: p.stat().st_mtime)  # a reused run keeps the old
    disk = newest.stat().st_size / index.ntotal
    out = folder / "reader.json"
    cpus = sorted(os.sched_getaffinity(0))
    split = args.pin and len(cpus) >= 2  # the writer and the reader on cores of their own, as on their own hosts
    reader_cpus = ",".join(str(c) for c in cpus[len(cpus) // 2 :]) if split else ""
    if split:
        os.sched_setaffinity(0, set(cpus[: len(cpus) // 2]))
    placement = f"writer on cpus {sorted(os.sched_getaffinity(0))}, reader on {reader_cpus}" if split else "unpinned"
    reader = subprocess.Popen(
        [sys.executable, __file__, "--reader", str(folder / "index"), url, str(args.clients), str(out), str(args.n),
         str(args.dim), str(args.clusters), str(args.recall_queries), reader_cpus],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert reader.stdout is not None and reader.stdout.readline().strip() == b"ready", "the reader did not start"
    console.print(f"{args.n:,} vectors ({args.dim}-d) sealed in {first_seal:.1f} s, {disk:,.0f} bytes a vector; "
                  f"adding {args.rate:,.0f}/s for {args.seconds:.0f} s, removing {args.remove_share:.0%} of that, "
                  f"a seal every {args.seal_every:,} changes; {args.clients} query clients; {placement}")  # fmt: skip
    writer = Writer(index, store, deltas, client, data, embeddings, args)
    with Progress(console=console, transient=True) as progress:
        writer.run(progress)
    writer_rss, writer_peak = memory_gb("VmRSS"), memory_gb("VmHWM")
    client.rpush(STOP, writer.last_id)
    reader.wait()
    result = json.loads(out.read_text())
    queries = data.sample(args.recall_queries, stream=2)
    console.print("exact search over the live set, for recall ...")
    exact = exact_over_live_set(writer, data, queries, args.n)
    recall = recall_at_k(np.array(result["found"]), exact, np.full(len(queries), -1), K)
    lat, alone = np.array(result["latencies_ms"]), result["alone_ms"]
    added, vis = np.array(result["visible_s"]).reshape(-1, 2).T
    table = Table("what", "value")
    rows = [
        ("index", f"IVF{index.nlist},{index.codec} nprobe {index.nprobe} (budget {args.budget_gb:g} GB)"
                  + (f", {index.rerank} x 10 candidates re-scored from the float16 stand-in" if index.rerank > 1
                     else "")),
        ("live vectors at the end (reader)", f"{result['ntotal']:,} ({result['delta']:,} in its delta, "
                                             f"{result['tombstones']:,} tombstones)"),
        (f"recall@10 vs exact over the live set ({len(queries)} fresh queries)", f"{recall:.3f}"),
        (f"single query, {args.clients} concurrent clients: p50 / p99 ms", f"{np.percentile(lat, 50):.2f} / "
                                                                           f"{np.percentile(lat, 99):.2f}"),
        ("QPS (all clients)", f"{result['qps']:,.0f}"),
        ("one query alone, after the stream: p50 / p99 ms", f"{np.percentile(alone, 50):.2f} / "
                                                            f"{np.percentile(alone, 99):.2f}"),
        ("visible after add: p50 / p99 s (max)", f"{np.percentile(vis, 50):.3f} / {np.percentile(vis, 99):.3f} "
                                                 f"({vis.max():.3f}, n={len(vis)})"),
        ("seal: fork ms p50 / whole seal s p50 (n)", f"{np.percentile(writer.fork_ms or [0], 50):.0f} / "
                                                     f"{np.percentile(writer.seals_s or [0], 50):.1f} "
                                                     f"({len(writer.seals_s)})"),
        ("writer RSS now / peak GB", f"{writer_rss:.2f} / {writer_peak:.2f}"),
        ("reader RSS now / peak GB (now: anonymous + mapped files)",
         f"{result['rss_gb']:.2f} / {result['peak_rss_gb']:.2f} ({result['anon_gb']:.2f} + {result['file_gb']:.2f})"),
        ("disk per vector (base snapshot)", f"{disk:,.0f} B"),
    ]  # fmt: skip
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    slowest = np.argsort(-vis)[:5]
    published = ", ".join(f"{at - writer.started_at:.1f}" for at in writer.published_at)
    console.print(
        "the reader's mapped files at the end, resident GB: "
        + ", ".join(f"{name} {gb:.2f}" for name, gb in sorted(result["mapped"].items()))
    )
    console.print("slowest probes (added at s into the stream: took s): "
                  + ", ".join(f"{added[i] - writer.started_at:.1f}: {vis[i]:.2f}" for i in slowest)
                  + f"; seals published at {published} s")  # fmt: skip
    console.print(
        "slowest queries (started at s into the stream: took ms): "
        + ", ".join(f"{at - writer.started_at:.1f}: {took * 1000:.1f}" for at, took in result["slowest"])
    )
    print(f"recall@10 = {recall:.3f}")
    print(f"p99 = {np.percentile(lat, 99):.2f} ms")
    print(f"visible p99 = {np.percentile(vis, 99):.3f} s")
    print(f"reader RSS = {result['peak_rss_gb']:.2f} GB")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=1000.0, help="vectors added a second")
    parser.add_argument("--batch", type=int, default=100, help="vectors per upsert")
    parser.add_argument("--remove-share", type=float, default=0.1, help="removals, as a share of the add rate")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the stream runs")
    parser.add_argument("--seal-every", type=int, default=50_000, help="index_seal_every_changes")
    parser.add_argument("--clients", type=int, default=2, help="concurrent query threads in the reader")
    parser.add_argument("--recall-queries", type=int, default=500)
    parser.add_argument("--budget-gb", type=float, default=6.0, help="index_memory_budget, for the base")
    parser.add_argument("--work-dir", default=None, help="where snapshots and Redis live (default: /tmp)")
    parser.add_argument(
        "--reuse",
        default=None,
        help="the work folder of a run stopped after its first seal: its "
        "base and float16 file are used again, nprobe and depth tuned again (10M: a pass, not a build)",
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="the writer and the reader share every core (default: half the cores each)")  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        folder, url, clients, out, n, dim, clusters, recall_queries, cpus = sys.argv[2:11]
        reader_main(folder, url, int(clients), out, int(n), int(dim), int(clusters), int(recall_queries), cpus)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="vectors indexed before the stream starts")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--clusters", type=int, default=4000)
    parser.add_argument("--target-recall", type=float, default=0.95)
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
