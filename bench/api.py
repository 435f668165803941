"""``GET /similar`` by post id through the real API process at a million posts, under a load generator on loopback.

    .venv/bin/python bench/api.py            # 1,000,000 posts (about 12 GB of RAM, 10 minutes on 2 cores)
    .venv/bin/python bench/api.py --quick    # 100,000 posts

Builds a data directory the way the system would hold it: a metadata store with one row per post (hashtags, owner),
an index snapshot of clustered synthetic embeddings under the posts' own vector ids, built by ``build_ivf`` (IVF
from ``IndexPolicy.ivf_from`` on, exact below). Then starts ``deeptarget serve`` on it as a separate process and
sends ``GET /similar?post_id=<random post>&k=10`` from an aiohttp client at several concurrency levels: latency
p50/p99 and requests/s. The last line is the p99 at concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
from rich.console import Console
from rich.table import Table

from deeptarget.core.records import Owner, Post, vector_id
from deeptarget.core.settings import Settings
from deeptarget.index.builder import IndexPolicy, build_ivf
from deeptarget.index.synthetic import ClusteredVectors
from deeptarget.index.vectors import SnapshotStore, VectorIndex
from deeptarget.runtime.embedded_redis import free_port
from deeptarget.store.metadata import MetadataStore

CHUNK = 65_536


def build_data(settings: Settings, n: int, dim: int, console: Console) -> list[str]:
    store = MetadataStore(settings.metadata_database)
    post_ids = [f"bench{i}" for i in range(n)]
    started = time.perf_counter()
    for start in range(0, n, 50_000):
        store.upsert_posts(
            Post(id=pid, hashtags=[f"tag{i % 997}", f"tag{(i * 7) % 997}"], owner=Owner(id=f"user{i % 50_000}"))
            for i, pid in enumerate(post_ids[start : start + 50_000], start)
        )
    console.print(f"metadata store: {n:,} posts in {time.perf_counter() - started:.0f} s")

    data = ClusteredVectors(dim=dim, seed=0)
    ids = np.array([vector_id(p) for p in post_ids], dtype=np.int64)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, chunk in enumerate(data.chunks(n, CHUNK)):
            yield ids[i * CHUNK : i * CHUNK + len(chunk)], chunk

    policy = IndexPolicy()
    started = time.perf_counter()
    if n >= policy.ivf_from:
        sample = data.sample(policy.nlist_for(n) * policy.vectors_per_list, stream=2)
        index, tuning = build_ivf(dim, "bench", sample, np.full(len(sample), -2, np.int64), chunks, n, policy)
        console.print(f"IVF{index.nlist}, nprobe {tuning.nprobe} (recall@10 {tuning.recall:.3f})")
    else:
        index = VectorIndex.empty(dim, "bench")
        for chunk_ids, chunk in chunks():
            index.index.add_with_ids(chunk, chunk_ids)
    SnapshotStore(settings.index_dir).save(index)
    console.print(
        f"index {index.kind} with {index.ntotal:,} vectors built and saved in {time.perf_counter() - started:.0f} s"
    )
    return post_ids


async def load(url: str, post_ids: list[str], requests: int, concurrency: int, seed: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(seed)
    chosen = [post_ids[i] for i in rng.integers(0, len(post_ids), requests)]
    latencies: list[float] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for post_id in chosen:
        queue.put_nowait(post_id)

    async def client(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            post_id = queue.get_nowait()
            started = time.perf_counter()
            async with http.get(f"{url}/similar", params={"post_id": post_id, "k": "10"}) as response:
                body = await response.json()
                assert response.status == 200 and body["results"][0]["post_id"] == post_id, body
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return np.array(latencies) * 1000, requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", default="1,4,16")
    args = parser.parse_args()
    n = args.n or (100_000 if args.quick else 1_000_000)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        settings = Settings(data_dir=Path(tmp), redis_url=f"redis://127.0.0.1:{free_port()}/0", api_port=port)
        post_ids = build_data(settings, n, args.dim, console)
        gc.collect()
        env = {**os.environ, **settings.to_env()}
        log = Path(tmp) / "api.log"
        with log.open("wb") as log_handle:
            server = subprocess.Popen([sys.executable, "-m", "deeptarget", "serve"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=log_handle)  # fmt: skip
            try:
                run_load(f"http://127.0.0.1:{port}", server, log, post_ids, args, n, console)
            finally:
                server.terminate()
                server.wait(30)


def run_load(url: str, server: subprocess.Popen[bytes], log: Path, post_ids: list[str], args: argparse.Namespace,
             n: int, console: Console) -> None:  # fmt: skip
    wait_until_up(url, server, log)
    asyncio.run(load(url, post_ids, 200, 2, seed=99))  # warm-up
    table = Table("concurrency", "requests", "p50 ms", "p99 ms", "requests/s")
    p99_at_1 = float("nan")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        ms, rate = asyncio.run(load(url, post_ids, args.requests, concurrency, seed=concurrency))
        p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
        p99_at_1 = p99 if concurrency == 1 else p99_at_1
        table.add_row(str(concurrency), str(len(ms)), f"{p50:.2f}", f"{p99:.2f}", f"{rate:.0f}")
    console.print(table)
    console.print(f"GET /similar?post_id=...&k=10 against `deeptarget serve` on loopback, n = {n:,}")
    print(f"p99 = {p99_at_1:.2f} ms")


def wait_until_up(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/openapi.json") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    deadline = time.monotonic() + 300
    while not asyncio.run(ready()):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the API did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
