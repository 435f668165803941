"""Similarity index at scale: exact (flat) against IVF as deeptarget builds it, on clustered synthetic embeddings.

    .venv/bin/python bench/index.py            # 1,000,000 vectors (about 15 GB of RAM, 10 minutes on 2 cores)
    .venv/bin/python bench/index.py --quick    # 100,000 vectors
    .venv/bin/python bench/index.py --stream -n 1000000   # under a stream of adds and removals (bench/index_stream.py)

Vectors: ``deeptarget.index.synthetic.ClusteredVectors`` (4,000 anisotropic Gaussian clusters of Zipf-like sizes,
unit length, the default backbone's width). Queries are fresh draws from the same distribution, not in the index.
For each index: add throughput, single-query latency p50/p99 (k=10), QPS for batches of 100, recall@10 against exact
search, resident memory. The IVF is built by ``index.builder.build_ivf`` with the default ``IndexPolicy`` (the
writer's own code path, nprobe tuned on in-collection queries); the recall reported is on the fresh queries. The
last two lines are the chosen index's ``recall@10`` and ``p99`` at this size.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import index_stream  # bench/, beside this file
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from deeptarget.index.builder import IndexPolicy, build_ivf, recall_at_k
from deeptarget.index.synthetic import ClusteredVectors
from deeptarget.index.vectors import VectorIndex

CHUNK = 65_536


@dataclass
class Measured:
    name: str
    add_per_s: float
    p50_ms: float
    p99_ms: float
    batch_qps: float
    recall: float
    memory_gb: float


def rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def latencies_ms(index: VectorIndex, queries: np.ndarray, k: int) -> np.ndarray:
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None], k)
        times.append(time.perf_counter() - started)
    return np.array(times) * 1000


def batch_qps(index: VectorIndex, queries: np.ndarray, k: int, batch: int = 100) -> float:
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        index.search(queries[start : start + batch], k)
    return len(queries) / (time.perf_counter() - started)


def measure(name: str, index: VectorIndex, add_s: float, memory: float, queries: np.ndarray, exact: np.ndarray,
            single: int, k: int) -> Measured:  # fmt: skip
    index.search(queries[:10], k)  # warm-up
    ms = latencies_ms(index, queries[:single], k)
    qps = batch_qps(index, queries, k)
    _, found = index.search(queries, k)
    recall = recall_at_k(found, exact, np.full(len(queries), -2), k)
    return Measured(name, index.ntotal / add_s, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), qps,
                    recall, memory)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 vectors instead of 1,000,000")
    parser.add_argument("-n", type=int, help="vectors (overrides --quick)")
    parser.add_argument("--dim", type=int, default=1280, help="mobilenet_v2's width, the default backbone")
    parser.add_argument("--clusters", type=int, default=4000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=1000, help="single queries timed for the IVF latency")
    parser.add_argument("--exact-single", type=int, default=50, help="single queries timed on the exact index")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--stream", action="store_true", help="the streaming mode: bench/index_stream.py's options")
    index_stream.add_arguments(parser)
    args = parser.parse_args()
    if args.stream:
        args.n = args.n or (100_000 if args.quick else 1_000_000)
        index_stream.run(args)
        return
    n = args.n or (100_000 if args.quick else 1_000_000)
    k = 10
    console = Console()
    data = ClusteredVectors(dim=args.dim, n_clusters=args.clusters, seed=0)
    queries = data.sample(args.queries, stream=1)
    ids = np.arange(n, dtype=np.int64) * 7919 + 13  # arbitrary int64 ids, as the blake2b ones are

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, chunk in enumerate(data.chunks(n, CHUNK)):
            yield ids[i * CHUNK : i * CHUNK + len(chunk)], chunk

    console.print(f"{n:,} clustered unit vectors, {args.dim}-d, {args.clusters} clusters; {args.queries} fresh queries")
    # exact
    before = rss_gb()
    exact_index = VectorIndex.empty(args.dim, "bench")
    generate_s = add_s = 0.0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("exact: adding", total=n)
        started = time.perf_counter()
        for chunk_ids, chunk in chunks():
            added = time.perf_counter()
            generate_s += added - started
            exact_index.upsert(chunk_ids, chunk)
            started = time.perf_counter()
            add_s += started - added
            progress.advance(task, len(chunk_ids))
    exact_memory = rss_gb() - before
    console.print(f"generated in {generate_s:.0f} s; ground truth for {len(queries)} queries ...")
    _, exact = exact_index.search(queries, k)
    results = [measure("exact (IDMap2 Flat)", exact_index, add_s, exact_memory, queries, exact, args.exact_single, k)]
    sample_rows = np.random.default_rng(1).permutation(n)

    # IVF, the writer's way: train on a sample, add everything, tune nprobe
    policy = IndexPolicy(target_recall=args.target_recall)
    sample_size = policy.nlist_for(n) * policy.vectors_per_list
    chosen = np.sort(sample_rows[:sample_size])
    sample = np.stack([exact_index.index.reconstruct(int(ids[i])) for i in chosen])
    before = rss_gb()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("IVF: training, adding, tuning", total=n)
        started = time.perf_counter()
        ivf, tuning = build_ivf(args.dim, "bench", sample, ids[chosen], chunks, n, policy,
                                progress=lambda m: progress.advance(task, m))  # fmt: skip
        build_s = time.perf_counter() - started - generate_s  # the chunks are generated again inside
    ivf_memory = rss_gb() - before
    name = f"IVF{ivf.nlist},Flat nprobe={ivf.nprobe}"
    results.append(measure(name, ivf, build_s, ivf_memory, queries, exact, args.single, k))

    curve = Table("nprobe", "recall@10 (in-collection, tuning)", "recall@10 (fresh queries)", "p99 ms")
    for nprobe, tuned_recall in tuning.curve.items():
        ivf.nprobe = nprobe
        _, found = ivf.search(queries, k)
        p99 = float(np.percentile(latencies_ms(ivf, queries[:200], k), 99))
        fresh = recall_at_k(found, exact, np.full(len(queries), -2), k)
        curve.add_row(str(nprobe), f"{tuned_recall:.3f}", f"{fresh:.3f}", f"{p99:.2f}")
    ivf.nprobe = tuning.nprobe
    console.print(curve)

    table = Table("index", "add/s (incl. training)", "p50 ms", "p99 ms", "QPS (batches of 100)", "recall@10", "RSS GB")
    for m in results:
        table.add_row(m.name, f"{m.add_per_s:,.0f}", f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}", f"{m.batch_qps:,.0f}",
                      f"{m.recall:.3f}", f"{m.memory_gb:.2f}")  # fmt: skip
    console.print(table)
    console.print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, n = {n:,}")
    chosen_index = results[1] if policy.wants_rebuild(exact_index) else results[0]
    console.print(f"chosen at this size by IndexPolicy(ivf_from={policy.ivf_from:,}): {chosen_index.name}")
    print(f"recall@10 = {chosen_index.recall:.3f}")
    print(f"p99 = {chosen_index.p99_ms:.2f} ms")


if __name__ == "__main__":
    main()
