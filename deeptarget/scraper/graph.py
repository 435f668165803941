"""A client for the Instagram Graph API's hashtag and business-discovery endpoints (and the sandbox, which speaks them).

Written from Meta's documentation; ``GRAPH_API.md`` beside this file cites each behaviour. Every request takes a
token from the shared ``TokenPool`` (budget per token, rotation). Outcomes (``graph_errors.py`` decides which):

- throttled: ``#4`` (the app's limit) pauses every token of the app, ``#17``/``#32``/``#613``/``80002``/HTTP 429
  pause the token, for ``Retry-After`` / ``estimated_time_to_regain_access`` when sane or ``throttle_pause_s``,
  never above ``max_pause_s``; the request goes again on another token. This uses up no retries;
- usage headers (``X-App-Usage``, ``X-Business-Use-Case-Usage``) at or above ``usage_pause_at`` percent: the answer
  is used, and the token pauses before it gets throttled;
- OAuth error 190: the token is retired and the request goes again on another one;
- transient (5xx, ``is_transient``, codes 1 and 2, resets, timeouts, a page cut short): retried with exponential
  backoff and full jitter, up to ``retries`` times;
- any other error: ``GraphApiError``, not retried.

Paging follows the documentation, not a guess: a hashtag edge is paged by its ``next`` link until ``next`` is absent
(its ``after`` cursor is documented to repeat on every page, so the cursor alone says nothing); business discovery's
nested media edge has no ``next`` at all, so the client builds ``.after(CURSOR)`` itself and stops when no new
``after`` comes. Empty and short pages are normal (the API filters after paging) and never end a walk.

The token goes where ``token_in`` says: the ``access_token`` query parameter (as documented) or an ``Authorization``
header. Either way it never reaches a log line, an error or a metric: messages name the path only, and redirects
are not followed (a redirect would carry a query token to another host).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
from prometheus_client import Counter, Histogram

from deeptarget.core.errors import CrawlStopped, GraphApiError, SourceError
from deeptarget.scraper.graph_errors import (
    ErrorBody,
    GraphTransientError,
    InvalidToken,
    Throttled,
    bounded_pause,
    classify,
    usage,
)
from deeptarget.scraper.stopping import sleep_or_stop
from deeptarget.scraper.tokens import Lease, TokenPool

LOG = logging.getLogger(__name__)

REQUESTS = Counter("deeptarget_scraper_requests_total", "Graph API requests by outcome", ["outcome"])
LATENCY = Histogram("deeptarget_scraper_request_seconds", "Graph API request latency")

TokenPlacement = Literal["query", "header"]
MAX_BODY_BYTES = 16 * 1024 * 1024  # a page of 50 media is tens of KB; anything near this is not a Graph answer


@dataclass
class Page:
    items: list[dict[str, Any]]
    next: str | None  # what the next call takes to fetch the page after this one; None at the documented end
    problem: str | None = None  # why paging cannot go on although the API did not say it ended


@dataclass
class GraphApiClient:
    session: aiohttp.ClientSession
    base_url: str
    user_id: str
    tokens: TokenPool
    retries: int = 3
    timeout_s: float = 20.0
    max_wait_s: float = 30.0
    throttle_pause_s: float = 60.0
    max_pause_s: float = 3600.0
    usage_pause_at: float = 95.0
    token_in: TokenPlacement = "query"
    stop: asyncio.Event | None = None

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        try:
            return await self._get(path, params)
        except SourceError as err:  # a server may echo the request, token and all, into its error message
            err.args = tuple(self.tokens.redact(a) if isinstance(a, str) else a for a in err.args)
            raise

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        failures = 0
        while True:
            self._check_stop()
            lease = await self.tokens.acquire()
            try:
                with LATENCY.time():
                    calls = [lease.call_id]
                    try:
                        payload = await self._get_once(path, params, lease, calls)
                    finally:
                        await self.tokens.done(lease, calls)
                REQUESTS.labels("ok").inc()
                return payload
            except Throttled as err:
                REQUESTS.labels(f"throttled_{err.scope}").inc()
                pause = bounded_pause(err.wait_s, self.throttle_pause_s, self.max_pause_s)
                if err.scope == "app":
                    await self.tokens.pause_app(lease, pause, str(err))
                else:
                    await self.tokens.pause(lease, pause, str(err))
            except InvalidToken as err:
                REQUESTS.labels("invalid_token").inc()
                await self.tokens.retire(lease, str(err))
            except GraphTransientError as err:
                REQUESTS.labels("transient").inc()
                failures += 1
                if failures > self.retries:
                    raise
                delay = random.uniform(0, min(self.max_wait_s, 0.5 * 2**failures))
                LOG.warning("%s; retry %d of %d in %.1f s", err, failures, self.retries, delay)
                await self._sleep(delay)
            except GraphApiError:
                REQUESTS.labels("error").inc()
                raise

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise CrawlStopped("stop requested: no new request")

    async def _sleep(self, seconds: float) -> None:
        if self.stop is None:
            await asyncio.sleep(seconds)
            return
        if await sleep_or_stop(self.stop, seconds):
            raise CrawlStopped("stop requested during a retry's backoff")

    async def _get_once(self, path: str, params: dict[str, str], lease: Lease, calls: list[str]) -> dict[str, Any]:
        url = path if path.startswith(("http://", "https://")) else self.base_url.rstrip("/") + "/" + path.lstrip("/")
        params = {k: v for k, v in params.items() if k != "access_token"}
        headers = {}
        if self.token_in == "query":
            params["access_token"] = lease.token
        else:
            headers["Authorization"] = f"Bearer {lease.token}"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        what = f"GET {urlsplit(url).path}"

        attempts = 0

        async def every_attempt_is_a_call(
            request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
        ) -> aiohttp.ClientResponse:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # aiohttp resends once on a dropped keep-alive connection: another call on the wire
                calls.append(await self.tokens.take_again(lease))
            return await handler(request)

        try:
            async with self.session.get(
                url,
                params=params,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                middlewares=(every_attempt_is_a_call,),
            ) as response:
                if response.content_length is not None and response.content_length > MAX_BODY_BYTES:
                    raise SourceError(f"{what}: HTTP {response.status}, a body of {response.content_length} bytes")
                chunks, size = [], 0
                async for chunk in response.content.iter_chunked(64 * 1024):  # the whole body, however it comes
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise SourceError(f"{what}: HTTP {response.status}, a body over {MAX_BODY_BYTES} bytes")
                    chunks.append(chunk)
                body = b"".join(chunks)
                status = response.status
                response_headers = response.headers
        # An aiohttp exception's text can hold the URL, and with it a query token: name its type only, and raise
        # outside the handler so that nothing keeps it as cause or context (a traceback would print its text).
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            failure: SourceError | None = GraphTransientError(f"{what}: {type(err).__name__}")
        except aiohttp.ClientResponseError as err:  # e.g. a header line too long: the answer is broken, not late
            failure = GraphTransientError(f"{what}: {type(err).__name__} (HTTP {err.status})")
        except aiohttp.ClientError as err:
            failure = SourceError(f"{what}: {type(err).__name__}")
        else:
            failure = None
        if failure is not None:
            raise failure
        if 300 <= status < 400:
            raise SourceError(f"{what}: HTTP {status} redirect, not followed (the Graph API does not redirect)")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            if status >= 500 or status == 200:  # a 200 whose body does not parse was cut short on the way
                raise GraphTransientError(f"{what}: HTTP {status}, body is not JSON") from err
            raise classify(status, None, response_headers, what) or SourceError(f"{what}: body is not JSON") from err
        if not isinstance(payload, dict):
            raise SourceError(f"{what}: expected a JSON object, got {type(payload).__name__}")
        refused = classify(status, ErrorBody.of(payload), response_headers, what)
        if refused is not None:
            raise refused
        used = usage(response_headers)
        pause = bounded_pause(used.regain_s, self.throttle_pause_s, self.max_pause_s)
        if used.app_percent >= self.usage_pause_at:  # X-App-Usage is the app's: all its tokens slow down
            await self.tokens.pause_app(lease, pause, f"app usage at {used.app_percent:.0f}%")
        elif used.account_percent >= self.usage_pause_at:
            await self.tokens.pause(lease, pause, f"usage at {used.account_percent:.0f}%")
        return payload

    # -- endpoints ------------------------------------------------------------------------------------------------
    async def hashtag_id(self, hashtag: str) -> str | None:
        payload = await self.get("ig_hashtag_search", {"user_id": self.user_id, "q": hashtag})
        data = payload.get("data")
        first = data[0] if isinstance(data, list) and data else None
        found = first.get("id") if isinstance(first, dict) else None
        return str(found) if isinstance(found, str | int) and not isinstance(found, bool) and str(found) else None

    async def hashtag_media(
        self, hashtag_id: str, edge: str, fields: str, resume: str | None = None, limit: int = 25
    ) -> Page:
        """A page of a hashtag edge. ``resume`` is a page's ``next`` (or a bare ``after`` cursor saved by an older
        version). The next page is the one the ``next`` link names: the edge's ``after`` repeats on every page
        (IG Hashtag Recent Media / Top Media, Limitations), so only the link tells pages apart."""
        path = f"{hashtag_id}/{edge}"
        params = {"user_id": self.user_id, "fields": fields, "limit": str(limit)}
        if resume and resume.startswith("/"):
            path, params = self._next_request(resume, path)
        elif resume:
            params["after"] = resume
        payload = await self.get(path, params)
        items = self._items(payload)
        paging = payload.get("paging")
        next_link = paging.get("next") if isinstance(paging, dict) else None
        # Graph API, Paginated Results: "stop paging when the next link no longer appears" (an empty page may
        # still carry one).
        if not next_link:
            return Page(items=items, next=None)
        try:
            return Page(items=items, next=self._resume_of(next_link, f"{hashtag_id}/{edge}"))
        except SourceError as err:  # the page is still good; only the way on is not
            return Page(items=items, next=None, problem=self.tokens.redact(str(err)))

    def _resume_of(self, next_link: Any, edge_path: str) -> str:
        """A ``next`` link as something to save and call later: its path and query, the token taken out. Only a
        link to the same edge on the configured API host is followed (a link elsewhere would be handed our token)."""
        if not isinstance(next_link, str) or len(next_link) > 8192:
            raise SourceError("paging.next is not a usable link")
        base, link = urlsplit(self.base_url), urlsplit(next_link)
        if link.netloc and (link.scheme, link.netloc) != (base.scheme, base.netloc):
            raise SourceError(f"paging.next points to another host ({link.netloc[:100]!r}): not followed")
        if not link.path.startswith("/") or not link.path.rstrip("/").endswith("/" + edge_path):
            raise SourceError(f"paging.next leads to {link.path[:200]!r}, not to {edge_path!r}: not followed")
        query = [(k, v) for k, v in parse_qsl(link.query, keep_blank_values=True) if k != "access_token"]
        return link.path + "?" + urlencode(query)

    def _next_request(self, resume: str, expected_path: str) -> tuple[str, dict[str, str]]:
        """URL (on the configured host) and params of a saved ``next`` link, which must lead to the same edge."""
        link = urlsplit(resume)
        if not link.path.rstrip("/").endswith("/" + expected_path):
            raise SourceError(f"the saved next link leads to {link.path[:200]!r}, not to {expected_path!r}")
        base = urlsplit(self.base_url)
        return f"{base.scheme}://{base.netloc}{link.path}", dict(parse_qsl(link.query, keep_blank_values=True))

    async def business_discovery(
        self, username: str, fields: str, after: str | None = None, limit: int = 25
    ) -> tuple[dict[str, Any], Page]:
        """The account and a page of its media. The nested media edge has no ``next``/``previous`` (IG User Business
        Discovery, Pagination: construct them "manually" from the cursors), so the next page is ``.after(<after>)``
        and the walk ends when no ``after`` comes, or the one we sent comes back."""
        modifiers = f".limit({limit})" + (f".after({after})" if after else "")
        account_fields = f"id,username,followers_count,media_count,media{modifiers}{{{fields}}}"
        spec = f"business_discovery.username({username}){{{account_fields}}}"
        payload = await self.get(self.user_id, {"fields": spec})
        account = payload.get("business_discovery")
        if not isinstance(account, dict):
            raise SourceError(f"business_discovery for {username}: no account in the answer")
        media = account.get("media") or {"data": []}
        if not isinstance(media, dict):
            raise SourceError(f"business_discovery for {username}: media is not an object")
        cursors = (media.get("paging") or {}).get("cursors") if isinstance(media.get("paging"), dict) else None
        new_after = cursors.get("after") if isinstance(cursors, dict) else None
        if not isinstance(new_after, str) or not new_after or new_after == after or len(new_after) > 4096:
            new_after = None
        return account, Page(items=self._items(media), next=new_after)

    def _items(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        items = payload.get("data")
        if not isinstance(items, list):
            raise SourceError(f"page without a data list: {self.tokens.redact(str(payload)[:200])}")
        return items
