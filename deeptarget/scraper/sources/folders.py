"""Instaloader download folders (``settings.instaloader_dirs``) as a source, read once a round.

Every post of a folder, ``page_size`` at a time, with its image read from inside the folder (``LocalImages``); posts
seen before are skipped by the engine's claims, so ``scrape --forever`` picks up new downloads. Sidecars are hostile
input, checked in ``scraper/instaloader.py``: an unreadable one is counted and logged, a video counted and skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path

from deeptarget.core.records import Post
from deeptarget.core.settings import Settings
from deeptarget.scraper import instaloader
from deeptarget.scraper.instaloader import LocalImages
from deeptarget.scraper.sources.base import Batch
from deeptarget.scraper.stats import ScraperStats
from deeptarget.store.blobs import BlobStore

LOG = logging.getLogger(__name__)


class InstaloaderFolders:
    """On when ``settings.instaloader_dirs`` is not empty."""

    def __init__(self, settings: Settings, *, blobs: BlobStore, stats: ScraperStats, stop: asyncio.Event) -> None:
        self.settings = settings
        self.blobs = blobs
        self.stats = stats
        self._stop = stop

    @property
    def folders(self) -> list[Path]:
        return list(self.settings.instaloader_dirs)

    @property
    def enabled(self) -> bool:
        return bool(self.folders)

    async def batches(self, folder: Path) -> AsyncGenerator[Batch, None]:
        """The folder's posts, a page at a time; a page is counted once the caller handled it. A stop ends it."""
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
                yield Batch(batch, images)
                await self.stats.add("page:instaloader")
                batch = []
        if batch:
            yield Batch(batch, images)
            await self.stats.add("page:instaloader")
