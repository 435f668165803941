"""The crawl engine: follow hashtags and accounts page by page, fetch each new post's image once, hand the posts to
the workers in batches, and remember where each target stopped.

Per page: parse -> claim each post (dedup) -> download the claimed ones concurrently -> send their references
(``PostRef``) to the infer queue -> mark them seen -> save the cursor. A page is finished before a stop request is
honoured, so a stopped crawl leaves no post half-handled, and a restart resumes at the saved cursor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import redis.asyncio as aioredis

from deeptarget.blobs import BlobStore
from deeptarget.config import Settings
from deeptarget.errors import GraphApiError, ImageRejected, SourceError
from deeptarget.schema import Owner, Post, PostRef
from deeptarget.scraper import instaloader
from deeptarget.scraper.claims import Claim, PostClaims
from deeptarget.scraper.cursors import CursorStore
from deeptarget.scraper.download import ImageDownloader
from deeptarget.scraper.graph import GraphApiClient, Page
from deeptarget.scraper.instaloader import LocalImages
from deeptarget.scraper.push import IngestStream, parse_posts
from deeptarget.scraper.quota import HashtagQuota
from deeptarget.scraper.sink import PostSink
from deeptarget.scraper.stats import ScraperStats
from deeptarget.scraper.structures import MEDIA_FIELDS, is_image, posts_from_media
from deeptarget.scraper.tokens import TokenPool

LOG = logging.getLogger(__name__)


class Fetcher(Protocol):
    """Stores a post's image by URL: (sha256, bytes), or ImageRejected. Downloads, or files of a local source."""

    async def __call__(self, url: str) -> tuple[str, int]: ...


HASHTAG = "hashtag"
ACCOUNT = "account"


