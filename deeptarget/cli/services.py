"""The long-running processes: ``demo``, ``redis``, ``sandbox``, ``scrape``, ``worker``, ``beat`` and ``serve``.

Each command imports the service it runs when it runs: the parser loads this module for every command, and the
scraper, the sandbox, the API and the Celery worker each pull in aiohttp, numpy, torch or FAISS.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import threading
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live

from deeptarget import jobs
from deeptarget.cli.arguments import number, whole
from deeptarget.cli.context import async_redis_client, connect, connected_settings, load_settings, senders
from deeptarget.core.errors import DeepTargetError
from deeptarget.core.settings import Settings
from deeptarget.core.terminal import plain
from deeptarget.store.blobs import BlobStore
from deeptarget.workers.metrics import serve_worker_metrics

if TYPE_CHECKING:
    from deeptarget.scraper import Crawler

MIN_API_KEY_BYTES = 16
_WORKER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a Celery hostname and a metrics folder


def _worker_name(text: str) -> str:
    if not _WORKER_NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"worker name {plain(text)!r}: 1 to 64 letters, digits, _ . and -, starting with a letter or digit"
        )
    return text


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="run the whole flow on the embedded default with the sandbox source")
    demo.add_argument("--once", action="store_true", help="exit after the crawl and the example queries")
    demo.add_argument("--posts", type=whole(1, 1_000_000), help="sandbox size in posts (default from settings: 300)")
    demo.set_defaults(run=cmd_demo)

    sub.add_parser("redis", help="run the embedded Redis for the data dir").set_defaults(run=cmd_redis)

    sandbox = sub.add_parser("sandbox", help="serve the sandbox social network")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=whole(0, 65535), default=8700)
    sandbox.set_defaults(run=cmd_sandbox)

    scrape = sub.add_parser("scrape", help="crawl the configured hashtags and accounts")
    scrape.add_argument("--forever", action="store_true", help="crawl again every --interval seconds")
    scrape.add_argument("--interval", type=number(0, above=True), default=600.0)
    scrape.set_defaults(run=cmd_scrape)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default=",".join(q for q in jobs.all_queues if q != jobs.index_queue))
    worker.add_argument(
        "--concurrency", type=whole(1, 1024), help="pool processes (default: settings.worker_concurrency)"
    )
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    worker.add_argument("--name", type=_worker_name, default="worker", help="the worker's name (and metrics folder)")
    worker.set_defaults(run=cmd_worker)

    sub.add_parser("beat", help="run Celery beat (periodic hashtag-model refits)").set_defaults(run=cmd_beat)
    sub.add_parser("serve", help="run the query API").set_defaults(run=cmd_serve)


def cmd_demo(args: argparse.Namespace) -> int:
    from deeptarget.cli.demo import run_demo  # every part of the system, torch and FAISS included

    settings = load_settings(args)
    if args.posts:
        settings = settings.model_copy(update={"sandbox_posts": args.posts})
    return asyncio.run(run_demo(settings, once=args.once))


def cmd_redis(args: argparse.Namespace) -> int:
    from deeptarget.runtime.processes import start_embedded_redis  # imports redis

    # Handlers, set before the server starts: a stop at any moment stops it too (SIGTERM's default action once killed
    # this process and left its redis-server running: issue 12, L14). sigwait, used before, hung once in CI: a SIGINT
    # that came after the ready line but before the signals were blocked went to Python's own handler, and sigwait
    # then waited for another.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    settings, server = start_embedded_redis(load_settings(args))
    try:
        print(
            f"embedded Redis for {settings.data_dir} at {server.shown_url} (AOF in {settings.redis_dir}, password in "
            f"{settings.redis_dir / 'password'}); Ctrl-C stops it",
            flush=True,
        )
        while not stop.wait(0.5):  # short waits: the handler runs between them at the latest
            pass
    finally:
        server.stop()
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from deeptarget.runtime.processes import wait_for_signal  # imports redis
    from deeptarget.sandbox import SandboxNetwork, sandbox_server  # aiohttp, numpy, PIL

    settings = load_settings(args)
    network = SandboxNetwork(
        settings.sandbox_seed, settings.sandbox_posts, settings.sandbox_users, settings.sandbox_hashtags
    )

    async def serve() -> None:
        async with sandbox_server(network, args.host, args.port) as server:
            print(
                f"sandbox at {server.url}: {len(network.media)} posts by {len(network.accounts)} accounts, "
                f"hashtags {', '.join(network.hashtags)}",
                flush=True,
            )
            await wait_for_signal()

    asyncio.run(serve())
    return 0


def cmd_scrape(args: argparse.Namespace) -> int:
    settings = connected_settings(args)
    if settings.scraper_metrics_port:
        # prometheus_client is imported only where metrics are served: the worker's must see its multiprocess
        # folder before the first import (workers/metrics.py)
        from prometheus_client import start_http_server

        start_http_server(settings.scraper_metrics_port, addr=settings.api_host)
    return asyncio.run(_scrape(settings, forever=args.forever, interval_s=args.interval))


async def _scrape(settings: Settings, *, forever: bool, interval_s: float) -> int:
    from deeptarget.scraper import CelerySink, Crawler  # aiohttp, numpy, PIL

    # Bounded waits: a Redis that went away (even silently, behind a partition) is an error the crawler waits out,
    # never a call that hangs. The socket timeout stays above the ingest stream's blocking read.
    client = async_redis_client(settings, socket_connect_timeout=5, socket_timeout=settings.ingest_block_s + 10)
    crawler = Crawler(settings, client, CelerySink(senders(settings)), BlobStore.for_settings(settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, crawler.stop)
    progress = asyncio.create_task(_show_progress(crawler))
    try:
        await crawler.serve(forever=forever, interval_s=interval_s)
        return 0
    finally:
        progress.cancel()
        await client.aclose()


async def _show_progress(crawler: Crawler, every_s: float = 1.0) -> None:
    """A live status line on a terminal (and nothing when output goes to a file: the logs say it there)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return
    started = asyncio.get_running_loop().time()
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        while True:
            counts = crawler.stats.local
            elapsed = max(asyncio.get_running_loop().time() - started, 1e-9)
            pages = sum(v for k, v in counts.items() if k.startswith("page:"))
            rejected = sum(v for k, v in counts.items() if k.startswith("rejected:"))
            down = [d.name for d in (crawler.redis_dep, crawler.blob_dep) if not d.up]
            live.update(
                f"pages {pages}  enqueued {counts['enqueued']} ({counts['enqueued'] / elapsed:.1f}/s)  "
                f"seen before {counts['duplicate']}  rejected {rejected}  failed downloads {counts['download_failed']}"
                f"  {counts['bytes'] / 1e6:.1f} MB" + (f"  waiting for {', '.join(down)}" if down else "")
            )
            await asyncio.sleep(every_s)


