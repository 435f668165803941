"""Image download throughput: deeptarget's scraper engine against img2dataset, same URLs, same local server.

    .venv/bin/python bench/scrape.py --img2dataset /path/to/venv/bin/img2dataset [--images 3000] [--concurrency 32]

(img2dataset has its own heavy dependencies; install it in a separate virtualenv: ``pip install img2dataset``.)

A server in its own process on loopback serves N distinct JPEGs of realistic sizes (50 to 300 KB: the sandbox's
photos enlarged, cropped at random and re-encoded, so nothing is identical). Both clients get the same URL list and
keep the bytes as they are (no resizing, no re-encoding):

- deeptarget: the per-host connection cap set to the same concurrency (one host here); the posts go in through push
  ingestion and ``Crawler.follow_ingest`` takes them the way it takes any
  post: Redis claims and the seen set (dedup on), content-type and magic-byte checks and the byte limit, streaming to a
  temporary file renamed into the content-addressed blob store, ``PostRef`` batches on the Celery queue of a real
  (embedded) Redis;
- img2dataset: ``--output_format files --resize_mode no --disable_all_reencoding True``, one process per core,
  ``--thread_count`` = the same concurrency.

Wall-clock time from start to the last image on disk, each client's start-up included. Prints images/s and MB/s for
both and, last, ``ratio deeptarget/img2dataset = X``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
import skimage.data
from PIL import Image
from rich.console import Console
from rich.table import Table

from deeptarget.core.records import Post
from deeptarget.core.settings import Settings
from deeptarget.jobs import Jobs
from deeptarget.runtime.embedded_redis import EmbeddedRedis, free_port
from deeptarget.scraper import CelerySink, Crawler
from deeptarget.scraper.push import IngestStream
from deeptarget.store.blobs import BlobStore


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """N distinct JPEGs of 50 to 300 KB."""
    rng = np.random.default_rng(seed)
    photos = [
        getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
    ]
    out: list[bytes] = []
    while len(out) < n:
        photo = photos[len(out) % len(photos)]
        side = int(rng.integers(700, 1400))
        image = Image.fromarray(photo).resize((side, int(side * photo.shape[0] / photo.shape[1])))
        left, top = int(rng.integers(0, 60)), int(rng.integers(0, 60))
        image = image.crop((left, top, image.width - int(rng.integers(0, 60)), image.height))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(rng.integers(80, 96)))
        data = buffer.getvalue()
        if 50_000 <= len(data) <= 300_000:
            out.append(data)
    return out


def serve(port: int, n: int, ready: multiprocessing.synchronize.Event) -> None:
    from aiohttp import web

    images = make_jpegs(n)

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=images[int(request.match_info["i"])], content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get(r"/img/{i:\d+}.jpg", image)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


async def run_deeptarget(urls: list[str], tmp: Path, concurrency: int) -> float:
    with EmbeddedRedis(tmp / "redis") as redis_server:
        settings = Settings(data_dir=tmp / "deeptarget", redis_url=redis_server.url, hashtags=[], accounts=[],
                            download_concurrency=concurrency, per_host_concurrency=concurrency, batch_size=32,
                            http_retries=1)  # fmt: skip
        client = aioredis.Redis.from_url(redis_server.url)
        posts = [Post(id=str(i), source="bench", media_url=url) for i, url in enumerate(urls)]
        await IngestStream(client).push(posts)
        crawler = Crawler(settings, client, CelerySink(Jobs.for_settings(settings)), BlobStore(settings.blob_dir))
        started = time.perf_counter()
        counts = await crawler.run()
        elapsed = time.perf_counter() - started
        await client.aclose()
        assert counts.get("enqueued") == len(urls), counts
        return elapsed


def run_img2dataset(binary: str, urls: list[str], tmp: Path, concurrency: int) -> float:
    url_list = tmp / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    command = [
        binary, "--url_list", str(url_list), "--input_format", "txt", "--output_folder", str(tmp / "i2d"),
        "--output_format", "files", "--resize_mode", "no", "--disable_all_reencoding", "True",
        "--processes_count", str(os.cpu_count() or 1), "--thread_count", str(concurrency),
        "--number_sample_per_shard", "1000", "--timeout", "20", "--retries", "1", "--enable_wandb", "False",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    elapsed = time.perf_counter() - started
    stored = len(list((tmp / "i2d").rglob("*.jpg")))
    assert stored == len(urls), f"img2dataset stored {stored} of {len(urls)} images"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--img2dataset", required=True, help="the img2dataset executable (its own virtualenv)")
    args = parser.parse_args()
    console = Console()
    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, args.images, ready), daemon=True)
    server.start()
    try:
        ready.wait(600)
        sizes = [len(b) for b in make_jpegs(args.images)]
        total_mb = sum(sizes) / 1e6
        console.print(f"{args.images} JPEGs, {total_mb:.0f} MB ({min(sizes) // 1000}-{max(sizes) // 1000} KB), "
                      f"concurrency {args.concurrency}, {os.cpu_count()} cores")  # fmt: skip
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.images)]
        with tempfile.TemporaryDirectory() as tmp:
            ours = asyncio.run(run_deeptarget(urls, Path(tmp), args.concurrency))
        with tempfile.TemporaryDirectory() as tmp:
            theirs = run_img2dataset(args.img2dataset, urls, Path(tmp), args.concurrency)
    finally:
        server.terminate()
    table = Table("downloader", "seconds", "images/s", "MB/s")
    for name, seconds in (("deeptarget (dedup, checks, blob store, queue)", ours), ("img2dataset", theirs)):
        table.add_row(name, f"{seconds:.1f}", f"{args.images / seconds:.0f}", f"{total_mb / seconds:.1f}")
    console.print(table)
    print(f"ratio deeptarget/img2dataset = {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
