"""Push-to-queryable latency: how long a post pushed through ``POST /ingest`` takes to answer ``GET /similar``.

    .venv/bin/python bench/latency.py                        # 5 and 20 posts/s, 30 s each (about 3 minutes)
    .venv/bin/python bench/latency.py --rates 5,20 --duration-s 30 --data-dir /tmp/lat   # and keep the logs
    .venv/bin/python bench/latency.py --face-model none      # the settings' default face detector (Haar)

Real processes on this machine, as a deployment runs them: the embedded Redis (in a fresh data dir), an infer worker
(queues infer, profiles, train), the index worker (``--pool solo``), the API (``deeptarget serve``) and the scraper
(``deeptarget scrape --forever --interval 600``, no hashtags or accounts: it only follows the ingest stream). The
bench process serves distinct JPEGs on loopback (one per post, from scikit-image's sample photos scaled, cropped and
tinted at random, so bytes and embeddings differ), pushes one post per ``POST /ingest`` on a steady schedule, and
for each post notes when it passed each stage:

- *scraper*: pushed -> its reference on the infer queue (the post joins the scraper's seen set);
- *infer*: -> its embedding in the metadata store (queue wait, decode, faces, embedding);
- *index*: -> marked indexed by the index writer (the index task's queue wait and the add);
- *publish*: -> ``GET /similar?post_id=ID&k=1`` answers 200 (the writer's deferred snapshot and the API's reload).

Faces are filtered with YuNet from ``../shared/assets`` when it is there (as ``bench/infer.py`` does; ``--face-model
none`` leaves the settings' default, Haar, which alone costs more than the 2 cores have at 20 posts/s).

One monitor polls every ``--poll-ms`` (one SMISMEMBER, one store query, and a GET for each post the store shows
indexed), so stage times are late by at most one poll. Models are warmed with a few posts first. Per rate: p50, p95,
max push-to-queryable and the throughput held (posts queryable per second from the first push to the last post
queryable), then each stage's p50/p95, the workers' task counts from their logs, and the CPU each process used
(with what other processes on the machine took meanwhile: a busy machine is flagged). The last line is
``push-to-queryable p95 = X.XX s`` for the highest rate (inf when some post never became queryable).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import redis.asyncio as aioredis
import skimage.data
from aiohttp import web
from PIL import Image
from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.core.records import vector_id
from deeptarget.core.settings import Settings
from deeptarget.runtime.app_server import AppServer
from deeptarget.runtime.embedded_redis import free_port
from deeptarget.runtime.processes import spawn_worker, start_embedded_redis, stop_processes
from deeptarget.store.metadata import MetadataStore
from deeptarget.workers.app import create_celery

STAGES = ("scraper", "infer", "index", "publish")
SHARED_YUNET = Path(__file__).resolve().parents[2] / "shared/assets/weights/face/yunet_s_640_640.onnx"
SETTLE_S = 60.0  # after the last push, how long the stragglers may take before they count as never queryable


@dataclass
class Tracked:
    post_id: str
    pushed: float
    enqueued: float | None = None
    embedded: float | None = None
    indexed: float | None = None
    queryable: float | None = None
    rejected: str | None = None

    def stages(self) -> list[float] | None:
        marks = [self.pushed, self.enqueued, self.embedded, self.indexed, self.queryable]
        if any(m is None for m in marks):
            return None
        return [b - a for a, b in itertools.pairwise(marks)]  # type: ignore[operator]


@dataclass
class Run:
    rate: float
    posts: list[Tracked] = field(default_factory=list)
    first_push: float = 0.0
    last_push: float = 0.0
    tasks: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # task -> (count, posts, busy seconds)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds from the first push to the end
    ended: float = 0.0

    @property
    def latencies(self) -> np.ndarray:
        return np.array([p.queryable - p.pushed for p in self.posts if p.queryable is not None])

    @property
    def held_per_s(self) -> float:
        done = [p.queryable for p in self.posts if p.queryable is not None]
        return len(done) / max(max(done) - self.first_push, 1e-9) if done else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (a prefork worker's pool), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, seconds)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, (0, 0.0))[1]
        todo += [child for child, (parent, _) in stats.items() if parent == current]
    return total


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


@functools.cache
def _photo(name: str) -> np.ndarray:
    return getattr(skimage.data, name)()


def make_jpeg(i: int, side: int) -> bytes:
    """A distinct photo JPEG of about ``side`` pixels: one of scikit-image's sample photos, scaled, cropped, tinted and
    re-encoded at random (one seed per post), so no two posts share bytes or an embedding."""
    rng = np.random.default_rng(1000 + i)
    photo = _photo(PHOTOS[i % len(PHOTOS)])
    width = int(side * rng.uniform(1.0, 1.3))
    image = Image.fromarray(photo).resize((width, int(width * photo.shape[0] / photo.shape[1])))
    left, top = (int(v) for v in rng.integers(0, width // 8, 2))
    image = image.crop((left, top, image.width - int(rng.integers(0, width // 8)), image.height))
    tint = np.asarray(image, dtype=np.float32) * rng.uniform(0.8, 1.2, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(tint, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(80, 95)))
    return buffer.getvalue()


def image_app(images: dict[str, bytes]) -> web.Application:
    async def image(request: web.Request) -> web.Response:
        data = images.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{name}.jpg", image)
    return app


class Pipeline:
    """The processes under test, and what the bench reads back from them."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, console: Console) -> None:
        s = self.settings
        self.logs.mkdir(parents=True, exist_ok=True)
        queues = [jobs.infer_queue, jobs.profiles_queue, jobs.train_queue]
        self.processes["infer"] = spawn_worker(
            s, queues, name="infer", concurrency=s.worker_concurrency, log_file=self.logs / "worker-infer.log"
        )
        self.processes["index"] = spawn_worker(
            s, [jobs.index_queue], name="index", pool="solo", log_file=self.logs / "worker-index.log"
        )
        self.processes["api"] = self._spawn("api", ["serve"])
        self.processes["scraper"] = self._spawn("scraper", ["scrape", "--forever", "--interval", "600"])
        console.print(
            f"processes: {', '.join(f'{n} {p.pid}' for n, p in self.processes.items())} (logs in {self.logs})"
        )

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.settings.to_env()}
        with (self.logs / f"{name}.log").open("ab") as log:
            return subprocess.Popen([sys.executable, "-m", "deeptarget", *command], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def check(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = self.logs / (f"worker-{name}.log" if name in ("infer", "index") else f"{name}.log")
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text()[-3000:]}")

    async def wait_ready(self, api_url: str, timeout_s: float = 180) -> None:
        app = create_celery(self.settings)
        deadline = time.monotonic() + timeout_s
        waiting = {"infer", "index"}
        while waiting:
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(waiting)} did not answer a ping in {timeout_s:.0f} s")
            replies = await asyncio.to_thread(app.control.ping, timeout=0.5)
            waiting -= {key.split("@")[0] for reply in replies or [] for key in reply}
        async with aiohttp.ClientSession() as http:
            while True:
                self.check()
                try:
                    async with http.get(f"{api_url}/openapi.json") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the API did not come up")
                await asyncio.sleep(0.2)

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(p.pid) for name, p in self.processes.items()} | {"bench": time.process_time()}

    def log_size(self, name: str) -> int:
        path = self.logs / f"worker-{name}.log"
        return path.stat().st_size if path.exists() else 0

    def task_counts(self, name: str, since: int, task: str, counted: str) -> tuple[int, int, float]:
        """(tasks, items, busy seconds) of ``task`` from this worker's Celery log since byte ``since``."""
        with (self.logs / f"worker-{name}.log").open("rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", "replace")
        pattern = re.compile(rf"Task {re.escape(task)}\[[^\]]+\] succeeded in ([0-9.]+)s: (.*)")
        tasks, items, busy = 0, 0, 0.0
        for seconds, result in pattern.findall(text):
            tasks += 1
            busy += float(seconds)
            numbers = re.findall(rf"'{counted}': (\d+)", result) if counted else re.findall(r"^(\d+)", result)
            items += sum(int(n) for n in numbers)
        return tasks, items, busy

    def stop(self) -> None:
        order = ["scraper", "api", "infer", "index"]  # all signalled at once; the index writer snapshots as it stops
        stop_processes([self.processes[n] for n in order if n in self.processes], timeout_s=30)


