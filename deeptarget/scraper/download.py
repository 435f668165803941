"""Image downloads into the content-addressed blob store, with type and size limits.

The body is streamed to a temporary file and renamed under its sha256 only when complete; a download that breaks a
limit is abandoned on the spot. Transient failures are retried with backoff; the rest become ``ImageRejected``. A blob
store that cannot take the image (disk full: ``StorageUnavailable``) is not the image's fault: it passes up as it is,
for the caller to wait out (``outages.py``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from urllib.parse import urljoin

import aiohttp
from PIL import Image
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from deeptarget.core.errors import CrawlStopped, ImageRejected
from deeptarget.core.image_header import check_pixels, sniff_image_type
from deeptarget.scraper.fetch_policy import FetchPolicy, FetchRefused, NotPublicAddress
from deeptarget.scraper.stopping import sleep_or_stop
from deeptarget.store.blobs import BlobStore, StorageUnavailable

LOG = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class _Transient(Exception):
    pass


class DownloadDeferred(CrawlStopped):
    """A stop came while the download waited to try again: the post is left for the next run, not counted failed."""


class ImageDownloader:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        blobs: BlobStore,
        *,
        max_bytes: int,
        max_pixels: int | None = None,
        timeout_s: float = 20.0,
        retries: int = 3,
        stop: asyncio.Event | None = None,
        policy: FetchPolicy | None = None,
    ) -> None:
        self.session = session
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self.retries = retries
        self.stop = stop or asyncio.Event()
        self.policy = policy  # None: any URL (a library default for tests and notebooks; the crawler passes one)

    async def _sleep(self, seconds: float) -> None:
        """Tenacity's wait between tries, cut short by a stop (no new try starts after it)."""
        if await sleep_or_stop(self.stop, seconds):
            raise DownloadDeferred("stop requested between download tries")

    async def __call__(self, url: str) -> tuple[str, int]:
        """Download ``url``; returns (sha256, bytes). Raises ``ImageRejected`` with the reason it gave up."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception_type(_Transient),
            reraise=True,
            sleep=self._sleep,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._once(url)
        except _Transient as err:
            if self.stop.is_set():
                raise DownloadDeferred(str(err)) from err
            raise ImageRejected("download_failed", str(err)) from err
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, url: str) -> tuple[str, int]:
        """One try: redirects are followed by hand, each hop checked against the fetch policy."""
        for _ in range(MAX_REDIRECTS + 1):
            self._allowed(url)
            location = await self._get(url)
            if isinstance(location, tuple):
                return location
            url = location
        raise ImageRejected("too_many_redirects", f"more than {MAX_REDIRECTS}")

    def _allowed(self, url: str) -> None:
        if self.policy is None:
            return
        try:
            self.policy.check(url)
        except FetchRefused as err:
            raise ImageRejected("not_allowed", str(err)) from None

    async def _get(self, url: str) -> tuple[str, int] | str:
        """The stored image (sha256, bytes), or the URL a redirect points to."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        writer = None
        try:
            async with self.session.get(url, timeout=timeout, allow_redirects=False) as response:
                if response.status in REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise ImageRejected("http_error", f"HTTP {response.status} without a Location")
                    return urljoin(url, location)
                if response.status >= 500 or response.status == 429:
                    raise _Transient(f"HTTP {response.status}")
                if response.status != 200:
                    raise ImageRejected("http_error", f"HTTP {response.status}")
                content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if (
                    content_type
                    and not content_type.startswith("image/")
                    and content_type != "application/octet-stream"
                ):
                    raise ImageRejected("not_an_image", f"content-type {content_type[:80]}")
                if response.content_length is not None and response.content_length > self.max_bytes:
                    raise ImageRejected("too_large", f"{response.content_length} bytes > {self.max_bytes}")
                writer = self.blobs.writer()
                head = b""
                async for chunk in response.content.iter_chunked(CHUNK):
                    if len(head) < 16:
                        head += chunk[:16]
                        if len(head) >= 12 and sniff_image_type(head) is None:
                            raise ImageRejected("not_an_image", f"magic bytes {head[:8]!r}")
                    writer.write(chunk)
                    if writer.size > self.max_bytes:
                        raise ImageRejected("too_large", f"more than {self.max_bytes} bytes")
                if writer.size == 0:
                    raise ImageRejected("empty_image")
                if sniff_image_type(head) is None:
                    raise ImageRejected("not_an_image", f"magic bytes {head[:8]!r}")
                self._check_pixels(writer.path)
                size = writer.size
                # in a thread: the fsync, and with a bucket the upload, must not stall the other downloads
                return await asyncio.to_thread(writer.commit), size
        except aiohttp.ClientConnectorDNSError as err:
            if isinstance(err.os_error, NotPublicAddress):  # refused at connect time: say nothing of the network
                raise ImageRejected("not_allowed", "not an allowed host (no public address)") from None
            raise _Transient(type(err).__name__) from None
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            raise _Transient(type(err).__name__) from None
        except aiohttp.ClientResponseError as err:  # a broken answer (bad header lines, not HTTP): this post's
            raise ImageRejected("bad_response", f"{type(err).__name__} (HTTP {err.status})") from None
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError, ValueError) as err:
            # One malformed URL is that post's problem, never the crawl's: before, it escaped and ended the run.
            raise ImageRejected("bad_url", f"{type(err).__name__}: {str(err)[:200]}") from None
        except aiohttp.ClientError as err:
            raise ImageRejected("http_error", type(err).__name__) from None
        except StorageUnavailable:
            raise
        except OSError as err:  # the store refused this one file (too big for the file system): this post's problem
            raise ImageRejected("storage_error", errno.errorcode.get(err.errno or 0, type(err).__name__)) from None
        finally:
            if writer is not None:
                writer.abort()

    def _check_pixels(self, path: Path) -> None:
        """Reject an image over the pixel limit from its header (nothing is decoded). A header PIL cannot read is
        left to the workers, whose decoder says precisely what is wrong with it."""
        if self.max_pixels is None:
            return
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return
        check_pixels(width, height, max_pixels=self.max_pixels)
