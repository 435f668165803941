"""``deeptarget demo``: the whole flow on one machine, on real parts.

Starts the embedded Redis (AOF in the data dir), the sandbox source, a Celery worker process for infer/profiles/train
and one for the index, and the query API; crawls every sandbox hashtag and account with a live progress display; then
asks the API for similar images, hashtag suggestions for a new picture and a user's profile, and keeps the API up
until Ctrl-C (or exits with ``--once``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import subprocess
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deeptarget import jobs
from deeptarget.api.app import create_app, server_limits
from deeptarget.cli.context import async_redis_client, metadata_store, senders
from deeptarget.core import keys
from deeptarget.core.errors import DeepTargetError
from deeptarget.core.records import PostStatus
from deeptarget.core.replies import deferred
from deeptarget.core.settings import Settings
from deeptarget.core.terminal import console as inert_console
from deeptarget.core.terminal import shown
from deeptarget.index.vectors import SnapshotStore
from deeptarget.reports.live import write_system_report
from deeptarget.runtime.app_server import AppServer
from deeptarget.runtime.processes import spawn_worker, start_embedded_redis, stop_processes, wait_for_signal
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.sandbox import images as sandbox_images
from deeptarget.sandbox.network import Media
from deeptarget.scraper import CelerySink, Crawler
from deeptarget.store.blobs import BlobStore
from deeptarget.store.metadata import MetadataStore
from deeptarget.store.versioned import VersionedDir

LOG = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 1800.0


def _log_to_file(path: Path) -> None:
    """Library logs go to a file so the console shows progress and results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


async def run_demo(settings: Settings, *, once: bool) -> int:
    console = inert_console()
    started = time.monotonic()
    logs = settings.data_dir / "logs"
    _log_to_file(logs / "demo.log")
    network = SandboxNetwork(
        settings.sandbox_seed, settings.sandbox_posts, settings.sandbox_users, settings.sandbox_hashtags
    )
    workers: list[subprocess.Popen[bytes]] = []
    redis_server = None
    async with AsyncExitStack() as stack:
        try:
            if settings.redis_url is None:
                settings, redis_server = start_embedded_redis(settings)
                console.print(
                    f"[bold]Redis[/] embedded at {shown(redis_server.shown_url)}, AOF in {shown(settings.redis_dir)}"
                )
            sandbox = await stack.enter_async_context(sandbox_server(network))
            settings = settings.model_copy(
                update={
                    "source_url": sandbox.url,
                    "hashtags": network.hashtags,
                    "accounts": [a.username for a in network.accounts],
                    "access_tokens": settings.access_tokens or [SecretStr("sandbox-token")],
                }
            )
            settings, api_key = _with_api_key(settings)
            offered = network.offered(settings.hashtags, settings.accounts, settings.hashtag_edge)
            console.print(
                f"[bold]Sandbox[/] at {sandbox.url}: {len(offered)} posts by {len(network.accounts)} accounts "
                f"under #{shown(', #'.join(network.hashtags))}"
            )
            workers.append(
                spawn_worker(
                    settings,
                    [jobs.infer_queue, jobs.profiles_queue, jobs.train_queue],
                    name="infer",
                    log_file=logs / "worker-infer.log",
                )
            )
            workers.append(
                spawn_worker(
                    settings, [jobs.index_queue], name="index", pool="solo", log_file=logs / "worker-index.log"
                )
            )
            console.print(f"[bold]Workers[/] pids {[w.pid for w in workers]} (logs in {shown(logs)})")
            api = await stack.enter_async_context(_api_server(settings))
            console.print(f"[bold]API[/] at {api.url}   [bold]web UI[/] at {api.url}/")

            redis_client = async_redis_client(settings)
            stack.push_async_callback(redis_client.aclose)
            store = metadata_store(settings)
            sink = CelerySink(senders(settings))
            crawler = Crawler(settings, redis_client, sink, BlobStore.for_settings(settings))
            await stack.enter_async_context(crawler)
            # Pushed posts (POST /ingest) are taken as they arrive for as long as the API is up, not once a round.
            follower = crawler.follow_in_background()
            stack.push_async_callback(_stop_following, crawler, follower)
            await _crawl_with_progress(console, crawler, store, redis_client, workers, len(offered))
            await _publish_models(console, settings, store, workers)
            await _print_summary(console, store, time.monotonic() - started)
            await _print_examples(console, api.url, network, store)
            report = write_system_report(store, settings.reports_dir / "demo")
            console.print(f"The system at a glance (posts, hashtags, faces, engagement): [bold]{shown(report)}[/]")
            if once:
                return 0
            console.print(
                f"\nThe API stays up at [bold]{api.url}[/], its web UI at [bold]{api.url}/[/] (search by image, "
                "audiences, accounts, the system); try\n"
                f"  curl '{api.url}/similar?post_id={shown(_example_post(network, store).id)}&k=5'\n"
                f"  curl --data-binary @photo.jpg '{api.url}/hashtags'\n"
                f"  curl '{api.url}/users/{shown(network.accounts[0].username)}'\n"
                f"  curl -H \"X-API-Key: {shown(api_key)}\" --data-binary @posts.jsonl '{api.url}/ingest'\n"
                "    (JSON lines with id, media_url, caption: queryable in seconds)\n"
                "Ctrl-C stops everything."
            )
            await wait_for_signal()
            return 0
        finally:
            stop_processes(workers)
            if redis_server is not None:
                redis_server.stop()


