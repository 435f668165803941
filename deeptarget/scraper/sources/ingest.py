"""The ingest stream (``deeptarget:ingest``, group ``scrapers``) as a source: posts pushed through ``POST /ingest``,
``deeptarget enqueue`` and partner feeds, taken as they arrive, during rounds and between them.

A batch is a list of (stream entry id, post); the engine acknowledges the entries once their posts are handled, and
what it never acknowledges another take gets after ``claim_ttl_s`` (after ``MAX_DELIVERIES``, the dead letters). A
post never waits for a full batch: a read returns as soon as one entry is there, and takes what else came within
``ingest_max_delay_s`` (a queue delay, as in Triton's dynamic batching).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from deeptarget.core.records import Post
from deeptarget.core.settings import Settings
from deeptarget.scraper.later import RetryLater
from deeptarget.scraper.outages import Dependency
from deeptarget.scraper.push import IngestStream

Entries = list[tuple[str, Post]]
"""Stream entries taken together: (entry id, post)."""

OWN_AT_START = 100_000  # at most this many of this scraper's own pending entries are taken back at once


class PushedPosts:
    """Always on: whatever pushed posts there are, and the posts a failed download left for later."""

    def __init__(
        self,
        settings: Settings,
        *,
        ingest: IngestStream,
        later: RetryLater,
        redis_dep: Dependency,
        stop: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.later = later
        self.redis_dep = redis_dep
        self._stop = stop

    @property
    def batch_size(self) -> int:
        return max(self.settings.batch_size, 1)

    async def batches(self, consumer: str, until: asyncio.Event | None = None) -> AsyncGenerator[Entries, None]:
        """Batches of entries for ``consumer``, until a stop, or (with ``until``) until that event is set and the
        stream has nothing left. First every post a failed download left for later goes back on the stream, and the
        entries this scraper (by its identity) had taken when it died are taken back at once. Without ``until`` (the
        follower that outlives rounds), due posts come back from the retry-later set about every second.

        The next read starts only when the caller asks for the next batch: the caller bounds the batches in flight."""
        outer = until is None
        batch = self.batch_size
        loop = asyncio.get_running_loop()
        await self.redis_dep.call(self.later.release, True)
        mine = await self.redis_dep.call(self.ingest.take_own, consumer, OWN_AT_START)
        for at in range(0, len(mine), batch):
            yield mine[at : at + batch]
        released_at = loop.time()
        while not self._stop.is_set():
            finished = until is not None and until.is_set()
            if outer and loop.time() - released_at >= 1.0:
                await self.redis_dep.call(self.later.release)
                released_at = loop.time()
            entries = [] if self._stop.is_set() else await self._take(consumer, batch, block=not finished)
            if not entries:
                if finished:
                    return
                continue
            yield entries

    async def _take(self, consumer: str, batch: int, *, block: bool) -> Entries:
        """Up to ``batch`` entries: waits up to ``ingest_block_s`` for the first one (when ``block``), then at most
        ``ingest_max_delay_s`` for more."""
        idle_ms = self.settings.claim_ttl_s * 1000
        first_ms = int(self.settings.ingest_block_s * 1000) if block else None
        take = self.redis_dep.call
        entries = await take(self.ingest.take, consumer, batch, idle_ms, block_ms=first_ms)
        deadline = asyncio.get_running_loop().time() + self.settings.ingest_max_delay_s
        while entries and len(entries) < batch and not self._stop.is_set():
            left_ms = int((deadline - asyncio.get_running_loop().time()) * 1000)
            if left_ms <= 0:
                break
            more = await take(self.ingest.take, consumer, batch - len(entries), idle_ms, block_ms=left_ms)
            if not more:
                break
            entries += more
        return entries

    async def ack(self, entries: Entries) -> None:
        """The entries' posts are handled: off the stream's pending list."""
        await self.redis_dep.call(self.ingest.ack, [entry for entry, _ in entries])
