"""Access tokens as a shared, polite budget: each token makes at most ``calls`` requests in any ``window_s`` seconds,
across every scraper process (a sliding window in Redis, checked and taken atomically by a Lua script); a throttled
token pauses (``Retry-After``, ``estimated_time_to_regain_access``, or usage headers near 100%); a throttled *app*
(Graph error #4, the app's own limit) pauses every token of that app; a token the API calls invalid (OAuth error
190) is retired. Requests go to the token that is free soonest.

A leaky bucket (aiolimiter) would allow a burst of ``calls`` on top of the steady rate, i.e. up to twice the budget in
one window; the Graph API counts calls in a rolling hour, hence the sliding window. A call is logged when it is taken
and logged again when its answer came: a request that waited for a pooled connection reaches the server later than
it was taken, and the server counts it when it arrives. Tokens are named by fingerprint
(a hash prefix) in Redis, logs and stats, never by value.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from deeptarget.core import keys
from deeptarget.core.errors import CrawlStopped, SourceError
from deeptarget.core.replies import deferred
from deeptarget.scraper.stopping import sleep_or_stop

LOG = logging.getLogger(__name__)

# KEYS[1] the token's call log (ZSET of call ids scored by time), KEYS[2] its pause key, KEYS[3] its app's pause key.
# ARGV now, window, calls, call id, arrival margin. Returns 0 when the call was taken, else the seconds to wait.
# A call is scored ``margin`` after it is taken, the latest it is expected to reach the server: scored at the take,
# a call still on its way (waiting for a connection, or the event loop) left the window before the server's window
# let it go, and the next call could make one too many there (13 in 1 s against a budget of 12, in a loaded CI run).
# Its answer rescores it (``done``), so a fast call gives the margin back at once.
_TAKE = """
local pause = math.max(redis.call('PTTL', KEYS[2]), redis.call('PTTL', KEYS[3]))
if pause > 0 then return tostring(pause / 1000) end
local now, window, calls = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local margin = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < calls then
  redis.call('ZADD', KEYS[1], now + margin, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil((window + margin) * 1000))
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:10]


DEFAULT_APP = "default"
ARRIVAL_MARGIN_S = 0.25  # how late after its take a call may still reach the server (see _TAKE)


@dataclass(frozen=True)
class Lease:
    token: str = field(repr=False)
    fingerprint: str
    call_id: str
    app: str = DEFAULT_APP


class TokenPool:
    """``tokens``: the access tokens; ``apps``: the app each belongs to, by token (missing: ``DEFAULT_APP``)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        tokens: list[str],
        calls: int,
        window_s: float,
        apps: dict[str, str] | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        if not tokens:
            raise SourceError("no access token configured (access_tokens)")
        self.redis = redis
        self.calls = calls
        self.window_s = window_s
        self.margin_s = min(ARRIVAL_MARGIN_S, window_s / 4)  # see _TAKE
        self._tokens = {fingerprint(t): t for t in tokens}
        self._apps = {fingerprint(t): (apps or {}).get(t, DEFAULT_APP) for t in tokens}
        self._stop = stop or asyncio.Event()
        self._take = redis.register_script(_TAKE)
        self._turn = 0  # round robin: the budgets wear down evenly

    @staticmethod
    def _calls_key(fp: str) -> str:
        return f"{keys.token_key_prefix}calls:{fp}"

    @staticmethod
    def _pause_key(fp: str) -> str:
        return f"{keys.token_key_prefix}pause:{fp}"

    @staticmethod
    def _app_pause_key(app: str) -> str:
        return f"{keys.token_key_prefix}app-pause:{app}"

    def _keys(self, fp: str) -> list[str]:
        return [self._calls_key(fp), self._pause_key(fp), self._app_pause_key(self._apps[fp])]

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or raise ``CrawlStopped`` as soon as a stop is requested (a wait for budget can last an hour)."""
        if await sleep_or_stop(self._stop, seconds):
            raise CrawlStopped("stop requested while waiting for a token")

    def redact(self, text: str) -> str:
        """``text`` with every token value replaced by its fingerprint (for messages a server may have echoed)."""
        for fp, token in self._tokens.items():
            if token in text:
                text = text.replace(token, f"<token {fp}>")
        return text

    async def usable(self) -> list[str]:
        retired = {m.decode() for m in await deferred(self.redis.smembers(keys.retired_tokens_key))}
        return [fp for fp in self._tokens if fp not in retired]

    async def acquire(self) -> Lease:
        """A token with budget left, waiting for the soonest one when none has; SourceError when all are retired,
        ``CrawlStopped`` when a stop is requested meanwhile."""
        while True:
            if self._stop.is_set():
                raise CrawlStopped("stop requested")
            usable = await self.usable()
            if not usable:
                raise SourceError(f"every access token is retired (fingerprints {sorted(self._tokens)})")
            waits = []
            now = time.time()
            self._turn += 1
            start = self._turn % len(usable)
            for fp in usable[start:] + usable[:start]:
                call_id = uuid.uuid4().hex
                wait = float(
                    await self._take(keys=self._keys(fp), args=[now, self.window_s, self.calls, call_id, self.margin_s])
                )
                if wait <= 0:
                    return Lease(self._tokens[fp], fp, call_id, self._apps[fp])
                waits.append(wait)
            await self._sleep(min(max(min(waits), 0.01), 5.0))

    async def take_again(self, lease: Lease) -> str:
        """Another call on the wire for the same request (aiohttp resends once on a dropped keep-alive connection):
        it takes its own slot of the same token, waiting for one. Returns its call id."""
        lua_keys = self._keys(lease.fingerprint)
        while True:
            call_id = uuid.uuid4().hex
            wait = float(
                await self._take(keys=lua_keys, args=[time.time(), self.window_s, self.calls, call_id, self.margin_s])
            )
            if wait <= 0:
                return call_id
            await self._sleep(min(max(wait, 0.01), 5.0))

    async def done(self, lease: Lease, call_ids: list[str]) -> None:
        """The request's answer came: its calls occupy the window until now (see the module doc)."""
        now = time.time()
        await self.redis.zadd(self._calls_key(lease.fingerprint), dict.fromkeys(call_ids, now), xx=True)

    async def pause(self, lease: Lease, seconds: float, reason: str) -> None:
        """No calls with this token for ``seconds`` (every process sees it)."""
        millis = max(1, int(seconds * 1000))
        await self.redis.set(self._pause_key(lease.fingerprint), reason, px=millis)
        await deferred(self.redis.hincrby(keys.scraper_stats_key, "token_paused", 1))
        LOG.warning("token %s paused for %.1f s: %s", lease.fingerprint, seconds, reason)

    async def pause_app(self, lease: Lease, seconds: float, reason: str) -> None:
        """No calls with any token of this lease's app for ``seconds`` (Graph #4: the app's limit, not the token's)."""
        millis = max(1, int(seconds * 1000))
        await self.redis.set(self._app_pause_key(lease.app), reason, px=millis)
        await deferred(self.redis.hincrby(keys.scraper_stats_key, "app_paused", 1))
        LOG.warning("app %s (every one of its tokens) paused for %.1f s: %s", lease.app, seconds, reason)

    async def retire(self, lease: Lease, reason: str) -> None:
        """Never use this token again (until an operator clears ``deeptarget:tokens:retired``)."""
        if await deferred(self.redis.sadd(keys.retired_tokens_key, lease.fingerprint)):
            await deferred(self.redis.hincrby(keys.scraper_stats_key, "token_retired", 1))
            LOG.error("token %s retired: %s", lease.fingerprint, reason)