class Monitor:
    """Stage times of every post in flight, one poll at a time."""

    def __init__(self, settings: Settings, api_url: str, poll_s: float) -> None:
        self.store = MetadataStore(settings.metadata_database)
        self.redis = aioredis.Redis.from_url(settings.redis_url or "")
        self.api_url = api_url
        self.poll_s = poll_s
        self.pending: dict[str, Tracked] = {}

    async def watch(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            polled = time.monotonic()
            await self.poll(http)
            await asyncio.sleep(max(0.0, polled + self.poll_s - time.monotonic()))

    async def poll(self, http: aiohttp.ClientSession) -> None:
        posts = list(self.pending.values())
        if not posts:
            return
        now = time.monotonic()
        waiting = [p for p in posts if p.enqueued is None]
        if waiting:
            seen = await self.redis.smismember(keys.seen_posts_key, [p.post_id for p in waiting])  # type: ignore[misc]
            for post, flag in zip(waiting, seen, strict=True):
                if flag:
                    post.enqueued = now
        stored = await asyncio.to_thread(self.store.posts_by_vector_ids, [vector_id(p.post_id) for p in posts])
        now = time.monotonic()
        for post in posts:
            row = stored.get(vector_id(post.post_id))
            if row is None:
                continue
            if row.status in ("embedded", "indexed") and post.embedded is None:
                post.embedded = now
            if row.status == "indexed" and post.indexed is None:
                post.indexed = now
            if row.status == "rejected":
                post.rejected = row.reason or "rejected"
                del self.pending[post.post_id]
        for post in posts:  # through the scraper and the infer task within one poll
            if post.enqueued is None and post.embedded is not None:
                post.enqueued = post.embedded
        indexed = [p for p in posts if p.indexed is not None and p.post_id in self.pending]
        await asyncio.gather(*(self.query(http, p) for p in indexed))

    async def query(self, http: aiohttp.ClientSession, post: Tracked) -> None:
        params = {"post_id": post.post_id, "k": "1"}
        async with http.get(f"{self.api_url}/similar", params=params) as response:
            await response.read()
            if response.status == 200:
                post.queryable = time.monotonic()
                self.pending.pop(post.post_id, None)

    async def close(self) -> None:
        await self.redis.aclose()


async def push_at_rate(http: aiohttp.ClientSession, api_url: str, headers: dict[str, str], image_url: str,
                       monitor: Monitor, run: Run, ids: Sequence[str], progress: Progress | None = None,
                       task: object = None) -> None:  # fmt: skip
    """One ``POST /ingest`` per post on a steady schedule (a late push never delays the next ones)."""

    async def push(post_id: str) -> None:
        line = json.dumps({"id": post_id, "media_url": f"{image_url}/img/{post_id}.jpg", "caption": "#latency"})
        tracked = Tracked(post_id, time.monotonic())
        run.posts.append(tracked)
        monitor.pending[post_id] = tracked
        async with http.post(f"{api_url}/ingest", data=line.encode(), headers=headers) as response:
            body = await response.text()
            if response.status != 202:
                raise RuntimeError(f"POST /ingest answered {response.status}: {body}")
        if progress is not None:
            progress.advance(task)  # type: ignore[arg-type]

    started = time.monotonic()
    run.first_push = started
    pushes = []
    for i, post_id in enumerate(ids):
        await asyncio.sleep(max(0.0, started + i / run.rate - time.monotonic()))
        pushes.append(asyncio.create_task(push(post_id)))
    run.last_push = time.monotonic()
    await asyncio.gather(*pushes)


async def measure(args: argparse.Namespace, console: Console, data_dir: Path) -> list[Run]:
    for name in [n for n in os.environ if n.startswith("DEEPTARGET_")]:
        del os.environ[name]  # the settings below, not the machine's
    rates = [float(r) for r in args.rates.split(",")]
    counts = [int(rate * args.duration_s) for rate in rates]
    names = [f"w{i}" for i in range(args.warmup)] + [
        f"r{rate:g}-{i}" for rate, n in zip(rates, counts, strict=True) for i in range(n)
    ]
    started = time.perf_counter()
    images = {name: make_jpeg(i, args.image_side) for i, name in enumerate(names)}
    sizes = [len(b) for b in images.values()]
    console.print(f"{len(images)} distinct JPEGs about {args.image_side} pixels wide "
                  f"({min(sizes) // 1000}-{max(sizes) // 1000} KB) made in {time.perf_counter() - started:.0f} s, "
                  f"{os.cpu_count()} cores")  # fmt: skip

    api_key = secrets.token_urlsafe(24)
    overrides: dict[str, object] = dict(item.split("=", 1) for item in args.set)
    if args.face_model != "none":
        overrides.setdefault("face_model_path", args.face_model)
    image_port = free_port()  # named in image_hosts: the scraper fetches from no host it was not told of
    values = {"data_dir": data_dir, "api_key": SecretStr(api_key), "api_port": free_port(), "hashtags": [],
              "accounts": [], "image_hosts": [f"127.0.0.1:{image_port}"], **overrides}  # fmt: skip
    base = Settings(**values)  # type: ignore[arg-type]
    settings, redis_server = start_embedded_redis(base)
    pipeline = Pipeline(settings, data_dir / "logs")
    runs: list[Run] = []
    try:
        async with AsyncExitStack() as stack:
            images_server = await stack.enter_async_context(AppServer(image_app(images), "127.0.0.1", image_port))
            pipeline.start(console)
            api_url = f"http://{settings.api_host}:{settings.api_port}"
            await pipeline.wait_ready(api_url)
            headers = {"X-API-Key": api_key, "Content-Type": "application/x-ndjson"}
            http = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)))
            monitor = Monitor(settings, api_url, args.poll_ms / 1000)
            stack.push_async_callback(monitor.close)
            redis_pid = int((await monitor.redis.info("server"))["process_id"])
            console.print(
                f"backbone {settings.backbone} (weights {settings.weights}), faces {settings.face_policy} with "
                f"{'YuNet ' + str(settings.face_model_path) if settings.face_model_path else 'Haar'}, "
                f"batch_size {settings.batch_size}, "
                f"snapshot_every_s {settings.snapshot_every_s}, ingest_max_delay_s {settings.ingest_max_delay_s}"
                + (f", set: {', '.join(args.set)}" if args.set else "")
            )

            warm = Run(rate=2.0)
            with console.status(f"warming up: {args.warmup} posts through every stage (models load)"):
                await one_run(http, api_url, headers, images_server.url, monitor, warm, names[: args.warmup],
                              pipeline, None)  # fmt: skip
            if warm.latencies.size < args.warmup:
                raise RuntimeError(f"warm-up: only {warm.latencies.size} of {args.warmup} posts became queryable")
            console.print(f"warm-up: {args.warmup} posts queryable, the slowest after {warm.latencies.max():.1f} s")

            offset = args.warmup
            for rate, n in zip(rates, counts, strict=True):
                run = Run(rate=rate)
                logs_at = {name: pipeline.log_size(name) for name in ("infer", "index")}
                cpu_at = pipeline.cpu() | {"redis": cpu_seconds(redis_pid), "machine": machine_busy_seconds()}
                await one_run(http, api_url, headers, images_server.url, monitor, run, names[offset : offset + n],
                              pipeline, console)  # fmt: skip
                run.ended = time.monotonic()
                cpu_now = pipeline.cpu() | {"redis": cpu_seconds(redis_pid), "machine": machine_busy_seconds()}
                run.cpu = {name: cpu_now[name] - cpu_at[name] for name in cpu_now}
                run.cpu["others"] = max(0.0, run.cpu.pop("machine") - sum(run.cpu.values()))
                offset += n
                run.tasks["infer"] = pipeline.task_counts("infer", logs_at["infer"], jobs.infer_task, "embedded")
                run.tasks["index"] = pipeline.task_counts("index", logs_at["index"], jobs.index_task, "")
                runs.append(run)
                await asyncio.sleep(args.pause_s)  # let the queues empty before the next rate
    finally:
        pipeline.stop()
        redis_server.stop()
    return runs


