"""Which posts to fetch: dedup across restarts and across several scraper processes, in Redis.

A post goes through ``claim`` (a lease with a TTL) and then ``commit`` (the post id joins the seen set once its
reference is on the queue). A post in the seen set is never fetched again.

A claim names its holder by the scraper's identity (``ScraperIdentity``: the same after a restart), so a restarted
scraper takes back at once what it held when it died, and a scraper that lived through a Redis outage finds its
claims its own. Two live processes never share an identity (each holds a lock file of its own), and within one
process a post held by one of its walks is ``MINE`` to the others. While a holder lives, ``refresh`` (its heartbeat)
keeps its claims from running out, so the TTL can be short: a dead holder's posts are free again within it.
"""

from __future__ import annotations

import fcntl
import hashlib
import socket
import uuid
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import IO

import redis.asyncio as aioredis

from deeptarget.core import keys
from deeptarget.core.replies import deferred

# KEYS[1] seen set, KEYS[2] claim key; ARGV post id, owner, ttl. A claim of this owner is taken again (the same
# scraper before a restart or an outage); the process keeps two of its own walks apart (PostClaims._mine).
_CLAIM = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return -1 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""
# Only the holder may release a claim.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] seen set, KEYS[2..] claim keys; ARGV owner, ttl, then the post ids. Each claim of ours gets a new TTL; one
# that ran out (an outage longer than the TTL) is taken again if nobody took it meanwhile and it is not seen. Returns
# 1 (still ours) or 0 (lost) per key.
_REFRESH = """
local out = {}
for i = 2, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then
    redis.call('EXPIRE', KEYS[i], ARGV[2])
    out[i - 1] = 1
  elseif not holder and redis.call('SISMEMBER', KEYS[1], ARGV[i + 1]) == 0 then
    redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
    out[i - 1] = 1
  else
    out[i - 1] = 0
  end
end
return out
"""


class Claim(IntEnum):
    TAKEN = 1  # ours to fetch
    SEEN = 0  # fetched before: never again
    HELD = -1  # another scraper is on it (or died on it: the claim runs out within its TTL)
    MINE = 2  # another walk of this process is on it right now


class ScraperIdentity:
    """A scraper's stable name: ``scraper_id`` (or this host and data dir) plus a slot, the first free one. A slot is
    an exclusively locked file in the data dir: the kernel frees it when the process dies, however it dies, so a
    restart gets the same name back and two live processes never get the same one."""

    def __init__(self, data_dir: Path, scraper_id: str | None = None) -> None:
        self.dir = Path(data_dir) / "scraper-slots"
        digest = hashlib.blake2b(str(Path(data_dir).resolve()).encode(), digest_size=4).hexdigest()
        self.base = scraper_id or f"{socket.gethostname()}-{digest}"
        self.name = ""
        self._lock: IO[bytes] | None = None

    def acquire(self) -> str:
        if self._lock is not None:
            return self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.base)[:100]
        slot = 0
        while True:
            handle = open(self.dir / f"{safe}.{slot}.lock", "ab")  # noqa: SIM115 - held for the process's life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                slot += 1
                continue
            self._lock = handle
            self.name = self.base if slot == 0 else f"{self.base}.{slot}"
            return self.name

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the lock
            self._lock = None


