"""``deeptarget`` command line.

    deeptarget demo [--once]              everything on the embedded default, with the sandbox as the source
    deeptarget redis                      run the embedded Redis for the data dir in the foreground
    deeptarget sandbox [--port N]         serve the sandbox social network
    deeptarget scrape [--forever]         crawl the configured hashtags/accounts into the infer queue
    deeptarget worker --queues infer,...  a Celery worker
    deeptarget beat                       periodic tasks (hashtag model refits)
    deeptarget serve                      the query API
    deeptarget query similar|hashtags|user|audience ...
    deeptarget profiles export PATH.jsonl|PATH.parquet
    deeptarget train | index snapshot|rebuild
    deeptarget train-head DATA_DIR --name N [--folds K] [--finetune] [--publish] / publish-head NAME VERSION
    deeptarget reclassify [HEAD...]       apply published heads to the stored embeddings, refresh profiles
    deeptarget reembed                    embed the stored posts again after a change of backbone or weights
    deeptarget train-likability           a likable-or-not head from the stored likes / followers
    deeptarget compare-backbones DATA_DIR accuracy, size and speed of each backbone
    deeptarget report [--out DIR]         HTML report of the live system
    deeptarget store-copy --to URL        copy the metadata store (e.g. SQLite -> PostgreSQL)
    deeptarget enqueue FILE.jsonl         push posts (JSON lines with id and media_url) to the scraper
    deeptarget delete POST_ID...          forget posts and take them out of the index
    deeptarget deadletter list|retry|drop [IDS] [--all]   tasks that failed for good

Settings come from DEEPTARGET_* variables and ``--config FILE`` (TOML); see deeptarget/config.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, get_args

from deeptarget import jobs
from deeptarget.core.errors import ConfigurationError, DeepTargetError
from deeptarget.core.settings import Settings
from deeptarget.core.terminal import json_text, plain, shown
from deeptarget.jobs import Jobs

LOG = logging.getLogger("deeptarget")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    settings = Settings.load(Path(args.config) if args.config else None, **overrides)
    _private(settings.data_dir)
    return settings


def _private(data_dir: Path) -> None:
    """The data dir holds the metadata store, the images, the Redis AOF and secrets: 0700, whatever the umask
    (issue 12, L13: with umask 022 the store and the AOF were world-readable)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if data_dir.stat().st_uid == os.getuid():
            os.chmod(data_dir, 0o700)
    except OSError as err:  # a read-only or foreign dir: the command itself says what it cannot do
        LOG.debug("data dir %s left as it is: %s", data_dir, err)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports which CPU build it picked, at INFO


# -- argument types: a bad value is argparse's error (exit 2, with the reason), never a traceback (issue 12, L10) ----
MAX_K = 1000  # as the API's
MAX_POST_ID_CHARS = 200  # as schema.Post's: every stored id can be named
_WORKER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a Celery hostname and a metrics folder
# scraper.push.ID_PATTERN, which every pushed id meets (importing scraper.push here would load torch per command)
_POST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


def _whole(low: int, high: int) -> Callable[[str], int]:
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{plain(text)!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value

    return whole


def _number(low: float, high: float = math.inf, *, above: bool = False) -> Callable[[str], float]:
    """A finite number from ``low`` (excluded with ``above``) to ``high``: NaN and infinities are refused."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{plain(text)!r} is not a number") from None
        if not math.isfinite(value) or value < low or (above and value == low) or value > high:
            bound = (f"above {low:g}" if above else f"from {low:g}") + (f" to {high:g}" if math.isfinite(high) else "")
            raise argparse.ArgumentTypeError(f"{plain(text)!r} is not a finite number {bound}")
        return value

    return number


def _folds(text: str) -> int:
    value = _whole(0, 1000)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("K-fold cross-validation needs K >= 2 (0: none)")
    return value


def _checked(check: Callable[[Any], Any]) -> Callable[[str], Any]:
    """An argument type from a library check that raises ValueError: the same rule at the door and inside."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(plain(err)) from None

    return parse


def _head_name(text: str) -> str:
    from deeptarget.models.heads import check_head_name

    return _checked(check_head_name)(text)


def _checked_version(text: str) -> int:
    from deeptarget.models.heads import check_version

    return check_version(_whole(1, 10**9)(text))


def _entry_id(text: str) -> str:
    from deeptarget.workers.deadletter import check_entry_id

    return _checked(check_entry_id)(text)


def _post_id(text: str) -> str:
    if not 0 < len(text) <= MAX_POST_ID_CHARS or not _POST_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"post id {plain(text)!r}: 1 to {MAX_POST_ID_CHARS} letters, digits and _ . : -, starting with a letter "
            "or digit"
        )
    return text


