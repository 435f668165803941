"""Scraper counters: kept in Redis (shared by every scraper process, read by the CLI and demo) and exported to
Prometheus from the process that moved them."""

from __future__ import annotations

from collections import Counter

import redis.asyncio as aioredis
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from deeptarget import constants

POSTS = PromCounter("deeptarget_scraper_posts_total", "Posts seen by the scraper, by outcome", ["outcome"])
PAGES = PromCounter("deeptarget_scraper_pages_total", "API pages fetched, by target kind", ["kind"])
BYTES = PromCounter("deeptarget_scraper_image_bytes_total", "Image bytes downloaded")
QUEUE_DEPTH = Gauge("deeptarget_queue_depth", "Messages waiting in a Celery queue or the ingest stream", ["queue"])
DOWNLOAD_RETRIES = Gauge(
    "deeptarget_scraper_download_retries_waiting", "Posts whose image download failed, waiting for a later run"
)


class ScraperStats:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.local: Counter[str] = Counter()

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
        await self.redis.hincrby(constants.scraper_stats_key, outcome, n)

    async def measure_queues(self) -> None:
        """Queue lag: what waits for the workers (infer queue) and for the scrapers (ingest stream)."""
        QUEUE_DEPTH.labels(constants.infer_queue).set(await self.redis.llen(constants.infer_queue))
        QUEUE_DEPTH.labels("ingest").set(await self.redis.xlen(constants.ingest_stream))
        DOWNLOAD_RETRIES.set(await self.redis.hlen(constants.download_failures_key))

    @staticmethod
    async def read(redis: aioredis.Redis) -> dict[str, int]:
        raw = await redis.hgetall(constants.scraper_stats_key)
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
