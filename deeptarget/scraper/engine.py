"""The crawl engine: follow hashtags and accounts page by page, fetch each new post's image once, hand the posts to
the workers in batches, and remember where each target stopped; and, all the while, take pushed posts off the ingest
stream as they arrive.

Per page: parse -> claim each post (dedup) -> download the claimed ones concurrently -> send their references
(``PostRef``) to the infer queue -> mark them seen -> save the cursor. Once a stop is requested nothing new starts (no
target, hashtag search, page, retry or download); the page in hand is finished, its posts not yet downloaded go on
the ingest stream for the next run, and its cursor is saved, so a restart resumes there with nothing lost or doubled.

When Redis or the blob store goes away, the operation in hand waits for it (capped backoff, cut short by a stop) and
carries on where it stopped (``outages.py``); a round that an outage broke anyway is run again from its cursors. The
scraper's claims name it by a stable identity (``claims.ScraperIdentity``), so a restarted scraper takes back what it
held, and keeps them alive by a heartbeat while it lives; a post another scraper holds goes on the retry-later set
until that claim must have run out, so a holder that died does not take it out of the run.

Paging ends where the documentation says it does (``graph.py``); a source that loops anyway is caught on evidence, not
on a repeated cursor (hashtag cursors repeat by design): ``loop_after_stale_pages`` pages in a row that bring no post
new to this round, or ``max_pages_per_round`` pages of one target.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import redis.asyncio as aioredis

from deeptarget.core.errors import CrawlStopped, GraphApiError, ImageRejected, SourceError
from deeptarget.core.records import Owner, Post, PostRef
from deeptarget.core.settings import Settings
from deeptarget.scraper import instaloader
from deeptarget.scraper.claims import Claim, PostClaims, ScraperIdentity
from deeptarget.scraper.cursors import CursorStore
from deeptarget.scraper.download import ImageDownloader
from deeptarget.scraper.fetch_policy import FetchPolicy
from deeptarget.scraper.graph import GraphApiClient, Page
from deeptarget.scraper.instaloader import LocalImages
from deeptarget.scraper.later import RetryLater
from deeptarget.scraper.outages import Dependency, blob_outage, redis_outage
from deeptarget.scraper.push import IngestStream, parse_posts
from deeptarget.scraper.quota import HashtagQuota
from deeptarget.scraper.sink import PostSink
from deeptarget.scraper.stats import ScraperStats
from deeptarget.scraper.stopping import sleep_or_stop
from deeptarget.scraper.structures import (
    MEDIA_FIELDS,
    is_image,
    is_video_album,
    owner_from_account,
    posts_from_media,
)
from deeptarget.scraper.tokens import TokenPool
from deeptarget.store.blobs import BlobStore

LOG = logging.getLogger(__name__)
T = TypeVar("T")


class Fetcher(Protocol):
    """Stores a post's image by URL: (sha256, bytes), or ImageRejected. Downloads, or files of a local source."""

    async def __call__(self, url: str) -> tuple[str, int]: ...


HASHTAG = "hashtag"
ACCOUNT = "account"


class _Connection:
    """What a crawl talks through: one HTTP pool, the Graph client and the image downloader. It outlives a round, so
    the ingest follower keeps going between rounds."""

    def __init__(self, crawler: Crawler) -> None:
        s = crawler.settings
        policy = FetchPolicy.from_settings(s)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(  # one pool, keep-alive, bounded overall and per host
                limit=s.download_concurrency + s.target_concurrency,
                limit_per_host=s.per_host_concurrency,
                keepalive_timeout=30,
                resolver=policy.resolver(),  # connects to public addresses only, but for the hosts configured
            )
        )
        tokens = TokenPool(
            crawler.redis,
            [t.get_secret_value() for t in s.all_access_tokens],
            s.token_calls,
            s.token_window_s,
            apps=s.token_app_of,
            stop=crawler._stop,
        )
        self.client = GraphApiClient(
            self.session,
            s.source_url,
            s.source_user_id,
            tokens=tokens,
            retries=s.http_retries,
            timeout_s=s.http_timeout_s,
            throttle_pause_s=s.throttle_pause_s,
            max_pause_s=s.max_pause_s,
            usage_pause_at=s.usage_pause_at,
            token_in=s.token_in,
            stop=crawler._stop,
        )
        self.downloader = ImageDownloader(
            self.session,
            crawler.blobs,
            max_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels,
            timeout_s=s.http_timeout_s,
            retries=s.http_retries,
            stop=crawler._stop,
            policy=policy,
        )


