"""Partners' JSON-lines feeds (``settings.jsonl_feeds``) as a source, read once a round.

A feed's valid records go on the ingest stream (the engine pushes them: they are taken from there like any pushed
post, and deduplicated there); each bad one is counted and logged with its line number and reason. A stop ends a
read at once (a feed may take minutes): nothing of it is pushed, and the next run reads it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

import aiohttp

from deeptarget.core.errors import CrawlStopped, SourceError
from deeptarget.core.records import Post
from deeptarget.core.settings import Settings
from deeptarget.scraper.push import parse_posts
from deeptarget.scraper.stats import ScraperStats
from deeptarget.scraper.stopping import unless_stopped

LOG = logging.getLogger(__name__)


class PartnerFeeds:
    """On when ``settings.jsonl_feeds`` is not empty."""

    def __init__(self, settings: Settings, *, stats: ScraperStats, stop: asyncio.Event) -> None:
        self.settings = settings
        self.stats = stats
        self._stop = stop

    @property
    def urls(self) -> list[str]:
        return list(self.settings.jsonl_feeds)

    @property
    def enabled(self) -> bool:
        return bool(self.urls)

    async def posts(self, session: aiohttp.ClientSession) -> AsyncGenerator[list[Post], None]:
        """Each readable feed's valid posts, feed by feed, until a stop."""
        for url in self.urls:
            if self._stop.is_set():
                return
            posts = await self.read(session, url)
            if posts is not None:
                yield posts

    async def read(self, session: aiohttp.ClientSession, url: str) -> list[Post] | None:
        """One feed's valid posts; None when it could not be read (tried again next round) or a stop came."""
        try:
            lines = await unless_stopped(self._stop, self._lines(session, url))
        except CrawlStopped:
            return None
        except (TimeoutError, aiohttp.ClientError, SourceError) as err:
            await self.stats.add("feed_error")
            LOG.error("feed %s unreadable (%s); tried again next round", url, type(err).__name__)
            return None
        posts, bad = parse_posts(lines, source="feed")
        for record in bad:
            LOG.warning("feed %s line %d rejected: %s", url, record.line, record.reason)
        await self.stats.add("feed_rejected", len(bad))
        return posts

    async def _lines(self, session: aiohttp.ClientSession, url: str) -> list[bytes]:
        lines: list[bytes] = []
        size, limit = 0, self.settings.max_feed_bytes
        timeout = aiohttp.ClientTimeout(total=self.settings.http_timeout_s * 10)
        async with session.get(url, timeout=timeout, allow_redirects=False) as response:
            if response.status != 200:
                raise SourceError(f"HTTP {response.status}")
            async for line in response.content:
                size += len(line)
                if size > limit:
                    LOG.warning("feed %s: longer than %d bytes, the rest is left out", url, limit)
                    break
                lines.append(line)
        return lines
