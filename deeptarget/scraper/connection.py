"""What a crawl talks through: one HTTP pool, the Graph API client and the image downloader, built from settings.

It outlives a round (the ingest follower keeps going between rounds), and the fetch policy guards both the pool's
connections and the downloader's URLs (``fetch_policy.py``).
"""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis

from deeptarget.core.settings import Settings
from deeptarget.scraper.download import ImageDownloader
from deeptarget.scraper.fetch_policy import FetchPolicy
from deeptarget.scraper.graph import GraphApiClient
from deeptarget.scraper.tokens import TokenPool
from deeptarget.store.blobs import BlobStore


class Connection:
    """The session (feeds read through it too), the Graph client on the shared token budgets, the downloader."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, blobs: BlobStore, stop: asyncio.Event) -> None:
        s = settings
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
            redis,
            [t.get_secret_value() for t in s.all_access_tokens],
            s.token_calls,
            s.token_window_s,
            apps=s.token_app_of,
            stop=stop,
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
            stop=stop,
        )
        self.downloader = ImageDownloader(
            self.session,
            blobs,
            max_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels,
            timeout_s=s.http_timeout_s,
            retries=s.http_retries,
            stop=stop,
            policy=policy,
        )

    async def close(self) -> None:
        await self.session.close()