async def one_run(http: aiohttp.ClientSession, api_url: str, headers: dict[str, str], image_url: str,
                  monitor: Monitor, run: Run, ids: Sequence[str], pipeline: Pipeline,
                  console: Console | None) -> None:  # fmt: skip
    stop = asyncio.Event()
    watcher = asyncio.create_task(monitor.watch(http, stop))
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=console, transient=False) if console else None
    try:
        if progress is not None:
            progress.start()
            pushed = progress.add_task(f"{run.rate:g} posts/s: pushed", total=len(ids))
            done = progress.add_task("  queryable", total=len(ids))
        pusher = asyncio.create_task(
            push_at_rate(http, api_url, headers, image_url, monitor, run, ids, progress, pushed if progress else None)
        )
        deadline: float | None = None
        while True:
            await asyncio.sleep(0.25)
            pipeline.check()
            if progress is not None:
                progress.update(done, completed=sum(p.queryable is not None for p in run.posts))
            if pusher.done():
                await pusher  # re-raises a failed push
                deadline = deadline or time.monotonic() + SETTLE_S
                if not monitor.pending or time.monotonic() > deadline:
                    break
    finally:
        stop.set()
        for post_id in [p.post_id for p in run.posts]:
            monitor.pending.pop(post_id, None)
        await watcher
        if progress is not None:
            progress.stop()


