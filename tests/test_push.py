"""Push ingestion: JSON lines validated record by record, queued on a Redis stream, fetched by the scraper once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import redis
import redis.asyncio as aioredis
from aiohttp import web
from pydantic import SecretStr

from deeptarget.api.app import create_app
from deeptarget.core import keys
from deeptarget.runtime.app_server import AppServer
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.scraper.push import IngestStream, parse_posts
from tests.helpers import crawl, crawl_settings, image_url, pushable, server_stats
from tests.queue_messages import queued_post_refs


def records(url: str, network: SandboxNetwork) -> list[str]:
    return [
        json.dumps({"id": m.id, "media_url": image_url(url, m), "caption": m.caption,
                    "hashtags": ["#Partner"], "like_count": 3, "owner": {"id": m.owner.id, "followers_count": 10}})
        for m in pushable(network)
    ]  # fmt: skip


def test_each_record_is_validated_alone_with_its_line_number() -> None:
    lines = [
        '{"id": "1", "media_url": "https://cdn.example/1.jpg", "hashtags": ["#Sushi"]}',
        "",
        "{not json",
        '{"media_url": "https://cdn.example/2.jpg"}',
        '{"id": "3", "media_url": "file:///etc/passwd"}',
        '{"id": "4", "media_url": "https://cdn.example/4.jpg", "like_count": -5}',
        "[1, 2]",
        '{"id": "5", "media_url": "http://cdn.example/5.jpg"}',
    ]
    posts, bad = parse_posts(lines)
    assert [p.id for p in posts] == ["1", "5"] and posts[0].hashtags == ["sushi"] and posts[0].source == "push"
    assert [b.line for b in bad] == [3, 4, 5, 6, 7]
    assert "not JSON" in bad[0].reason and "id" in bad[1].reason and "media_url" in bad[2].reason
    assert "like_count" in bad[3].reason and "JSON object" in bad[4].reason


async def test_pushed_posts_are_fetched_once_even_when_a_scraper_died_holding_them(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=51, n_posts=40, n_users=4, n_hashtags=2, corrupt_share=0.0)
    pushed = {m.id for m in pushable(network)}
    assert len(pushed) >= 15
    async with sandbox_server(network) as server:
        settings = crawl_settings(tmp_path, redis_url, network, server.url, hashtags=[], accounts=[], claim_ttl_s=1)
        posts, bad = parse_posts(records(server.url, network))
        assert not bad and len(posts) == len(pushed)
        client = aioredis.Redis.from_url(redis_url)
        stream = IngestStream(client)
        await stream.push(posts)
        await stream.take("a-scraper-that-dies", 5, idle_ms=1000)  # taken, never acknowledged
        await asyncio.sleep(1.1)
        counts = await crawl(settings)
        await stream.push(posts[:5])  # pushed again: already seen, not fetched again
        again = await crawl(settings)
        assert await stream.backlog() == 0
        await client.aclose()
        stats = await server_stats(server.url)
    ids = Counter(ref["post"]["id"] for ref in queued_post_refs(redis_client))
    assert set(ids) == pushed and max(ids.values()) == 1
    assert set(stats["image_fetches"]) == pushed and max(stats["image_fetches"].values()) == 1
    assert counts["enqueued"] == len(pushed) and again["duplicate"] == 5
    ref = next(r for r in queued_post_refs(redis_client))
    assert ref["post"]["hashtags"] == ["partner"] and ref["post"]["owner"]["followers_count"] == 10


async def test_ingest_endpoint_and_enqueue_command(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    network = SandboxNetwork(seed=52, n_posts=8, n_users=2, n_hashtags=1, corrupt_share=0.0)
    lines = records("http://127.0.0.1:9", network)[:6]
    assert len(lines) == 6
    settings = crawl_settings(tmp_path, redis_url, network, "http://127.0.0.1:9", api_key=SecretStr("k"))
    body = "\n".join([*lines[:3], '{"id": "x"}']).encode()
    async with AppServer(create_app(settings)) as server, aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/ingest", data=body) as response:
            assert response.status == 401
        async with http.post(f"{server.url}/ingest", data=body, headers={"X-API-Key": "k"}) as response:
            assert response.status == 202
            answer = await response.json()
        async with http.post(f"{server.url}/ingest", data=b"[{]", headers={"X-API-Key": "k"}) as response:
            assert response.status == 400 and "JSON array" in (await response.json())["error"]
    assert answer["accepted"] == 3 and answer["rejected"][0]["line"] == 4
    assert "media_url" in answer["rejected"][0]["reason"]

    feed = tmp_path / "posts.jsonl"
    feed.write_text("\n".join([*lines[3:], "garbage"]) + "\n")
    env = os.environ | settings.to_env()
    done = subprocess.run([sys.executable, "-m", "deeptarget", "enqueue", str(feed)], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3 posts queued" in done.stdout and f"{feed}:4: rejected: not JSON" in done.stderr
    assert redis_client.xlen(keys.ingest_stream) == 6


async def test_a_partner_feed_over_http_is_read_each_round(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=53, n_posts=8, n_users=2, n_hashtags=1, corrupt_share=0.0)
    pushed = {m.id for m in pushable(network)}
    assert any(network.media_by_id[i].kind == "CAROUSEL_ALBUM" for i in pushed)  # an album's first picture too
    async with sandbox_server(network) as sandbox:
        feed_body = "\n".join([*records(sandbox.url, network), '{"id": "no-image"}']) + "\n"

        async def feed(request: web.Request) -> web.Response:
            return web.Response(text=feed_body, content_type="application/x-ndjson")

        app = web.Application()
        app.router.add_get("/feed.jsonl", feed)
        async with AppServer(app) as partner:
            feeds = [f"{partner.url}/feed.jsonl", f"{partner.url}/gone.jsonl"]
            settings = crawl_settings(tmp_path, redis_url, network, sandbox.url, hashtags=[], accounts=[],
                                      jsonl_feeds=feeds)  # fmt: skip
            counts = await crawl(settings)
            again = await crawl(settings)
    ids = Counter(ref["post"]["id"] for ref in queued_post_refs(redis_client))
    assert set(ids) == pushed and max(ids.values()) == 1
    assert counts["feed_rejected"] == 1 and counts["feed_error"] == 1  # the bad line, the 404 feed
    assert counts["enqueued"] == len(pushed) and again["duplicate"] == len(pushed) and "enqueued" not in again
