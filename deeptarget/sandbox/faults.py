"""Failure switches for the sandbox, so that tests (and the curious) can see the scraper survive what real APIs do.

Which request fails is decided by counters, not chance, so a test run is reproducible. The server also logs when
each token called (``calls``), so tests can check the scraper's request rate against its budget from the server's
side of the wire, and counts every call a token (or any token of an app) makes while it is told to wait
(``token_pause_violations``, ``app_pause_violations``).

The limits themselves are always on (sandbox/limits.py): an app budget and a token budget over a rolling window.
Their defaults are too large for a test to reach unless it sets them lower.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# Graph API Rate Limits, Platform Rate Limits: an app's (and a user's) call count is "the number of calls it can
# make during a rolling one hour window".
HOUR_S = 3600.0


@dataclass
class Faults:
    throttle_every: int = 0  # every Nth Graph request is throttled ...
    # ... with this Graph error code: 4 pauses the whole app (HTTP 403); 17, 32, 613, 80002 pause the token (HTTP
    # 400); None: HTTP 429, which pauses the token
    throttle_code: int | None = None
    retry_after_s: float | None = None  # sent as Retry-After with a throttle, and the pause the server then enforces
    regain_minutes: float | None = None  # sent as estimated_time_to_regain_access, and the pause it enforces
    usage_percent: float | None = None  # overrides the X-App-Usage call_count on every Graph answer
    error_every: int = 0  # every Nth Graph request starts a burst of server errors ...
    error_burst: int = 1  # ... this many in a row ...
    error_status: int = 500  # ... with this status
    transient_every: int = 0  # every Nth Graph request: Graph error 2, is_transient, HTTP 503
    reset_every: int = 0  # every Nth Graph request: the connection is closed without an answer
    slow_every: int = 0  # every Nth Graph request: the answer comes after slow_s
    slow_s: float = 0.0
    malformed_every: int = 0  # every Nth Graph page: the JSON is cut in half (HTTP 200)
    duplicate_across_pages: bool = False  # every page also repeats the previous page's last post
    cursor_loop_after: int | None = None  # the page starting at this offset points back to offset 0
    image_error_every: int = 0  # every Nth image fetch answers 503
    image_slow_every: int = 0  # every Nth image fetch: the body stalls for slow_s
    # A request (same path and query) or image that failed this many times in a row is answered whole on its next
    # try. The counts are shared by concurrent requests, so without a cap one request's retries could keep landing on
    # every Nth and run out, now and then, which makes a flaky test rather than a fault the client should survive.
    max_faults_per_request: int = 3
    app_throttle_every: int = 0  # every Nth Graph request: #4 for the app, which pauses every token of it
    app_calls_per_hour: int = 1_000_000  # the app's budget over usage_window_s; past it: #4 for the app
    token_calls_per_hour: int = 1_000_000  # each token's budget over usage_window_s; past it: #17 for the token
    usage_window_s: float = HOUR_S  # the rolling window both budgets (and the usage headers) count over
    # The pause the server enforces after a throttle that announced no wait (neither retry_after_s nor
    # regain_minutes). The Graph API documents none ("until enough time has passed for the call count to drop below
    # the limit"); ours is short so that tests run fast, yet long enough that an immediate retry is a violation.
    default_pause_s: float = 1.0
    # Calls arriving during a pause that count as already on the wire when the throttle was answered (the scraper's
    # target_concurrency, 4 by default, is how many Graph requests it has in flight at most); beyond: violations.
    in_flight_allowance: int = 4

    def due(self, every: int, count: int) -> bool:
        return every > 0 and count % every == 0

    def spared(self, faulted: Counter[str], key: str) -> bool:
        """Whether this request has had its share of faults in a row (the server's count of them starts again once it
        is answered)."""
        return faulted[key] >= self.max_faults_per_request

    def pause_s(self) -> float:
        """How long a throttle this configuration sends asks the client to wait: the longest wait it announces, or
        ``default_pause_s`` when it announces none."""
        regain_s = None if self.regain_minutes is None else self.regain_minutes * 60
        announced = [s for s in (self.retry_after_s, regain_s) if s is not None]
        return max(announced) if announced else self.default_pause_s


def max_calls_in_window(times: list[float], window_s: float) -> int:
    """The most calls that fell in any window of ``window_s`` seconds (server-side rate check)."""
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        most = max(most, end - start + 1)
    return most