class Crawler:
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
        self.claims = PostClaims(redis, ttl_s=settings.claim_ttl_s)
        self.cursors = CursorStore(redis, source)
        self.stats = ScraperStats(redis)
        self.ingest = IngestStream(redis)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.quota = HashtagQuota(redis, settings.source_user_id, settings.hashtag_quota, settings.hashtag_quota_days)
        self._downloads = asyncio.Semaphore(settings.download_concurrency)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Finish the pages in hand, save cursors, return. Safe to call from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def wait_stopped(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a stop request; True if one came."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def targets(self) -> list[tuple[str, str]]:
        return [(ACCOUNT, a) for a in self.settings.accounts] + [(HASHTAG, h) for h in self.settings.hashtags]

    async def run(self) -> dict[str, int]:
        """One crawl round over every target; resumes an unfinished round. Returns this run's counters."""
        targets = self.targets
        if targets and all([await self.cursors.is_done(k, t) for k, t in targets]):
            LOG.info("every target was crawled to the end: starting a new round (seen posts are skipped)")
            for kind, target in targets:
                await self.cursors.reset(kind, target)
        connector = aiohttp.TCPConnector(  # one pool, keep-alive, bounded overall and per host
            limit=self.settings.download_concurrency + self.settings.target_concurrency,
            limit_per_host=self.settings.per_host_concurrency,
            keepalive_timeout=30,
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            s = self.settings
            tokens = TokenPool(self.redis, [t.get_secret_value() for t in s.access_tokens], s.token_calls,
                               s.token_window_s)  # fmt: skip
            client = GraphApiClient(
                session,
                s.source_url,
                s.source_user_id,
                tokens=tokens,
                retries=s.http_retries,
                timeout_s=s.http_timeout_s,
                throttle_pause_s=s.throttle_pause_s,
                usage_pause_at=s.usage_pause_at,
            )
            downloader = ImageDownloader(
                session,
                self.blobs,
                max_bytes=s.max_image_bytes,
                max_pixels=s.max_image_pixels,
                timeout_s=s.http_timeout_s,
                retries=s.http_retries,
            )
            target_slots = asyncio.Semaphore(s.target_concurrency)

            async def crawl(kind: str, target: str) -> None:
                async with target_slots:
                    await self._crawl_target(client, downloader, kind, target)

            for feed in s.jsonl_feeds:
                await self.read_feed(session, feed)
            await asyncio.gather(*(crawl(k, t) for k, t in targets), self.drain_ingest(downloader))
            for folder in s.instaloader_dirs:
                await self.read_instaloader(folder)
        return dict(self.stats.local)

    async def _crawl_target(self, client: GraphApiClient, downloader: ImageDownloader, kind: str, target: str) -> None:
        if await self.cursors.is_done(kind, target):
            return
        try:
            hashtag_id = None
            if kind == HASHTAG:
                hashtag_id = await self._hashtag_id(client, target)
                if hashtag_id is None:
                    return
            after = await self.cursors.get(kind, target)
            pages = 0
            cursors_seen = {after}
            while not self._stop.is_set():
                owner, page = await self._fetch_page(client, kind, target, hashtag_id, after)
                pages += 1
                await self.stats.add(f"page:{kind}")
                await self._handle_page(downloader, page.items, owner)
                if page.after is None or not page.items:
                    await self.cursors.mark_done(kind, target)
                    LOG.info("%s %s: crawled to the end (%d pages)", kind, target, pages)
                    return
                if page.after in cursors_seen:  # the source sent us round in a circle: nothing new down that way
                    await self.stats.add("cursor_loop")
                    await self.cursors.mark_done(kind, target)
                    LOG.warning("%s %s: the cursor loops back after %d pages; target finished", kind, target, pages)
                    return
                cursors_seen.add(page.after)
                after = page.after
                await self.cursors.save(kind, target, after)
                if self.settings.max_pages_per_target and pages >= self.settings.max_pages_per_target:
                    return
        except GraphApiError as err:
            await self.stats.add(f"target_error:{err.code}")
            LOG.error("%s %s: %s; its cursor is kept for the next run", kind, target, err)
        except SourceError as err:
            await self.stats.add("bad_page")
            LOG.error("%s %s: %s; its cursor is kept for the next run", kind, target, err)

    async def _hashtag_id(self, client: GraphApiClient, hashtag: str) -> str | None:
        """The hashtag's Graph id (cached), or None when it is unknown or over the 30-hashtags-a-week quota."""
        cached = await self.quota.cached_id(hashtag)
        if cached:
            return cached
        if not await self.quota.allow(hashtag):
            await self.stats.add("hashtag_quota")
            days = self.quota.window_s / 86400
            LOG.warning("#%s not searched: %d unique hashtags already searched in %g days (the API's limit); "
                        "tried again next round", hashtag, self.quota.limit, days)  # fmt: skip
            # Done for this round: nothing of it was fetched (a hashtag once searched has its id cached and is never
            # blocked), and a round waiting for it would keep every other target from being crawled again.
            await self.cursors.mark_done(HASHTAG, hashtag)
            return None
        hashtag_id = await client.hashtag_id(hashtag)
        if hashtag_id is None:
            LOG.warning("hashtag #%s is unknown to the source: skipped", hashtag)
            await self.stats.add("unknown_hashtag")
            await self.cursors.mark_done(HASHTAG, hashtag)
            return None
        await self.quota.remember_id(hashtag, hashtag_id)
        return hashtag_id

    async def _fetch_page(
        self, client: GraphApiClient, kind: str, target: str, hashtag_id: str | None, after: str | None
    ) -> tuple[Owner | None, Page]:
        limit = self.settings.page_size
        if kind == HASHTAG:
            assert hashtag_id is not None
            return None, await client.hashtag_media(hashtag_id, self.settings.hashtag_edge, MEDIA_FIELDS, after, limit)
        account, page = await client.business_discovery(target, MEDIA_FIELDS, after, limit)
        owner = Owner(
            id=str(account.get("id") or target),
            username=account.get("username") or target,
            followers_count=account.get("followers_count"),
        )
        return owner, page

    async def _handle_page(self, downloader: ImageDownloader, items: Sequence[Any], owner: Owner | None) -> None:
        posts: dict[str, Post] = {}
        for node in items:
            if isinstance(node, dict) and not is_image(node):
                await self.stats.add("skipped_video")
                continue
            try:
                images = posts_from_media(node, source=self.source, owner=owner)
            except ValueError as err:
                await self.stats.add("malformed_media")
                LOG.warning("malformed media node skipped: %s", err)
                continue
            if len(images) > 1:
                await self.stats.add("carousel_images", len(images))
            if not images:
                await self.stats.add("skipped_album_without_images")
            for post in images:
                posts.setdefault(post.id, post)  # a page that repeats a post handles it once
        await self._handle_posts(downloader, list(posts.values()))

    async def _handle_posts(self, downloader: Fetcher, posts: list[Post]) -> set[str]:
        """Claim, download, enqueue, commit. Posts whose downloads failed go (back) on the ingest stream for a later
        run, whatever brought them: a crawl's cursor moves past their page, and a later round may never page back to
        it. Returns their ids."""
        claims = await asyncio.gather(*(self.claims.claim(p.id) for p in posts))
        taken = [p for p, c in zip(posts, claims, strict=True) if c is Claim.TAKEN]
        seen = [p for p, c in zip(posts, claims, strict=True) if c is Claim.SEEN]
        await self.stats.add("duplicate", len(seen))
        await self.stats.add("held_elsewhere", sum(c is Claim.HELD for c in claims))
        try:
            results = await asyncio.gather(*(self._fetch(downloader, p) for p in taken))
            refs = [r for r in results if r is not None]
            for start in range(0, len(refs), self.settings.batch_size):
                await asyncio.to_thread(self.sink.send_refs, refs[start : start + self.settings.batch_size])
        except BaseException:
            await self.claims.release([p.id for p in taken])
            raise
        await self.claims.commit([r.post.id for r in refs])
        retry_later = [p for p, r in zip(taken, results, strict=True) if r is None]
        await self.ingest.push(retry_later)  # before the release (and a drained entry's ack): a crash loses none
        await self.claims.release([p.id for p in retry_later])
        await self.stats.add("enqueued", len(refs))
        await self.stats.add("rejected", sum(r.rejected is not None for r in refs))
        await self.stats.measure_queues()
        with_owner = [r for r in refs if r.post.owner is not None]
        if with_owner or any(p.owner is not None for p in seen):
            await self._merge_owner(with_owner, [p for p in seen if p.owner is not None])
        return {p.id for p in retry_later}

    async def read_feed(self, session: aiohttp.ClientSession, url: str) -> None:
        """A partner's JSON-lines feed: every valid record joins the ingest stream (drained below, deduplicated
        there); each bad one is counted and logged with its line number and reason."""
        lines: list[bytes] = []
        size, limit = 0, self.settings.max_feed_bytes
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.http_timeout_s * 10)
            async with session.get(url, timeout=timeout) as response:
                if response.status != 200:
                    raise SourceError(f"HTTP {response.status}")
                async for line in response.content:
                    size += len(line)
                    if size > limit:
                        LOG.warning("feed %s: longer than %d bytes, the rest is left out", url, limit)
                        break
                    lines.append(line)
        except (TimeoutError, aiohttp.ClientError, SourceError) as err:
            await self.stats.add("feed_error")
            LOG.error("feed %s unreadable (%s); tried again next round", url, err)
            return
        posts, bad = parse_posts(lines, source="feed")
        for record in bad:
            LOG.warning("feed %s line %d rejected: %s", url, record.line, record.reason)
        await self.stats.add("feed_rejected", len(bad))
        await self.ingest.push(posts)

    async def read_instaloader(self, folder: Path) -> None:
        """Every post in an instaloader download folder (posts seen before are skipped by the claims)."""
        images = LocalImages(folder, self.blobs, self.settings.max_image_bytes)
        batch: list[Post] = []
        for sidecar, found in await asyncio.to_thread(lambda: list(instaloader.scan(folder))):
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

    async def drain_ingest(self, downloader: ImageDownloader) -> None:
        """Posts pushed through ``deeptarget enqueue`` / ``POST /ingest``, until the stream has none for us."""
        while not self._stop.is_set():
            batch = max(self.settings.page_size, 4 * self.settings.download_concurrency)  # keep the downloads busy
            entries = await self.ingest.take(self.consumer, batch, self.settings.claim_ttl_s * 1000)
            if not entries:
                return
            posts = list({post.id: post for _, post in entries}.values())
            retry_later = await self._handle_posts(downloader, posts)
            await self.stats.add("page:push")
            await self.ingest.ack([entry for entry, _ in entries])
            if retry_later:  # they are back at the end of the stream: a later run tries them again
                return

    async def _merge_owner(self, refs: list[PostRef], seen: list[Post]) -> None:
        """Posts first met under a hashtag learn their owner when met again through the owner's account."""
        await self.claims.mark_owner_known([r.post.id for r in refs])
        known = await self.claims.owner_known([p.id for p in seen])
        merges = [p for p, k in zip(seen, known, strict=True) if not k]
        if merges:
            await asyncio.to_thread(self.sink.send_merges, merges)
            await self.claims.mark_owner_known([p.id for p in merges])
            await self.stats.add("merged_owner", len(merges))

    async def _fetch(self, downloader: Fetcher, post: Post) -> PostRef | None:
        """The post's reference: with its stored image, or rejected with a reason; None to retry in a later run."""
        if not post.media_url:
            await self.stats.add("rejected:no_media_url")
            return PostRef(post=post, rejected="no_media_url")
        async with self._downloads:
            try:
                sha, size = await downloader(post.media_url)
            except ImageRejected as err:
                if err.reason == "download_failed":
                    await self.stats.add("download_failed")
                    failures = await self.claims.download_failed(post.id)
                    if failures < self.settings.max_download_failures:
                        LOG.warning("post %s: download failed after retries (%s), %d of %d times; left for a later "
                                    "run", post.id, err, failures, self.settings.max_download_failures)  # fmt: skip
                        return None
                await self.stats.add(f"rejected:{err.reason}")
                LOG.warning("post %s rejected: %s", post.id, err)
                return PostRef(post=post, rejected=err.reason)
        await self.stats.add("bytes", size)
        return PostRef(post=post, blob=sha)
