"""Graph API targets as a source: hashtags (``ig_hashtag_search``, then ``recent_media``/``top_media``) and accounts
(``business_discovery``), each walked page by page from its saved cursor (``graph.py`` pages as Meta documents it).

A walk is an async iterator of its pages' posts. The engine handles a page (claim -> download -> sink) before it asks
for the next one, and only then does the walk save the cursor past it: a restart resumes at the first page whose
posts were not all on the queue, and a stop while a page is handled leaves the cursor where it was.

Paging ends where the documentation says it does; a source that loops anyway is caught on evidence, not on a repeated
cursor (hashtag cursors repeat by design): ``loop_after_stale_pages`` pages in a row that bring no post new to this
round, or ``max_pages_per_round`` pages of one target. A target that fails (an unknown account, an unusable page)
keeps its cursor and is marked failed, so it does not hold the round open; a hashtag over the weekly search quota,
or unknown to the source, is done for the round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from deeptarget.core.errors import CrawlStopped, GraphApiError, SourceError
from deeptarget.core.records import Owner, Post
from deeptarget.core.settings import Settings
from deeptarget.scraper.cursors import CursorStore
from deeptarget.scraper.graph import GraphApiClient, Page
from deeptarget.scraper.outages import Dependency
from deeptarget.scraper.quota import HashtagQuota
from deeptarget.scraper.sources.base import Batch, Fetcher
from deeptarget.scraper.stats import ScraperStats
from deeptarget.scraper.structures import (
    MEDIA_FIELDS,
    is_image,
    is_video_album,
    owner_from_account,
    posts_from_media,
)

LOG = logging.getLogger(__name__)

HASHTAG = "hashtag"
ACCOUNT = "account"


class GraphTargets:
    """``settings.accounts`` and ``settings.hashtags``: on when either is not empty."""

    def __init__(
        self,
        settings: Settings,
        *,
        cursors: CursorStore,
        quota: HashtagQuota,
        stats: ScraperStats,
        redis_dep: Dependency,
        stop: asyncio.Event,
        source: str,
    ) -> None:
        self.settings = settings
        self.cursors = cursors
        self.quota = quota
        self.stats = stats
        self.redis_dep = redis_dep
        self._stop = stop
        self.source = source  # the name its posts carry

    @property
    def targets(self) -> list[tuple[str, str]]:
        return [(ACCOUNT, a) for a in self.settings.accounts] + [(HASHTAG, h) for h in self.settings.hashtags]

    @property
    def enabled(self) -> bool:
        return bool(self.targets)

    async def begin_round(self) -> None:
        """Resumes an unfinished round; once every target was crawled to its end (or failed), starts a new one."""
        redis = self.redis_dep.call
        targets = self.targets
        done = [await redis(self.cursors.is_done, k, t) for k, t in targets]
        failed = [await redis(self.cursors.failed, k, t) for k, t in targets]
        # A target whose last crawl failed (an unknown account, a source error) keeps its cursor, but must not keep
        # every other target from being crawled again: the round is over when the rest are done.
        if targets and all(d or f for d, f in zip(done, failed, strict=True)):
            LOG.info("every target was crawled to the end: starting a new round (seen posts are skipped)")
            for (kind, target), was_done in zip(targets, done, strict=True):
                if was_done:
                    await redis(self.cursors.reset, kind, target)

    async def walk(
        self, client: GraphApiClient, images: Fetcher, kind: str, target: str
    ) -> AsyncGenerator[Batch, None]:
        """The target's pages from its cursor, each page's posts once handled by the caller. ``CrawlStopped`` goes
        up (the cursor stays); a source's error ends the walk with the target marked failed."""
        redis = self.redis_dep.call
        try:
            if self._stop.is_set() or await redis(self.cursors.is_done, kind, target):
                return
            hashtag_id = None
            if kind == HASHTAG:
                hashtag_id = await self._hashtag_id(client, target)
                if hashtag_id is None:
                    return
            resume = await redis(self.cursors.get, kind, target)
            await redis(self.cursors.clear_failed, kind, target)
            pages = stale = 0
            round_ids: set[str] = set()  # post ids this target brought in this round: the evidence of a loop
            while not self._stop.is_set():
                # The token budgets live in Redis: a page is fetched again once it is back (a GET; nothing is lost).
                owner, page = await redis(self._fetch_page, client, kind, target, hashtag_id, resume)
                pages += 1
                await self.stats.add(f"page:{kind}")
                posts = await self._posts_of(page.items, owner)
                yield Batch(posts, images)  # claimed, downloaded and sent before the walk goes on
                ids = {p.id for p in posts}
                # Only a page that shows posts, all met before in this round, is evidence: empty and short pages are
                # normal (the API filters after paging) and the hashtag cursor repeats by design.
                stale = stale + 1 if ids and ids <= round_ids else 0
                round_ids |= ids
                if page.next is None:
                    await redis(self.cursors.mark_done, kind, target)
                    if page.problem:
                        await self.stats.add("bad_next_link")
                        LOG.warning("%s %s: %s; target finished for this round after %d pages", kind, target,
                                    page.problem, pages)  # fmt: skip
                    else:
                        LOG.info("%s %s: crawled to the end (%d pages)", kind, target, pages)
                    return
                resume = page.next
                await redis(self.cursors.save, kind, target, resume)  # after its posts are on the queue
                if stale >= self.settings.loop_after_stale_pages:
                    await self._end_looping(kind, target, f"{stale} pages in a row brought no new post", pages)
                    return
                if pages >= self.settings.max_pages_per_round:
                    await self._end_looping(kind, target, f"page cap ({pages} pages) reached", pages)
                    return
                if self.settings.max_pages_per_target and pages >= self.settings.max_pages_per_target:
                    return
        except GraphApiError as err:
            await self._failed_target(kind, target, f"target_error:{err.code}", err)
        except SourceError as err:
            await self._failed_target(kind, target, "bad_page", err)

    async def _failed_target(self, kind: str, target: str, outcome: str, err: Exception) -> None:
        await self.stats.add(outcome)
        LOG.error("%s %s: %s; its cursor is kept for the next run", kind, target, err)
        with contextlib.suppress(CrawlStopped):  # unmarked, it is crawled again from its cursor
            await self.redis_dep.call(self.cursors.mark_failed, kind, target)

    async def _end_looping(self, kind: str, target: str, why: str, pages: int) -> None:
        await self.stats.add("cursor_loop")
        await self.redis_dep.call(self.cursors.mark_done, kind, target)
        LOG.warning("%s %s: %s after %d pages; the source seems to loop, target finished for this round",
                    kind, target, why, pages)  # fmt: skip

    async def _hashtag_id(self, client: GraphApiClient, hashtag: str) -> str | None:
        """The hashtag's Graph id (cached), or None when it is unknown or over the 30-hashtags-a-week quota."""
        redis = self.redis_dep.call
        cached = await redis(self.quota.cached_id, hashtag)
        if cached:
            return cached
        if self._stop.is_set():  # a search spends a slot of the weekly quota: never for a crawl that is winding down
            raise CrawlStopped("stop requested before the hashtag search")
        if not await redis(self.quota.allow, hashtag):
            await self.stats.add("hashtag_quota")
            days = self.quota.window_s / 86400
            LOG.warning("#%s not searched: %d unique hashtags already searched in %g days (the API's limit); "
                        "tried again next round", hashtag, self.quota.limit, days)  # fmt: skip
            # Done for this round: nothing of it was fetched (a hashtag once searched has its id cached and is never
            # blocked), and a round waiting for it would keep every other target from being crawled again.
            await redis(self.cursors.mark_done, HASHTAG, hashtag)
            return None
        hashtag_id = await redis(client.hashtag_id, hashtag)
        if hashtag_id is None:
            LOG.warning("hashtag #%s is unknown to the source: skipped", hashtag)
            await self.stats.add("unknown_hashtag")
            await redis(self.cursors.mark_done, HASHTAG, hashtag)
            return None
        await redis(self.quota.remember_id, hashtag, hashtag_id)
        return hashtag_id

    async def _fetch_page(
        self, client: GraphApiClient, kind: str, target: str, hashtag_id: str | None, resume: str | None
    ) -> tuple[Owner | None, Page]:
        limit = self.settings.page_size
        if kind == HASHTAG:
            assert hashtag_id is not None
            edge = self.settings.hashtag_edge
            return None, await client.hashtag_media(hashtag_id, edge, MEDIA_FIELDS, resume, limit)
        account, page = await client.business_discovery(target, MEDIA_FIELDS, resume, limit)
        # checked like any crawled field: a followers count past int64 raised out of the crawl and ended the run
        return owner_from_account(account, target), page

    async def _posts_of(self, items: Sequence[Any], owner: Owner | None) -> list[Post]:
        """A page's posts (a carousel's images each one), once each; videos and malformed nodes counted, skipped."""
        posts: dict[str, Post] = {}
        for node in items:
            if isinstance(node, dict) and (not is_image(node) or is_video_album(node)):
                await self.stats.add("skipped_video")
                continue
            try:
                images = posts_from_media(node, source=self.source, owner=owner)
            except (ValueError, TypeError, KeyError) as err:  # a hostile shape is one node's problem
                await self.stats.add("malformed_media")
                LOG.warning("malformed media node skipped: %s", str(err)[:300])
                continue
            if len(images) > 1:
                await self.stats.add("carousel_images", len(images))
            if not images:
                await self.stats.add("skipped_album_without_images")
            for post in images:
                posts.setdefault(post.id, post)  # a page that repeats a post handles it once
        return list(posts.values())
