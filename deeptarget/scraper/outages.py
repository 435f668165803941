"""What the scraper depends on going away for a while (Redis, which is also the Celery broker; the blob store): the
work in hand waits, retrying with capped backoff, and carries on where the outage caught it. A stop cuts the wait
short (``CrawlStopped``). Each outage is logged once when it starts and once when it ends, and exported:
``deeptarget_scraper_dependency_up{dependency}`` (1 or 0) and ``deeptarget_scraper_outages_total{dependency}``.

The retry boundary is one operation, not a page: every Redis call the scraper makes is idempotent (a claim of our own
owner is ours again, seen-set adds, cursor saves, acks) or harmless twice (a counter; a stream entry taken twice
finds its post SEEN), so a retried call carries on exactly where it stopped and nothing done before it is redone.
The one call that is neither, publishing an infer task, is repeated only when Redis took it but its answer was lost
on the way back (a window of microseconds): the infer task is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from kombu.exceptions import OperationalError
from redis import exceptions as redis_errors
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_never, wait_exponential_jitter

from deeptarget.core.errors import CrawlStopped
from deeptarget.scraper.stats import DEPENDENCY_UP, OUTAGES
from deeptarget.scraper.stopping import sleep_or_stop
from deeptarget.store.blobs import StorageUnavailable

LOG = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

# Answers of a Redis that is there but cannot serve now: loading its AOF, a replica after a failover, out of memory
# (noeviction), unable to persist, a cluster re-sharding.
_BUSY_PREFIXES = ("LOADING", "READONLY", "OOM", "MISCONF", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")


def redis_outage(err: BaseException) -> bool:
    """Redis (or the broker on it) unreachable or unable to serve for now; a wrong command is no outage."""
    if isinstance(err, redis_errors.ConnectionError | redis_errors.TimeoutError | OperationalError):
        return True
    return isinstance(err, redis_errors.ResponseError) and str(err).startswith(_BUSY_PREFIXES)


def blob_outage(err: BaseException) -> bool:
    return isinstance(err, StorageUnavailable)


class Dependency:
    """One dependency's state, shared by every operation that waits on it."""

    def __init__(
        self,
        name: str,
        is_outage: Callable[[BaseException], bool],
        stop: asyncio.Event,
        *,
        max_wait_s: float = 5.0,
        answers: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.name = name
        self.is_outage = is_outage
        self.stop = stop
        self.max_wait_s = max_wait_s
        self.answers = answers  # a cheap call that must reach the dependency (Redis: PING)
        self.up = True
        self.outages = 0
        self.down_since = 0.0
        self.back_at = 0.0
        DEPENDENCY_UP.labels(name).set(1)

    def _went_down(self, state: RetryCallState, tried_at: float) -> None:
        if not self.up or tried_at < self.back_at:  # a try begun before another found it back is no new outage
            return
        self.up = False
        self.outages += 1
        self.down_since = time.monotonic()
        DEPENDENCY_UP.labels(self.name).set(0)
        OUTAGES.labels(self.name).inc()
        err = state.outcome.exception() if state.outcome else None
        LOG.error("%s unavailable (%s: %s): the scraper waits for it and carries on where it stopped",
                  self.name, type(err).__name__, str(err)[:200])  # fmt: skip

    def _came_back(self) -> None:
        if self.up:
            return
        self.up = True
        self.back_at = time.monotonic()
        DEPENDENCY_UP.labels(self.name).set(1)
        LOG.warning("%s available again after %.1f s: carrying on", self.name, time.monotonic() - self.down_since)

    async def _sleep(self, seconds: float) -> None:
        if await sleep_or_stop(self.stop, seconds):
            raise CrawlStopped(f"stop requested while {self.name} was unavailable")

    async def call(
        self,
        fn: Callable[P, Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``await fn(*args, **kwargs)``, again and again while it fails for an outage of this dependency (backoff
        capped at ``max_wait_s``), until it succeeds or a stop comes."""
        return await self.call_probed(None, fn, *args, **kwargs)

    async def call_probed(
        self,
        probe: Callable[[], Awaitable[None]] | None,
        fn: Callable[P, Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``call``, but a retry first runs ``probe`` (cheap; raises the outage while it lasts), so that waiting out
        an outage does not repeat costly work (a download) just to learn the dependency is still down."""
        tried_at = 0.0
        retrying = AsyncRetrying(
            retry=retry_if_exception(self.is_outage),
            wait=wait_exponential_jitter(multiplier=0.1, max=self.max_wait_s, jitter=0.2),
            stop=stop_never,
            sleep=self._sleep,
            before_sleep=lambda state: self._went_down(state, tried_at),
            reraise=True,
        )
        failed = False
        async for attempt in retrying:
            with attempt:
                tried_at = time.monotonic()
                failed = attempt.retry_state.attempt_number > 1
                if probe is not None and failed:
                    await probe()
                result = await fn(*args, **kwargs)
        if not self.up and (failed or await self._answers_now()):
            self._came_back()
        return result

    async def _answers_now(self) -> bool:
        """Whether the dependency, down until now, answers. A call that never failed may not have needed it (an ack
        of nothing returns at once): taken for its answer, one such call during a hung Redis's silence ended the
        outage in the log and metrics a moment after it began."""
        if self.answers is None:
            return True
        try:
            await self.answers()
        except Exception as err:
            if self.is_outage(err):
                return False
            raise
        return True
