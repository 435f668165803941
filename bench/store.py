"""The metadata store on SQLite against PostgreSQL, doing what workers and the API do most.

    .venv/bin/python bench/store.py                      # 20,000 posts; a local PostgreSQL server is started
    .venv/bin/python bench/store.py --posts 5000 --database-url postgresql://user:pw@host/db

Without ``--database-url`` a PostgreSQL 16 server is started from the pgserver wheel's binaries (tests/postgres.py)
with fsync on and synchronous_commit off, which is what SQLite's WAL mode with synchronous=NORMAL promises too (a
crash may lose the last commits, never corrupt). Posts carry 1280-d float32 embeddings, as mobilenet_v2 makes them.
Each line: the operation, its rate or latency on each database, and PostgreSQL / SQLite (above 1 = PostgreSQL
slower for times, faster for rates: the column says which).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.postgres, when run as a script

from deeptarget.core.records import InferResult, Owner, Post, PostStatus, Prediction, Profile
from deeptarget.store.metadata import MetadataStore
from tests.postgres import LocalPostgres

BATCH = 16  # posts per infer task
DIM = 1280
USERS = 500


def results(start: int, n: int) -> list[InferResult]:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        owner = Owner(id=f"u{i % USERS}", username=f"user{i % USERS}", followers_count=1000 + i % USERS)
        post = Post(id=f"p{i}", hashtags=[f"tag{i % 50}", f"tag{i % 7}"], like_count=i % 300, owner=owner)
        classes = {"food": {"sushi": float(i % 10) / 10, "pizza": 1 - float(i % 10) / 10}}
        prediction = Prediction(post_id=post.id, status=PostStatus.EMBEDDED, model_id="bench", classes=classes)
        vector = rng.standard_normal(DIM).astype(np.float32)
        out.append(InferResult(post, f"{i:064x}", prediction, vector / np.linalg.norm(vector)))
    return out


def write_range(location: str, start: int, n: int) -> None:
    """One writer process: ``n`` posts in infer-sized batches."""
    store = MetadataStore(location)
    for first in range(start, start + n, BATCH):
        store.record_results(results(first, min(BATCH, start + n - first)))
    store.close()


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def p50_ms(action: Callable[[int], object], repeats: int) -> float:
    return float(np.median([timed(functools.partial(action, i)) for i in range(repeats)])) * 1000


def measure(location: str, posts: int, writers: int) -> dict[str, float]:
    store = MetadataStore(location)
    out = {"write posts/s (1 process)": posts / timed(lambda: write_range(location, 0, posts))}
    extra = posts // 4
    share = extra // writers
    with ProcessPoolExecutor(writers) as pool:
        seconds = timed(lambda: list(pool.map(write_range, [location] * writers, range(posts, posts + extra, share),
                                              [share] * writers)))  # fmt: skip
    out[f"write posts/s ({writers} processes)"] = share * writers / seconds
    ids = [f"p{i}" for i in range(posts)]

    def mark_all_indexed() -> None:
        for i in range(0, posts, 256):
            store.mark_indexed(ids[i : i + 256], i)

    out["mark indexed posts/s"] = posts / timed(mark_all_indexed)
    profiles = [Profile(user_id=f"u{u}", post_count=posts // USERS, classes={"food": {"sushi": (u % 10) / 10}})
                for u in range(USERS)]  # fmt: skip

    def save_all_profiles() -> None:
        for profile in profiles:
            store.save_profile(profile)

    out["save profile ms"] = timed(save_all_profiles) / USERS * 1000
    vector_ids = [store.post(f"p{i}").vector_id for i in range(0, posts, max(1, posts // 1000))]  # type: ignore[union-attr]
    out["posts by 10 vector ids ms (p50)"] = p50_ms(lambda i: store.posts_by_vector_ids(vector_ids[i : i + 10]), 200)
    out["audience top 100 ms (p50)"] = p50_ms(lambda i: store.audience("class:food:sushi", limit=100), 200)
    started = time.perf_counter()
    scanned = sum(len(rows.post_ids) for rows in store.embeddings_of_model("bench"))
    out["embeddings scan rows/s"] = scanned / (time.perf_counter() - started)
    out["hashtag counts ms"] = timed(store.hashtag_counts) * 1000
    store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=20_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--database-url", help="an existing, empty PostgreSQL database (else one is started)")
    args = parser.parse_args()
    console = Console()
    server = None
    if args.database_url is None:
        server = LocalPostgres({"fsync": "on", "synchronous_commit": "off", "full_page_writes": "on"}).start()
    try:
        with tempfile.TemporaryDirectory() as folder:
            console.print(f"SQLite, {args.posts} posts ...")
            sqlite = measure(str(Path(folder) / "bench.sqlite3"), args.posts, args.writers)
            console.print(f"PostgreSQL, {args.posts} posts ...")
            postgres = measure(args.database_url or server.create_database(), args.posts, args.writers)  # type: ignore[union-attr]
    finally:
        if server is not None:
            server.stop()
    table = Table(title=f"metadata store, {args.posts} posts with {DIM}-d embeddings")
    for column in ("operation", "SQLite", "PostgreSQL", "PostgreSQL / SQLite"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for name, value in sqlite.items():
        table.add_row(name, f"{value:,.1f}", f"{postgres[name]:,.1f}", f"{postgres[name] / value:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