class PostClaims:
    def __init__(self, redis: aioredis.Redis, ttl_s: int = 60, owner: str | None = None) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.owner = owner or uuid.uuid4().hex
        self._reserved: set[str] = set()  # a walk of this process is claiming these (across retries of the claim)
        self._mine: set[str] = set()  # claims this process holds (its heartbeat keeps them)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._refresh = redis.register_script(_REFRESH)

    async def claim(self, post_id: str) -> Claim:
        """``reserve`` then ``take``: what a caller that does not retry the Redis call needs."""
        if not self.reserve(post_id):
            return Claim.MINE
        claim = Claim.HELD
        try:
            claim = await self.take(post_id)
        finally:
            self.settle(post_id, claim)
        return claim

    def reserve(self, post_id: str) -> bool:
        """False when another walk of this process holds or is claiming the post; else it is reserved for the
        caller until ``settle``, however long its ``take`` waits for Redis."""
        if post_id in self._reserved or post_id in self._mine:
            return False
        self._reserved.add(post_id)
        return True

    async def take(self, post_id: str) -> Claim:
        """The claim in Redis, for a reserved post (idempotent: a claim of our own is ours again)."""
        lua_keys = [keys.seen_posts_key, keys.claim_key_prefix + post_id]
        return Claim(int(await self._claim(keys=lua_keys, args=[post_id, self.owner, self.ttl_s])))

    def settle(self, post_id: str, claim: Claim) -> None:
        """The reservation ends: the post is ours to keep alive if it was TAKEN."""
        self._reserved.discard(post_id)
        if claim is Claim.TAKEN:
            self._mine.add(post_id)

    @property
    def held(self) -> set[str]:
        return set(self._mine)

    def forget(self, post_ids: Sequence[str]) -> None:
        """No longer ours to keep alive (committed, released, or lost), whatever Redis says."""
        self._mine.difference_update(post_ids)

    async def commit(self, post_ids: Sequence[str]) -> None:
        """These posts are on the queue: mark them seen for good and drop the leases."""
        if not post_ids:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(keys.seen_posts_key, *post_ids)
            pipe.hdel(keys.download_failures_key, *post_ids)
            pipe.delete(*(keys.claim_key_prefix + p for p in post_ids))
            await pipe.execute()
        self.forget(post_ids)

    async def release(self, post_ids: Sequence[str]) -> None:
        """Give posts back unfetched (shutdown, transient failure): another run may take them at once."""
        for post_id in post_ids:
            await self._release(keys=[keys.claim_key_prefix + post_id], args=[self.owner])
        self.forget(post_ids)

    async def refresh(self, post_ids: Sequence[str] | None = None) -> set[str]:
        """The heartbeat: a new TTL for ``post_ids`` (default: every claim this process holds), taken again where it
        ran out and is still free. Returns those no longer ours (another scraper took them, or saw them through):
        they are forgotten, and must not be sent."""
        ids = sorted(self._mine if post_ids is None else set(post_ids))
        if not ids:
            return set()
        lua_keys = [keys.seen_posts_key, *(keys.claim_key_prefix + p for p in ids)]
        flags = await self._refresh(keys=lua_keys, args=[self.owner, self.ttl_s, *ids])
        lost = {p for p, ours in zip(ids, flags, strict=True) if not int(ours)}
        self.forget(list(lost))
        return lost

    async def download_failed(self, post_id: str) -> int:
        """Counts a failed download of the post (retries spent); returns how many it has had. ``commit`` clears it."""
        return int(await deferred(self.redis.hincrby(keys.download_failures_key, post_id, 1)))

    async def is_seen(self, post_id: str) -> bool:
        return bool(await deferred(self.redis.sismember(keys.seen_posts_key, post_id)))

    # One set per source besides the crawl's own: the store takes a post's owner only from the source that stored
    # the post (issue 12, M4), so an instaloader folder that names an owner for a Graph post's id must not mark
    # that post's owner as known and keep the Graph account crawl from sending the real one.
    @staticmethod
    def _owner_known_key(source: str | None) -> str:
        return keys.owner_known_key if source is None else f"{keys.owner_known_key}:{source}"

    async def owner_known(self, post_ids: Sequence[str], source: str | None = None) -> list[bool]:
        if not post_ids:
            return []
        flags = await deferred(self.redis.smismember(self._owner_known_key(source), list(post_ids)))
        return [bool(f) for f in flags]

    async def mark_owner_known(self, post_ids: Sequence[str], source: str | None = None) -> None:
        if post_ids:
            await deferred(self.redis.sadd(self._owner_known_key(source), *post_ids))
