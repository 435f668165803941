"""The scraper process through outages of what it depends on (issue 13, items 1, 2 and 8), on real processes: a
scraper process (``python -m deeptarget scrape``), its own redis-server (AOF on; killed with SIGKILL and started again
on the same port and directory), the sandbox served on loopback, a real tmpfs for a full disk.

Each test asserts every offered post on the infer queue exactly once, with no manual step, and prints the recovery
time: from the fault cleared to the scraper making progress again (``pytest -s`` shows it). Where a test must act
while the scraper is blocked at a known point, the sandbox holds requests at a ``Gate`` (logged on arrival), and the
test waits for the hold, never for a guessed time; the only sleeps are the faults' own durations."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
import redis
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from deeptarget.core import keys
from deeptarget.core.records import Post
from deeptarget.core.settings import Settings
from deeptarget.runtime.app_server import AppServer
from deeptarget.runtime.embedded_redis import EmbeddedRedis, free_port
from deeptarget.sandbox import SandboxNetwork
from deeptarget.sandbox.server import create_app
from deeptarget.scraper.claims import ScraperIdentity
from tests.faults import CannotMount, fill, small_tmpfs
from tests.helpers import AVAILABLE_AGAIN, UNAVAILABLE, crawl_settings
from tests.queue_messages import queued_post_refs

pytestmark = pytest.mark.timeout(180)


class Gate:
    """Holds the sandbox's Graph requests or image requests while closed; logs every request on arrival."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str, dict[str, str]]] = []  # (wall time, path, query) of every Graph request
        self.waiting = Counter[str]()  # requests held now, by kind (graph, image)
        self.held_images: set[str] = set()
        self._open = {"graph": asyncio.Event(), "image": asyncio.Event()}
        for event in self._open.values():
            event.set()
        self.hold_first = 0  # images: hold only the first N distinct ones that arrive while closed (0: all)

    def close(self, kind: str) -> None:
        self._open[kind].clear()

    def open(self, kind: str) -> None:
        self._open[kind].set()

    def _holds(self, kind: str, image: str) -> bool:
        if self._open[kind].is_set():
            return False
        if kind == "graph" or not self.hold_first:
            return True
        if image not in self.held_images and len(self.held_images) < self.hold_first:
            self.held_images.add(image)
        return image in self.held_images

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/sandbox/"):
            return await handler(request)
        kind = "image" if request.path.startswith("/media/") else "graph"
        if kind == "graph":
            self.log.append(
                (time.time(), request.path, {k: v for k, v in request.query.items() if k != "access_token"})
            )
        if self._holds(kind, request.path):
            self.waiting[kind] += 1
            try:
                await self._open[kind].wait()
            finally:
                self.waiting[kind] -= 1
        return await handler(request)

    def targets(self, network: SandboxNetwork, after: float = 0.0) -> set[str]:
        """The targets the Graph requests logged after ``after`` were for (hashtags as #name, accounts by name)."""
        by_id = {network.hashtag_id(h): h for h in network.hashtags}
        named = set()
        for at, path, query in self.log:
            if at <= after:
                continue
            if path.endswith("/ig_hashtag_search"):
                named.add("#" + query.get("q", "").lstrip("#"))
            elif match := re.search(r"business_discovery\.username\(([^)]+)\)", query.get("fields", "")):
                named.add(match.group(1))
            else:
                named.update("#" + by_id[node] for node in path.strip("/").split("/") if node in by_id)
        return named


def gated_sandbox(network: SandboxNetwork) -> tuple[AppServer, Gate]:
    gate = Gate()
    app = create_app(network)
    app.middlewares.insert(0, gate.middleware)
    return AppServer(app), gate


