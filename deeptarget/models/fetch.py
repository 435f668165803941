"""``deeptarget models fetch``: the one place in the project that downloads, and only when asked.

Each file of the registry (``models/files.py``) is fetched from its upstream URL, or the same file name under a
``--mirror`` URL, or copied from a ``--mirror`` folder, into a staging file beside its cache
(``<cache>/.partial/<file>.part``), checked against its recorded SHA-256 (or torchvision's prefix) and only then
renamed into place (fsync, ``os.replace``, fsync of the folder), so the code never finds a file that did not pass.

- An interrupted download resumes with ``Range: bytes=<have>-``; a server that answers 200 instead of 206 (it ignores
  Range) is read from the start again, and a 206 whose ``Content-Range`` starts elsewhere is too. Both are what HTTP
  allows: "a server MAY ignore the Range header field" and then sends the whole representation with 200, and a 206
  names the part it sends in Content-Range (RFC 9110, sections 14.2, 14.4 and 15.3.7).
- The registry's size bounds the download: a server announcing or sending more is an error (and the part is dropped).
- A cut-short download keeps its part for the next run; a wrong digest deletes it.
- Hosts: upstream, only the URL's own host and the hosts its entry names for redirects, over HTTPS; with a mirror
  URL, only the mirror's host. No proxy from the environment (``trust_env=False``): nothing else is contacted.
  (``scraper/fetch_policy.py`` is for scraped content; it does not apply here.)
- Timeouts: connecting (``connect_timeout_s``) and every read (``read_timeout_s``): a mirror that hangs is an error
  naming the file, not a stuck command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiohttp

from deeptarget.core.errors import ModelFetchError
from deeptarget.models.files import FileCheck, ModelFile, cache_path, check_file, fsync_dir

LOG = logging.getLogger(__name__)

CHUNK = 256 * 1024
MAX_REDIRECTS = 5
STAGING_DIR = ".partial"
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

Progress = Callable[[ModelFile, int, int | None], None]
"""Called as bytes arrive: (file, bytes so far, total bytes or None when unknown)."""


@dataclass(frozen=True)
class FetchOptions:
    mirror: str | None = None  # an http(s):// URL serving the registry's file names, or a folder holding them
    force: bool = False  # fetch again even when the file is there and passes its check
    connect_timeout_s: float = 15.0
    read_timeout_s: float = 60.0

    @property
    def mirror_url(self) -> str | None:
        mirror = self.mirror
        return mirror if mirror and mirror.startswith(("http://", "https://")) else None

    @property
    def mirror_dir(self) -> Path | None:
        return Path(self.mirror) if self.mirror and self.mirror_url is None else None


@dataclass(frozen=True)
class Fetched:
    entry: ModelFile
    path: Path
    action: str  # "fetched", "copied", "already there"
    check: FileCheck
    source: str  # the URL or file it came from ("" when it was already there)
    resumed_at: int = 0  # bytes already staged from an earlier, interrupted run

    @property
    def shown(self) -> str:
        resumed = f" (resumed at byte {self.resumed_at:,})" if self.resumed_at else ""
        origin = f" from {self.source}" if self.source else ""
        return f"{self.entry.name}: {self.action}{origin}{resumed} -> {self.path}, {self.check.status}"


def staging_file(dest: Path) -> Path:
    return dest.parent / STAGING_DIR / f"{dest.name}.part"


def _fail(entry: ModelFile, reason: str) -> ModelFetchError:
    return ModelFetchError(f"{entry.name} ({entry.file_name}): {' '.join(reason.split())}")


def source_url(entry: ModelFile, options: FetchOptions) -> str:
    mirror = options.mirror_url
    return f"{mirror.rstrip('/')}/{entry.file_name}" if mirror else entry.url


def allowed_hosts(entry: ModelFile, options: FetchOptions) -> frozenset[str]:
    """The hosts a fetch of ``entry`` may contact (redirects included)."""
    mirror = options.mirror_url
    if mirror:
        return frozenset({(urlsplit(mirror).hostname or "").lower()})
    return frozenset({(urlsplit(entry.url).hostname or "").lower(), *(h.lower() for h in entry.hosts)})


class _Restart(Exception):
    """The staged part cannot be continued: start from byte 0."""


class Fetcher:
    """Fetches registry entries into their caches. ``files_dir``: ``settings.model_files_dir``."""

    def __init__(self, files_dir: Path, options: FetchOptions, progress: Progress | None = None) -> None:
        self.files_dir = files_dir
        self.options = options
        self.progress = progress or (lambda entry, done, total: None)

    def destination(self, entry: ModelFile) -> Path:
        return cache_path(entry, self.files_dir)

    async def fetch_all(self, entries: Iterable[ModelFile]) -> tuple[list[Fetched], list[ModelFetchError]]:
        """Every entry, one after another; a failure is reported and the next one is tried."""
        done: list[Fetched] = []
        failed: list[ModelFetchError] = []
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.options.connect_timeout_s, sock_read=self.options.read_timeout_s
        )
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False, auto_decompress=False) as session:
            for entry in entries:
                try:
                    done.append(await self.fetch(session, entry))
                except ModelFetchError as err:
                    failed.append(err)
        return done, failed

    async def fetch(self, session: aiohttp.ClientSession, entry: ModelFile) -> Fetched:
        dest = self.destination(entry)
        existing = check_file(entry, dest)
        if existing.ok and not self.options.force:
            return Fetched(entry, dest, "already there", existing, "")
        if existing.present and not existing.ok:
            LOG.warning("%s fails verification (%s): fetching it again", dest, existing.problem)
        staging = staging_file(dest)
        try:
            staging.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _fail(entry, f"cannot create {staging.parent}: {err}") from None
        if self.options.force:
            staging.unlink(missing_ok=True)
        try:
            mirror_dir = self.options.mirror_dir
            if mirror_dir is not None:
                source = str(mirror_dir / entry.file_name)
                try:
                    await asyncio.to_thread(self._copy, entry, mirror_dir / entry.file_name, staging)
                    check = self._verify(entry, staging)
                except ModelFetchError:
                    staging.unlink(missing_ok=True)  # a copy is not resumed
                    raise
                action, resumed_at = "copied", 0
            else:
                source = source_url(entry, self.options)
                resumed_at = await self._download(session, entry, source, staging)
                action = "fetched"
                check = self._verify(entry, staging)
            try:
                os.replace(staging, dest)
                fsync_dir(dest.parent)
            except OSError as err:
                raise _fail(entry, f"cannot move it into place at {dest}: {err}") from None
        finally:
            with contextlib.suppress(OSError):
                staging.parent.rmdir()  # only when nothing is staged there (a part kept for a resume stays)
        return Fetched(entry, dest, action, replace(check, path=dest), source, resumed_at)

    def _verify(self, entry: ModelFile, staging: Path) -> FileCheck:
        """The staged file's check; it is kept when it is only short (a resume finishes it), deleted when wrong."""
        check = check_file(entry, staging)
        if check.ok:
            return check
        size = check.size or 0
        if size < entry.min_size:
            raise _fail(
                entry,
                f"download cut short: {size:,} of {entry.exact_size or entry.min_size:,} bytes; the part is kept in "
                f"{staging.parent}: run the fetch again to resume",
            )
        staging.unlink(missing_ok=True)
        raise _fail(entry, f"wrong file, NOT used: {check.problem}; the download was deleted")

    def _copy(self, entry: ModelFile, source: Path, staging: Path) -> None:
        """Copy ``source`` (a mirror folder's file) to ``staging``, bounded by the registry's size."""
        try:
            size = source.stat().st_size
        except FileNotFoundError:
            raise _fail(entry, f"not in the mirror folder {source.parent}") from None
        except OSError as err:
            raise _fail(entry, f"cannot read {source}: {err}") from None
        if not source.is_file():
            raise _fail(entry, f"{source} is not a regular file")
        if not entry.min_size <= size <= entry.max_size:
            expected = f"{entry.exact_size:,}" if entry.exact_size else f"{entry.min_size:,} to {entry.max_size:,}"
            raise _fail(entry, f"wrong file, NOT used: {source} is {size:,} bytes, expected {expected}")
        done = 0
        try:
            with open(source, "rb") as src, open(staging, "wb") as out:
                while block := src.read(CHUNK):
                    done += len(block)
                    if done > entry.max_size:  # it grew while being copied
                        raise _fail(entry, f"{source} grew past the {entry.max_size:,} bytes expected")
                    out.write(block)
                    self.progress(entry, done, size)
                out.flush()
                os.fsync(out.fileno())
        except OSError as err:
            raise _fail(entry, f"copy from {source} failed: {err}") from None

    async def _download(self, session: aiohttp.ClientSession, entry: ModelFile, url: str, staging: Path) -> int:
        """Download ``url`` into ``staging``, continuing a part already there; the offset it continued from."""
        try:
            have = staging.stat().st_size
        except FileNotFoundError:
            have = 0
        if have > entry.max_size:
            staging.unlink()
            have = 0
        if have and have == entry.exact_size:
            return have  # complete from an earlier run that stopped before its check: check it
        try:
            return await self._download_from(session, entry, url, staging, have)
        except _Restart:
            staging.unlink(missing_ok=True)
            return await self._download_from(session, entry, url, staging, 0)

    async def _download_from(
        self, session: aiohttp.ClientSession, entry: ModelFile, url: str, staging: Path, have: int
    ) -> int:
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        done = have
        total: int | None = None
        try:
            response = await self._get(session, entry, url, headers)
            async with response:
                status = response.status
                if status == 416 and have:
                    raise _Restart  # the part is no prefix of this file (or it is complete and the server says so)
                if status == 404:
                    raise _fail(entry, f"not found (HTTP 404) at {response.url}")
                if status not in (200, 206):
                    raise _fail(entry, f"HTTP {status} {response.reason or ''} from {response.url}")
                if status == 206:
                    start, total = self._content_range(response)
                    if start != have:
                        raise _Restart
                elif have:
                    LOG.info("%s: the server ignored the Range request (200, not 206): downloading again", url)
                    have = done = 0
                if status == 200 and response.content_length is not None:
                    total = response.content_length
                if total is not None and total > entry.max_size:
                    raise _fail(
                        entry, f"the server announces {total:,} bytes, more than the {entry.max_size:,} expected"
                    )
                with open(staging, "ab" if have else "wb") as out:
                    async for block in response.content.iter_chunked(CHUNK):
                        done += len(block)
                        if done > entry.max_size:
                            out.close()
                            staging.unlink(missing_ok=True)
                            raise _fail(entry, f"the server sent more than the {entry.max_size:,} bytes expected")
                        out.write(block)
                        self.progress(entry, done, total or entry.exact_size)
                    out.flush()
                    os.fsync(out.fileno())
        except aiohttp.ConnectionTimeoutError:
            raise _fail(entry, f"could not connect within {self.options.connect_timeout_s:g} s to {url}") from None
        except (aiohttp.SocketTimeoutError, TimeoutError):
            raise _fail(
                entry,
                f"no data for {self.options.read_timeout_s:g} s from {url} (read timeout) after {done:,} bytes; "
                + ("the part is kept: run the fetch again to resume" if done else "nothing was kept"),
            ) from None
        except aiohttp.ClientPayloadError as err:
            raise _fail(
                entry,
                f"download cut short at {done:,} of {total or entry.exact_size or '?'} bytes ({err}); the part is kept "
                "in its staging folder: run the fetch again to resume",
            ) from None
        except aiohttp.ClientConnectorError as err:
            raise _fail(entry, f"cannot connect to {url}: {err.os_error or err}") from None
        except aiohttp.ClientError as err:
            raise _fail(entry, f"{type(err).__name__} from {url}: {err}") from None
        except OSError as err:  # the disk, not the network
            raise _fail(entry, f"cannot write {staging}: {err}") from None
        return have

    async def _get(
        self, session: aiohttp.ClientSession, entry: ModelFile, url: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """GET ``url``, following redirects by hand: only to allowed hosts, never from HTTPS down to HTTP, and
        upstream (no mirror) over HTTPS only."""
        hosts = allowed_hosts(entry, self.options)
        https_only = self.options.mirror_url is None
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if (parts.hostname or "").lower() not in hosts:
                raise _fail(entry, f"refusing {parts.hostname}: only {', '.join(sorted(hosts))} may be contacted")
            if parts.scheme not in ("http", "https") or (https_only and parts.scheme != "https"):
                raise _fail(entry, f"refusing {parts.scheme}:// for {parts.hostname}: HTTPS is wanted")
            response = await session.get(url, headers=headers, allow_redirects=False)
            if response.status not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("Location", "")
            response.release()
            if not location:
                raise _fail(entry, f"HTTP {response.status} without a Location from {url}")
            target = urljoin(url, location)
            if parts.scheme == "https" and urlsplit(target).scheme != "https":
                raise _fail(entry, f"refusing a redirect from HTTPS to {urlsplit(target).scheme}:// ({url})")
            url = target
        raise _fail(entry, f"more than {MAX_REDIRECTS} redirects from {source_url(entry, self.options)}")

    @staticmethod
    def _content_range(response: aiohttp.ClientResponse) -> tuple[int, int | None]:
        """(first byte, total) of a 206 answer, from its Content-Range."""
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not match:
            raise _Restart
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), total


def fetch_files(
    entries: Sequence[ModelFile], files_dir: Path, options: FetchOptions, progress: Progress | None = None
) -> tuple[list[Fetched], list[ModelFetchError]]:
    """``Fetcher(...).fetch_all(entries)`` from synchronous code."""
    return asyncio.run(Fetcher(files_dir, options, progress).fetch_all(entries))