def _with_api_key(settings: Settings) -> tuple[Settings, str]:
    """The demo's write key: the configured one, or one made for this data dir (kept in a 0600 file, never printed),
    so that POST /ingest works out of the box and is still not open to anyone who can reach the port. Returns the
    settings and a shell expression for the key."""
    if settings.api_key is not None and settings.api_key.get_secret_value().strip():
        return settings, "$DEEPTARGET_API_KEY"
    key_file = settings.data_dir / "api-key"
    if not key_file.is_file():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(24))
    key = key_file.read_text().strip()
    return settings.model_copy(update={"api_key": SecretStr(key)}), f"$(cat {key_file})"


async def _stop_following(crawler: Crawler, follower: asyncio.Task[None]) -> None:
    crawler.stop()
    await follower


def _api_server(settings: Settings) -> AppServer:
    port = settings.api_port
    probe = socket.socket()
    try:
        probe.bind((settings.api_host, port))
    except OSError:
        LOG.warning("port %d is taken: the API uses a free port instead", port)
        port = 0
    finally:
        probe.close()
    return AppServer(create_app(settings), settings.api_host, port, server_limits(settings))  # as `deeptarget serve`


def _check_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is not None:
            raise DeepTargetError(
                f"worker pid {worker.pid} exited with {worker.returncode}: see data/logs/worker-*.log"
            )


async def _crawl_with_progress(
    console: Console,
    crawler: Crawler,
    store: MetadataStore,
    redis_client: aioredis.Redis,
    workers: list[subprocess.Popen[bytes]],
    total: int,
) -> None:
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        crawled = progress.add_task("crawled (enqueued)", total=total)
        processed = progress.add_task("processed", total=total)
        indexed = progress.add_task("  indexed", total=total)
        rejected = progress.add_task("  rejected", total=total)
        crawl = asyncio.create_task(crawler.run())
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            await asyncio.sleep(0.5)
            _check_workers(workers)
            seen = await deferred(redis_client.scard(keys.seen_posts_key))
            counts = store.status_counts()
            done = counts.get(PostStatus.INDEXED, 0) + counts.get(PostStatus.REJECTED, 0)
            progress.update(crawled, completed=seen, total=max(total, seen))
            progress.update(processed, completed=done, total=max(total, seen))
            progress.update(indexed, completed=counts.get(PostStatus.INDEXED, 0), total=max(total, seen))
            progress.update(rejected, completed=counts.get(PostStatus.REJECTED, 0), total=max(total, seen))
            settled = not counts.get(PostStatus.QUEUED) and not counts.get(PostStatus.EMBEDDED) and done >= seen
            if crawl.done() and settled:
                break
            if time.monotonic() > deadline:
                raise DeepTargetError(f"the pipeline did not settle in {SETTLE_TIMEOUT_S:.0f} s")
        stats = await crawl  # this run's counters; re-raises a crawl failure
    console.print(
        f"this crawl: {stats.get('page:hashtag', 0)} hashtag pages, {stats.get('page:account', 0)} account pages, "
        f"{stats.get('enqueued', 0)} new posts enqueued, {stats.get('duplicate', 0)} already seen, "
        f"{stats.get('bytes', 0) / 1e6:.1f} MB of images"
    )


async def _publish_models(
    console: Console, settings: Settings, store: MetadataStore, workers: list[subprocess.Popen[bytes]]
) -> None:
    """Snapshot the index and fit the hashtag model now instead of waiting for their schedules."""
    send = senders(settings)
    snapshots = SnapshotStore(settings.index_dir).versions
    models = VersionedDir(settings.hashtag_model_dir, ".npz")
    before = (snapshots.current() or 0, models.current() or 0)
    send.snapshot()
    send.train_hashtags()
    with console.status("snapshotting the index, fitting the hashtag model, rolling up profiles"):
        deadline = time.monotonic() + 600
        while (
            (snapshots.current() or 0) <= before[0] or (models.current() or 0) <= before[1] or store.profile_backlog()
        ):
            _check_workers(workers)
            if time.monotonic() > deadline:
                raise DeepTargetError("index snapshot / hashtag model / profiles not ready after 600 s")
            await asyncio.sleep(0.3)
    console.print(f"index snapshot v{snapshots.current()}, hashtag model v{models.current()}, profiles up to date")


