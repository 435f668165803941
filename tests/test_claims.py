from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from deeptarget.scraper.claims import Claim, PostClaims
from deeptarget.scraper.cursors import CursorStore


async def test_a_post_is_claimed_once_then_never_again(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    first, second = PostClaims(client), PostClaims(client)
    assert await first.claim("p1") is Claim.TAKEN
    assert await first.claim("p1") is Claim.HELD  # not re-entrant: one fetch even within a process
    assert await second.claim("p1") is Claim.HELD
    await first.commit(["p1"])
    assert await second.claim("p1") is Claim.SEEN
    assert await first.is_seen("p1")
    await client.aclose()


async def test_released_and_expired_claims_become_available(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    first, second = PostClaims(client, ttl_s=1), PostClaims(client)
    assert await first.claim("p1") is Claim.TAKEN
    await second.release(["p1"])  # only the holder may release
    assert await second.claim("p1") is Claim.HELD
    await first.release(["p1"])
    assert await second.claim("p1") is Claim.TAKEN
    assert await first.claim("p2") is Claim.TAKEN
    await asyncio.sleep(1.2)  # a crashed scraper's lease runs out (ttl 1 s)
    assert await second.claim("p2") is Claim.TAKEN
    await client.aclose()


async def test_cursors_resume_and_finish(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    cursors = CursorStore(client, "graph")
    assert await cursors.get("hashtag", "sushi") is None
    await cursors.save("hashtag", "sushi", "QVFIUmx")
    assert await CursorStore(client, "graph").get("hashtag", "sushi") == "QVFIUmx"
    assert await CursorStore(client, "other-source").get("hashtag", "sushi") is None
    await cursors.mark_done("hashtag", "sushi")
    assert await cursors.is_done("hashtag", "sushi") and await cursors.get("hashtag", "sushi") is None
    await cursors.reset("hashtag", "sushi")
    assert not await cursors.is_done("hashtag", "sushi")
    await client.aclose()