class Scraper:
    """A ``deeptarget scrape`` process, its log in a file (a pipe nobody reads would stall it)."""

    running: ClassVar[list[Scraper]] = []  # killed at the end of each test (one that failed leaves none behind)

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @classmethod
    async def start(cls, settings: Settings, log: Path, *args: str) -> Scraper:
        with log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "deeptarget", "scrape", *args, env={**os.environ, **settings.to_env()},
                stdout=asyncio.subprocess.DEVNULL, stderr=out,
            )  # fmt: skip
        cls.running.append(cls(process, log))
        return cls.running[-1]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> None:
        assert self.process.returncode is None, f"the scraper exited:\n{self.text()[-3000:]}"

    async def finished(self, timeout_s: float = 120) -> None:
        await asyncio.wait_for(self.process.wait(), timeout=timeout_s)
        assert self.process.returncode == 0, self.text()[-3000:]

    async def terminate(self, timeout_s: float = 30) -> None:
        self.process.send_signal(signal.SIGTERM)
        await self.finished(timeout_s)

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()


async def until(condition: Callable[[], Any], what: str, scraper: Scraper | None = None, timeout_s: float = 60) -> Any:
    """Poll ``condition`` (the event loop keeps serving the sandbox meanwhile) until it is true."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if scraper is not None:
            scraper.alive()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


def seen(client: redis.Redis) -> int:
    return int(client.scard(keys.seen_posts_key))


async def progress_after(client: redis.Redis, scraper: Scraper, cleared_at: float, timeout_s: float = 60) -> float:
    """Seconds from ``cleared_at`` (monotonic) until the scraper commits a post it had not before."""
    before = seen(client)
    await until(lambda: seen(client) > before, "progress after the fault", scraper, timeout_s)
    return time.monotonic() - cleared_at


async def metric(port: int, name: str, **labels: str) -> float | None:
    """A sample of the scraper's Prometheus metrics; None when absent or the endpoint does not answer."""
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    except aiohttp.ClientError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def metric_becomes(port: int, name: str, value: float, scraper: Scraper, timeout_s: float = 30, **labels: str):
    deadline = time.monotonic() + timeout_s
    while await metric(port, name, **labels) != value:
        scraper.alive()
        assert time.monotonic() < deadline, f"{name}{labels} never became {value}"
        await asyncio.sleep(0.05)


def assert_each_post_once(client: redis.Redis, expected: set[str]) -> None:
    ids = Counter(ref["post"]["id"] for ref in queued_post_refs(client))
    assert set(ids) == expected, f"missing {len(expected - set(ids))}, unexpected {len(set(ids) - expected)}"
    assert max(ids.values()) == 1, f"enqueued twice: {[p for p, n in ids.items() if n > 1][:10]}"


def assert_one_outage_logged(scraper: Scraper, dependency: str) -> None:
    """An outage is two log lines, when it starts and when it ends, not one per retry."""
    text = scraper.text()
    down = [m for m in UNAVAILABLE.findall(text) if m == dependency]
    back = [m for m in AVAILABLE_AGAIN.findall(text) if m == dependency]
    assert len(down) == len(back) == 1, f"{len(down)} outage starts and {len(back)} ends logged:\n{text[-3000:]}"


def offered(network: SandboxNetwork, settings: Settings) -> set[str]:
    return network.offered(settings.hashtags, settings.accounts, settings.hashtag_edge)


@pytest.fixture(autouse=True)
def no_scraper_left() -> Iterator[None]:
    yield
    for scraper in Scraper.running:
        with contextlib.suppress(ProcessLookupError):
            scraper.process.kill()
    Scraper.running.clear()


def connect(server: EmbeddedRedis) -> redis.Redis:
    """The test's own client: it reconnects by itself after a restart."""
    return redis.Redis.from_url(server.url, retry=Retry(ExponentialBackoff(cap=0.5), 5),
                                retry_on_error=[redis.ConnectionError])  # fmt: skip


def big_network(seed: int) -> SandboxNetwork:
    return SandboxNetwork(seed=seed, n_posts=300, n_users=8, n_hashtags=6)


def outage_settings(tmp_path: Path, server: EmbeddedRedis, network: SandboxNetwork, url: str, **extra: Any) -> Settings:
    """Page by page (10 posts), a token budget no run comes near (the faults here are Redis and the disk)."""
    return crawl_settings(tmp_path, server.url, network, url, token_calls=100_000, **extra)


