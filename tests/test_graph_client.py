"""The Graph client against what a real or hostile server can answer: absurd throttle headers, errors by scope,
``next`` links to other hosts, redirects, and a token that must never leave the request it was put in."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from deeptarget.core import keys
from deeptarget.core.errors import CrawlStopped, GraphApiError, SourceError
from deeptarget.jobs import Jobs
from deeptarget.runtime.app_server import AppServer
from deeptarget.scraper import CelerySink, Crawler
from deeptarget.scraper.graph import GraphApiClient
from deeptarget.scraper.graph_errors import (
    ErrorBody,
    GraphTransientError,
    Throttled,
    Usage,
    bounded_pause,
    classify,
    usage,
)
from deeptarget.scraper.graph_errors import wait_from as graph_wait_from
from deeptarget.scraper.tokens import TokenPool
from deeptarget.store.blobs import BlobStore
from tests.conftest import make_settings
from tests.helpers import noise_jpeg

SECRET = "EAAG-very-secret-token-value"


@pytest.mark.parametrize(
    "retry_after", ["abc", "-5", "nan", "inf", "1e309", "99999999", "", "Wed, 21 Oct 2015 07:28:00 GMT", "  "]
)
def test_absurd_retry_after_means_the_default_pause_never_a_crash(retry_after: str) -> None:
    wait = graph_wait_from({"Retry-After": retry_after})
    assert bounded_pause(wait, default_s=60, cap_s=3600) == 60  # a date in the past names no wait either


@pytest.mark.parametrize(
    "header",
    [
        "not json",
        "[]",
        "null",
        '"a string"',
        '{"call_count": "abc", "total_time": null, "total_cputime": [1]}',
        '{"call_count": NaN}',
        '{"call_count": -40}',
        '{"1784": "not a list"}',
        '{"1784": [1, "x", {"call_count": {"deep": 1}, "estimated_time_to_regain_access": "soon"}]}',
        "[" * 100_000,
    ],
)
def test_malformed_usage_headers_count_as_absent(header: str) -> None:
    assert usage({"X-App-Usage": header, "X-Business-Use-Case-Usage": header}) == Usage(0.0, 0.0, None)


def test_usage_headers_as_documented() -> None:
    app = json.dumps({"call_count": 28, "total_time": 25, "total_cputime": 97})
    buc = json.dumps({"1784": [{"type": "instagram", "call_count": 12, "estimated_time_to_regain_access": 7}]})
    assert usage({"X-App-Usage": app, "X-Business-Use-Case-Usage": buc}) == Usage(97.0, 12.0, 420.0)
    assert bounded_pause(420.0, default_s=60, cap_s=3600) == 420.0
    assert bounded_pause(10**7, default_s=60, cap_s=3600) == 60  # absurd: the default, not a year
    assert bounded_pause(0.0, default_s=60, cap_s=3600) == 1.0  # "retry at once" on every throttle: a floor


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (400, {"code": 4, "message": "(#4) Application request limit reached"}, ("app", Throttled)),
        (403, {"code": 4}, ("app", Throttled)),
        (400, {"code": 17}, ("token", Throttled)),
        (400, {"code": 32}, ("token", Throttled)),
        (400, {"code": 613}, ("token", Throttled)),
        (400, {"code": 80002}, ("token", Throttled)),
        (400, {"code": 2, "is_transient": True}, (None, GraphTransientError)),
        (500, {"code": 1}, (None, GraphTransientError)),
        (400, {"code": 100, "is_transient": True}, (None, GraphTransientError)),
        (400, {"code": 100, "is_transient": False}, (None, GraphApiError)),
        (400, {"code": "not a number", "is_transient": "yes"}, (None, GraphApiError)),
    ],
)
def test_errors_are_read_by_code_and_is_transient_not_by_status(
    status: int, error: dict[str, Any], expected: tuple[str | None, type]
) -> None:
    failure = classify(status, ErrorBody.of({"error": error}), {}, "GET /x")
    scope, kind = expected
    assert isinstance(failure, kind)
    if scope is not None:
        assert isinstance(failure, Throttled) and failure.scope == scope


# -- a hostile Graph server on loopback ---------------------------------------------------------------------------
Handler = Callable[[web.Request], Any]


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[str, list[web.Request], dict[str, Handler]]]:
    """A loopback server whose answers each test sets (``routes[path]``); it records every request it got."""
    seen: list[web.Request] = []
    routes: dict[str, Handler] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        answer = routes.get(request.path)
        if answer is None:
            return web.json_response({"error": {"message": "no such path", "code": 100}}, status=400)
        return await answer(request)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    async with AppServer(app, "127.0.0.1", 0) as server:
        yield server.url, seen, routes


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[TokenPool]:
    client = aioredis.Redis.from_url(redis_url)
    yield TokenPool(client, [SECRET, "second-token"], calls=1000, window_s=60)
    await client.aclose()


async def client_for(url: str, pool: TokenPool, **extra: Any) -> tuple[aiohttp.ClientSession, GraphApiClient]:
    session = aiohttp.ClientSession()
    return session, GraphApiClient(session, url, "17841400000000000", pool, retries=1, max_wait_s=0.05, **extra)


async def test_the_token_goes_in_the_query_as_documented_or_in_a_header(hostile: Any, pool: TokenPool) -> None:
    url, seen, routes = hostile

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "1"}]})

    routes["/ig_hashtag_search"] = ok
    for token_in in ("query", "header"):
        session, client = await client_for(url, pool, token_in=token_in)
        async with session:
            assert await client.hashtag_id("sushi") == "1"
        request = seen[-1]
        in_query, in_header = "access_token" in request.query, "Authorization" in request.headers
        assert (in_query, in_header) == ((True, False) if token_in == "query" else (False, True))


async def test_a_next_link_to_another_host_is_not_followed(hostile: Any, pool: TokenPool) -> None:
    url, _seen, routes = hostile

    async def page(request: web.Request) -> web.Response:
        return web.json_response(
            {"data": [], "paging": {"cursors": {"after": "X"}, "next": "http://evil.example/1/recent_media?after=X"}}
        )

    routes["/1/recent_media"] = page
    session, client = await client_for(url, pool)
    async with session:
        page = await client.hashtag_media("1", "recent_media", "id")
    assert page.next is None and page.problem and "another host" in page.problem


async def test_a_next_link_is_followed_without_its_token_and_with_ours(hostile: Any, pool: TokenPool) -> None:
    """Graph next links carry the access_token they were asked with; the client puts in the token of its own lease
    (which may be another one) and saves the link without it."""
    url, seen, routes = hostile

    async def page(request: web.Request) -> web.Response:
        if "__paging_token" in request.query:
            return web.json_response({"data": [{"id": "2"}]})
        link = f"{url}/v21.0/1/recent_media?user_id=9&limit=25&after=SAME&__paging_token=p2&access_token=LEAKED"
        return web.json_response({"data": [], "paging": {"cursors": {"after": "SAME"}, "next": link}})

    routes["/1/recent_media"] = page
    routes["/v21.0/1/recent_media"] = page
    session, client = await client_for(url, pool)
    async with session:
        first = await client.hashtag_media("1", "recent_media", "id")
        assert first.items == [] and first.next is not None  # an empty page with next is not the end
        assert "LEAKED" not in first.next and "access_token" not in first.next
        second = await client.hashtag_media("1", "recent_media", "id", first.next)
    assert second.items == [{"id": "2"}] and second.next is None
    assert seen[-1].path == "/v21.0/1/recent_media" and seen[-1].query["access_token"] in (SECRET, "second-token")


async def test_redirects_are_not_followed(hostile: Any, pool: TokenPool) -> None:
    url, seen, routes = hostile

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{url}/elsewhere")

    routes["/ig_hashtag_search"] = redirect
    session, client = await client_for(url, pool)
    async with session:
        with pytest.raises(SourceError, match="redirect"):
            await client.hashtag_id("sushi")
    assert [r.path for r in seen] == ["/ig_hashtag_search"]


async def test_the_token_is_in_no_error_and_no_log_line(
    hostile: Any, pool: TokenPool, caplog: pytest.LogCaptureFixture
) -> None:
    url, seen, routes = hostile

    async def reset(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    async def echo(request: web.Request) -> web.Response:  # a server that echoes the request into its error
        return web.json_response({"error": {"message": f"bad request {request.url}", "code": 100}}, status=400)

    routes["/ig_hashtag_search"] = reset
    routes["/1/top_media"] = echo
    caplog.set_level(logging.DEBUG)
    session, client = await client_for(url, pool)
    errors = []
    async with session:
        for call in (client.hashtag_id("sushi"), client.hashtag_media("1", "top_media", "id")):
            with pytest.raises(SourceError) as caught:
                await call
            errors.append(caught.value)
    text = " ".join([str(e) + repr(e) + str(e.__cause__) for e in errors] + [r.getMessage() for r in caplog.records])
    assert seen and SECRET not in text and "second-token" not in text


async def test_app_throttle_pauses_every_token_of_the_app_and_a_stop_ends_the_wait(
    hostile: Any, pool: TokenPool, redis_url: str
) -> None:
    url, seen, routes = hostile

    async def app_limit(request: web.Request) -> web.Response:
        body = {"error": {"message": "(#4) Application request limit reached", "code": 4, "is_transient": False}}
        return web.json_response(body, status=403, headers={"Retry-After": "garbage"})

    routes["/ig_hashtag_search"] = app_limit
    stop = asyncio.Event()
    pool._stop = stop
    session, client = await client_for(url, pool, throttle_pause_s=30, stop=stop)
    async with session:
        call = asyncio.create_task(client.hashtag_id("sushi"))
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert len(seen) == 1  # one #4, then no token of the app calls again
        redis = aioredis.Redis.from_url(redis_url)
        assert 25_000 < await redis.pttl(f"{keys.token_key_prefix}app-pause:default") <= 30_000
        await redis.aclose()
        stop.set()
        with pytest.raises(CrawlStopped):
            await asyncio.wait_for(call, timeout=2)


async def test_a_page_that_arrives_in_pieces_is_read_whole(hostile: Any, pool: TokenPool) -> None:
    """Real pages of 50 media come in several TCP segments, with pauses between them."""
    url, _seen, routes = hostile
    items = [{"id": str(k), "caption": "x" * 500} for k in range(50)]
    body = json.dumps({"data": items}).encode()

    async def slow_page(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(body), 4096):
            await response.write(body[start : start + 4096])
            await asyncio.sleep(0.02)
        await response.write_eof()
        return response

    routes["/1/recent_media"] = slow_page
    session, client = await client_for(url, pool)
    async with session:
        page = await client.hashtag_media("1", "recent_media", "id,caption")
    assert page.items == items


async def test_a_broken_header_is_a_retried_failure_that_names_no_token(hostile: Any, pool: TokenPool) -> None:
    url, seen, routes = hostile

    async def huge_header(request: web.Request) -> web.Response:
        return web.json_response({"data": []}, headers={"X-Junk": "j" * 20_000})

    routes["/ig_hashtag_search"] = huge_header
    session, client = await client_for(url, pool)
    async with session:
        with pytest.raises(SourceError) as caught:
            await client.hashtag_id("sushi")
    assert len(seen) == 2  # the first try and its one retry
    chain = f"{caught.value} {caught.value.__cause__} {caught.value.__context__}"
    assert SECRET not in chain and "second-token" not in chain


async def test_a_bad_next_link_keeps_the_page_and_ends_the_walk(hostile: Any, pool: TokenPool) -> None:
    url, _seen, routes = hostile
    for path, link in {"/1/recent_media": "relative/1/recent_media?after=X", "/2/recent_media": f"{url}/9/top_media",
                       "/3/recent_media": ["not", "a", "link"]}.items():  # fmt: skip

        async def page(request: web.Request, link: object = link) -> web.Response:
            return web.json_response({"data": [{"id": "7"}], "paging": {"next": link}})

        routes[path] = page
    session, client = await client_for(url, pool)
    async with session:
        for hashtag_id in ("1", "2", "3"):
            result = await client.hashtag_media(hashtag_id, "recent_media", "id")
            assert result.items == [{"id": "7"}] and result.next is None and result.problem


async def test_high_app_usage_slows_the_whole_app_and_high_account_usage_the_token(
    hostile: Any, pool: TokenPool, redis_url: str
) -> None:
    url, _seen, routes = hostile
    headers = {"X-App-Usage": json.dumps({"call_count": 99})}

    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "1"}]}, headers=headers)

    routes["/ig_hashtag_search"] = busy
    redis = aioredis.Redis.from_url(redis_url)
    session, client = await client_for(url, pool, throttle_pause_s=5)
    async with session:
        assert await client.hashtag_id("sushi") == "1"
        assert await redis.pttl(f"{keys.token_key_prefix}app-pause:default") > 3000
        await redis.delete(f"{keys.token_key_prefix}app-pause:default")
        headers.clear()
        headers["X-Business-Use-Case-Usage"] = json.dumps({"1784": [{"call_count": 99}]})
        assert await client.hashtag_id("sushi") == "1"
    assert not await redis.exists(f"{keys.token_key_prefix}app-pause:default")
    assert len(await redis.keys(f"{keys.token_key_prefix}pause:*")) == 1
    await redis.aclose()


async def test_hostile_media_shapes_are_each_skipped_and_the_crawl_goes_on(
    hostile: Any, tmp_path: Path, redis_url: str
) -> None:
    url, _seen, routes = hostile
    nodes = [
        {"id": "1", "media_type": []},
        {"id": "2", "media_type": "IMAGE", "timestamp": 5},
        {"id": "3", "media_type": "IMAGE", "caption": 5},
        {"id": "4", "media_type": "CAROUSEL_ALBUM", "children": {"data": "nope"}},
        {"id": "5", "media_type": "IMAGE", "like_count": -3},
        "not a node",
        None,
        {"media_type": "IMAGE"},
        {"id": "6", "media_type": "IMAGE", "caption": "fine #ok", "media_url": f"{url}/img/6.jpg"},
    ]

    async def search(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "1"}]})

    async def page(request: web.Request) -> web.Response:
        return web.json_response({"data": nodes, "paging": "not an object"})

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=noise_jpeg(), content_type="image/jpeg")

    routes.update({"/ig_hashtag_search": search, "/1/recent_media": page, "/img/6.jpg": image})
    settings = make_settings(tmp_path / "data", redis_url, source_url=url, hashtags=["ok"], accounts=[])
    client = aioredis.Redis.from_url(redis_url)
    try:
        crawler = Crawler(settings, client, CelerySink(Jobs.for_settings(settings)), BlobStore(settings.blob_dir))
        counts = await crawler.run()
    finally:
        await client.aclose()
    assert counts["enqueued"] == 1 and counts["malformed_media"] >= 6
