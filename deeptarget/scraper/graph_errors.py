"""What a Graph API answer means for the client: which errors are worth a retry, which throttle whom, and how long
to wait. Written from Meta's documentation (``GRAPH_API.md`` beside this file cites each part):

- Graph API, Error Handling: the error object carries ``code``, ``error_subcode``, ``is_transient`` and a message;
  ``is_transient: true`` means "retry later"; codes 1 (API Unknown) and 2 (API Service) are temporary.
- Graph API, Rate Limiting: ``#4`` "Application request limit reached" is the *app's* limit (every token of the app
  is throttled), ``#17`` "User request limit reached" the user's, ``#32`` the Page's, ``#613`` a custom rate limit,
  ``80002`` the Instagram Business Use Case limit of one account. The user, the Page and the IG account are those of
  one access token here, so those pause the token; ``#4`` pauses the app.
- ``X-App-Usage`` (percentages of the app's hourly budget) and ``X-Business-Use-Case-Usage`` (per business object, a
  list of entries with ``estimated_time_to_regain_access`` in minutes) come on answers; their values are only hints,
  and a malformed or absurd one is read as "no hint", never as a reason to crash.
- OAuth ``190``: the token is invalid or expired, and no retry will mend it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from deeptarget.core.errors import GraphApiError, SourceError

APP_THROTTLE_CODES = frozenset({4})
TOKEN_THROTTLE_CODES = frozenset({17, 32, 613, 80002})
TRANSIENT_CODES = frozenset({1, 2})
INVALID_TOKEN_CODE = 190

Scope = Literal["app", "token"]


class GraphTransientError(SourceError):
    """A failure worth retrying: 5xx, ``is_transient``, a reset, a timeout, a truncated page."""


class Throttled(SourceError):
    """The API asked us to slow down; ``scope`` says whose calls must pause, ``wait_s`` for how long (None: the
    client's default)."""

    def __init__(self, message: str, scope: Scope, wait_s: float | None) -> None:
        super().__init__(message)
        self.scope: Scope = scope
        self.wait_s = wait_s


class InvalidToken(SourceError):
    pass


@dataclass(frozen=True)
class ErrorBody:
    """The fields of a Graph error object that decide what to do (anything else is only shown)."""

    code: int | None
    subcode: int | None
    transient: bool
    message: str

    @classmethod
    def of(cls, payload: Mapping[str, Any]) -> ErrorBody | None:
        error = payload.get("error")
        if error is None:
            return None
        if not isinstance(error, dict):
            return cls(None, None, False, str(error)[:200])
        return cls(
            code=_int_or_none(error.get("code")),
            subcode=_int_or_none(error.get("error_subcode")),
            transient=error.get("is_transient") is True,
            message=str(error.get("message") or "error")[:300],
        )


def classify(status: int, error: ErrorBody | None, headers: Mapping[str, str], what: str) -> SourceError | None:
    """The exception this answer stands for, or None when it is a usable answer."""
    code = error.code if error else None
    if code in APP_THROTTLE_CODES:
        return Throttled(f"{what}: app throttled (HTTP {status}, code {code})", "app", wait_from(headers))
    if status == 429 or code in TOKEN_THROTTLE_CODES:
        return Throttled(f"{what}: throttled (HTTP {status}, code {code})", "token", wait_from(headers))
    if code == INVALID_TOKEN_CODE:
        return InvalidToken(f"{what}: {error.message if error else 'invalid OAuth access token'}")
    if status >= 500 or (error is not None and (error.transient or code in TRANSIENT_CODES)):
        return GraphTransientError(f"{what}: HTTP {status}, code {code}" + (" (transient)" if error else ""))
    if error is not None or status >= 400:
        return GraphApiError(f"{what}: {error.message if error else 'error'}", code=code, status=status)
    return None


def wait_from(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait that the answer names: ``Retry-After`` (seconds or an HTTP date), else the usage header's
    ``estimated_time_to_regain_access``; None when neither says anything usable."""
    retry_after = headers.get("Retry-After")
    if retry_after:
        seconds = _retry_after_s(retry_after.strip())
        if seconds is not None:
            return seconds
    return usage(headers).regain_s


def _retry_after_s(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


@dataclass(frozen=True)
class Usage:
    """What the usage headers say: the app's share of its hourly budget (``X-App-Usage``), the highest share of an
    account's (``X-Business-Use-Case-Usage``), in percent, and the longest announced wait in seconds (or None)."""

    app_percent: float = 0.0
    account_percent: float = 0.0
    regain_s: float | None = None


def usage(headers: Mapping[str, str]) -> Usage:
    """The Graph usage headers read. Anything malformed (not JSON, wrong shapes, non-numbers, NaN, negatives) counts
    as absent."""
    percents = {"X-App-Usage": 0.0, "X-Business-Use-Case-Usage": 0.0}
    regain = None
    for name in percents:
        raw = headers.get(name)
        if not raw or len(raw) > 64 * 1024:
            continue
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            continue
        for entry in _usage_entries(value):
            for key in ("call_count", "total_time", "total_cputime"):
                percent = _number(entry.get(key))
                if percent is not None:
                    percents[name] = max(percents[name], percent)
            minutes = _number(entry.get("estimated_time_to_regain_access"))
            if minutes:
                regain = max(regain or 0.0, minutes * 60)
    return Usage(percents["X-App-Usage"], percents["X-Business-Use-Case-Usage"], regain)


def _usage_entries(value: Any) -> list[dict[str, Any]]:
    """X-App-Usage is one object; X-Business-Use-Case-Usage maps business ids to lists of objects."""
    if not isinstance(value, dict):
        return []
    if any(k in value for k in ("call_count", "total_time", "total_cputime")):
        return [value]
    return [e for v in value.values() if isinstance(v, list) for e in v if isinstance(e, dict)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def bounded_pause(wait_s: float | None, default_s: float, cap_s: float) -> float:
    """The pause to take: the named wait when it is sane, else the default; never above the cap (an absurd header
    must not park a token for a year), and never below a floor (``Retry-After: 0`` on every throttle would have us
    hammer the API: throttles use up no retries)."""
    floor = min(1.0, default_s, cap_s)
    if wait_s is None or not math.isfinite(wait_s) or wait_s < 0 or wait_s > cap_s:
        return min(default_s, cap_s)
    return max(wait_s, floor)
