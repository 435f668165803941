"""A client for the Instagram Graph API's hashtag and business-discovery endpoints (and the sandbox, which speaks them).

The access token travels in the ``Authorization`` header, never in a URL, so it cannot leak into logs. Transient
failures (5xx, resets, timeouts) are retried with exponential backoff and jitter; throttling (HTTP 429, Graph codes
4/17/32/613) waits for ``Retry-After`` when given; other errors are raised as ``GraphApiError``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from deeptarget.errors import GraphApiError, SourceError

LOG = logging.getLogger(__name__)

THROTTLE_CODES = frozenset({4, 17, 32, 613})


class TransientError(SourceError):
    """A failure worth retrying: 5xx, throttling, a reset or a timeout."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Page:
    items: list[dict[str, Any]]
    after: str | None  # cursor of the next page; None at the end


@dataclass
class GraphApiClient:
    session: aiohttp.ClientSession
    base_url: str
    user_id: str
    token: str = field(repr=False)
    retries: int = 3
    timeout_s: float = 20.0
    max_wait_s: float = 30.0

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(TransientError),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._get_once(path, params)
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, retry_state: Any) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, TransientError) and error.retry_after_s is not None:
            return min(error.retry_after_s, self.max_wait_s)
        return float(wait_random_exponential(multiplier=0.5, max=self.max_wait_s)(retry_state))

    async def _get_once(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = self.base_url.rstrip("/") + "/" + path.lstrip("/")
        headers = {"Authorization": f"Bearer {self.token}"}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.session.get(url, params=params, headers=headers, timeout=timeout) as response:
                body = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            raise TransientError(f"GET {path}: {type(err).__name__}: {err}") from err
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if status >= 500:
                raise TransientError(f"GET {path}: HTTP {status}") from err
            raise SourceError(f"GET {path}: HTTP {status}, body is not JSON: {body[:120]!r}") from err
        if not isinstance(payload, dict):
            raise SourceError(f"GET {path}: expected a JSON object, got {type(payload).__name__}")
        error = payload.get("error")
        if status == 429 or (isinstance(error, dict) and error.get("code") in THROTTLE_CODES):
            wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
            raise TransientError(f"GET {path}: throttled (HTTP {status})", retry_after_s=wait)
        if status >= 500:
            raise TransientError(f"GET {path}: HTTP {status}")
        if error is not None or status >= 400:
            detail = error if isinstance(error, dict) else {}
            raise GraphApiError(f"GET {path}: {detail.get('message', 'error')}", code=detail.get("code"), status=status)
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