async def _print_summary(console: Console, store: MetadataStore, elapsed_s: float) -> None:
    counts = store.status_counts()
    table = Table(title=f"Pipeline after {elapsed_s:.0f} s", show_header=True)
    table.add_column("posts")
    table.add_column("count", justify="right")
    table.add_row("indexed", str(counts.get(PostStatus.INDEXED, 0)))
    for reason, n in store.rejection_reasons().items():
        table.add_row(f"rejected: {shown(reason)}", str(n))
    table.add_row("users profiled", str(len(store.profiles())))
    console.print(table)


def _example_post(network: SandboxNetwork, store: MetadataStore) -> Media:
    """An indexed #astronaut picture (the sandbox also holds media the API never shows: removed ones, videos)."""
    for media in network.media:
        stored = store.post(media.id) if media.visible and media.kind == "IMAGE" else None
        if stored is not None and stored.status == PostStatus.INDEXED and media.topic.hashtag == "astronaut":
            return media
    raise DeepTargetError("no #astronaut post was indexed: see data/logs/worker-*.log")


async def _print_examples(console: Console, api_url: str, network: SandboxNetwork, store: MetadataStore) -> None:
    async with aiohttp.ClientSession() as http:
        # 1. Similar images for a post.
        post = _example_post(network, store)
        similar = await _get(http, f"{api_url}/similar", params={"post_id": post.id, "k": "6"})
        title = f"GET /similar?post_id={post.id}  (a #{post.topic.hashtag} post by @{post.owner.username})"
        console.print(similar_table(title, similar["results"]))

        # 2. Hashtags for pictures the system has never seen.
        for topic in (t for t in network.topics if t.hashtag in ("coffee", "sunset", "cats")):
            picture = sandbox_images.render(10**9 + 17, topic.sources, face=topic.face)
            body = sandbox_images.jpeg_bytes(picture, 10**9 + 17)
            suggested = await _post(http, f"{api_url}/hashtags?n=6", body)
            tags = ", ".join(f"#{h['hashtag']} ({h['score']:.2f})" for h in suggested["hashtags"])
            console.print(f"POST /hashtags with a new {shown(topic.hashtag)} picture -> {shown(tags)}")

        # 3. One user's interest profile.
        most_active = max(network.accounts, key=lambda a: sum(m.owner is a and m.visible for m in network.media))
        profile = await _get(http, f"{api_url}/users/{most_active.username}")
        top = ", ".join(f"#{t} {w:.0%}" for t, w in list(profile["hashtags"].items())[:6])
        engagement = profile["median_engagement"]
        console.print(
            f"GET /users/{shown(most_active.username)} -> {profile['post_count']} posts, "
            f"{profile['followers_count']} followers, faces in {profile['face_share']:.0%} of posts, "
            f"median engagement {engagement if engagement is None else f'{engagement:.2%}'}; interests: {shown(top)}"
        )


def similar_table(title: str, results: list[dict[str, Any]]) -> Table:
    """``GET /similar`` results as a table. Every cell is data (post ids, hashtags, owners): shown, never parsed
    as markup or obeyed as control characters (issue 12, L9: a hashtag ``[/]`` stopped the printout)."""
    table = Table(title=shown(title))
    for column in ("post", "score", "hashtags", "owner", "faces"):
        table.add_column(column)
    for row in results:
        table.add_row(
            shown(row["post_id"]),
            f"{row['score']:.3f}",
            shown(" ".join(f"#{t}" for t in row["hashtags"])),
            shown(row["owner"]),
            shown(row["faces"]),
        )
    return table


async def _get(http: aiohttp.ClientSession, url: str, params: dict[str, str] | None = None) -> Any:
    async with http.get(url, params=params) as response:
        payload = await response.json()
        if response.status != 200:
            raise DeepTargetError(f"GET {url}: HTTP {response.status}: {payload}")
        return payload


async def _post(http: aiohttp.ClientSession, url: str, body: bytes) -> Any:
    async with http.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as response:
        payload = await response.json()
        if response.status != 200:
            raise DeepTargetError(f"POST {url}: HTTP {response.status}: {payload}")
        return payload