def report(console: Console, runs: list[Run], args: argparse.Namespace) -> None:
    table = Table("posts/s", "posts", "queryable", "p50 s", "p95 s", "max s", "held posts/s", "rejected",
                  "others' cores")  # fmt: skip
    for run in runs:
        lat = run.latencies
        p50, p95, worst = (np.percentile(lat, 50), np.percentile(lat, 95), lat.max()) if lat.size else (np.nan,) * 3
        rejected = sum(p.rejected is not None for p in run.posts)
        table.add_row(f"{run.rate:g}", str(len(run.posts)), str(lat.size), f"{p50:.2f}", f"{p95:.2f}", f"{worst:.2f}",
                      f"{run.held_per_s:.1f}", str(rejected),
                      f"{run.cpu.get('others', 0.0) / max(run.ended - run.first_push, 1e-9):.2f}")  # fmt: skip
    console.print(table)
    console.print(f"push (POST /ingest) -> GET /similar?post_id=ID&k=1 answers 200, {args.duration_s:g} s per rate, "
                  f"polled every {args.poll_ms} ms, {os.cpu_count()} cores")  # fmt: skip

    stages = Table("posts/s", *(f"{s} p50 / p95 s" for s in STAGES), "infer tasks (posts/task, busy)",
                   "index tasks (busy)", title="where the time goes")  # fmt: skip
    for run in runs:
        split = np.array([s for p in run.posts if (s := p.stages()) is not None])
        cells = [f"{np.percentile(split[:, i], 50):.2f} / {np.percentile(split[:, i], 95):.2f}" if split.size else "-"
                 for i in range(len(STAGES))]  # fmt: skip
        span = max(run.last_push - run.first_push, 1e-9)
        infer, index = run.tasks.get("infer", (0, 0, 0.0)), run.tasks.get("index", (0, 0, 0.0))
        cells.append(f"{infer[0]} ({infer[1] / max(infer[0], 1):.1f}, {infer[2] / span:.0%})")
        cells.append(f"{index[0]} ({index[2] / span:.0%})")
        stages.add_row(f"{run.rate:g}", *cells)
    console.print(stages)
    title = "CPU from the first push to the last post queryable (others: processes not under test)"
    cpu = Table("posts/s", "seconds", *(f"{name} cores" for name in runs[0].cpu), "total cores", title=title)
    for run in runs:
        span = max(run.ended - run.first_push, 1e-9)
        cpu.add_row(f"{run.rate:g}", f"{span:.1f}", *(f"{v / span:.2f}" for v in run.cpu.values()),
                    f"{sum(run.cpu.values()) / span:.2f} of {os.cpu_count()}")  # fmt: skip
        if run.cpu["others"] / span > 0.2:
            console.print(f"[bold red]{run.rate:g} posts/s: other processes took {run.cpu['others'] / span:.2f} "
                          "cores during the run: these numbers are not those of a quiet machine[/]")  # fmt: skip
    console.print(cpu)
    console.print(
        "stages: scraper = push -> on the infer queue; infer = -> embedding stored; index = -> indexed by the "
        "writer; publish = -> GET answers 200 (snapshot + API reload). busy = task seconds / run length"
    )
    last = max(runs, key=lambda r: r.rate)
    lat = last.latencies
    p95 = np.percentile(lat, 95) if lat.size == len(last.posts) and lat.size else float("inf")
    print(f"push-to-queryable p95 = {p95:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="5,20", help="posts per second, one run each")
    parser.add_argument("--duration-s", type=float, default=30.0, help="pushing time per rate")
    parser.add_argument("--warmup", type=int, default=8, help="posts pushed first, to load the models")
    parser.add_argument("--image-side", type=int, default=1080, help="about this many pixels wide")
    parser.add_argument("--poll-ms", type=int, default=50)
    parser.add_argument("--pause-s", type=float, default=3.0, help="idle time between rates")
    parser.add_argument("--face-model", default=str(SHARED_YUNET) if SHARED_YUNET.is_file() else "none",
                        help="YuNet .onnx for the workers' face filter (default: the shared one, as bench/infer.py); "
                        "none: the settings' default (Haar without a model file)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for every process, e.g. --set torch_threads=1 (repeatable)")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, help="keep the data and logs here (default: a temporary dir)")
    args = parser.parse_args()
    console = Console() if sys.stdout.isatty() else Console(width=140)  # tables unwrapped in a log
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        if any(args.data_dir.iterdir()):
            parser.error(f"--data-dir {args.data_dir} is not empty")
        runs = asyncio.run(measure(args, console, args.data_dir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            runs = asyncio.run(measure(args, console, Path(tmp)))
    report(console, runs, args)


if __name__ == "__main__":
    main()
