"""Posts whose image download failed wait here for a while before they go back on the ingest stream.

With a scraper that follows the ingest stream all the time, a failed post pushed straight back would be tried again
within seconds, and an image host that is down for a few minutes would see every one of its posts spend all of its
``max_download_failures`` at once. So a failed post waits ``download_retry_delay_s`` in a sorted set (scored by
when it is due), and a Lua script moves due posts onto the stream, atomically: a crash loses none and doubles none.
A new scraper process releases everything waiting, so "a later run" still tries every one of them.

Posts another scraper held when this one met them wait here too, until that claim must have run out (a holder that
died never brings them back, and the walk that met them has moved past their page).
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis

from deeptarget.core import keys
from deeptarget.core.records import Post

# KEYS[1] the waiting set, KEYS[2] the ingest stream; ARGV now, most to move. Returns how many moved.
_RELEASE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, post in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'post', post)
  redis.call('ZREM', KEYS[1], post)
end
return #due
"""


class RetryLater:
    def __init__(self, redis: aioredis.Redis, delay_s: float) -> None:
        self.redis = redis
        self.delay_s = delay_s
        self._release = redis.register_script(_RELEASE)

    async def put(self, posts: list[Post], delay_s: float | None = None) -> None:
        """Back on the ingest stream in ``delay_s`` (default: the download retry delay)."""
        if posts:
            due = time.time() + (self.delay_s if delay_s is None else delay_s)
            await self.redis.zadd(keys.ingest_later_key, {p.model_dump_json(): due for p in posts})

    async def release(self, everything: bool = False, most: int = 1000) -> int:
        """Move the posts that are due (``everything``: all of them) onto the ingest stream; returns how many."""
        now = math.inf if everything else time.time()
        lua_keys = [keys.ingest_later_key, keys.ingest_stream]
        moved = 0
        while True:
            n = int(await self._release(keys=lua_keys, args=["+inf" if now == math.inf else repr(now), most]))
            moved += n
            if n < most:
                return moved

    async def waiting(self) -> int:
        return int(await self.redis.zcard(keys.ingest_later_key))
