"""Failure switches for the sandbox, so that tests (and the curious) can see the scraper survive what real APIs do.

Which request fails is decided by counters, not chance, so a test run is reproducible. The server also logs when
each token called (``calls``), so tests can check the scraper's request rate against its budget from the server's
side of the wire.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass


@dataclass
class Faults:
    throttle_every: int = 0  # every Nth Graph request is throttled ...
    throttle_code: int | None = None  # ... with this Graph error code (4, 17, 32, 613) and HTTP 400; None: HTTP 429
    retry_after_s: float | None = None  # sent as Retry-After with a throttle
    regain_minutes: float | None = None  # sent as estimated_time_to_regain_access (X-Business-Use-Case-Usage)
    usage_percent: float | None = None  # X-App-Usage call_count on every Graph answer
    error_every: int = 0  # every Nth Graph request starts a burst of server errors ...
    error_burst: int = 1  # ... this many in a row ...
    error_status: int = 500  # ... with this status
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

    def due(self, every: int, count: int) -> bool:
        return every > 0 and count % every == 0

    def spared(self, faulted: Counter[str], key: str) -> bool:
        """Whether this request has had its share of faults in a row (the server's count of them starts again once it
        is answered)."""
        return faulted[key] >= self.max_faults_per_request

    def throttle_headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = f"{self.retry_after_s:g}"
        if self.regain_minutes is not None:
            entry = {"type": "instagram", "call_count": 100, "total_cputime": 40, "total_time": 40,
                     "estimated_time_to_regain_access": self.regain_minutes}  # fmt: skip
            headers["X-Business-Use-Case-Usage"] = json.dumps({"17841400000000000": [entry]})
        return headers

    def usage_headers(self) -> dict[str, str]:
        if self.usage_percent is None:
            return {}
        usage = {"call_count": self.usage_percent, "total_time": 10, "total_cputime": 10}
        return {"X-App-Usage": json.dumps(usage)}


def max_calls_in_window(times: list[float], window_s: float) -> int:
    """The most calls that fell in any window of ``window_s`` seconds (server-side rate check)."""
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        most = max(most, end - start + 1)
    return most
