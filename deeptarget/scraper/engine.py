"""The crawl engine: rounds over the sources, the post pipeline every batch goes through, and the stop.

The sources (``scraper/sources/``) say where posts come from: Graph API hashtags and accounts, partner feeds,
instaloader folders, and the ingest stream of pushed posts, each an async iterator of batches. The engine decides
when each runs. A round reads the feeds onto the ingest stream, walks every Graph target (``target_concurrency`` at
a time) while taking pushed posts off the stream, then reads the instaloader folders; ``serve`` runs rounds, one or
one every ``interval_s``, and with ``forever`` follows the ingest stream the whole time, so a pushed post never waits
for a round.

Per batch (``PostPipeline``): claim each post (dedup) -> download the claimed ones concurrently -> send their
references (``PostRef``) to the infer queue -> mark them seen; then the source goes on (a walk saves its cursor, a
pushed batch is acknowledged). Once a stop is requested nothing new starts (no target, hashtag search, page, retry or
download); the page in hand is finished, its posts not yet downloaded go on the ingest stream for the next run, and
its cursor is saved, so a restart resumes there with nothing lost or doubled.

When Redis or the blob store goes away, the operation in hand waits for it (capped backoff, cut short by a stop) and
carries on where it stopped (``outages.py``); a round that an outage broke anyway is run again from its cursors. The
scraper's claims name it by a stable identity (``claims.ScraperIdentity``), so a restarted scraper takes back what it
held, and keeps them alive by a heartbeat while it lives; a post another scraper holds goes on the retry-later set
until that claim must have run out, so a holder that died does not take it out of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from deeptarget.core.errors import CrawlStopped, ImageRejected
from deeptarget.core.records import Post, PostRef
from deeptarget.core.replies import deferred
from deeptarget.core.settings import Settings
from deeptarget.scraper.claims import Claim, PostClaims, ScraperIdentity
from deeptarget.scraper.connection import Connection
from deeptarget.scraper.cursors import CursorStore
from deeptarget.scraper.later import RetryLater
from deeptarget.scraper.outages import Dependency, blob_outage, redis_outage
from deeptarget.scraper.push import IngestStream
from deeptarget.scraper.quota import HashtagQuota
from deeptarget.scraper.sink import PostSink
from deeptarget.scraper.sources import (
    ACCOUNT,
    HASHTAG,
    Entries,
    Fetcher,
    GraphTargets,
    InstaloaderFolders,
    PartnerFeeds,
    PushedPosts,
)
from deeptarget.scraper.stats import ScraperStats
from deeptarget.scraper.stopping import sleep_or_stop
from deeptarget.store.blobs import BlobStore

__all__ = ["ACCOUNT", "HASHTAG", "Crawler", "Fetcher", "PostPipeline"]

LOG = logging.getLogger(__name__)


class PostPipeline:
    """A batch of posts from any source: claim -> download -> sink -> commit (``handle``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        sink: PostSink,
        claims: PostClaims,
        stats: ScraperStats,
        ingest: IngestStream,
        later: RetryLater,
        redis_dep: Dependency,
        blob_dep: Dependency,
        probe_blobs: Callable[[], Awaitable[None]],
        stop: asyncio.Event,
        source: str,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.claims = claims
        self.stats = stats
        self.ingest = ingest
        self.later = later
        self.redis_dep = redis_dep
        self.blob_dep = blob_dep
        self.probe_blobs = probe_blobs
        self._stop = stop
        self.source = source  # the crawl's own source: its posts' owners are marked known without a source name
        self._downloads = asyncio.Semaphore(settings.download_concurrency)

    async def handle(self, fetcher: Fetcher, posts: list[Post]) -> set[str]:
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
            retry_later = await self._fetch_and_send(fetcher, taken, seen)
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

    async def _fetch_and_send(self, fetcher: Fetcher, taken: list[Post], seen: list[Post]) -> set[str]:
        redis = self.redis_dep.call
        sent: list[PostRef] = []
        try:
            results = await asyncio.gather(*(self._fetch(fetcher, p) for p in taken))
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
        if self._stop.is_set():
            await self.stats.add("deferred_by_stop", len(retry_later))
            await redis(self.ingest.push, retry_later)
        else:
            await redis(self.later.put, retry_later)
        await redis(self.claims.release, [p.id for p in retry_later])
        await self.stats.add("enqueued", len(refs))
        await self.stats.add("rejected", sum(r.rejected is not None for r in refs))
        await self.stats.measure_queues()
        # A push of an id met before never rewrites that post (store/posts.py; issue 12, M4): no merge, no owner
        # marked known.
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

    async def _fetch(self, fetcher: Fetcher, post: Post) -> PostRef | None:
        """The post's reference: with its stored image, or rejected with a reason; None to retry in a later run
        (a download that failed, or one a stop came before). A blob store that cannot take the image (disk full)
        holds the download until it can (the store probed first, not the image fetched again for nothing)."""
        if not post.media_url:
            await self.stats.add("rejected:no_media_url")
            return PostRef(post=post, rejected="no_media_url")
        if self._stop.is_set():
            return None
        async with self._downloads:
            if self._stop.is_set():  # no download starts after a stop; the post goes on the ingest stream
                return None
            try:
                sha, size = await self.blob_dep.call_probed(self.probe_blobs, fetcher, post.media_url)
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
        stop = self._stop
        # Every Redis call (the broker's too) goes through redis_dep, every blob write through blob_dep: waited out.
        self.redis_dep = Dependency("redis", redis_outage, stop, max_wait_s=settings.outage_max_wait_s,
                                    answers=self._ping)  # fmt: skip
        self.blob_dep = Dependency("blobs", blob_outage, stop, max_wait_s=settings.outage_max_wait_s,
                                   answers=self._probe_blobs)  # fmt: skip
        self.identity = ScraperIdentity(settings.data_dir, settings.scraper_id)
        self.claims = PostClaims(redis, ttl_s=settings.claim_ttl_s)
        self.cursors = CursorStore(redis, source)
        self.stats = ScraperStats(redis, redis_up=lambda: self.redis_dep.up)
        self.ingest = IngestStream(redis)
        self.later = RetryLater(redis, settings.download_retry_delay_s)
        self.consumer = ""  # the identity, once entered
        self.quota = HashtagQuota(redis, settings.source_user_id, settings.hashtag_quota, settings.hashtag_quota_days)
        # The sources, each switched on by its settings; the ingest stream is always followed.
        self.graph = GraphTargets(settings, cursors=self.cursors, quota=self.quota, stats=self.stats,
                                  redis_dep=self.redis_dep, stop=stop, source=source)  # fmt: skip
        self.feeds = PartnerFeeds(settings, stats=self.stats, stop=stop)
        self.folders = InstaloaderFolders(settings, blobs=blobs, stats=self.stats, stop=stop)
        self.pushed = PushedPosts(settings, ingest=self.ingest, later=self.later, redis_dep=self.redis_dep, stop=stop)
        self.pipeline = PostPipeline(settings, sink=sink, claims=self.claims, stats=self.stats, ingest=self.ingest,
                                     later=self.later, redis_dep=self.redis_dep, blob_dep=self.blob_dep,
                                     probe_blobs=self._probe_blobs, stop=stop, source=source)  # fmt: skip
        self._connection: Connection | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._pushed_in_flight: set[str] = set()  # ingest entries being handled (the heartbeat keeps them ours)
        self._following = False  # an ingest follower runs: rounds leave the stream to it

    # -- stop -----------------------------------------------------------------------------------------------------
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

    # -- the connection and the claims' heartbeat -----------------------------------------------------------------
    async def __aenter__(self) -> Crawler:
        if self._connection is None:
            self.claims.owner = self.consumer = self.identity.acquire()
            self._connection = Connection(self.settings, self.redis, self.blobs, self._stop)
            self._heartbeat = asyncio.create_task(self._keep_alive())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._connection is not None:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
                await asyncio.gather(self._heartbeat, return_exceptions=True)
                self._heartbeat = None
            await self._connection.close()
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

    async def _ping(self) -> None:
        await deferred(self.redis.ping())

    async def _probe_blobs(self) -> None:
        await asyncio.to_thread(self.blobs.probe)

    # -- rounds ---------------------------------------------------------------------------------------------------
    @property
    def targets(self) -> list[tuple[str, str]]:
        return self.graph.targets

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
                    if not (self.graph.enabled or self.feeds.enabled or self.folders.enabled):
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
        """One crawl round over every source; resumes an unfinished round. Returns this run's counters."""
        if self._connection is None:
            async with self:
                return await self.run()
        connection = self._connection
        before = self.stats.local.copy()
        await self.graph.begin_round()
        targets = self.graph.targets
        target_slots = asyncio.Semaphore(self.settings.target_concurrency)

        async def crawl(kind: str, target: str) -> None:
            async with target_slots:
                await self._crawl_target(connection, kind, target)

        async with contextlib.aclosing(self.feeds.posts(connection.session)) as feeds:
            async for posts in feeds:
                await self._push(posts)
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
        for folder in self.folders.folders:
            await self.read_instaloader(folder)
        return dict(self.stats.local - before)

    # -- the sources, each through the pipeline -------------------------------------------------------------------
    async def _crawl_target(self, connection: Connection, kind: str, target: str) -> None:
        """One Graph target's walk; each page is handled before the walk saves its cursor and goes on."""
        walk = self.graph.walk(connection.client, connection.downloader, kind, target)
        try:
            async with contextlib.aclosing(walk) as pages:
                async for page in pages:
                    await self.pipeline.handle(page.fetcher, page.posts)
        except CrawlStopped:
            LOG.info("%s %s: stopped; its cursor is kept for the next run", kind, target)

    async def read_feed(self, session: aiohttp.ClientSession, url: str) -> None:
        """A partner's JSON-lines feed onto the ingest stream (``sources/feeds.py``)."""
        posts = await self.feeds.read(session, url)
        if posts is not None:
            await self._push(posts)

    async def _push(self, posts: list[Post]) -> None:
        with contextlib.suppress(CrawlStopped):  # not pushed: the next run reads the feed again
            await self.redis_dep.call(self.ingest.push, posts)

    async def read_instaloader(self, folder: Path) -> None:
        """Every post in an instaloader download folder (posts seen before are skipped by the claims)."""
        with contextlib.suppress(CrawlStopped):  # a stop while Redis was away: the next run reads the folder again
            async with contextlib.aclosing(self.folders.batches(folder)) as batches:
                async for batch in batches:
                    await self.pipeline.handle(batch.fetcher, batch.posts)

    async def follow_ingest(self, until: asyncio.Event | None = None) -> None:
        """Posts pushed through ``deeptarget enqueue`` / ``POST /ingest`` / feeds, as they arrive: a blocking group
        read, until a stop, or (with ``until``) until that event is set and the stream has nothing left for us.

        A post never waits for a full batch (``sources/ingest.py``). Up to ``ingest_batches_in_flight`` batches are
        handled at once, so one slow image does not hold back the ones behind it."""
        if self._connection is None:
            async with self:
                return await self.follow_ingest(until)
        downloader = self._connection.downloader
        outer = until is None
        if outer:
            self._following = True
        in_flight: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self.settings.ingest_batches_in_flight)

        def start(entries: Entries) -> None:
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
            async with contextlib.aclosing(self.pushed.batches(self.consumer, until)) as batches:
                while True:
                    await slots.acquire()  # the next take waits for a free slot
                    try:
                        entries = await anext(batches, None)
                    except BaseException:
                        slots.release()
                        raise
                    if entries is None:
                        slots.release()
                        break
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

    async def _handle_pushed(self, downloader: Fetcher, entries: Entries) -> None:
        """A stop while Redis is away leaves the entries pending: this scraper's next start takes them back."""
        posts = list({post.id: post for _, post in entries}.values())
        try:
            await self.pipeline.handle(downloader, posts)
        except CrawlStopped:
            return
        except Exception:
            # One post must not keep the others of its batch from going on: each alone, and what still fails stays
            # pending (another take gets it after claim_ttl_s; after MAX_DELIVERIES it goes to the dead letters).
            LOG.exception("a batch of %d pushed posts failed; handling them one by one", len(posts))
            with contextlib.suppress(CrawlStopped):
                for entry, post in entries:
                    try:
                        await self.pipeline.handle(downloader, [post])
                    except CrawlStopped:
                        raise
                    except Exception:
                        LOG.exception("pushed post %s not handled; it stays on the ingest stream", post.id[:100])
                        continue
                    await self.pushed.ack([(entry, post)])
            return
        await self.stats.add("page:push")
        with contextlib.suppress(CrawlStopped):  # handled but not acknowledged: SEEN when taken again
            await self.pushed.ack(entries)
