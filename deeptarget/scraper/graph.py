"""A client for the Instagram Graph API's hashtag and business-discovery endpoints (and the sandbox, which speaks them).

Every request takes a token from the shared ``TokenPool`` (budget per token, rotation). The token travels in the
``Authorization`` header, never in a URL, so it cannot leak into logs. Outcomes:

- throttled (HTTP 429, Graph codes 4/17/32/613): that token pauses for ``Retry-After`` /
  ``estimated_time_to_regain_access`` (or ``throttle_pause_s``) and the request goes again on another token; this
  does not use up retries, the crawl just slows down;
- usage headers (``X-App-Usage``, ``X-Business-Use-Case-Usage``) at or above ``usage_pause_at`` percent: the answer
  is used, and the token pauses before it gets throttled;
- OAuth error 190: the token is retired and the request goes again on another one;
- transient (5xx, resets, timeouts, a page cut short): retried with exponential backoff and full jitter, up to
  ``retries`` times;
- any other error: ``GraphApiError``, not retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import Counter, Histogram

from deeptarget.errors import GraphApiError, SourceError
from deeptarget.scraper.tokens import Lease, TokenPool

LOG = logging.getLogger(__name__)

THROTTLE_CODES = frozenset({4, 17, 32, 613})
INVALID_TOKEN_CODE = 190

REQUESTS = Counter("deeptarget_scraper_requests_total", "Graph API requests by outcome", ["outcome"])
LATENCY = Histogram("deeptarget_scraper_request_seconds", "Graph API request latency")


class TransientError(SourceError):
    """A failure worth retrying: 5xx, a reset, a timeout, a truncated page."""


class Throttled(SourceError):
    def __init__(self, message: str, wait_s: float | None) -> None:
        super().__init__(message)
        self.wait_s = wait_s


class InvalidToken(SourceError):
    pass


@dataclass
class Page:
    items: list[dict[str, Any]]
    after: str | None  # cursor of the next page; None at the end


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
    usage_pause_at: float = 95.0

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        failures = 0
        while True:
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
                REQUESTS.labels("throttled").inc()
                await self.tokens.pause(lease, err.wait_s or self.throttle_pause_s, str(err))
            except InvalidToken as err:
                REQUESTS.labels("invalid_token").inc()
                await self.tokens.retire(lease, str(err))
            except TransientError as err:
                REQUESTS.labels("transient").inc()
                failures += 1
                if failures > self.retries:
                    raise
                delay = random.uniform(0, min(self.max_wait_s, 0.5 * 2**failures))
                LOG.warning("%s; retry %d of %d in %.1f s", err, failures, self.retries, delay)
                await asyncio.sleep(delay)
            except GraphApiError:
                REQUESTS.labels("error").inc()
                raise

    async def _get_once(self, path: str, params: dict[str, str], lease: Lease, calls: list[str]) -> dict[str, Any]:
        url = self.base_url.rstrip("/") + "/" + path.lstrip("/")
        headers = {"Authorization": f"Bearer {lease.token}"}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)

        attempts = 0

        async def every_attempt_is_a_call(request: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # aiohttp resends once on a dropped keep-alive connection: another call on the wire
                calls.append(await self.tokens.take_again(lease))
            return await handler(request)

        try:
            async with self.session.get(
                url, params=params, headers=headers, timeout=timeout, middlewares=(every_attempt_is_a_call,)
            ) as response:
                body = await response.read()
                status = response.status
                response_headers = response.headers
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            raise TransientError(f"GET {path}: {type(err).__name__}: {err}") from err
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if status >= 500 or status == 200:  # a 200 whose body does not parse was cut short on the way
                raise TransientError(f"GET {path}: HTTP {status}, body is not JSON: {body[:80]!r}") from err
            raise SourceError(f"GET {path}: HTTP {status}, body is not JSON: {body[:120]!r}") from err
        if not isinstance(payload, dict):
            raise SourceError(f"GET {path}: expected a JSON object, got {type(payload).__name__}")
        error = payload.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        if status == 429 or code in THROTTLE_CODES:
            raise Throttled(f"GET {path}: throttled (HTTP {status}, code {code})", _wait_from(response_headers))
        if code == INVALID_TOKEN_CODE:
            raise InvalidToken(f"GET {path}: {error.get('message', 'invalid OAuth access token')}")
        if status >= 500:
            raise TransientError(f"GET {path}: HTTP {status}")
        if error is not None or status >= 400:
            detail = error if isinstance(error, dict) else {}
            raise GraphApiError(f"GET {path}: {detail.get('message', 'error')}", code=code, status=status)
        usage, regain_s = _usage(response_headers)
        if usage >= self.usage_pause_at:
            await self.tokens.pause(lease, regain_s or self.throttle_pause_s, f"usage at {usage:.0f}%")
        return payload

    # -- endpoints ------------------------------------------------------------------------------------------------
    async def hashtag_id(self, hashtag: str) -> str | None:
        payload = await self.get("ig_hashtag_search", {"user_id": self.user_id, "q": hashtag})
        data = payload.get("data") or []
        return str(data[0]["id"]) if data and isinstance(data[0], dict) and "id" in data[0] else None

    async def hashtag_media(
        self, hashtag_id: str, edge: str, fields: str, after: str | None = None, limit: int = 25
    ) -> Page:
        params = {"user_id": self.user_id, "fields": fields, "limit": str(limit)}
        if after:
            params["after"] = after
        return _page(await self.get(f"{hashtag_id}/{edge}", params))

    async def business_discovery(
        self, username: str, fields: str, after: str | None = None, limit: int = 25
    ) -> tuple[dict[str, Any], Page]:
        modifiers = f".limit({limit})" + (f".after({after})" if after else "")
        account_fields = f"id,username,followers_count,media_count,media{modifiers}{{{fields}}}"
        spec = f"business_discovery.username({username}){{{account_fields}}}"
        payload = await self.get(self.user_id, {"fields": spec})
        account = payload.get("business_discovery")
        if not isinstance(account, dict):
            raise SourceError(f"business_discovery for {username}: no account in the answer")
        return account, _page(account.get("media") or {})


def _page(payload: dict[str, Any]) -> Page:
    items = payload.get("data")
    if not isinstance(items, list):
        raise SourceError(f"page without a data list: {str(payload)[:200]}")
    paging = payload.get("paging") or {}
    after = (paging.get("cursors") or {}).get("after") if paging.get("next") else None
    return Page(items=items, after=after)


def _wait_from(headers: Any) -> float | None:
    """Seconds to wait from ``Retry-After`` or a usage header's ``estimated_time_to_regain_access`` (minutes)."""
    retry_after = headers.get("Retry-After")
    if retry_after:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            pass  # an HTTP date: rare here; fall back to the usage headers or the default pause
    return _usage(headers)[1]


def _usage(headers: Any) -> tuple[float, float | None]:
    """(highest usage percentage, seconds until access is regained or None) from the Graph usage headers."""
    highest, regain = 0.0, None
    for name in ("X-App-Usage", "X-Business-Use-Case-Usage"):
        raw = headers.get(name)
        if not raw:
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            continue
        entries = [value] if name == "X-App-Usage" else [e for v in value.values() for e in v]
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            for key in ("call_count", "total_time", "total_cputime"):
                highest = max(highest, float(entry.get(key) or 0))
            minutes = entry.get("estimated_time_to_regain_access")
            if minutes:
                regain = max(regain or 0.0, float(minutes) * 60)
    return highest, regain
