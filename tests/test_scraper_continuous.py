"""The scraper as a long-running process: pushed posts are taken as they arrive (during a round and between rounds,
never only once a round), and SIGTERM ends it quickly without starting anything new."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import redis
import redis.asyncio as aioredis

from deeptarget.core import keys
from deeptarget.core.records import Owner, Post
from deeptarget.core.settings import Settings
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.scraper.push import MAX_DELIVERIES, IngestStream
from tests.helpers import assert_each_image_once, crawl_settings, server_stats
from tests.queue_messages import queued_post_refs


async def start_scraper(settings: Settings, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deeptarget", "scrape", *args, env={**os.environ, **settings.to_env()},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def wait_queued(
    client: redis.Redis, post_id: str, process: asyncio.subprocess.Process, timeout_s: float
) -> float:
    """Seconds until ``post_id`` is on the infer queue (the scraper must stay up meanwhile)."""
    started = time.monotonic()
    while post_id not in {r["post"]["id"] for r in queued_post_refs(client)}:
        assert process.returncode is None, "the scraper exited"
        assert time.monotonic() - started < timeout_s, f"post {post_id} not queued in {timeout_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def stop(process: asyncio.subprocess.Process, timeout_s: float = 30) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    assert process.returncode == 0, stderr.decode()[-2000:]
    return stderr.decode()


async def test_pushed_posts_are_taken_as_they_arrive_by_a_scraper_that_runs_forever(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=61, n_posts=40, n_users=4, n_hashtags=2, corrupt_share=0.0, video_share=0.0,
                             carousel_share=0.0)  # fmt: skip
    async with sandbox_server(network) as server:
        # Targets to crawl, then a 600 s wait for the next round: pushed posts must not wait for it.
        settings = crawl_settings(tmp_path, redis_url, network, server.url, hashtags=network.hashtags[:1])
        scraper = await start_scraper(settings, "--forever", "--interval", "600")
        client = aioredis.Redis.from_url(redis_url)
        stream = IngestStream(client)
        owner = Owner(id="partner-1", username="partner", followers_count=100)
        try:
            pushed = [m for m in network.media if network.hashtags[0] not in m.hashtags][:6]
            assert pushed
            waits = []
            for media in pushed:  # one at a time, as a trickle
                post = Post(id=f"push-{media.id}", source="push", media_url=f"{server.url}/media/{media.id}.jpg",
                            caption=media.caption, owner=owner)  # fmt: skip
                await stream.push([post])
                waits.append(await wait_queued(redis_client, post.id, scraper, timeout_s=30))
            while await stream.backlog():  # acknowledged (and deleted) a moment after it is queued
                assert scraper.returncode is None
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
            await stop(scraper)
    ids = Counter(r["post"]["id"] for r in queued_post_refs(redis_client))
    assert all(ids[f"push-{m.id}"] == 1 for m in pushed)
    assert max(ids.values()) == 1
    assert redis_client.xlen(keys.ingest_stream) == 0
    print("push -> infer queue, s:", [round(w, 2) for w in waits])  # shown with -s


async def test_a_scraper_with_nothing_to_crawl_only_follows_the_stream_and_stops_at_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=62, n_posts=5, n_users=2, n_hashtags=1, corrupt_share=0.0, video_share=0.0,
                             carousel_share=0.0)  # fmt: skip
    async with sandbox_server(network) as server:
        settings = crawl_settings(tmp_path, redis_url, network, server.url, hashtags=[], accounts=[])
        scraper = await start_scraper(settings, "--forever")
        client = aioredis.Redis.from_url(redis_url)
        try:
            media = network.media[0]
            post = Post(id="lonely", source="push", media_url=f"{server.url}/media/{media.id}.jpg")
            await IngestStream(client).push([post])
            await wait_queued(redis_client, "lonely", scraper, timeout_s=30)
        finally:
            await client.aclose()
            started = time.monotonic()
            await stop(scraper)
            stopped_in = time.monotonic() - started
    # The blocking read wakes within ingest_block_s; 2 s for the rest, a margin for a loaded machine.
    assert stopped_in < 2 + settings.ingest_block_s + 5


async def test_sigterm_starts_nothing_new_and_exits_fast_and_a_restart_collects_every_post_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=63, n_posts=200, n_users=6, n_hashtags=10)
    async with sandbox_server(network) as server:
        settings = crawl_settings(tmp_path, redis_url, network, server.url, page_size=5, target_concurrency=1,
                                  download_concurrency=2, http_timeout_s=5.0)  # fmt: skip
        first = await start_scraper(settings)
        while redis_client.scard(keys.seen_posts_key) < 15:
            assert first.returncode is None, (await first.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]
            await asyncio.sleep(0.02)
        signalled = time.time()
        await stop(first)
        exited = time.time()
        exited_in = exited - signalled
        await asyncio.sleep(0.5)  # anything still on its way from the first process would arrive meanwhile
        stats = await server_stats(server.url)
        searches_after = [t for t in stats["hashtag_search_times"] if t > signalled + 0.05]
        graph_calls_after_exit = sum(1 for times in stats["calls"].values() for t in times if t > exited)

        second = await start_scraper(settings)
        _, stderr = await asyncio.wait_for(second.communicate(), timeout=180)
        assert second.returncode == 0, stderr.decode()[-2000:]
        stats = await server_stats(server.url)
    # "the process exits within 2 s plus one in-flight request's timeout" (issue 11); a margin for a busy machine.
    assert exited_in < 2 + settings.http_timeout_s + 3, exited_in
    assert searches_after == [] and graph_calls_after_exit == 0
    offered = network.offered(settings.hashtags, settings.accounts, settings.hashtag_edge)
    assert_each_image_once(redis_client, stats, offered)


async def test_a_pushed_entry_that_keeps_coming_back_unhandled_goes_to_the_dead_letters(redis_url: str) -> None:
    """A poison pill must not come back forever (issue 12, H2): after MAX_DELIVERIES takes without an ack, the entry
    is moved to deeptarget:ingest:dead with its reason, and the entries behind it go on."""
    client = aioredis.Redis.from_url(redis_url)
    stream = IngestStream(client)
    try:
        await stream.push([Post(id="poison", source="push", media_url="http://x.example/p.jpg")])
        for _ in range(MAX_DELIVERIES):  # taken, and each time the scraper died before its ack
            assert [p.id for _, p in await stream.take("dying", 10, idle_ms=0)] == ["poison"]
        await stream.push([Post(id="innocent", source="push", media_url="http://x.example/i.jpg")])
        taken = await stream.take("healthy", 10, idle_ms=0)
        assert [p.id for _, p in taken] == ["innocent"]
        dead = await client.xrange(keys.ingest_dead_stream)
        assert len(dead) == 1 and b"delivered 6 times" in dead[0][1][b"reason"] and b"poison" in dead[0][1][b"post"]
        await stream.ack([entry for entry, _ in taken])
        assert await stream.backlog() == 0
    finally:
        await client.aclose()