def cmd_worker(args: argparse.Namespace) -> int:
    settings = connected_settings(args)
    serve_worker_metrics(settings, args.name)  # before the tasks import prometheus_client

    from deeptarget.workers.app import create_celery  # the task bodies, after the metrics folder is set

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = set(queues) - set(jobs.all_queues)
    if unknown:
        raise DeepTargetError(f"unknown queue(s) {sorted(unknown)}: choose from {jobs.all_queues}")
    concurrency = args.concurrency or settings.worker_concurrency
    if jobs.index_queue in queues and concurrency != 1:
        raise DeepTargetError("the index queue needs exactly one consumer: use --concurrency 1")
    app = create_celery(settings, warm_infer=jobs.infer_queue in queues)
    argv = [
        "worker", "--queues", ",".join(queues), "--concurrency", str(concurrency), "--pool", args.pool,
        "--hostname", f"{args.name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    app.worker_main(argv)
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    from deeptarget.workers.app import create_celery  # the Celery worker app and its task bodies

    settings = connected_settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    create_celery(settings).Beat(schedule=str(settings.data_dir / "celerybeat-schedule"), loglevel="INFO").run()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deeptarget.api.app import create_app, server_limits  # the query service: torch, FAISS
    from deeptarget.runtime.app_server import AppServer  # aiohttp
    from deeptarget.runtime.processes import wait_for_signal  # imports redis

    settings = load_settings(args)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    if key is not None and len(key.encode()) < MIN_API_KEY_BYTES:
        raise DeepTargetError(
            f"DEEPTARGET_API_KEY is shorter than {MIN_API_KEY_BYTES} bytes: use a random secret "
            "(python -c 'import secrets; print(secrets.token_urlsafe(24))'), or none to keep write endpoints closed"
        )
    if key is not None and key.strip() and (key != key.strip() or not key.isprintable()):
        # HTTP strips a header value's surrounding whitespace and has no place for control characters: such a key
        # could never be sent, so every write would fail with 401 for no visible reason.
        raise DeepTargetError("DEEPTARGET_API_KEY has surrounding whitespace or control characters, which no HTTP "
                              "client can send: use a random secret (secrets.token_urlsafe)")  # fmt: skip
    settings = connect(settings)

    async def serve() -> None:
        limits = server_limits(settings)  # slow or greedy clients cannot hold every connection
        async with AppServer(create_app(settings), settings.api_host, settings.api_port, limits) as server:
            print(f"deeptarget API at {server.url}", flush=True)
            await wait_for_signal()

    asyncio.run(serve())
    return 0
