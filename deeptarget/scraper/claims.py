"""Which posts to fetch: dedup across restarts and across several scraper processes, in Redis.

A post goes through ``claim`` (a lease with a TTL, so a crashed scraper's posts come back) and then ``commit``
(the post id joins the seen set once its reference is on the queue). A post in the seen set is never fetched again.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from enum import IntEnum

import redis.asyncio as aioredis

from deeptarget import constants

# KEYS[1] seen set, KEYS[2] claim key; ARGV post id, owner, ttl. Not re-entrant: two crawls of one process that
# meet the same post at once must not both fetch it.
_CLAIM = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ARGV[3]) then return 1 end
return -1
"""
# Only the holder may release a claim.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Claim(IntEnum):
    TAKEN = 1  # ours to fetch
    SEEN = 0  # fetched before: never again
    HELD = -1  # another scraper is on it right now


class PostClaims:
    def __init__(self, redis: aioredis.Redis, ttl_s: int = 900, owner: str | None = None) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.owner = owner or uuid.uuid4().hex
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, post_id: str) -> Claim:
        keys = [constants.seen_posts_key, constants.claim_key_prefix + post_id]
        return Claim(int(await self._claim(keys=keys, args=[post_id, self.owner, self.ttl_s])))

    async def commit(self, post_ids: Sequence[str]) -> None:
        """These posts are on the queue: mark them seen for good and drop the leases."""
        if not post_ids:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(constants.seen_posts_key, *post_ids)
            pipe.hdel(constants.download_failures_key, *post_ids)
            pipe.delete(*(constants.claim_key_prefix + p for p in post_ids))
            await pipe.execute()

    async def release(self, post_ids: Sequence[str]) -> None:
        """Give posts back unfetched (shutdown, transient failure): another run may take them at once."""
        for post_id in post_ids:
            await self._release(keys=[constants.claim_key_prefix + post_id], args=[self.owner])

    async def download_failed(self, post_id: str) -> int:
        """Counts a failed download of the post (retries spent); returns how many it has had. ``commit`` clears it."""
        return int(await self.redis.hincrby(constants.download_failures_key, post_id, 1))

    async def is_seen(self, post_id: str) -> bool:
        return bool(await self.redis.sismember(constants.seen_posts_key, post_id))

    async def owner_known(self, post_ids: Sequence[str]) -> list[bool]:
        if not post_ids:
            return []
        flags = await self.redis.smismember(constants.owner_known_key, list(post_ids))
        return [bool(f) for f in flags]

    async def mark_owner_known(self, post_ids: Sequence[str]) -> None:
        if post_ids:
            await self.redis.sadd(constants.owner_known_key, *post_ids)