async def test_redis_killed_mid_crawl_and_back_after_5_s(tmp_path: Path, own_redis: EmbeddedRedis) -> None:
    network = big_network(71)
    server, _ = gated_sandbox(network)
    async with server:
        port = free_port()
        settings = outage_settings(tmp_path, own_redis, network, server.url, scraper_metrics_port=port,
                                  outage_max_wait_s=1.0)  # fmt: skip
        expected = offered(network, settings)
        client = connect(own_redis)
        scraper = await Scraper.start(settings, tmp_path / "scraper.log")
        await until(lambda: seen(client) >= 60, "a crawl well under way", scraper)
        own_redis.stop(kill=True)
        await metric_becomes(port, "deeptarget_scraper_dependency_up", 0, scraper, dependency="redis")
        await asyncio.sleep(5)  # the outage
        await asyncio.to_thread(own_redis.start)
        recovery = await progress_after(client, scraper, time.monotonic())
        await scraper.finished()
    assert_each_post_once(client, expected)
    assert_one_outage_logged(scraper, "redis")
    print(f"\nredis kill -9, back after 5 s: progress again {recovery:.2f} s after it was back")


async def test_redis_that_stops_answering_is_timed_out_and_waited_for(tmp_path: Path, own_redis: EmbeddedRedis) -> None:
    """A Redis that keeps its connections open but answers nothing (a partition, a stalled host; here the server is
    stopped with SIGSTOP for 25 s): no call may hang. Each client's socket timeout turns the silence into the outage
    a kill is, waited out the same way; the kernel still accepts new connections meanwhile, so only a read timeout
    can tell."""
    network = big_network(76)
    server, _ = gated_sandbox(network)
    async with server:
        port = free_port()
        settings = outage_settings(tmp_path, own_redis, network, server.url, scraper_metrics_port=port,
                                  outage_max_wait_s=1.0)  # fmt: skip
        expected = offered(network, settings)
        client = connect(own_redis)
        pid = int(client.info("server")["process_id"])
        scraper = await Scraper.start(settings, tmp_path / "scraper.log")
        await until(lambda: seen(client) >= 60, "a crawl well under way", scraper)
        os.kill(pid, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            # Within the longest socket timeout of the scraper's clients (kombu's publish: 30 s).
            await metric_becomes(port, "deeptarget_scraper_dependency_up", 0, scraper, timeout_s=40, dependency="redis")
            noticed = time.monotonic() - stopped
            await asyncio.sleep(max(0.0, 25 - (time.monotonic() - stopped)))  # the rest of the silence
        finally:
            os.kill(pid, signal.SIGCONT)
        recovery = await progress_after(client, scraper, time.monotonic())
        await scraper.finished()
    assert_each_post_once(client, expected)
    assert_one_outage_logged(scraper, "redis")
    print(f"\nredis SIGSTOP 25 s: the scraper called it down {noticed:.1f} s in, progress again {recovery:.2f} s after")


async def test_redis_away_longer_than_the_claims_last_with_pushed_posts_in_flight(
    tmp_path: Path, own_redis: EmbeddedRedis
) -> None:
    """15 s away, three times the claim TTL (5 s): every claim runs out meanwhile, and the scraper takes its own back
    when Redis returns. A scraper that runs forever, so the ingest follower lives through it too."""
    network = big_network(72)
    server, _ = gated_sandbox(network)
    async with server:
        port = free_port()
        settings = outage_settings(tmp_path, own_redis, network, server.url, scraper_metrics_port=port,
                                  claim_ttl_s=5, outage_max_wait_s=2.0, accounts=[])  # fmt: skip
        crawled = offered(network, settings)
        pushed = [Post(id=f"push-{m.id}", source="push", media_url=f"{server.url}/media/{m.id}.jpg")
                  for m in network.media if m.visible and m.kind == "IMAGE" and m.corruption is None][:40]  # fmt: skip
        client = connect(own_redis)
        scraper = await Scraper.start(settings, tmp_path / "scraper.log", "--forever", "--interval", "600")
        await until(lambda: seen(client) >= 40, "a crawl well under way", scraper)
        for post in pushed:
            client.xadd(keys.ingest_stream, {"post": post.model_dump_json()})
        own_redis.stop(kill=True)
        await metric_becomes(port, "deeptarget_scraper_dependency_up", 0, scraper, dependency="redis")
        await asyncio.sleep(15)  # the outage
        await asyncio.to_thread(own_redis.start)
        cleared = time.monotonic()
        recovery = await progress_after(client, scraper, cleared)
        expected = crawled | {p.id for p in pushed}
        await until(lambda: {r["post"]["id"] for r in queued_post_refs(client)} >= expected, "every post", scraper)
        complete = time.monotonic() - cleared
        await metric_becomes(port, "deeptarget_scraper_dependency_up", 1, scraper, dependency="redis")
        assert await metric(port, "deeptarget_scraper_outages_total", dependency="redis") == 1
        await scraper.terminate()
    assert_each_post_once(client, expected)
    assert_one_outage_logged(scraper, "redis")
    assert client.xlen(keys.ingest_stream) == 0
    print(f"\nredis away 15 s: progress again {recovery:.2f} s after it was back, every post in {complete:.1f} s")


async def test_sigterm_while_redis_is_away_stops_at_once_and_loses_nothing(
    tmp_path: Path, own_redis: EmbeddedRedis
) -> None:
    """A stop cuts the waits short: the scraper exits while Redis is still away, with what it had in hand left
    claimed under its name or pending on the stream, and a restart once Redis is back collects every post once."""
    network = big_network(78)
    server, _ = gated_sandbox(network)
    async with server:
        port = free_port()
        settings = outage_settings(tmp_path, own_redis, network, server.url, scraper_metrics_port=port,
                                   outage_max_wait_s=5.0)  # fmt: skip
        expected = offered(network, settings)
        client = connect(own_redis)
        scraper = await Scraper.start(settings, tmp_path / "first.log", "--forever", "--interval", "600")
        await until(lambda: seen(client) >= 60, "a crawl well under way", scraper)
        own_redis.stop(kill=True)
        await metric_becomes(port, "deeptarget_scraper_dependency_up", 0, scraper, dependency="redis")
        signalled = time.monotonic()
        await scraper.terminate(timeout_s=30)
        stopped_in = time.monotonic() - signalled
        await asyncio.to_thread(own_redis.start)
        second = await Scraper.start(settings, tmp_path / "second.log")
        await second.finished()
    assert stopped_in < 3 + settings.ingest_block_s, f"the stop waited for Redis: {stopped_in:.1f} s"
    assert_each_post_once(client, expected)
    print(f"\nSIGTERM while redis is away: exited in {stopped_in:.2f} s")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MB tmpfs as the blob directory (room for the sandbox's images, 10 MB), to be filled up and freed."""
    try:
        with small_tmpfs(tmp_path / "data" / "blobs", "32m") as mount_point:
            yield mount_point
    except CannotMount as why:
        pytest.skip(str(why))


async def test_a_full_blob_disk_holds_the_downloads_until_there_is_room(
    tmp_path: Path, own_redis: EmbeddedRedis, small_disk: Path
) -> None:
    network = big_network(73)
    server, _ = gated_sandbox(network)
    async with server:
        port = free_port()
        settings = outage_settings(tmp_path, own_redis, network, server.url, scraper_metrics_port=port,
                                  outage_max_wait_s=1.0)  # fmt: skip
        assert settings.blob_dir == small_disk
        expected = offered(network, settings)
        client = connect(own_redis)
        scraper = await Scraper.start(settings, tmp_path / "scraper.log")
        await until(lambda: seen(client) >= 60, "a crawl well under way", scraper)
        filler = await asyncio.to_thread(fill, small_disk)
        await metric_becomes(port, "deeptarget_scraper_dependency_up", 0, scraper, dependency="blobs")
        await asyncio.sleep(3)  # the outage, with the scraper waiting
        assert await metric(port, "deeptarget_scraper_dependency_up", dependency="blobs") == 0
        filler.unlink()
        recovery = await progress_after(client, scraper, time.monotonic())
        await scraper.finished()
    assert_each_post_once(client, expected)
    refs = queued_post_refs(client)
    assert not [r for r in refs if r["rejected"] not in (None, "not_an_image")], "a post was rejected for the disk"
    assert_one_outage_logged(scraper, "blobs")
    print(f"\nblob disk full, then freed: progress again {recovery:.2f} s after")


async def kill_mid_page(settings: Settings, gate: Gate, client: redis.Redis, log: Path) -> set[str]:
    """A scraper (one walk) killed with SIGKILL while it holds the claims of a page whose images it is downloading
    (held at the gate: nothing of that page is sent yet). Returns the posts it held."""
    scraper = await Scraper.start(settings, log)
    await until(lambda: seen(client) >= 30, "a crawl under way", scraper)
    gate.close("image")
    await until(lambda: gate.waiting["image"] > 0, "a download held mid-page", scraper)
    holders = {k.decode().removeprefix(keys.claim_key_prefix): client.get(k)
               for k in client.scan_iter(keys.claim_key_prefix + "*")}  # fmt: skip
    await scraper.kill()
    gate.open("image")
    assert holders, "no claim held mid-page"
    # Held under the scraper's stable name (host and data dir, or scraper_id), not a name of this process alone.
    assert set(holders.values()) == {ScraperIdentity(settings.data_dir, settings.scraper_id).base.encode()}
    return set(holders)


async def test_a_scraper_killed_mid_page_takes_its_own_claims_back_when_restarted(
    tmp_path: Path, own_redis: EmbeddedRedis
) -> None:
    """The claims last 900 s: collected in seconds, the restarted scraper took them back (same identity)."""
    network = big_network(74)
    server, gate = gated_sandbox(network)
    async with server:
        settings = outage_settings(tmp_path, own_redis, network, server.url, claim_ttl_s=900,
                                  target_concurrency=1, download_concurrency=4)  # fmt: skip
        expected = offered(network, settings)
        client = connect(own_redis)
        held = await kill_mid_page(settings, gate, client, tmp_path / "first.log")
        restarted = time.monotonic()
        scraper = await Scraper.start(settings, tmp_path / "second.log")
        recovery = await progress_after(client, scraper, restarted)
        await scraper.finished()
        complete = time.monotonic() - restarted
    assert held <= expected
    assert_each_post_once(client, expected)
    assert not list(client.scan_iter(keys.claim_key_prefix + "*"))
    assert complete < 60, "the claims were waited out, not taken back"
    print(
        f"\nscraper kill -9 mid-page, restarted: progress {recovery:.2f} s after the restart, all in {complete:.1f} s"
    )


async def test_posts_a_dead_scraper_held_come_back_in_the_same_run(tmp_path: Path, own_redis: EmbeddedRedis) -> None:
    """Scraper alpha dies holding a page; scraper beta (another identity) meets those posts HELD, sets them aside
    until alpha's claims must have run out (10 s, no heartbeat any more), and collects them in the same run."""
    network = big_network(75)
    server, gate = gated_sandbox(network)
    async with server:
        settings = outage_settings(tmp_path, own_redis, network, server.url, claim_ttl_s=10,
                                  target_concurrency=1, download_concurrency=4)  # fmt: skip
        expected = offered(network, settings)
        client = connect(own_redis)
        alpha = settings.model_copy(update={"scraper_id": "alpha"})
        held = await kill_mid_page(alpha, gate, client, tmp_path / "alpha.log")
        killed = time.monotonic()
        beta = settings.model_copy(update={"scraper_id": "beta", "target_concurrency": 4})
        scraper = await Scraper.start(beta, tmp_path / "beta.log", "--forever", "--interval", "600")
        await until(lambda: {r["post"]["id"] for r in queued_post_refs(client)} >= expected, "every post", scraper)
        complete = time.monotonic() - killed
        set_aside = int(client.hget(keys.scraper_stats_key, "held_for_later") or 0)
        await scraper.terminate()
    assert set_aside >= 1 and held <= expected
    assert_each_post_once(client, expected)
    assert complete < 10 + 30, complete
    print(
        f"\nscraper alpha kill -9 mid-page, beta running: every post {complete:.1f} s after the kill (claim TTL 10 s)"
    )


async def test_a_live_scraper_keeps_its_claims_past_their_ttl(tmp_path: Path, own_redis: EmbeddedRedis) -> None:
    """Scraper alpha waits on a download for longer than the claim TTL (3 s); scraper beta, started meanwhile on the
    same targets, must find alpha's posts HELD (alpha's heartbeat kept them), not fetch them a second time."""
    network = big_network(76)
    server, gate = gated_sandbox(network)
    async with server:
        settings = outage_settings(tmp_path, own_redis, network, server.url, claim_ttl_s=3,
                                  target_concurrency=1, download_concurrency=4)  # fmt: skip
        expected = offered(network, settings)
        client = connect(own_redis)
        alpha = await Scraper.start(settings, tmp_path / "alpha.log")
        await until(lambda: seen(client) >= 30, "a crawl under way", alpha)
        gate.hold_first = 1  # one image of alpha's page waits; the rest of its downloads go on
        gate.close("image")
        await until(lambda: gate.waiting["image"] >= 1, "a download held", alpha)
        await asyncio.sleep(settings.claim_ttl_s + 1)  # longer than the claims last without a heartbeat
        beta = await Scraper.start(settings.model_copy(update={"target_concurrency": 4}), tmp_path / "beta.log",
                                   "--forever", "--interval", "600")  # fmt: skip
        await until(lambda: int(client.hget(keys.scraper_stats_key, "held_for_later") or 0) >= 1,
                    "beta to meet alpha's held posts", beta)  # fmt: skip
        gate.open("image")
        await alpha.finished()
        await until(lambda: {r["post"]["id"] for r in queued_post_refs(client)} >= expected, "every post", beta)
        await beta.terminate()
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/sandbox/stats") as response:
            fetches = (await response.json())["image_fetches"]
    assert_each_post_once(client, expected)
    assert max(fetches.values()) == 1, "an image was fetched by both scrapers"


async def test_sigterm_mid_crawl_of_many_targets_starts_none_of_those_pending(
    tmp_path: Path, own_redis: EmbeddedRedis
) -> None:
    """Item 8: three walks blocked on their next Graph request, a dozen targets waiting; SIGTERM; once the scraper
    has taken the stop, the gate opens. No Graph request may come after the signal: not for a target not started
    (half of the hashtags need no search first: their ids are cached), not even for another page."""
    network = SandboxNetwork(seed=77, n_posts=300, n_users=8, n_hashtags=10)
    server, gate = gated_sandbox(network)
    async with server:
        settings = outage_settings(tmp_path, own_redis, network, server.url, target_concurrency=3, page_size=5)
        expected = offered(network, settings)
        client = connect(own_redis)
        for hashtag in network.hashtags[::2]:
            client.hset(keys.hashtag_ids_key, hashtag, str(network.hashtag_id(hashtag)))
        scraper = await Scraper.start(settings, tmp_path / "first.log")
        await until(lambda: seen(client) >= 20, "a crawl under way", scraper)
        gate.close("graph")
        await until(lambda: gate.waiting["graph"] == settings.target_concurrency, "every walk held", scraper)
        started = gate.targets(network)
        signalled = time.time()
        scraper.process.send_signal(signal.SIGTERM)
        await until(lambda: "stop requested" in scraper.text(), "the scraper to take the stop", scraper)
        gate.open("graph")
        await scraper.finished(timeout_s=30)
        pending = {"#" + h for h in network.hashtags} | {a.username for a in network.accounts}
        assert len(pending - started) >= 8, "too few targets left to prove anything"
        after = [(path, query) for at, path, query in gate.log if at > signalled]
        assert after == [], f"Graph requests after SIGTERM: {after[:5]}"
        assert gate.targets(network) == started
        second = await Scraper.start(settings, tmp_path / "second.log")
        await second.finished()
    assert_each_post_once(client, expected)


def test_the_blob_store_tells_a_full_disk_from_a_bad_write(small_disk: Path) -> None:
    from deeptarget.store.blobs import BlobStore, StorageUnavailable

    store = BlobStore(small_disk)
    filler = fill(small_disk)
    with pytest.raises(StorageUnavailable) as caught:
        store.put(os.urandom(256 * 1024))
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(StorageUnavailable):
        store.probe()
    assert not list((small_disk / "tmp").iterdir()), "a failed write left its temporary file"
    filler.unlink()
    store.probe()
    assert store.put(b"fits now") in store
