"""The Graph API's hashtag quota: an IG user may search at most 30 unique hashtags in a rolling 7 days. Tracked in
Redis (shared by every scraper process) and enforced before calling, since the API's own answer to the 31st is an
error that also counts against the app. Hashtag ids are cached: searching a hashtag again costs nothing here."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from deeptarget.core import keys
from deeptarget.core.replies import deferred

# KEYS[1] the user's ZSET; ARGV now, window seconds, limit, hashtag. 1 = allowed (and counted), 0 = over quota.
_ALLOW = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 1 end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
  return 1
end
return 0
"""


class HashtagQuota:
    def __init__(self, redis: aioredis.Redis, user_id: str, limit: int = 30, days: float = 7.0) -> None:
        self.redis = redis
        self.key = keys.hashtag_queries_key_prefix + user_id
        self.limit = limit
        self.window_s = days * 86400
        self._allow = redis.register_script(_ALLOW)

    async def allow(self, hashtag: str) -> bool:
        """May ``hashtag`` be searched now? Counts it when it is new in the window."""
        return bool(await self._allow(keys=[self.key], args=[time.time(), self.window_s, self.limit, hashtag]))

    async def cached_id(self, hashtag: str) -> str | None:
        value = await deferred(self.redis.hget(keys.hashtag_ids_key, hashtag))
        return (value.decode() if isinstance(value, bytes) else value) or None

    async def remember_id(self, hashtag: str, hashtag_id: str) -> None:
        await deferred(self.redis.hset(keys.hashtag_ids_key, hashtag, hashtag_id))
