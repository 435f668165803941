"""Scraper counters: kept in Redis (shared by every scraper process, read by the CLI and demo) and exported to
Prometheus from the process that moved them. A counter never stops a crawl: while Redis is away, increments wait
in the process and go to Redis with the next one that gets through."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import redis.asyncio as aioredis
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from redis.exceptions import RedisError

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.core.replies import deferred

POSTS = PromCounter("deeptarget_scraper_posts_total", "Posts seen by the scraper, by outcome", ["outcome"])
PAGES = PromCounter("deeptarget_scraper_pages_total", "API pages fetched, by target kind", ["kind"])
BYTES = PromCounter("deeptarget_scraper_image_bytes_total", "Image bytes downloaded")
QUEUE_DEPTH = Gauge("deeptarget_queue_depth", "Messages waiting in a Celery queue or the ingest stream", ["queue"])
DOWNLOAD_RETRIES = Gauge(
    "deeptarget_scraper_download_retries_waiting", "Posts whose image download failed, waiting for a later run"
)
DEPENDENCY_UP = Gauge(
    "deeptarget_scraper_dependency_up", "1 while the scraper can use a dependency (redis, blobs), 0 in an outage",
    ["dependency"],
)  # fmt: skip
OUTAGES = PromCounter(
    "deeptarget_scraper_outages_total", "Outages of a dependency the scraper waited out", ["dependency"]
)


class ScraperStats:
    """``redis_up``: whether Redis is thought reachable (while it is not, counts wait without trying it)."""

    def __init__(self, redis: aioredis.Redis, redis_up: Callable[[], bool] = lambda: True) -> None:
        self.redis = redis
        self.redis_up = redis_up
        self.local: Counter[str] = Counter()
        self._unsent: Counter[str] = Counter()

    async def add(self, outcome: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.local[outcome] += n
        if outcome.startswith("page:"):
            PAGES.labels(outcome.removeprefix("page:")).inc(n)
        elif outcome == "bytes":
            BYTES.inc(n)
        else:
            POSTS.labels(outcome).inc(n)
        self._unsent[outcome] += n
        await self.flush()

    async def flush(self) -> None:
        """Send the counts Redis has not had yet; kept for the next try when it is away."""
        if not self._unsent or not self.redis_up():
            return
        unsent, self._unsent = self._unsent, Counter()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for outcome, n in unsent.items():
                    pipe.hincrby(keys.scraper_stats_key, outcome, n)
                await pipe.execute()
        except RedisError:
            self._unsent.update(unsent)

    async def measure_queues(self) -> None:
        """Queue lag: what waits for the workers (infer queue) and for the scrapers (ingest stream)."""
        if not self.redis_up():
            return
        try:
            QUEUE_DEPTH.labels(jobs.infer_queue).set(await deferred(self.redis.llen(jobs.infer_queue)))
            QUEUE_DEPTH.labels("ingest").set(await self.redis.xlen(keys.ingest_stream))
            DOWNLOAD_RETRIES.set(await deferred(self.redis.hlen(keys.download_failures_key)))
        except RedisError:
            pass  # a gauge can wait for the next page

    @staticmethod
    async def read(redis: aioredis.Redis) -> dict[str, int]:
        raw = await deferred(redis.hgetall(keys.scraper_stats_key))
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
