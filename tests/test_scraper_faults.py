"""The scraper against a sandbox that misbehaves like real APIs do. For each fault: the crawl finishes, every post is
enqueued exactly once (nothing lost, nothing twice), images are fetched at most once when they arrive whole, the
right counters move, and no token ever exceeds its request budget, as measured on the server's side of the wire."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY

from deeptarget.core import keys
from deeptarget.sandbox import Faults, SandboxNetwork, sandbox_server
from deeptarget.sandbox.faults import max_calls_in_window
from deeptarget.scraper.tokens import fingerprint
from tests.helpers import assert_each_image_once, crawl, crawl_settings, everything, server_stats
from tests.queue_messages import queued_post_refs

pytestmark = pytest.mark.timeout(180)

BUDGET = {"token_calls": 12, "token_window_s": 1.0}  # tight enough that a crawl has to wait on it


def network() -> SandboxNetwork:
    return SandboxNetwork(seed=41, n_posts=40, n_users=5, n_hashtags=3, corrupt_share=0.0)


async def crawl_with(
    faults: Faults, tmp_path: Path, redis_url: str, sandbox: SandboxNetwork | None = None, **extra: Any
) -> tuple[dict, dict, SandboxNetwork]:
    sandbox = sandbox or network()
    if faults.default_pause_s == Faults.default_pause_s:  # the pause it expects when it names none: the client's
        faults = replace(faults, default_pause_s=0.3)
    async with sandbox_server(sandbox, faults=faults) as server:
        settings = crawl_settings(tmp_path, redis_url, sandbox, server.url, http_timeout_s=1.0, http_retries=4,
                                  throttle_pause_s=0.3, **{**BUDGET, **extra})  # fmt: skip
        counts = await crawl(settings)
        stats = await server_stats(server.url)
    return counts, stats, sandbox


def fault_id(faults: Faults) -> str:
    """The fields a case sets, so that a failing case names its fault."""
    changed = {f.name: getattr(faults, f.name) for f in fields(faults) if getattr(faults, f.name) != f.default}
    return ",".join(f"{name}={value}" for name, value in changed.items())


def assert_complete_and_polite(client: redis.Redis, stats: dict, sandbox: SandboxNetwork, calls: int = 12) -> None:
    ids = Counter(ref["post"]["id"] for ref in queued_post_refs(client))
    assert set(ids) == everything(sandbox), "a post was lost"
    assert max(ids.values()) == 1, "a post was enqueued twice"
    assert max(stats["image_fetches"].values()) == 1, "an image was fetched whole twice"
    for times in stats["calls"].values():
        assert max_calls_in_window(times, 1.0) <= calls, "a token went over its budget"
    # Measured by the server: no call while the app (#4) or the token (#17, #32, #613, 429) was told to wait.
    assert stats["app_pause_violations"] == {} and stats["token_pause_violations"] == {}, "a pause was not honoured"


@pytest.mark.parametrize(
    ("faults", "counter"),
    [
        (Faults(throttle_every=7), "token_paused"),  # HTTP 429 without Retry-After: the default pause
        (Faults(throttle_every=7, retry_after_s=0.2), "token_paused"),  # 429 with Retry-After
        (Faults(throttle_every=7, throttle_code=4), "app_paused"),  # the app's limit: every token waits
        (Faults(throttle_every=7, throttle_code=17), "token_paused"),
        (Faults(throttle_every=7, throttle_code=32, regain_minutes=0.005), "token_paused"),
        (Faults(throttle_every=7, throttle_code=613), "token_paused"),
        (Faults(usage_percent=97.0), "app_paused"),  # X-App-Usage near 100%: the app slows down before a #4
        (Faults(error_every=6, error_burst=2, error_status=500), None),
        (Faults(error_every=9, error_burst=3, error_status=503), None),
        (Faults(reset_every=5), None),
        (Faults(slow_every=6, slow_s=1.5), None),  # past the 1 s client timeout
        (Faults(malformed_every=5), None),  # JSON cut in half with a 200
        (Faults(image_error_every=4), None),
        (Faults(image_slow_every=9, slow_s=1.5), None),
    ],
    ids=lambda v: fault_id(v) if isinstance(v, Faults) else str(v),
)
async def test_the_crawl_survives_the_fault(
    faults: Faults, counter: str | None, tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    counts, stats, sandbox = await crawl_with(faults, tmp_path, redis_url)
    assert sum(stats["faults"].values()) > 0 or faults.usage_percent, "the fault never fired"
    assert_complete_and_polite(redis_client, stats, sandbox)
    assert counts["enqueued"] == len(everything(sandbox))
    if counter:
        assert int(redis_client.hget(keys.scraper_stats_key, counter) or 0) > 0


async def crawl_then_drain(faults: Faults, tmp_path: Path, redis_url: str, **extra: Any) -> tuple[dict, dict, dict]:
    """A crawl of the accounts (which meets each post once), then a run with no targets: only what the first left on
    the ingest stream. Both runs' counters and the server's stats."""
    sandbox = network()
    async with sandbox_server(sandbox, faults=faults) as server:
        settings = crawl_settings(tmp_path, redis_url, sandbox, server.url, http_timeout_s=1.0, hashtags=[],
                                  **{**BUDGET, **extra})  # fmt: skip
        first = await crawl(settings)
        first["retries_waiting"] = int(REGISTRY.get_sample_value("deeptarget_scraper_download_retries_waiting") or 0)
        second = await crawl(settings.model_copy(update={"hashtags": [], "accounts": []}))
        stats = await server_stats(server.url)
    return first, second, stats


async def test_a_post_whose_download_runs_out_of_retries_is_fetched_by_a_later_run(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    # Each image fails twice in a row and the client tries twice: every download of the crawl fails.
    faults = Faults(image_error_every=1, max_faults_per_request=2)
    first, second, stats = await crawl_then_drain(faults, tmp_path, redis_url, http_retries=1)
    expected = network().offered(accounts=[a.username for a in network().accounts])
    assert first["download_failed"] == first["retries_waiting"] == len(expected) and first.get("enqueued", 0) == 0
    assert second["enqueued"] == len(expected) and second.get("download_failed", 0) == 0
    assert_each_image_once(redis_client, stats, expected)
    assert all(ref["blob"] and ref["rejected"] is None for ref in queued_post_refs(redis_client))
    assert redis_client.xlen(keys.ingest_stream) == 0 and not redis_client.exists(keys.download_failures_key)
    assert not redis_client.exists(keys.ingest_later_key)


async def test_a_post_whose_download_keeps_failing_is_recorded_as_rejected_after_max_download_failures(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    faults = Faults(image_error_every=1, max_faults_per_request=1000)
    first, second, _ = await crawl_then_drain(faults, tmp_path, redis_url, http_retries=0, max_download_failures=2)
    expected = network().offered(accounts=[a.username for a in network().accounts])
    assert first["download_failed"] == len(expected) and first.get("enqueued", 0) == 0
    assert second["rejected:download_failed"] == len(expected)
    refs = queued_post_refs(redis_client)
    assert sorted(ref["post"]["id"] for ref in refs) == sorted(expected)
    assert {ref["rejected"] for ref in refs} == {"download_failed"}
    assert redis_client.xlen(keys.ingest_stream) == 0 and not redis_client.exists(keys.download_failures_key)


async def test_duplicates_across_pages_are_fetched_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    counts, stats, sandbox = await crawl_with(Faults(duplicate_across_pages=True), tmp_path, redis_url)
    assert_complete_and_polite(redis_client, stats, sandbox)
    # Each post is met by its account and its hashtags, and again on the page after its own. A second meeting counts
    # as a duplicate when the first one has finished, as held elsewhere while the first is still downloading (the
    # account and hashtag walks run concurrently): which one depends on timing, their sum does not.
    met_again = counts.get("duplicate", 0) + counts.get("held_elsewhere", 0)
    assert met_again > len(everything(sandbox))


async def test_a_looping_cursor_ends_the_target_instead_of_crawling_forever(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    two_big_hashtags = SandboxNetwork(seed=41, n_posts=60, n_users=5, n_hashtags=2, corrupt_share=0.0)
    counts, stats, _ = await crawl_with(Faults(cursor_loop_after=10), tmp_path, redis_url, two_big_hashtags)
    assert counts["cursor_loop"] > 0
    ids = Counter(ref["post"]["id"] for ref in queued_post_refs(redis_client))
    assert max(ids.values()) == 1 and max(stats["image_fetches"].values()) == 1


async def test_an_invalid_token_is_retired_by_fingerprint_and_the_others_carry_on(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    sandbox = network()
    good = ["token-alpha", "token-beta"]
    async with sandbox_server(sandbox, tokens=good) as server:
        settings = crawl_settings(tmp_path, redis_url, sandbox, server.url, access_tokens=["token-revoked", *good],
                                  **BUDGET)  # fmt: skip
        await crawl(settings)
        stats = await server_stats(server.url)
    assert_complete_and_polite(redis_client, stats, sandbox)
    retired = {m.decode() for m in redis_client.smembers(keys.retired_tokens_key)}
    assert retired == {fingerprint("token-revoked")}
    assert set(stats["calls"]) == {fingerprint(t) for t in good}  # both good tokens shared the work
    assert all(len(times) > 3 for times in stats["calls"].values())


async def test_the_hashtag_quota_is_enforced_before_calling(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    sandbox = network()
    async with sandbox_server(sandbox) as server:
        settings = crawl_settings(tmp_path, redis_url, sandbox, server.url, accounts=[], hashtag_quota=2)
        counts = await crawl(settings)
        again = await crawl(settings)  # a second run searches nothing new: ids are cached, the quota is still full
    assert counts["hashtag_quota"] == len(sandbox.hashtags) - 2 and again["hashtag_quota"] == len(sandbox.hashtags) - 2
    # The blocked hashtags did not hold the round open: the second run was a new round over the searchable ones.
    assert counts.get("page:hashtag", 0) >= 2 and again.get("page:hashtag", 0) >= 2
    searched = redis_client.zrange(keys.hashtag_queries_key_prefix + settings.source_user_id, 0, -1)
    assert len(searched) == 2


async def test_an_app_throttle_pauses_every_token_of_that_app_and_no_other(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """Graph #4 is the app's limit: each of its tokens must wait (the server counts any call as a violation), while
    a token of another app goes on."""
    sandbox = network()
    apps = {"alpha-1": "app-a", "alpha-2": "app-a", "beta-1": "app-b"}
    faults = Faults(app_throttle_every=6, retry_after_s=0.3)
    async with sandbox_server(sandbox, faults=faults, apps=apps) as server:
        settings = crawl_settings(tmp_path, redis_url, sandbox, server.url, access_tokens=[],
                                  token_apps={"app-a": ["alpha-1", "alpha-2"], "app-b": ["beta-1"]},
                                  token_calls=50, token_window_s=1.0)  # fmt: skip
        counts = await crawl(settings)
        stats = await server_stats(server.url)
    assert_complete_and_polite(redis_client, stats, sandbox, calls=50)
    assert {p["scope"] for p in stats["pauses"]} == {"app"} and counts["enqueued"] == len(everything(sandbox))
    assert int(redis_client.hget(keys.scraper_stats_key, "app_paused") or 0) > 0
    assert set(stats["calls"]) == {fingerprint(t) for t in apps}
