"""Resumable crawl positions per (source, kind, target), in Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from deeptarget.core import keys
from deeptarget.core.replies import deferred

DONE = "\x00done"


class CursorStore:
    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self.redis = redis
        self.source = source

    def _field(self, kind: str, target: str) -> str:
        return f"{self.source}|{kind}|{target}"

    async def _read(self, kind: str, target: str) -> str | None:
        value = await deferred(self.redis.hget(keys.cursor_key, self._field(kind, target)))
        return value.decode() if isinstance(value, bytes) else value

    async def get(self, kind: str, target: str) -> str | None:
        """The cursor of the next page to fetch; None to start at the beginning."""
        value = await self._read(kind, target)
        return None if value == DONE else value

    async def save(self, kind: str, target: str, cursor: str) -> None:
        await deferred(self.redis.hset(keys.cursor_key, self._field(kind, target), cursor))

    async def mark_done(self, kind: str, target: str) -> None:
        await deferred(self.redis.hset(keys.cursor_key, self._field(kind, target), DONE))

    async def is_done(self, kind: str, target: str) -> bool:
        return await self._read(kind, target) == DONE

    async def reset(self, kind: str, target: str) -> None:
        field = self._field(kind, target)
        await deferred(self.redis.hdel(keys.cursor_key, field, field + "|failed"))

    async def mark_failed(self, kind: str, target: str) -> None:
        """The target's last crawl ended on an error: its cursor stays, but it does not hold the round open."""
        await deferred(self.redis.hset(keys.cursor_key, self._field(kind, target) + "|failed", "1"))

    async def clear_failed(self, kind: str, target: str) -> None:
        await deferred(self.redis.hdel(keys.cursor_key, self._field(kind, target) + "|failed"))

    async def failed(self, kind: str, target: str) -> bool:
        return bool(await deferred(self.redis.hexists(keys.cursor_key, self._field(kind, target) + "|failed")))
