"""The metadata store on SQLite against PostgreSQL, and the blob store on a local folder against a bucket, doing
what workers, the scraper and the API do most.

    .venv/bin/python bench/store.py                      # 20,000 posts; a local PostgreSQL server is started
    .venv/bin/python bench/store.py --posts 5000 --database-url postgresql://user:pw@host/db
    .venv/bin/python bench/store.py --only-blobs         # images: local folder against moto_server on loopback
    .venv/bin/python bench/store.py --only-blobs --endpoint http://minio:9000 --bucket deeptarget   # a real MinIO

Without ``--database-url`` a PostgreSQL 16 server is started from the pgserver wheel's binaries (tests/postgres.py)
with fsync on and synchronous_commit off, which is what SQLite's WAL mode with synchronous=NORMAL promises too (a
crash may lose the last commits, never corrupt). Posts carry 1280-d float32 embeddings, as mobilenet_v2 makes them.
Each line: the operation, its rate or latency on each database, and PostgreSQL / SQLite (above 1 = PostgreSQL
slower for times, faster for rates: the column says which).

The blob table writes images as the scraper does (a streaming writer, then ``commit``: with a bucket, the upload)
and reads them as an infer worker on another host does (``get`` on a second store with an empty cache: a download,
then the same image again from the cache), from 1 and 8 threads (the scraper commits in threads, a worker decodes in
threads). The images are JPEGs of noise (``--image-kb`` each), as incompressible as photographs. Without
``--endpoint`` the bucket is moto's S3 server (``moto_server``, tests/objectstore.py) on loopback: what it measures
is the client's and the protocol's cost per image, not a disk's (moto is Python, on the same 2 cores: a floor for
a real server). The local folder's reads come from the page cache (just written): its best case.
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.postgres, when run as a script

from PIL import Image

from deeptarget.core.bucket_address import BucketAddress
from deeptarget.core.records import InferResult, Owner, Post, PostStatus, Prediction, Profile
from deeptarget.store.blobs import BlobStore
from deeptarget.store.bucket import Bucket
from deeptarget.store.metadata import MetadataStore
from tests.objectstore import S3Server, set_credentials
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


def noise_jpegs(n: int, kb: int) -> list[bytes]:
    """``n`` distinct JPEGs of about ``kb`` KB each (noise: as incompressible as a photograph)."""
    rng = np.random.default_rng(7)
    side = int((kb * 1024 / 0.91) ** 0.5)  # noise at quality 90 takes about 0.91 bytes a pixel (measured)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_images(store: BlobStore, images: list[bytes], threads: int) -> tuple[list[str], float]:
    """The scraper's path: a streaming writer per image, 64 KB chunks, then ``commit``."""

    def one(data: bytes) -> str:
        writer = store.writer()
        try:
            for i in range(0, len(data), 64 * 1024):
                writer.write(data[i : i + 64 * 1024])
            return writer.commit()
        finally:
            writer.abort()

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        shas = list(pool.map(one, images))
    return shas, time.perf_counter() - started


def read_images(store: BlobStore, shas: list[str], threads: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda sha: len(store.get(sha)), shas))
    assert all(sizes)
    return time.perf_counter() - started


def measure_blobs(
    make: Callable[[Path], BlobStore], images: list[bytes], folder: Path, *, shared_disk: bool
) -> dict[str, float]:
    """Images a second for each path; every pass on fresh folders and images of its own. On a shared disk (the local
    folder) the worker reads the writer's folder; with a bucket it reads into an empty cache of its own."""
    out: dict[str, float] = {}
    half = len(images) // 2
    for threads, batch in ((1, images[:half]), (8, images[half:])):
        writer = make(folder / f"writer-{threads}")
        shas, seconds = write_images(writer, batch, threads)
        out[f"scraper writes ({threads} thread{'s' if threads > 1 else ''})"] = len(batch) / seconds
        reader = writer if shared_disk else make(folder / f"reader-{threads}")
        out[f"worker reads, cold ({threads} thread{'s' if threads > 1 else ''})"] = len(batch) / read_images(
            reader, shas, threads
        )
        out[f"worker reads, cached ({threads} thread{'s' if threads > 1 else ''})"] = len(batch) / read_images(
            reader, shas, threads
        )
    return out


def blob_table(args: argparse.Namespace, console: Console) -> None:
    images = noise_jpegs(args.images, args.image_kb)
    mean_kb = sum(map(len, images)) / len(images) / 1024
    server = None
    if args.endpoint is None:
        set_credentials()
        log = Path(tempfile.mkdtemp(prefix="bench-s3-")) / "moto.log"
        server = S3Server(log).start()
        endpoint, name = server.url, server.create_bucket()
    else:
        endpoint, name = args.endpoint, args.bucket
    try:
        with tempfile.TemporaryDirectory() as folder:
            console.print(f"blobs: {len(images)} images of {mean_kb:.0f} KB, local folder ...")
            local = measure_blobs(BlobStore, images, Path(folder) / "local", shared_disk=True)
            console.print(f"blobs: the same on the bucket at {endpoint} ...")

            # one prefix for every store: each pass writes images of its own, and its reader has an empty cache
            bucket = Bucket(BucketAddress.parse(f"s3://{name}/bench-{time.time_ns()}/"), endpoint_url=endpoint)
            remote = measure_blobs(
                lambda root: BlobStore(root, bucket=bucket), images, Path(folder) / "bucket", shared_disk=False
            )
    finally:
        if server is not None:
            server.stop()
    mb = mean_kb / 1024
    console.print(comparison(f"blob store, {len(images)} JPEGs of {mean_kb:.0f} KB: images/s (MB/s)",
                             ("local folder", "bucket"), local, remote,
                             lambda v: f"{v:,.0f} ({v * mb:,.0f})", ratio_digits=3))  # fmt: skip


def comparison(title: str, sides: tuple[str, str], base: dict[str, float], other: dict[str, float],
               shown: Callable[[float], str], ratio_digits: int = 2) -> Table:  # fmt: skip
    """One row per operation: its value on each side and ``other / base``."""
    table = Table(title=title)
    for column in ("operation", *sides, f"{sides[1]} / {sides[0]}"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for name, value in base.items():
        table.add_row(name, shown(value), shown(other[name]), f"{other[name] / value:.{ratio_digits}f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=20_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--database-url", help="an existing, empty PostgreSQL database (else one is started)")
    parser.add_argument("--images", type=int, default=400, help="images for the blob table (half per thread count)")
    parser.add_argument("--image-kb", type=int, default=120, help="size of each image")
    parser.add_argument("--only-blobs", action="store_true", help="the blob table only")
    parser.add_argument("--endpoint", help="an S3 endpoint (MinIO) instead of moto_server; with --bucket")
    parser.add_argument("--bucket", help="an existing bucket at --endpoint (credentials: boto3's chain)")
    args = parser.parse_args()
    console = Console()
    if args.endpoint and not args.bucket:
        parser.error("--endpoint needs --bucket")
    if not args.only_blobs:
        metadata_table(args, console)
    blob_table(args, console)


def metadata_table(args: argparse.Namespace, console: Console) -> None:
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
    console.print(comparison(f"metadata store, {args.posts} posts with {DIM}-d embeddings", ("SQLite", "PostgreSQL"),
                             sqlite, postgres, lambda v: f"{v:,.1f}"))  # fmt: skip


if __name__ == "__main__":
    main()