def _worker_name(text: str) -> str:
    if not _WORKER_NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"worker name {plain(text)!r}: 1 to 64 letters, digits, _ . and -, starting with a letter or digit"
        )
    return text


def _input_file(path: str, what: str) -> None:
    """``path`` must be something to read from: a regular file or a pipe (not a directory or a device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise DeepTargetError(f"{what} {plain(path)}: {err.strerror or type(err).__name__}") from None
    if stat.S_ISDIR(mode):
        raise DeepTargetError(f"{what} {plain(path)}: a directory, not a file")
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise DeepTargetError(f"{what} {plain(path)}: not a regular file")


def _read_file(path: str, limit: int, what: str) -> bytes:
    """A whole file of at most ``limit`` bytes, or a ``DeepTargetError`` saying why not."""
    _input_file(path, what)
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise DeepTargetError(f"{what} {plain(path)}: larger than {limit} bytes")
    return data


def _bounded_lines(handle: BinaryIO, limit: int) -> Iterator[bytes]:
    """The lines of ``handle``, none held longer than ``limit`` + 2 bytes: a longer one comes cut (and so is
    rejected as too long), the rest of it is skipped unread into memory."""
    while line := handle.readline(limit + 2):
        if len(line) == limit + 2 and not line.endswith(b"\n"):
            while (rest := handle.readline(64 * 1024)) and not rest.endswith(b"\n"):
                pass
        yield line


# -- commands ----------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from deeptarget.cli.demo import run_demo

    settings = _settings(args)
    if args.posts:
        settings = settings.model_copy(update={"sandbox_posts": args.posts})
    return asyncio.run(run_demo(settings, once=args.once))


def cmd_redis(args: argparse.Namespace) -> int:
    from deeptarget.runtime.processes import start_embedded_redis

    # Handlers, set before the server starts: a stop at any moment stops it too (SIGTERM's default action once killed
    # this process and left its redis-server running: issue 12, L14). sigwait, used before, hung once in CI: a SIGINT
    # that came after the ready line but before the signals were blocked went to Python's own handler, and sigwait
    # then waited for another.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    settings, server = start_embedded_redis(_settings(args))
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
    from deeptarget.runtime.processes import wait_for_signal
    from deeptarget.sandbox import SandboxNetwork, sandbox_server

    settings = _settings(args)
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
    from deeptarget.runtime.processes import connect_redis

    settings = connect_redis(_settings(args))
    if settings.scraper_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.scraper_metrics_port, addr=settings.api_host)
    return asyncio.run(_scrape(settings, forever=args.forever, interval_s=args.interval))


async def _scrape(settings: Settings, *, forever: bool, interval_s: float) -> int:
    import redis.asyncio as aioredis

    from deeptarget.scraper import CelerySink, Crawler
    from deeptarget.store.blobs import BlobStore

    # Bounded waits: a Redis that went away (even silently, behind a partition) is an error the crawler waits out,
    # never a call that hangs. The socket timeout stays above the ingest stream's blocking read.
    client = aioredis.Redis.from_url(
        settings.redis_url or "", socket_connect_timeout=5, socket_timeout=settings.ingest_block_s + 10
    )
    crawler = Crawler(settings, client, CelerySink(Jobs.for_settings(settings)), BlobStore(settings.blob_dir))
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


async def _show_progress(crawler: Any, every_s: float = 1.0) -> None:
    """A live status line on a terminal (and nothing when output goes to a file: the logs say it there)."""
    from rich.console import Console
    from rich.live import Live

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
    from deeptarget.runtime.processes import connect_redis
    from deeptarget.workers.metrics import serve_worker_metrics

    settings = connect_redis(_settings(args))
    serve_worker_metrics(settings, args.name)  # before the tasks import prometheus_client

    from deeptarget.workers.app import create_celery

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
    from deeptarget.runtime.processes import connect_redis
    from deeptarget.workers.app import create_celery

    settings = connect_redis(_settings(args))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    create_celery(settings).Beat(schedule=str(settings.data_dir / "celerybeat-schedule"), loglevel="INFO").run()
    return 0


MIN_API_KEY_BYTES = 16


def cmd_serve(args: argparse.Namespace) -> int:
    from deeptarget.api.app import create_app, server_limits
    from deeptarget.runtime.app_server import AppServer
    from deeptarget.runtime.processes import connect_redis, wait_for_signal

    settings = _settings(args)
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
    settings = connect_redis(settings)

    async def serve() -> None:
        limits = server_limits(settings)  # slow or greedy clients cannot hold every connection
        async with AppServer(create_app(settings), settings.api_host, settings.api_port, limits) as server:
            print(f"deeptarget API at {server.url}", flush=True)
            await wait_for_signal()

    asyncio.run(serve())
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    settings = _settings(args)
    image = _read_file(args.image, settings.max_upload_bytes, "--image") if args.image else None  # before the models

    from deeptarget.query.service import PostFilter, QueryService

    service = QueryService(settings)
    if args.what == "similar":
        try:
            has_face = {"yes": True, "no": False}.get(args.has_face or "")
            where = PostFilter.parse(args.hashtag, args.since, args.until, has_face)
        except ValueError as err:
            raise DeepTargetError(str(err)) from None
        if args.post_id:
            results = service.similar_to_post(args.post_id, args.k, where)
        elif image is not None:
            results = service.similar_to_image(image, args.k, where)
        else:
            raise DeepTargetError("query similar needs --post-id or --image")
        _print_json([r.to_json() for r in results])
    elif args.what == "hashtags":
        if image is None:
            raise DeepTargetError("query hashtags needs --image")
        tags, _ = service.suggest_hashtags(image, args.k)
        _print_json([{"hashtag": t, "score": round(s, 6)} for t, s in tags])
    elif args.what == "audience":
        if not args.user:
            raise DeepTargetError("query audience needs an interest, e.g. sushi, food:sushi or '#sushi'")
        key, members = service.audience(args.user, args.min_score, args.min_posts, args.k, args.exclude_outliers)
        _print_json({"interest": key, "users": [
            {"user_id": m.user_id, "username": m.profile.username, "score": round(m.score, 6),
             "post_count": m.profile.post_count, "followers_count": m.profile.followers_count}
            for m in members
        ]})  # fmt: skip
    else:
        if not args.user:
            raise DeepTargetError("query user needs a user id or username")
        _print_json(service.profile(args.user).model_dump(mode="json"))
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from deeptarget.profiles.export import export_profiles
    from deeptarget.store.metadata import MetadataStore

    settings = _settings(args)
    path = Path(args.path)
    fmt = args.format or ("parquet" if path.suffix == ".parquet" else "jsonl")
    count = export_profiles(MetadataStore(settings.metadata_database), path, fmt)
    print(f"{count} profiles written to {path} ({fmt})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.local:
        from deeptarget.models.hashtags import HashtagModel
        from deeptarget.store.metadata import MetadataStore

        ids, tags = MetadataStore(settings.metadata_database).image_hashtags()
        model = HashtagModel.fit_with(settings, ids, tags)
        print(f"hashtag model v{model.save(settings.hashtag_model_dir)} published")
        return 0
    return _send(settings, jobs.train_task)


def cmd_index(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "rebuild" and args.local:
        from deeptarget.index.writer import IndexWriter
        from deeptarget.store.metadata import MetadataStore

        writer = IndexWriter.from_settings(settings, MetadataStore(settings.metadata_database))
        print(f"rebuilt the index from the metadata store: {writer.rebuild()} vectors")
        return 0
    return _send(settings, jobs.snapshot_task if args.action == "snapshot" else jobs.rebuild_task)


def cmd_train_head(args: argparse.Namespace) -> int:
    from rich.console import Console

    settings = _settings(args)
    overrides = {"backbone": args.backbone, "weights": args.weights, "weights_normalization": args.normalization}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    console = Console(emoji=False)
    if args.finetune and args.folds:
        raise ConfigurationError("--folds cross-validates the linear head; it does not apply to --finetune")
    from deeptarget.training.datasets import load_labelled

    load_labelled(Path(args.images))  # a folder that can't be trained on says so before the models load
    if args.finetune:
        from deeptarget.training.finetune import FinetuneOptions, finetune

        options = FinetuneOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, restart=args.restart)
        trained = finetune(settings, Path(args.images), args.name, options, publish=args.publish)
    else:
        from deeptarget.training.train_head import train_head

        trained = train_head(settings, Path(args.images), args.name, publish=args.publish, l2=args.l2, folds=args.folds)
    head = trained.head
    console.print(f"head [bold]{shown(head.name)}[/] v{head.version} on {shown(head.model_id)}: "
                  f"{trained.train_images} training images, {trained.test_images} held out, {trained.skipped} "
                  "unusable")  # fmt: skip
    console.print(_metrics_table(trained.metrics))
    if trained.report_path:
        console.print(f"report: {shown(trained.report_path)}")
    for line in trained.notes:
        console.print(shown(line))
    state = (
        "published"
        if args.publish
        else f"saved; publish with: deeptarget publish-head {args.name} {trained.head.version}"
    )
    console.print(state)
    return 0


def _metrics_table(metrics: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    summary = Table("", "top-1", "top-5", "macro-F1")
    summary.add_row("held out", f"{metrics['top1']:.3f}", f"{metrics['top5']:.3f}", f"{metrics['macro_f1']:.3f}")
    if "top1_tta" in metrics:
        summary.add_row("held out, TTA", f"{metrics['top1_tta']:.3f}", f"{metrics['top5_tta']:.3f}",
                        f"{metrics['macro_f1_tta']:.3f}")  # fmt: skip
    for fold in metrics.get("folds", []):
        summary.add_row(f"fold {fold['fold']}", f"{fold['top1']:.3f}", f"{fold['top5']:.3f}", f"{fold['macro_f1']:.3f}")
    if metrics.get("folds"):
        from deeptarget.training.linear import fold_statistics

        means = [f"{mean:.3f}" for mean, _ in fold_statistics(metrics["folds"]).values()]
        summary.add_row(f"{len(metrics['folds'])}-fold mean", *means)
    per_class = Table("class", "precision", "recall")
    for name, values in metrics["per_class"].items():
        per_class.add_row(shown(name), f"{values['precision']:.3f}", f"{values['recall']:.3f}")  # folder names
    return Group(summary, per_class)


def cmd_publish_head(args: argparse.Namespace) -> int:
    from deeptarget.models.heads import publish_head

    publish_head(_settings(args).heads_dir, args.name, args.version)
    print(f"head {args.name} v{args.version} published: running workers use it from their next batch")
    return 0


def cmd_reclassify(args: argparse.Namespace) -> int:
    from deeptarget.ops.reclassify import published_heads, reclassify
    from deeptarget.store.metadata import MetadataStore

    settings = _settings(args)
    heads = published_heads(settings.heads_dir, args.heads or None)
    if not heads:
        raise ConfigurationError(f"no published head in {settings.heads_dir}")
    done = reclassify(
        MetadataStore(settings.metadata_database),
        heads,
        half_life_days=settings.profile_half_life_days,
        outlier_k=settings.follower_outlier_k,
    )
    for name, version in done.heads.items():
        print(f"head {name} v{version}: {done.posts[name]} stored posts reclassified")
    print(f"{done.profiles} profiles rebuilt")
    return 0


def cmd_reembed(args: argparse.Namespace) -> int:
    from rich.console import Console

    from deeptarget.models.embedder import Embedder
    from deeptarget.ops.reembed import rebuild_index, send_reembed, wait_until_reembedded
    from deeptarget.runtime.processes import connect_redis
    from deeptarget.store.metadata import MetadataStore

    settings = connect_redis(_settings(args))
    model_id = Embedder.from_settings(settings).model_id
    store, send, console = MetadataStore(settings.metadata_database), Jobs.for_settings(settings), Console(emoji=False)
    sent = send_reembed(store, send, model_id, settings.batch_size)
    console.print(f"{sent} posts queued to be embedded again with {shown(model_id)}; the workers must run these "
                  "settings")  # fmt: skip
    if args.no_wait:
        console.print("when they are done: deeptarget index rebuild")
        return 0
    with console.status("re-embedding") as status:
        left = wait_until_reembedded(
            store, model_id, args.timeout, lambda n: status.update(f"re-embedding: {n} posts left")
        )
    if left:
        console.print(f"{left} posts still carry another model's embedding after {args.timeout:.0f} s: are the "
                      f"workers running with {shown(model_id)}? The index was not rebuilt.")  # fmt: skip
        return 1
    rebuild_index(send)
    console.print("every post re-embedded; the index rebuild for the new model is on the index queue")
    return 0


def cmd_train_likability(args: argparse.Namespace) -> int:
    from deeptarget.training.likability import train_likability

    trained = train_likability(_settings(args), model_id=args.model_id, publish=args.publish)
    m = trained.metrics
    print(
        f"likability v{trained.head.version} on {plain(trained.model_id)}: {trained.train_posts} training posts, "
        f"{trained.test_posts} held out, {trained.outlier_posts} from follower-count outliers left out"
    )
    print(f"accuracy {m['accuracy']:.3f}   average precision {m['average_precision']:.3f} "
          f"(random {m['positive_share']:.3f})   ROC AUC {m['roc_auc']:.3f}")  # fmt: skip
    print(f"report: {trained.report_path}")
    return 0


def cmd_compare_backbones(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from deeptarget.models.embedder import BACKBONES
    from deeptarget.training.backbones import BackboneSpec, compare_backbones, comparison_report

    settings = _settings(args)
    specs = [BackboneSpec.parse(text, settings) for text in (args.backbone or list(BACKBONES))]
    results = compare_backbones(settings, Path(args.images), specs, timing_images=args.timing_images)
    table = Table("backbone", "weights", "params (M)", "size (MB)", "ms/image", "top-1", "top-5", "macro-F1")
    for r in results:
        scores = [f"{r.metrics[k]:.3f}" for k in ("top1", "top5", "macro_f1")]
        sizes = [f"{r.parameters_m:.1f}", f"{r.size_mb:.1f}", f"{r.ms_per_image:.1f}"]
        table.add_row(shown(r.spec.name), shown(r.model_id.split(":")[1]), *sizes, *scores)
    console = Console(emoji=False)
    console.print(table)
    folder = settings.reports_dir / f"backbones-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"report: {shown(comparison_report(Path(args.images), results).write(folder))}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from deeptarget.reports.live import write_system_report
    from deeptarget.store.metadata import MetadataStore

    settings = _settings(args)
    folder = Path(args.out) if args.out else settings.reports_dir / f"system-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"report: {write_system_report(MetadataStore(settings.metadata_database), folder)}")
    return 0


def cmd_store_copy(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from deeptarget.core.settings import without_password
    from deeptarget.store.copy import copy_store
    from deeptarget.store.metadata import MetadataStore

    settings = _settings(args)
    source = MetadataStore(settings.metadata_database)
    destination = MetadataStore(args.to)
    print(f"copying {settings.metadata_database_shown} -> {without_password(args.to)}")
    with Progress() as progress:
        tasks: dict[str, Any] = {}

        def advance(table: str, n: int) -> None:
            if table not in tasks:
                tasks[table] = progress.add_task(table, total=None)
            progress.advance(tasks[table], n)

        counts = copy_store(source, destination, advance)
    print(f"copied {counts.posts} posts, {counts.profiles} profiles, {counts.models} embedder records")
    if source.status_counts() != destination.status_counts():
        print("the copy's post counts differ from the source's: was something still writing?", file=sys.stderr)
        return 1
    return 0


SHOWN_REJECTIONS = 50  # a binary file is hundreds of bad lines: the first ones say enough


def cmd_enqueue(args: argparse.Namespace) -> int:
    if args.file != "-":
        _input_file(args.file, "enqueue")

    import redis.asyncio as aioredis

    from deeptarget.runtime.processes import connect_redis
    from deeptarget.scraper.push import MAX_LINE_BYTES, IngestStream, parse_posts

    settings = connect_redis(_settings(args))
    with open(args.file, "rb") if args.file != "-" else sys.stdin.buffer as handle:
        posts, bad = parse_posts(_bounded_lines(handle, MAX_LINE_BYTES))
    for record in bad[:SHOWN_REJECTIONS]:  # the reasons quote the file: shown inert
        print(f"{plain(args.file)}:{record.line}: rejected: {plain(record.reason)}", file=sys.stderr)
    if len(bad) > SHOWN_REJECTIONS:
        print(f"... and {len(bad) - SHOWN_REJECTIONS} more rejected lines", file=sys.stderr)

    async def push() -> int:
        client = aioredis.Redis.from_url(settings.redis_url or "")
        try:
            return await IngestStream(client).push(posts)
        finally:
            await client.aclose()

    pushed = asyncio.run(push()) if posts else 0
    print(f"{pushed} posts queued for the scraper, {len(bad)} rejected")
    return 1 if bad and not pushed else 0


def cmd_delete(args: argparse.Namespace) -> int:
    from deeptarget.ops.deletion import delete_posts
    from deeptarget.runtime.processes import connect_redis
    from deeptarget.store.metadata import MetadataStore

    settings = connect_redis(_settings(args))
    deleted = delete_posts(MetadataStore(settings.metadata_database), Jobs.for_settings(settings), args.post_ids)
    unknown = sorted(set(args.post_ids) - set(deleted))
    print(f"deleted {len(deleted)} posts" + (f"; unknown: {plain(', '.join(unknown))}" if unknown else ""))
    return 0


def cmd_deadletter(args: argparse.Namespace) -> int:
    import redis
    from rich.console import Console
    from rich.table import Table

    from deeptarget.runtime.processes import connect_redis
    from deeptarget.workers.deadletter import DeadLetters

    settings = connect_redis(_settings(args))
    letters_store = DeadLetters(redis.Redis.from_url(settings.redis_url or ""), settings.deadletter_path)
    if args.action == "list":
        letters = letters_store.list(args.limit)
        if args.json:
            _print_json([letter.model_dump() for letter in letters])
            return 0
        table = Table(title=f"{len(letters)} dead letters")
        for column in ("id", "failed at", "task", "items", "retries"):
            table.add_column(column, no_wrap=True)
        table.add_column("error", overflow="fold")
        for letter in letters:  # a task's error quotes its data (usernames, captions): shown inert
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.failed_at))
            table.add_row(shown(letter.id), when, shown(letter.task), str(letter.size), str(letter.retries),
                          shown(letter.error[:100]))  # fmt: skip
        Console(emoji=False).print(table)
        if letters_store.fallback_file.exists():
            print(f"letters written while Redis was down: {letters_store.fallback_file}")
        return 0
    if not args.ids and not args.all:
        raise DeepTargetError(f"deadletter {args.action}: name entry ids, or --all")
    try:
        letters = letters_store.list() if args.all else letters_store.get(args.ids)
    except KeyError as err:
        raise DeepTargetError(str(err.args[0])) from err
    if args.action == "drop":
        print(f"dropped {letters_store.drop([letter.id for letter in letters])} dead letters")
        return 0
    sent = letters_store.retry(Jobs.for_settings(settings), letters)
    print(f"sent {sent} dead letters back to their queues")
    if sent < len(letters):
        print(f"{len(letters) - sent} left in place: their task is not one of ours (see deadletter list --json)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _send(settings: Settings, task: str) -> int:
    from deeptarget.runtime.processes import connect_redis

    settings = connect_redis(settings)
    Jobs.for_settings(settings).send(task)
    print(f"sent {task} to the {jobs.task_queues[task]} queue")
    return 0


def _print_json(value: Any) -> None:
    print(json_text(value))  # the same JSON, with every control character escaped: inert on a terminal


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeptarget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML settings file (DEEPTARGET_* variables override it)")
    parser.add_argument("--data-dir", help="data directory (default: ./data)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole flow on the embedded default with the sandbox source")
    demo.add_argument("--once", action="store_true", help="exit after the crawl and the example queries")
    demo.add_argument("--posts", type=_whole(1, 1_000_000), help="sandbox size in posts (default from settings: 300)")
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("redis", help="run the embedded Redis for the data dir").set_defaults(func=cmd_redis)

    sandbox = sub.add_parser("sandbox", help="serve the sandbox social network")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=_whole(0, 65535), default=8700)
    sandbox.set_defaults(func=cmd_sandbox)

    scrape = sub.add_parser("scrape", help="crawl the configured hashtags and accounts")
    scrape.add_argument("--forever", action="store_true", help="crawl again every --interval seconds")
    scrape.add_argument("--interval", type=_number(0, above=True), default=600.0)
    scrape.set_defaults(func=cmd_scrape)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default=",".join(q for q in jobs.all_queues if q != jobs.index_queue))
    worker.add_argument(
        "--concurrency", type=_whole(1, 1024), help="pool processes (default: settings.worker_concurrency)"
    )
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    worker.add_argument("--name", type=_worker_name, default="worker", help="the worker's name (and metrics folder)")
    worker.set_defaults(func=cmd_worker)

    sub.add_parser("beat", help="run Celery beat (periodic hashtag-model refits)").set_defaults(func=cmd_beat)
    sub.add_parser("serve", help="run the query API").set_defaults(func=cmd_serve)

    query = sub.add_parser("query", help="query the index and profiles locally")
    query.add_argument("what", choices=["similar", "hashtags", "user", "audience"])
    query.add_argument("user", nargs="?", help="user id or username (query user); interest (query audience)")
    query.add_argument("--post-id", type=_post_id)
    query.add_argument("--image", help="path of an image file")
    query.add_argument("-k", type=_whole(1, MAX_K), default=10, help=f"how many results (1 to {MAX_K})")
    query.add_argument("--hashtag", help="similar: only posts with this hashtag")
    query.add_argument("--since", help="similar: only posts from this ISO date on")
    query.add_argument("--until", help="similar: only posts before this ISO date")
    query.add_argument("--has-face", choices=["yes", "no"], help="similar: only posts with / without a face")
    query.add_argument("--min-score", type=_number(0, 1), default=0.0, help="audience: least share of the interest")
    query.add_argument("--min-posts", type=_whole(1, 1_000_000), default=1, help="audience: least posts per user")
    query.add_argument("--exclude-outliers", action="store_true", help="audience: no follower-count outliers")
    query.set_defaults(func=cmd_query)

    profiles = sub.add_parser("profiles", help="export every user profile")
    profiles.add_argument("action", choices=["export"])
    profiles.add_argument("path", help="output file (.jsonl or .parquet)")
    profiles.add_argument("--format", choices=["jsonl", "parquet"], help="default: from the file's suffix")
    profiles.set_defaults(func=cmd_profiles)

    train = sub.add_parser("train", help="refit the hashtag model (a task on the train queue)")
    train.add_argument("--local", action="store_true", help="fit in this process instead")
    train.set_defaults(func=cmd_train)

    index = sub.add_parser("index", help="index maintenance (tasks on the index queue)")
    index.add_argument("action", choices=["snapshot", "rebuild"])
    index.add_argument("--local", action="store_true", help="rebuild in this process (stop the index worker first)")
    index.set_defaults(func=cmd_index)

    train_head = sub.add_parser("train-head", help="train a classification head on a labelled image folder")
    train_head.add_argument(
        "images",
        metavar="DATA_DIR",
        help="train/ and test/ folders per class, train.txt/test.txt, or a folder per class",
    )
    train_head.add_argument("--name", required=True, type=_head_name,
                            help="the head's name (e.g. food): lowercase letters, digits, _ and -")  # fmt: skip
    fields = Settings.model_fields
    train_head.add_argument("--backbone", choices=get_args(fields["backbone"].annotation),
                            help="default: the backbone setting (the one the workers run)")  # fmt: skip
    train_head.add_argument("--weights", help="imagenet, none, auto or a .pth file (default: the weights setting)")
    train_head.add_argument("--normalization", choices=get_args(fields["weights_normalization"].annotation),
                            help="input scaling of the weights")  # fmt: skip
    train_head.add_argument("--publish", action="store_true", help="make it the version workers use")
    train_head.add_argument("--l2", type=_number(0), default=1e-3, help="L2 penalty of the logistic regression")
    train_head.add_argument("--folds", type=_folds, default=0, help="also report K-fold cross-validation (K >= 2)")
    train_head.add_argument(
        "--finetune", action="store_true", help="fine-tune the backbone end to end (resumes from its checkpoint)"
    )
    train_head.add_argument("--epochs", type=_whole(1, 10_000), default=8, help="fine-tuning epochs")
    train_head.add_argument("--batch-size", type=_whole(1, 65536), default=32, help="fine-tuning batch size")
    train_head.add_argument("--lr", type=_number(0, above=True), default=1e-3,
                            help="fine-tuning peak learning rate of the head")  # fmt: skip
    train_head.add_argument("--restart", action="store_true", help="fine-tuning: ignore an existing checkpoint")
    train_head.set_defaults(func=cmd_train_head)

    publish = sub.add_parser("publish-head", help="make a trained head version the one workers use")
    publish.add_argument("name", type=_head_name)
    publish.add_argument("version", type=_checked_version)
    publish.set_defaults(func=cmd_publish_head)

    reclassify = sub.add_parser("reclassify", help="apply the published heads to the stored embeddings")
    reclassify.add_argument("heads", nargs="*", type=_head_name, help="head names (default: every published head)")
    reclassify.set_defaults(func=cmd_reclassify)

    reembed = sub.add_parser("reembed", help="embed the stored posts again after a change of backbone or weights")
    reembed.add_argument("--no-wait", action="store_true", help="queue them and return (then: index rebuild)")
    reembed.add_argument("--timeout", type=_number(0, above=True), default=24 * 3600.0,
                         help="seconds to wait for the workers")  # fmt: skip
    reembed.set_defaults(func=cmd_reembed)

    likability = sub.add_parser("train-likability", help="train the likability head from the stored engagement")
    likability.add_argument("--model-id", help="embeddings of this model (default: the one most posts have)")
    likability.add_argument("--publish", action="store_true", help="make it the version workers use")
    likability.set_defaults(func=cmd_train_likability)

    compare = sub.add_parser("compare-backbones", help="accuracy, size and speed of backbones on a labelled folder")
    compare.add_argument("images", metavar="DATA_DIR", help="a labelled image folder, as for train-head")
    compare.add_argument(
        "--backbone",
        action="append",
        help="NAME, NAME=WEIGHTS or NAME=WEIGHTS:NORMALIZATION; repeat it (default: every known backbone)",
    )
    compare.add_argument("--timing-images", type=_whole(1, 100_000), default=64,
                         help="images embedded to time each backbone")  # fmt: skip
    compare.set_defaults(func=cmd_compare_backbones)

    report = sub.add_parser("report", help="an HTML report of the live system (posts, faces, classes, engagement)")
    report.add_argument("--out", help="folder for index.html and its PNGs (default: data/reports/system-<time>)")
    report.set_defaults(func=cmd_report)

    store_copy = sub.add_parser(
        "store-copy", help="copy the metadata store to another (SQLite path or postgresql:// URL); stop writers first"
    )
    store_copy.add_argument(
        "--to", required=True, help="the destination; a password may come from PGPASSWORD or ~/.pgpass instead"
    )
    store_copy.set_defaults(func=cmd_store_copy)

    enqueue = sub.add_parser("enqueue", help="queue posts from a JSON-lines file (- for stdin) for the scraper")
    enqueue.add_argument("file")
    enqueue.set_defaults(func=cmd_enqueue)

    delete = sub.add_parser("delete", help="delete posts: forgotten by the store, removed from the index")
    delete.add_argument("post_ids", nargs="+", type=_post_id)
    delete.set_defaults(func=cmd_delete)

    deadletter = sub.add_parser("deadletter", help="tasks that failed for good: list them, send them again, drop them")
    deadletter.add_argument("action", choices=["list", "retry", "drop"])
    deadletter.add_argument(
        "ids", nargs="*", type=_entry_id, help="entry ids from the list (retry, drop), e.g. 1700000000000-0"
    )
    deadletter.add_argument("--all", action="store_true", help="every dead letter (retry, drop)")
    deadletter.add_argument("--limit", type=_whole(1, 1_000_000), help="show at most this many (list)")
    deadletter.add_argument("--json", action="store_true", help="full letters with arguments and traceback (list)")
    deadletter.set_defaults(func=cmd_deadletter)
    return parser


def main(argv: list[str] | None = None) -> int:
    from redis.exceptions import RedisError

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except DeepTargetError as err:
        print(f"deeptarget: error: {plain(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file not there, not readable, a directory: the reason, not a traceback
        print(f"deeptarget: error: {plain(err)}", file=sys.stderr)
        return 1
    except RedisError as err:
        print(f"deeptarget: error: Redis: {plain(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
