"""The Graph API's rate limits and error bodies, as the sandbox serves them.

Tokens belong to apps (``create_app(apps=...)``; by default every token is in one app). Every call a known token makes
counts against its app's budget and its own over a rolling window (Faults.app_calls_per_hour, token_calls_per_hour,
usage_window_s), and every answer says how much is used (X-App-Usage, X-Business-Use-Case-Usage). A throttle pauses an
app (#4: every token of it) or one token (#17, #32, #613, #80002, HTTP 429) for the wait it announces; calls made
while paused are answered with the same throttle and counted as violations, so a test can check from the server's side
that a client honoured each pause in its scope.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from deeptarget.sandbox.faults import Faults

DEFAULT_APP = "default"  # the app of a token create_app's ``apps`` does not name (as the scraper's TokenPool has it)
DEFAULT_IG_USER = "17841400000000000"  # the BUC header's business id when a request names no IG user
# A call this close to the end of a pause is not held against the client: its clock and ours round differently.
GRACE_S = 0.05


@dataclass(frozen=True)
class GraphError:
    status: int
    code: int
    message: str
    kind: str = "OAuthException"
    subcode: int | None = None
    transient: bool = False

    def body(self) -> dict[str, object]:
        # Graph API Handling Errors, Error Responses: message, type, code, error_subcode ("Additional information about
        # the error"), fbtrace_id ("Internal support identifier"). is_transient is not in that sample but real answers
        # carry it (seen in the field).
        error: dict[str, object] = {"message": self.message, "type": self.kind, "code": self.code}
        if self.subcode is not None:
            error["error_subcode"] = self.subcode
        error["is_transient"] = self.transient
        error["fbtrace_id"] = secrets.token_urlsafe(8)
        return {"error": error}

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=headers)


class GraphFailure(Exception):
    """Raised by a handler to answer with a Graph error."""

    def __init__(self, error: GraphError) -> None:
        super().__init__(error.message)
        self.error = error


def bad_request(message: str, subcode: int | None = None, kind: str = "GraphMethodException") -> GraphFailure:
    # Graph API Handling Errors lists no HTTP statuses; 400 is what the Graph sends for a request it refuses (assumed).
    return GraphFailure(GraphError(400, 100, message, kind, subcode))


# Graph API Handling Errors, Error Codes: "190: Access token has expired"; "OAuthException: ... the login status or
# access token has expired, been revoked, or is otherwise invalid". HTTP 400 (seen in the field; not documented).
INVALID_TOKEN = GraphError(400, 190, "Invalid OAuth access token - Cannot parse access token")
# Graph API Handling Errors, Error Codes: "2: API Service: Temporary issue due to downtime. Wait and retry the
# operation." The message and is_transient are as seen in the field; HTTP 503 is assumed (not documented).
TRANSIENT = GraphError(503, 2, "Service temporarily unavailable", transient=True)

# Graph API Rate Limits, Throttle Error Codes: "4: Indicates that the app whose token is being used in the request has
# reached its rate limit"; "17: ... the User whose token is being used in the request has reached their rate limit";
# "32: ... the User or app whose token is being used in the Pages API request has reached its rate limit"; "613: ...
# a custom rate limit has been reached"; Business Use Case Rate Limits, Error Codes: "error code 80002: Instagram".
# The #32 message is the Rate Limits sample's and the #80002 one the reference pages' error tables'; the others are
# as seen in the field. HTTP statuses are not documented: 403 for #4 is what the field reports, 400 for the rest is
# assumed. is_transient: true is what the field reports for #4 and #17, assumed for the others.
THROTTLES: dict[int, GraphError] = {
    4: GraphError(403, 4, "(#4) Application request limit reached", transient=True),
    17: GraphError(400, 17, "(#17) User request limit reached", transient=True),
    32: GraphError(400, 32, "(#32) Page request limit reached", transient=True),
    613: GraphError(400, 613, "(#613) Calls to this api have exceeded the rate limit.", transient=True),
    80002: GraphError(
        400,
        80002,
        "(#80002) There have been too many calls to this Instagram account. Wait a bit and try again. For more info, "
        "please refer to https://developers.facebook.com/docs/graph-api/overview/rate-limiting.",
        transient=True,
    ),
}
# Not a status the Graph is documented to send (assumed: what a proxy in front of it may answer); its body is #17's,
# so that it names its scope: this token.
TOO_MANY_REQUESTS = GraphError(429, 17, "(#17) User request limit reached", transient=True)

Scope = Literal["app", "token"]


def throttle_error(code: int | None) -> tuple[Scope, GraphError]:
    """What a throttle with this Graph code (None: HTTP 429) pauses, and how it answers."""
    if code is None:
        return "token", TOO_MANY_REQUESTS
    error = THROTTLES.get(code) or GraphError(400, code, f"(#{code}) Request limit reached", transient=True)
    return ("app" if code == 4 else "token"), error


@dataclass
class Pause:
    error: GraphError
    started: float  # time.monotonic()
    until: float
    announce_retry_after: bool
    announce_regain: bool
    held: int = 0  # calls that came while it was on

    def remaining_s(self, now: float) -> float:
        return max(0.0, self.until - now)


def _seconds(value: float) -> str:
    return f"{math.ceil(value * 1000) / 1000:g}"  # rounded up: a client that waits this long waits long enough


def _minutes(seconds: float) -> float:
    return math.ceil(seconds / 60 * 1e6) / 1e6


class Limits:
    """Call counts by app and by token fingerprint over the rolling window, and the pauses throttles start."""

    def __init__(self, faults: Faults, apps: dict[str, str]) -> None:
        self.faults = faults
        self.apps = apps  # token -> app id
        self.app_calls: defaultdict[str, deque[float]] = defaultdict(deque)
        self.token_calls: defaultdict[str, deque[float]] = defaultdict(deque)
        self.app_pauses: dict[str, Pause] = {}
        self.token_pauses: dict[str, Pause] = {}
        self.app_pause_violations: Counter[str] = Counter()
        self.token_pause_violations: Counter[str] = Counter()
        self.token_apps: dict[str, str] = {}  # fingerprint -> app id, for the stats
        self.pauses: list[dict[str, object]] = []  # every pause started, for the stats

    def app_of(self, token: str) -> str:
        return self.apps.get(token, DEFAULT_APP)

    def call(self, app: str, fingerprint: str, now: float) -> Pause | None:
        """Counts one call. Returns the pause that answers it: the app's or the token's if one is on (a violation),
        or a new one if this call took the app or the token over its budget."""
        self.token_apps[fingerprint] = app
        # Graph API Rate Limits, Best Practices: "When the limit has been reached, stop making API calls. Continuing to
        # make calls will continue to increase your call count": calls made while paused count too.
        for calls in (self.app_calls[app], self.token_calls[fingerprint]):
            calls.append(now)
            while calls and calls[0] <= now - self.faults.usage_window_s:
                calls.popleft()
        app_pause, token_pause = self._pauses(app, fingerprint, now)
        # A client cannot call back requests already on the wire when the throttle reached it: up to
        # Faults.in_flight_allowance calls arriving during a pause are those; any more were sent after it.
        if app_pause is not None:
            app_pause.held += 1
            if app_pause.held > self.faults.in_flight_allowance:
                self.app_pause_violations[app] += 1
        if token_pause is not None:
            token_pause.held += 1
            if token_pause.held > self.faults.in_flight_allowance:
                self.token_pause_violations[fingerprint] += 1
        if app_pause is not None or token_pause is not None:
            return app_pause or token_pause
        # Graph API Rate Limits: "Once a rate limit is reached, any subsequent requests made by your app will fail and
        # the API will return an error code until enough time has passed for the call count to drop below the limit."
        if len(self.app_calls[app]) > self.faults.app_calls_per_hour:
            return self.pause("app", app, THROTTLES[4], now)
        if len(self.token_calls[fingerprint]) > self.faults.token_calls_per_hour:
            return self.pause("token", fingerprint, THROTTLES[17], now)
        return None

    def pause(self, scope: Scope, name: str, error: GraphError, now: float) -> Pause:
        """Starts a pause of the app or token ``name`` for the wait Faults announces (or its default)."""
        faults = self.faults
        pause = Pause(error, now, now + faults.pause_s(), faults.retry_after_s is not None,
                      faults.regain_minutes is not None)  # fmt: skip
        (self.app_pauses if scope == "app" else self.token_pauses)[name] = pause
        wall = time.time()
        self.pauses.append({"scope": scope, "name": name, "code": error.code, "from": wall,
                            "until": wall + pause.remaining_s(now)})  # fmt: skip
        return pause

    def throttled(self, pause: Pause, now: float) -> web.Response:
        """The answer to a call the pause holds back: its throttle, and Retry-After if it announces one."""
        headers = {"Retry-After": _seconds(pause.remaining_s(now))} if pause.announce_retry_after else {}
        return pause.error.response(headers)

    def headers(self, app: str, fingerprint: str, ig_user: str, now: float) -> dict[str, str]:
        """The usage headers of an answer to this app and token, from the server's counts."""
        # Graph API Rate Limits, Headers: X-App-Usage's call_count is "A whole number expressing the percentage of calls
        # made by your app over a rolling one hour period"; total_cputime and total_time are CPU and total time, which
        # the sandbox does not measure: they follow the call count.
        app_pause, token_pause = self._pauses(app, fingerprint, now)
        app_percent = self._percent(self.app_calls[app], self.faults.app_calls_per_hour, app_pause)
        call_count: float = app_percent if self.faults.usage_percent is None else self.faults.usage_percent
        app_usage = {"call_count": call_count, "total_time": app_percent, "total_cputime": app_percent}
        # Business Use Case Rate Limits, Headers: "estimated_time_to_regain_access: Time, in minutes, until calls will
        # not longer be throttled"; "type: ... instagram". Rate Limits, Instagram Graph API Notes: "Business Discovery
        # and Hashtag Search are subject to Platform Rate Limits", so the real API may leave this header out on them;
        # we send it on every answer (our choice), for the token's own counts and pauses, and the app's pause when
        # Faults announces its regain time.
        token_percent = self._percent(self.token_calls[fingerprint], self.faults.token_calls_per_hour, token_pause)
        regain_s = token_pause.remaining_s(now) if token_pause else 0.0
        if app_pause is not None and app_pause.announce_regain:
            regain_s = max(regain_s, app_pause.remaining_s(now))
        usage = {"type": "instagram", "call_count": token_percent, "total_cputime": token_percent,
                 "total_time": token_percent, "estimated_time_to_regain_access": _minutes(regain_s)}  # fmt: skip
        return {"X-App-Usage": json.dumps(app_usage), "X-Business-Use-Case-Usage": json.dumps({ig_user: [usage]})}

    def _percent(self, calls: deque[float], budget: int, pause: Pause | None) -> int:
        percent = len(calls) * 100 // max(1, budget)  # past 100 when calls go on past the budget
        return max(percent, 100) if pause is not None else percent

    def _pauses(self, app: str, fingerprint: str, now: float) -> tuple[Pause | None, Pause | None]:
        """The app's and the token's pause, where one is on."""
        return self._on(self.app_pauses.get(app), now), self._on(self.token_pauses.get(fingerprint), now)

    @staticmethod
    def _on(pause: Pause | None, now: float) -> Pause | None:
        return pause if pause is not None and now < pause.until - GRACE_S else None