class Crawler:
    """Use as ``async with crawler:`` to keep one connection across rounds (``serve``), or call ``run`` alone."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        sink: PostSink,
        blobs: BlobStore,
        *,
        source: str = "graph",
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.sink = sink
        self.blobs = blobs
        self.source = source
        self._stop = asyncio.Event()
        # Every Redis call (the broker's too) goes through redis_dep, every blob write through blob_dep: waited out.
        self.redis_dep = Dependency("redis", redis_outage, self._stop, max_wait_s=settings.outage_max_wait_s,
                                    answers=redis.ping)  # fmt: skip
        self.blob_dep = Dependency("blobs", blob_outage, self._stop, max_wait_s=settings.outage_max_wait_s,
                                   answers=self._probe_blobs)  # fmt: skip
        self.identity = ScraperIdentity(settings.data_dir, settings.scraper_id)
        self.claims = PostClaims(redis, ttl_s=settings.claim_ttl_s)
        self.cursors = CursorStore(redis, source)
        self.stats = ScraperStats(redis, redis_up=lambda: self.redis_dep.up)
        self.ingest = IngestStream(redis)
        self.later = RetryLater(redis, settings.download_retry_delay_s)
        self.consumer = ""  # the identity, once entered
        self.quota = HashtagQuota(redis, settings.source_user_id, settings.hashtag_quota, settings.hashtag_quota_days)
        self._downloads = asyncio.Semaphore(settings.download_concurrency)
        self._connection: _Connection | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._pushed_in_flight: set[str] = set()  # ingest entries being handled (the heartbeat keeps them ours)
        self._following = False  # an ingest follower runs: rounds leave the stream to it

    def stop(self) -> None:
        """Start nothing new, finish the pages in hand, save cursors, return. Safe to call from a signal handler."""
        if not self._stop.is_set():
            LOG.info("stop requested: the pages in hand are finished, nothing new starts")
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def wait_stopped(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a stop request; True if one came."""
        return await sleep_or_stop(self._stop, timeout_s)

    async def __aenter__(self) -> Crawler:
        if self._connection is None:
            self.claims.owner = self.consumer = self.identity.acquire()
            self._connection = _Connection(self)
            self._heartbeat = asyncio.create_task(self._keep_alive())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._connection is not None:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
                await asyncio.gather(self._heartbeat, return_exceptions=True)
                self._heartbeat = None
            await self._connection.session.close()
            self._connection = None
            self.identity.release()

    async def _keep_alive(self) -> None:
        """The heartbeat: this scraper's claims, and the pushed entries it is handling, do not run out while it lives
        (after an outage longer than their TTL, it takes back those nobody else took)."""
        every = max(self.settings.claim_ttl_s / 3, 0.1)
        while True:
            await asyncio.sleep(every)
            try:
                # Only with something in hand: a call that touches no Redis would "succeed" during an outage and
                # end it in the log and the metrics, making one outage many.
                lost: set[str] = set()
                if self.claims.held:
                    lost = await self.redis_dep.call(self.claims.refresh)
                if self._pushed_in_flight:
                    await self.redis_dep.call(self.ingest.touch, self.consumer, sorted(self._pushed_in_flight))
            except CrawlStopped:
                return
            except Exception:  # a heartbeat that dies would let every claim run out under a live scraper
                LOG.exception("the claims' heartbeat failed; it beats again in %.1f s", every)
                continue
            if lost:
                await self.stats.add("claim_lost", len(lost))
                LOG.warning("%d claims ran out during an outage and another scraper took them: left to it", len(lost))

    @property
    def targets(self) -> list[tuple[str, str]]:
        return [(ACCOUNT, a) for a in self.settings.accounts] + [(HASHTAG, h) for h in self.settings.hashtags]

    async def serve(self, *, forever: bool, interval_s: float) -> None:
        """Crawl rounds (one, or one every ``interval_s`` until a stop) while following the ingest stream the whole
        time, so a pushed post never waits for a round. With one round, pushed posts are taken until none is left."""
        async with self:
            if not forever:
                await self._round()
                return
            follower = self.follow_in_background()
            try:
                while not self.stopping:
                    await self._round()
                    if not self.targets and not self.settings.jsonl_feeds and not self.settings.instaloader_dirs:
                        await self._stop.wait()  # nothing to crawl: only pushed posts, until the stop
                    elif await self.wait_stopped(interval_s):
                        break
            finally:
                self.stop()
                await follower

    async def _round(self) -> None:
        """One round, to its end: the operations wait out outages themselves, but a round one broke all the same is
        run again after a pause (it resumes from the saved cursors; claims and the seen set make that safe)."""
        while True:
            try:
                counts = await self.run()
            except CrawlStopped:
                return
            except Exception as err:
                if not (redis_outage(err) or blob_outage(err)) or self.stopping:
                    raise
                LOG.exception("a crawl round was broken by an outage; it runs again in %g s", self.redis_dep.max_wait_s)
                if await self.wait_stopped(self.redis_dep.max_wait_s):
                    return
                continue
            LOG.info("crawl round finished: %s", json.dumps(counts, sort_keys=True))
            return

    async def run(self) -> dict[str, int]:
        """One crawl round over every target; resumes an unfinished round. Returns this run's counters."""
        if self._connection is None:
            async with self:
                return await self.run()
        connection = self._connection
        before = self.stats.local.copy()
        targets = self.targets
        done = [await self.redis_dep.call(self.cursors.is_done, k, t) for k, t in targets]
        failed = [await self.redis_dep.call(self.cursors.failed, k, t) for k, t in targets]
        # A target whose last crawl failed (an unknown account, a source error) keeps its cursor, but must not keep
        # every other target from being crawled again: the round is over when the rest are done.
        if targets and all(d or f for d, f in zip(done, failed, strict=True)):
            LOG.info("every target was crawled to the end: starting a new round (seen posts are skipped)")
            for (kind, target), was_done in zip(targets, done, strict=True):
                if was_done:
                    await self.redis_dep.call(self.cursors.reset, kind, target)
        target_slots = asyncio.Semaphore(self.settings.target_concurrency)

        async def crawl(kind: str, target: str) -> None:
            async with target_slots:
                await self._crawl_target(connection.client, connection.downloader, kind, target)

        for feed in self.settings.jsonl_feeds:
            if not self.stopping:
                await self.read_feed(connection.session, feed)
        crawled = asyncio.Event()

        async def crawl_all() -> None:
            try:  # every walk settles before an error goes up: a round run again must not meet a walk still going
                results = await asyncio.gather(*(crawl(k, t) for k, t in targets), return_exceptions=True)
            finally:
                crawled.set()
            for result in results:
                if isinstance(result, BaseException):
                    raise result

        # Pushed posts (and what the feeds just pushed) are taken alongside the crawl, unless a follower that
        # outlives the round does it already.
        pushed = [] if self._following else [self.follow_ingest(until=crawled)]
        await asyncio.gather(crawl_all(), *pushed)
        for folder in self.settings.instaloader_dirs:
            await self.read_instaloader(folder)
        return dict(self.stats.local - before)

    async def _crawl_target(self, client: GraphApiClient, downloader: ImageDownloader, kind: str, target: str) -> None:
        redis = self.redis_dep.call
        try:
            if self.stopping or await redis(self.cursors.is_done, kind, target):
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
            while not self.stopping:
                # The token budgets live in Redis: a page is fetched again once it is back (a GET; nothing is lost).
                owner, page = await redis(self._fetch_page, client, kind, target, hashtag_id, resume)
                pages += 1
                await self.stats.add(f"page:{kind}")
                ids = await self._handle_page(downloader, page.items, owner)
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
        except CrawlStopped:
            LOG.info("%s %s: stopped; its cursor is kept for the next run", kind, target)
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
        if self.stopping:  # a search spends a slot of the weekly quota: never for a crawl that is winding down
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

    async def _handle_page(self, downloader: ImageDownloader, items: Sequence[Any], owner: Owner | None) -> set[str]:
        """Every post of a page handled; returns the ids of the posts it held."""
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
        await self._handle_posts(downloader, list(posts.values()))
        return set(posts)

    async def _handle_posts(self, downloader: Fetcher, posts: list[Post]) -> set[str]:
        """Claim, download, enqueue, commit. Posts whose downloads failed go (back) on the ingest stream for a later
        run, whatever brought them: a crawl's cursor moves past their page, and a later round may never page back to
        it. Returns their ids."""
        claims = await asyncio.gather(*(self._claim(p.id) for p in posts))
        taken = [p for p, c in zip(posts, claims, strict=True) if c is Claim.TAKEN]
        seen = [p for p, c in zip(posts, claims, strict=True) if c is Claim.SEEN]
        held = [p for p, c in zip(posts, claims, strict=True) if c is Claim.HELD]
        await self.stats.add("duplicate", len(seen))
        await self.stats.add("held_elsewhere", sum(c in (Claim.HELD, Claim.MINE) for c in claims))
        try:
            # Another scraper's claim (a walk of this one brings its own posts back itself): that scraper may have died
            # holding it, and this walk moves past the page. The post comes back once the claim must have run out,
            # and is SEEN then if the holder lives.
            await self.redis_dep.call(self.later.put, held, float(self.settings.claim_ttl_s))
            await self.stats.add("held_for_later", len(held))
            retry_later = await self._fetch_and_send(downloader, taken, seen)
        finally:
            self.claims.forget([p.id for p in taken])  # whatever became of them, the heartbeat keeps none alive
        return retry_later

    async def _claim(self, post_id: str) -> Claim:
        if not self.claims.reserve(post_id):
            return Claim.MINE
        claim = Claim.HELD
        try:
            claim = await self.redis_dep.call(self.claims.take, post_id)
        finally:
            self.claims.settle(post_id, claim)
        return claim

    async def _fetch_and_send(self, downloader: Fetcher, taken: list[Post], seen: list[Post]) -> set[str]:
        redis = self.redis_dep.call
        sent: list[PostRef] = []
        try:
            results = await asyncio.gather(*(self._fetch(downloader, p) for p in taken))
            refs = [r for r in results if r is not None]
            # Still ours? A Redis outage longer than the claim TTL may have let another scraper take one meanwhile.
            lost = await redis(self.claims.refresh, [r.post.id for r in refs])
            if lost:
                await self.stats.add("claim_lost", len(lost))
                refs = [r for r in refs if r.post.id not in lost]
            for start in range(0, len(refs), self.settings.batch_size):
                batch = refs[start : start + self.settings.batch_size]
                await redis(asyncio.to_thread, self.sink.send_refs, batch)
                sent += batch
            await redis(self.claims.commit, [r.post.id for r in refs])
        except BaseException:
            await self._give_back(taken, sent)
            raise
        retry_later = [p for p, r in zip(taken, results, strict=True) if r is None]
        # Before the release (and a pushed entry's ack), so a crash loses none. What a stop left undownloaded goes
        # straight back on the stream; a failed download waits its delay first (later.py).
        if self.stopping:
            await self.stats.add("deferred_by_stop", len(retry_later))
            await redis(self.ingest.push, retry_later)
        else:
            await redis(self.later.put, retry_later)
        await redis(self.claims.release, [p.id for p in retry_later])
        await self.stats.add("enqueued", len(refs))
        await self.stats.add("rejected", sum(r.rejected is not None for r in refs))
        await self.stats.measure_queues()
        # A push of an id met before never rewrites that post (store.py; issue 12, M4): no merge, no owner marked known.
        await self.stats.add("push_ignored:known_id", sum(p.pushed for p in seen))
        merges = [p for p in seen if p.owner is not None and not p.pushed]
        with_owner = [r for r in refs if r.post.owner is not None]
        if with_owner or merges:
            await self._merge_owner(with_owner, merges)
        return {p.id for p in retry_later}

    async def _give_back(self, taken: list[Post], sent: list[PostRef]) -> None:
        """A page broken off (a stop while Redis was away, or a bug): what was sent is committed, the rest released,
        each if Redis answers at once. What it does not, this scraper's next start takes back (the same identity),
        and the claims run out meanwhile (the heartbeat keeps none of them)."""
        sent_ids = {r.post.id for r in sent}
        with contextlib.suppress(Exception):
            await self.claims.commit(sorted(sent_ids))
        with contextlib.suppress(Exception):
            await self.claims.release([p.id for p in taken if p.id not in sent_ids])

    async def read_feed(self, session: aiohttp.ClientSession, url: str) -> None:
        """A partner's JSON-lines feed: every valid record joins the ingest stream (taken from there like any pushed
        post, deduplicated there); each bad one is counted and logged with its line number and reason. A stop ends
        the read at once (a feed may take minutes): nothing of it is pushed, the next run reads it again."""
        try:
            lines = await self._unless_stopped(self._feed_lines(session, url))
        except CrawlStopped:
            return
        except (TimeoutError, aiohttp.ClientError, SourceError) as err:
            await self.stats.add("feed_error")
            LOG.error("feed %s unreadable (%s); tried again next round", url, type(err).__name__)
            return
        posts, bad = parse_posts(lines, source="feed")
        for record in bad:
            LOG.warning("feed %s line %d rejected: %s", url, record.line, record.reason)
        await self.stats.add("feed_rejected", len(bad))
        with contextlib.suppress(CrawlStopped):  # not pushed: the next run reads the feed again
            await self.redis_dep.call(self.ingest.push, posts)

    async def _feed_lines(self, session: aiohttp.ClientSession, url: str) -> list[bytes]:
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

    async def _unless_stopped(self, work: Coroutine[Any, Any, T]) -> T:
        """``work``'s result, or ``CrawlStopped`` as soon as a stop is requested (the work is cancelled)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise CrawlStopped("stop requested")
        return task.result()

    async def read_instaloader(self, folder: Path) -> None:
        """Every post in an instaloader download folder (posts seen before are skipped by the claims)."""
        with contextlib.suppress(CrawlStopped):  # a stop while Redis was away: the next run reads the folder again
            await self._read_instaloader(folder)

    async def _read_instaloader(self, folder: Path) -> None:
        images = LocalImages(folder, self.blobs, self.settings.max_image_bytes)
        batch: list[Post] = []
        limit = self.settings.max_sidecar_bytes
        for sidecar, found in await asyncio.to_thread(lambda: list(instaloader.scan(folder, limit))):
            if self._stop.is_set():
                return
            if isinstance(found, ValueError):
                await self.stats.add("malformed_media")
                LOG.warning("%s: unreadable instaloader metadata, skipped: %s", sidecar, found)
            elif found.post is None:
                await self.stats.add("skipped_video" if found.skipped == "video" else f"skipped:{found.skipped}")
            else:
                batch.append(found.post)
            if len(batch) >= self.settings.page_size:
                await self._handle_posts(images, batch)
                await self.stats.add("page:instaloader")
                batch = []
        if batch:
            await self._handle_posts(images, batch)
            await self.stats.add("page:instaloader")

    async def follow_ingest(self, until: asyncio.Event | None = None) -> None:
        """Posts pushed through ``deeptarget enqueue`` / ``POST /ingest`` / feeds, as they arrive: a blocking group
        read, until a stop, or (with ``until``) until that event is set and the stream has nothing left for us.

        A post never waits for a full batch: a read returns as soon as one entry is there, and takes what else came
        within ``ingest_max_delay_s`` (a queue delay, as in Triton's dynamic batching). Several batches are handled
        at once, so one slow image does not hold back the ones behind it."""
        if self._connection is None:
            async with self:
                return await self.follow_ingest(until)
        downloader = self._connection.downloader
        outer = until is None
        if outer:
            self._following = True
        in_flight: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self.settings.ingest_batches_in_flight)
        batch = max(self.settings.batch_size, 1)
        loop = asyncio.get_running_loop()

        def start(entries: list[tuple[str, Post]]) -> None:
            ids = [entry for entry, _ in entries]
            self._pushed_in_flight.update(ids)
            task = asyncio.create_task(self._handle_pushed(downloader, entries))
            in_flight.add(task)

            def finished_batch(done: asyncio.Task[None]) -> None:
                in_flight.discard(done)
                self._pushed_in_flight.difference_update(ids)
                slots.release()

            task.add_done_callback(finished_batch)

        try:
            # A new run tries every post a failed download left for later, and takes back at once the entries this
            # scraper (by its identity) had taken when it died.
            await self.redis_dep.call(self.later.release, True)
            mine = await self.redis_dep.call(self.ingest.take_own, self.consumer, 100_000)
            for at in range(0, len(mine), batch):
                await slots.acquire()
                start(mine[at : at + batch])
            released_at = loop.time()
            while not self.stopping:
                await slots.acquire()
                finished = until is not None and until.is_set()
                try:
                    if outer and loop.time() - released_at >= 1.0:
                        await self.redis_dep.call(self.later.release)
                        released_at = loop.time()
                    entries = [] if self.stopping else await self._take_pushed(batch, block=not finished)
                except BaseException:
                    slots.release()
                    raise
                if not entries:
                    slots.release()
                    if finished:
                        break
                    continue
                start(entries)
        except CrawlStopped:
            pass  # a stop while Redis was away: what was taken and not handled stays pending for our next start
        finally:
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            if outer:
                self._following = False

    def follow_in_background(self) -> asyncio.Task[None]:
        """``follow_ingest`` as a task that runs until ``stop`` (rounds started meanwhile leave the stream to it)."""
        if self._connection is None:
            raise RuntimeError("follow_in_background needs the crawler entered (async with crawler)")
        self._following = True
        return asyncio.create_task(self.follow_ingest())

    async def _take_pushed(self, batch: int, *, block: bool) -> list[tuple[str, Post]]:
        """Up to ``batch`` entries: waits up to ``ingest_block_s`` for the first one (when ``block``), then at most
        ``ingest_max_delay_s`` for more."""
        idle_ms = self.settings.claim_ttl_s * 1000
        first_ms = int(self.settings.ingest_block_s * 1000) if block else None
        take = self.redis_dep.call
        entries = await take(self.ingest.take, self.consumer, batch, idle_ms, block_ms=first_ms)
        deadline = asyncio.get_running_loop().time() + self.settings.ingest_max_delay_s
        while entries and len(entries) < batch and not self.stopping:
            left_ms = int((deadline - asyncio.get_running_loop().time()) * 1000)
            if left_ms <= 0:
                break
            more = await take(self.ingest.take, self.consumer, batch - len(entries), idle_ms, block_ms=left_ms)
            if not more:
                break
            entries += more
        return entries

    async def _handle_pushed(self, downloader: Fetcher, entries: list[tuple[str, Post]]) -> None:
        """A stop while Redis is away leaves the entries pending: this scraper's next start takes them back."""
        posts = list({post.id: post for _, post in entries}.values())
        try:
            await self._handle_posts(downloader, posts)
        except CrawlStopped:
            return
        except Exception:
            # One post must not keep the others of its batch from going on: each alone, and what still fails stays
            # pending (another take gets it after claim_ttl_s; after MAX_DELIVERIES it goes to the dead letters).
            LOG.exception("a batch of %d pushed posts failed; handling them one by one", len(posts))
            with contextlib.suppress(CrawlStopped):
                for entry, post in entries:
                    try:
                        await self._handle_posts(downloader, [post])
                    except CrawlStopped:
                        raise
                    except Exception:
                        LOG.exception("pushed post %s not handled; it stays on the ingest stream", post.id[:100])
                        continue
                    await self.redis_dep.call(self.ingest.ack, [entry])
            return
        await self.stats.add("page:push")
        with contextlib.suppress(CrawlStopped):  # handled but not acknowledged: SEEN when taken again
            await self.redis_dep.call(self.ingest.ack, [entry for entry, _ in entries])

    async def _merge_owner(self, refs: list[PostRef], seen: list[Post]) -> None:
        """Posts first met under a hashtag learn their owner when met again through the owner's account."""
        redis = self.redis_dep.call

        def by_source(posts: Sequence[Post]) -> dict[str | None, list[Post]]:  # None: the crawl's own source
            groups: dict[str | None, list[Post]] = {}
            for post in posts:
                groups.setdefault(None if post.source == self.source else post.source, []).append(post)
            return groups

        for source, posts in by_source([r.post for r in refs]).items():
            await redis(self.claims.mark_owner_known, [p.id for p in posts], source)
        fresh: dict[str | None, list[Post]] = {}
        for source, posts in by_source(seen).items():
            known = await redis(self.claims.owner_known, [p.id for p in posts], source)
            fresh[source] = [p for p, k in zip(posts, known, strict=True) if not k]
        merges = [p for posts in fresh.values() for p in posts]
        if merges:
            await redis(asyncio.to_thread, self.sink.send_merges, merges)
            for source, posts in fresh.items():  # known only once sent
                await redis(self.claims.mark_owner_known, [p.id for p in posts], source)
            await self.stats.add("merged_owner", len(merges))

    async def _fetch(self, downloader: Fetcher, post: Post) -> PostRef | None:
        """The post's reference: with its stored image, or rejected with a reason; None to retry in a later run
        (a download that failed, or one a stop came before). A blob store that cannot take the image (disk full)
        holds the download until it can (the store probed first, not the image fetched again for nothing)."""
        if not post.media_url:
            await self.stats.add("rejected:no_media_url")
            return PostRef(post=post, rejected="no_media_url")
        if self.stopping:
            return None
        async with self._downloads:
            if self.stopping:  # no download starts after a stop; the post goes on the ingest stream
                return None
            try:
                sha, size = await self.blob_dep.call_probed(self._probe_blobs, downloader, post.media_url)
            except CrawlStopped:  # DownloadDeferred, or a stop while the blob store was down
                return None
            except ImageRejected as err:
                if err.reason == "download_failed":
                    await self.stats.add("download_failed")
                    try:
                        failures = await self.redis_dep.call(self.claims.download_failed, post.id)
                    except CrawlStopped:
                        return None
                    if failures < self.settings.max_download_failures:
                        LOG.warning("post %s: download failed after retries (%s), %d of %d times; left for a later "
                                    "run", post.id, err, failures, self.settings.max_download_failures)  # fmt: skip
                        return None
                await self.stats.add(f"rejected:{err.reason}")
                LOG.warning("post %s rejected: %s", post.id, err)
                return PostRef(post=post, rejected=err.reason)
        await self.stats.add("bytes", size)
        return PostRef(post=post, blob=sha)

    async def _probe_blobs(self) -> None:
        await asyncio.to_thread(self.blobs.probe)
