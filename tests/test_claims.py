from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from deeptarget.core import keys
from deeptarget.scraper.claims import Claim, PostClaims, ScraperIdentity
from deeptarget.scraper.cursors import CursorStore


async def test_a_post_is_claimed_once_then_never_again(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    first, second = PostClaims(client), PostClaims(client)
    assert await first.claim("p1") is Claim.TAKEN
    assert await first.claim("p1") is Claim.MINE  # one fetch even within a process (its walks share a holder)
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


async def test_a_scraper_takes_its_own_claims_back_and_its_heartbeat_keeps_them(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    before, after = PostClaims(client, owner="scraper-a"), PostClaims(client, owner="scraper-a")  # a restart
    other = PostClaims(client)
    assert await before.claim("p1") is Claim.TAKEN and await before.claim("p2") is Claim.TAKEN
    assert await other.claim("p1") is Claim.HELD
    assert await after.claim("p1") is Claim.TAKEN  # the same scraper, restarted: its own claim
    await client.delete(keys.claim_key_prefix + "p1", keys.claim_key_prefix + "p2")  # ran out (an outage)
    assert await other.claim("p2") is Claim.TAKEN
    assert await after.refresh() == set()  # p1 free again: taken back
    assert await before.refresh() == {"p2"}  # p2 another scraper took meanwhile: lost, not kept alive
    assert before.held == {"p1"} and await other.claim("p1") is Claim.HELD
    await client.aclose()


def test_two_live_processes_never_share_an_identity_and_a_restart_gets_its_own_back(tmp_path: Path) -> None:
    first, second = ScraperIdentity(tmp_path), ScraperIdentity(tmp_path)
    name = first.acquire()
    assert second.acquire() == f"{name}.1"  # the slot is taken while the first lives
    first.release()  # it died: the kernel dropped its lock
    assert ScraperIdentity(tmp_path).acquire() == name
    assert ScraperIdentity(tmp_path / "other", scraper_id="alpha").acquire() == "alpha"
    second.release()
