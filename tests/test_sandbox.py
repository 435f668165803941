"""The sandbox over real loopback HTTP: it pages, filters, limits and fails the way the Graph API documents."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from deeptarget.sandbox import Faults, SandboxNetwork, sandbox_server
from deeptarget.sandbox.network import Media
from deeptarget.sandbox.server import token_fingerprint

AUTH = {"Authorization": "Bearer good-token"}
FIELDS = "id,caption,media_type,media_url,like_count,timestamp,children{media_type,media_url}"

Sandbox = tuple[str, SandboxNetwork, aiohttp.ClientSession]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    network = SandboxNetwork(seed=3, n_posts=80, n_users=10, n_hashtags=5)
    async with sandbox_server(network, tokens=["good-token"]) as server, aiohttp.ClientSession(headers=AUTH) as http:
        yield server.url, network, http


async def get(http: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, dict[str, Any], Any]:
    async with http.get(url, params=params or None) as response:
        return response.status, dict(response.headers), await response.json()


async def walk_hashtag(http: aiohttp.ClientSession, url: str, hashtag_id: str, limit: int, edge: str = "recent_media"):
    """Every page of a hashtag edge, following the next links (the documented way on)."""
    pages = []
    link: str | None = f"{url}/v21.0/{hashtag_id}/{edge}?user_id=1&fields={FIELDS}&limit={limit}"
    while link:
        status, _, page = await get(http, link)
        assert status == 200, page
        pages.append(page)
        link = page.get("paging", {}).get("next")
        assert len(pages) < 100, "the next links never end"
    return pages


async def walk_account(http: aiohttp.ClientSession, url: str, username: str, limit: int) -> list[dict[str, Any]]:
    """Every media page of an account by business discovery, building each next query from the after cursor."""
    pages, after = [], None
    while True:
        modifiers = f".limit({limit})" + (f".after({after})" if after else "")
        fields = f"business_discovery.username({username}){{id,media{modifiers}{{{FIELDS}}}}}"
        status, _, body = await get(http, f"{url}/v21.0/17841400000000001", fields=fields)
        assert status == 200, body
        pages.append(body["business_discovery"]["media"])
        after = pages[-1].get("paging", {}).get("cursors", {}).get("after")
        if not after:
            return pages
        assert len(pages) < 100, "the after cursors never end"


def post_ids(node: dict[str, Any]) -> list[str]:
    """The post ids a media node becomes, named as the scraper names them (structures.posts_from_media)."""
    if node["media_type"] == "VIDEO":
        return []
    if node["media_type"] != "CAROUSEL_ALBUM":
        return [node["id"]]
    images = [c for c in node["children"]["data"] if c["media_type"] == "IMAGE"]
    return [node["id"] if k == 0 else f"{node['id']}_{k}" for k in range(len(images))]


def visible_ids(media: list[Media]) -> list[str]:
    return [m.id for m in media if m.visible]


def test_the_network_is_deterministic_from_its_seed() -> None:
    a, b = SandboxNetwork(seed=5, n_posts=40), SandboxNetwork(seed=5, n_posts=40)
    assert [m.id for m in a.media] == [m.id for m in b.media]
    assert [m.visible for m in a.media] == [m.visible for m in b.media]
    assert a.media[3].image_bytes() == b.media[3].image_bytes()
    assert [m.caption for m in a.media] != [m.caption for m in SandboxNetwork(seed=6, n_posts=40).media]
    assert {m.corruption for m in SandboxNetwork(n_posts=300).media} >= {None, "truncated", "html", "garbage"}
    assert any(m.has_face for m in a.media) and not all(m.has_face for m in a.media)
    default = SandboxNetwork()
    regular, removed = default.media[: default.n_posts], default.media[default.n_posts :]
    assert {m.kind for m in regular} == {"IMAGE", "VIDEO", "CAROUSEL_ALBUM"}
    assert 0.15 < sum(not m.visible for m in regular) / len(regular) < 0.25  # restricted at random
    assert len(removed) == 2 * (2 * default.hidden_run - 1) and not any(m.visible for m in removed)  # the two runs


async def test_hashtag_pages_share_one_after_cursor_and_the_next_links_give_every_visible_post_once(
    sandbox: Sandbox,
) -> None:
    url, network, http = sandbox
    _, _, found = await get(http, f"{url}/v21.0/ig_hashtag_search", user_id="1", q="#Coffee")
    hashtag_id = found["data"][0]["id"]
    pages = await walk_hashtag(http, url, hashtag_id, limit=7)
    items = network.hashtag_media("coffee")
    assert len(pages) == -(-len(items) // 7)  # one page per 7 of the unfiltered result set
    cursors = [page["paging"]["cursors"] for page in pages]
    assert all(c == {"after": cursors[0]["after"]} for c in cursors)  # the same after on every page, no before
    assert "next" not in pages[-1]["paging"] and all("next" in p["paging"] for p in pages[:-1])
    assert all(f"after={cursors[0]['after']}" in p["paging"]["next"].replace("%3D", "=") for p in pages[:-1])
    assert all("__paging_token=" in p["paging"]["next"] for p in pages[:-1])
    seen = [m["id"] for page in pages for m in page["data"]]
    assert seen == visible_ids(items)  # each visible post once, in order; the hidden ones never
    albums = [m for page in pages for m in page["data"] if m["media_type"] == "CAROUSEL_ALBUM"]
    assert albums and all("media_url" not in m and m["children"]["data"] for m in albums)  # as documented
    assert any(len(page["data"]) < 7 for page in pages[:-1])  # filtered after paging: short pages before the end


async def test_the_repeated_after_cursor_alone_gets_the_second_page(sandbox: Sandbox) -> None:
    url, network, http = sandbox
    hashtag_id = network.hashtag_id("coffee")
    assert hashtag_id
    pages = await walk_hashtag(http, url, hashtag_id, limit=5, edge="top_media")
    after = pages[0]["paging"]["cursors"]["after"]
    for _ in range(2):  # the same answer however often it is asked: the cursor names no place in the result set
        params = {"user_id": "1", "fields": FIELDS, "limit": "5", "after": after}
        status, _, page = await get(http, f"{url}/{hashtag_id}/top_media", **params)
        assert status == 200 and page["data"] == pages[1]["data"]
    # A cursor of another result set, or one the API never gave, is an invalid parameter.
    status, _, recent = await get(http, f"{url}/{hashtag_id}/recent_media", user_id="1", limit="5", after=after)
    assert status == 400 and recent["error"]["code"] == 100
    status, _, made_up = await get(http, f"{url}/{hashtag_id}/top_media", user_id="1", __paging_token="bm8=")
    assert status == 400 and made_up["error"]["code"] == 100


@pytest.mark.parametrize(
    ("network", "page_size"),
    [
        (SandboxNetwork(), 25),  # the default network at the default page size
        (SandboxNetwork(7, 60, 12, 6), 25),  # the tests' settings (tests/conftest.py)
        (SandboxNetwork(seed=41, n_posts=40, n_users=5, n_hashtags=3), 10),  # a small one at the tests' page size
    ],
    ids=["default", "test-settings", "small"],
)
async def test_filtering_after_paging_leaves_empty_pages_that_still_lead_on(
    network: SandboxNetwork, page_size: int
) -> None:
    """A hashtag and an account each have an empty page that is not their last."""
    async with sandbox_server(network) as server, aiohttp.ClientSession(headers=AUTH) as http:
        empty_hashtag_pages = []
        for hashtag in network.hashtags:
            hashtag_id = network.hashtag_id(hashtag)
            assert hashtag_id
            pages = await walk_hashtag(http, server.url, hashtag_id, limit=page_size)
            assert [m["id"] for p in pages for m in p["data"]] == visible_ids(network.hashtag_media(hashtag))
            empty_hashtag_pages += [p for p in pages if not p["data"] and "next" in p.get("paging", {})]
        empty_account_pages = []
        for account in network.accounts:
            pages = await walk_account(http, server.url, account.username, limit=page_size)
            assert [m["id"] for p in pages for m in p["data"]] == visible_ids(network.account_media(account))
            empty_account_pages += [
                p for p in pages if not p["data"] and "after" in p.get("paging", {}).get("cursors", {})
            ]
    assert empty_hashtag_pages and empty_account_pages


async def test_business_discovery_pages_by_before_and_after_cursors_only(sandbox: Sandbox) -> None:
    url, network, http = sandbox
    account = max(network.accounts, key=lambda a: len(network.account_media(a)))
    items = network.account_media(account)
    pages = await walk_account(http, url, account.username, limit=4)
    assert len(pages) == -(-len(items) // 4)
    for page in pages:
        assert set(page["paging"]) == {"cursors"}  # no next, no previous
        assert "before" in page["paging"]["cursors"]
    assert all("after" in p["paging"]["cursors"] for p in pages[:-1]) and "after" not in pages[-1]["paging"]["cursors"]
    assert [m["id"] for p in pages for m in p["data"]] == visible_ids(items)
    # Media that fit one page come without paging at all.
    small = min(network.accounts, key=lambda a: len(network.account_media(a)))
    (only,) = await walk_account(http, url, small.username, limit=50)
    assert "paging" not in only


async def test_business_discovery_gives_followers_and_counts_every_media(sandbox: Sandbox) -> None:
    url, network, http = sandbox
    account = max(network.accounts, key=lambda a: len(network.account_media(a)))
    fields = f"business_discovery.username({account.username}){{id,followers_count,media_count,media.limit(2){{id}}}}"
    _, _, body = await get(http, f"{url}/1", fields=fields)
    found = body["business_discovery"]
    assert found["followers_count"] == account.followers_count
    assert found["media_count"] == len(network.account_media(account))  # those the caller cannot see too
    assert len(found["media"]["data"]) <= 2
    status, _, missing = await get(http, f"{url}/1", fields="business_discovery.username(nobody_here){id}")
    assert status == 400 and missing["error"]["code"] == 110


async def test_offered_is_what_following_every_target_collects(sandbox: Sandbox) -> None:
    url, network, http = sandbox
    collected: list[str] = []
    for hashtag in network.hashtags:
        for page in await walk_hashtag(http, url, network.hashtag_id(hashtag) or "", limit=10):
            collected += [post for node in page["data"] for post in post_ids(node)]
    for account in network.accounts:
        for page in await walk_account(http, url, account.username, limit=10):
            collected += [post for node in page["data"] for post in post_ids(node)]
    offered = network.offered(network.hashtags, [a.username for a in network.accounts])
    assert set(collected) == offered
    # Met by hashtag and by account: twice at most, never a hidden one.
    hidden = {post for m in network.media if not m.visible for post in m.image_ids}
    assert max(collected.count(p) for p in offered) <= 2 and not hidden & set(collected)
    assert network.offered(["nosuchtag"], ["nobody"]) == set()


async def test_an_album_of_videos_has_a_media_url_but_no_image() -> None:
    network = SandboxNetwork(seed=17, n_posts=50, n_users=5, n_hashtags=3, corrupt_share=0.0, carousel_share=0.4)
    albums = [m for m in network.media if m.kind == "CAROUSEL_ALBUM" and m.visible]
    videos_only = next(m for m in albums if set(m.layout) == {"VIDEO"})
    video_first = next(m for m in albums if m.layout[0] == "VIDEO" and "IMAGE" in m.layout)
    assert videos_only.image_ids == [] and len(video_first.image_ids) == video_first.children
    async with sandbox_server(network) as server, aiohttp.ClientSession(headers=AUTH) as http:
        nodes = {}
        for account in {videos_only.owner.username, video_first.owner.username}:
            for page in await walk_account(http, server.url, account, limit=50):
                nodes.update((n["id"], n) for n in page["data"])
        album = nodes[videos_only.id]
        assert album["media_url"].endswith(".mp4")  # the album's own URL is its first child's
        assert {c["media_type"] for c in album["children"]["data"]} == {"VIDEO"} and post_ids(album) == []
        async with http.get(album["media_url"]) as response:
            assert response.status == 200 and response.content_type == "video/mp4"
        async with http.get(f"{server.url}/media/{videos_only.id}.jpg") as response:
            assert response.status == 404
        mixed = nodes[video_first.id]
        assert mixed["media_url"].endswith(".mp4") and post_ids(mixed) == video_first.image_ids
        for child in (c for c in mixed["children"]["data"] if c["media_type"] == "IMAGE"):
            async with http.get(child["media_url"]) as response:
                assert response.content_type == "image/jpeg"
        _, _, stats = await get(http, f"{server.url}/sandbox/stats")
    assert stats["video_fetches"] == {f"{videos_only.id}_v0": 1}
    assert set(stats["image_fetches"]) == set(video_first.image_ids)
    assert videos_only.id not in network.offered([], [videos_only.owner.username])


def assert_graph_error(body: dict[str, Any], code: int, transient: bool) -> None:
    error = body["error"]
    assert error["code"] == code and error["is_transient"] is transient
    assert {"message", "type", "fbtrace_id"} <= set(error) and error["message"]


@pytest.mark.parametrize(
    ("code", "status"), [(4, 403), (17, 400), (32, 400), (613, 400), (80002, 400), (None, 429)], ids=str
)
async def test_throttles_answer_with_their_documented_code_and_status(code: int | None, status: int) -> None:
    network = SandboxNetwork(seed=3, n_posts=20, n_users=4, n_hashtags=2)
    async with (
        sandbox_server(network, faults=Faults(throttle_every=1, throttle_code=code, retry_after_s=0.2)) as server,
        aiohttp.ClientSession(headers=AUTH) as http,
    ):
        got, headers, body = await get(http, f"{server.url}/ig_hashtag_search", user_id="1", q="cats")
    assert got == status and headers["Retry-After"] == "0.2"
    assert_graph_error(body, 17 if code is None else code, transient=True)
    assert json.loads(headers["X-App-Usage"])["call_count"] >= (100 if code == 4 else 0)


async def test_error_4_pauses_every_token_of_the_app_and_counts_their_calls_as_violations() -> None:
    network = SandboxNetwork(seed=3, n_posts=20, n_users=4, n_hashtags=2)
    apps = {"alpha-1": "app-a", "alpha-2": "app-a", "beta-1": "app-b"}
    faults = Faults(app_throttle_every=3, retry_after_s=0.4, in_flight_allowance=0)
    async with (
        sandbox_server(network, tokens=apps, faults=faults, apps=apps) as server,
        aiohttp.ClientSession() as http,
    ):

        async def search(token: str) -> tuple[int, dict[str, Any], Any]:
            params = {"user_id": "1", "q": "cats", "access_token": token}
            return await get(http, f"{server.url}/ig_hashtag_search", **params)

        assert [(await search("alpha-1"))[0] for _ in range(2)] == [200, 200]
        status, headers, body = await search("alpha-1")  # the 3rd: the app has reached its limit
        assert status == 403 and body["error"]["message"] == "(#4) Application request limit reached"
        assert_graph_error(body, 4, transient=True)
        assert json.loads(headers["X-App-Usage"])["call_count"] >= 100 and float(headers["Retry-After"]) <= 0.4
        status, _, body = await search("alpha-2")  # another token of the same app: paused too, and a violation
        assert status == 403 and body["error"]["code"] == 4
        assert (await search("beta-1"))[0] == 200  # another app is not held back
        await asyncio.sleep(0.45)
        assert (await search("alpha-2"))[0] == 200  # the pause it announced is over
        _, _, stats = await get(http, f"{server.url}/sandbox/stats")
    assert stats["app_pause_violations"] == {"app-a": 1} and stats["token_pause_violations"] == {}
    assert [(p["scope"], p["name"], p["code"]) for p in stats["pauses"]] == [("app", "app-a", 4)]
    assert stats["token_apps"] == {token_fingerprint(t): app for t, app in apps.items()}


async def test_the_app_budget_over_a_rolling_window_answers_4_until_the_calls_age_out() -> None:
    network = SandboxNetwork(seed=3, n_posts=20, n_users=4, n_hashtags=2)
    faults = Faults(app_calls_per_hour=3, usage_window_s=0.8, default_pause_s=0.3, in_flight_allowance=0)
    async with sandbox_server(network, faults=faults) as server:
        sessions = [aiohttp.ClientSession(headers={"Authorization": f"OAuth token-{k}"}) for k in (1, 2)]
        try:
            usage = []
            for _ in range(3):
                status, headers, _ = await get(sessions[0], f"{server.url}/ig_hashtag_search", user_id="1", q="cats")
                assert status == 200
                usage.append(json.loads(headers["X-App-Usage"]))
            assert [u["call_count"] for u in usage] == [33, 66, 100]
            assert all(u["total_time"] == u["call_count"] == u["total_cputime"] for u in usage)
            status, _, body = await get(sessions[0], f"{server.url}/ig_hashtag_search", user_id="1", q="cats")
            assert status == 403 and body["error"]["code"] == 4  # the 4th in the window
            status, _, _ = await get(sessions[1], f"{server.url}/ig_hashtag_search", user_id="1", q="cats")
            assert status == 403  # the other token shares the app's budget, and its call is a violation
            await asyncio.sleep(0.85)  # the window forgets them all
            status, _, _ = await get(sessions[1], f"{server.url}/ig_hashtag_search", user_id="1", q="cats")
            assert status == 200
            _, _, stats = await get(sessions[0], f"{server.url}/sandbox/stats")
        finally:
            for session in sessions:
                await session.close()
    assert stats["app_pause_violations"] == {"default": 1}


async def test_a_token_throttle_pauses_that_token_alone_and_counts_its_calls_as_violations() -> None:
    network = SandboxNetwork(seed=3, n_posts=20, n_users=4, n_hashtags=2)
    faults = Faults(throttle_every=3, throttle_code=80002, regain_minutes=0.006, in_flight_allowance=0)  # 0.36 s
    async with sandbox_server(network, faults=faults) as server, aiohttp.ClientSession() as http:

        async def search(token: str) -> tuple[int, dict[str, Any], Any]:
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{server.url}/ig_hashtag_search", params={"user_id": "42", "q": "cats"},
                                headers=headers) as response:  # fmt: skip
                return response.status, dict(response.headers), await response.json()

        assert [(await search(token))[0] for token in ("one", "two")] == [200, 200]
        status, headers, body = await search("one")  # the 3rd
        assert status == 400 and body["error"]["code"] == 80002
        (usage,) = json.loads(headers["X-Business-Use-Case-Usage"])["42"]
        assert usage["type"] == "instagram" and usage["call_count"] >= 100
        assert 0.005 < usage["estimated_time_to_regain_access"] <= 0.006
        assert (await search("one"))[0] == 400  # still paused: a violation
        assert (await search("two"))[0] == 200  # the other token carries on
        await asyncio.sleep(0.4)
        status, headers, _ = await search("one")
        assert status == 200
        assert json.loads(headers["X-Business-Use-Case-Usage"])["42"][0]["estimated_time_to_regain_access"] == 0
        _, _, stats = await get(http, f"{server.url}/sandbox/stats")
    assert stats["token_pause_violations"] == {token_fingerprint("one"): 1} and stats["app_pause_violations"] == {}


async def test_the_token_budget_answers_17_for_that_token() -> None:
    network = SandboxNetwork(seed=3, n_posts=20, n_users=4, n_hashtags=2)
    faults = Faults(token_calls_per_hour=2, default_pause_s=5.0)
    async with sandbox_server(network, faults=faults) as server, aiohttp.ClientSession(headers=AUTH) as http:
        statuses = [(await get(http, f"{server.url}/ig_hashtag_search", user_id="1", q="cats"))[0] for _ in range(3)]
        _, headers, body = await get(http, f"{server.url}/ig_hashtag_search", user_id="1", q="cats")
    assert statuses == [200, 200, 400] and body["error"]["code"] == 17
    regain = json.loads(headers["X-Business-Use-Case-Usage"])["1"][0]["estimated_time_to_regain_access"]
    assert 0.07 < regain <= 5.0 / 60  # the default pause, announced in minutes


async def test_every_graph_answer_carries_parseable_usage_headers(sandbox: Sandbox) -> None:
    url, network, http = sandbox
    account = network.accounts[0].username
    requests = [  # the business is the app user's IG user: user_id, or the node business discovery asks on
        (f"{url}/ig_hashtag_search", {"user_id": "7", "q": "cats"}, "7"),  # 200
        (f"{url}/{network.hashtag_id('cats')}/recent_media", {"user_id": "7", "fields": FIELDS}, "7"),  # 200
        (f"{url}/7", {"fields": f"business_discovery.username({account}){{media{{id}}}}"}, "7"),  # 200
        (f"{url}/ig_hashtag_search", {"q": "cats"}, "17841400000000000"),  # 400: no user_id
        (f"{url}/8/recent_media", {"user_id": "7"}, "7"),  # 400: no such hashtag
    ]
    for target, params, expected in requests:
        _, headers, _ = await get(http, target, **params)
        app_usage = json.loads(headers["X-App-Usage"])
        assert set(app_usage) == {"call_count", "total_time", "total_cputime"}
        assert all(isinstance(v, int) for v in app_usage.values())
        buc = json.loads(headers["X-Business-Use-Case-Usage"])
        ((business, (usage,)),) = buc.items()
        assert business == expected and usage["type"] == "instagram"
        assert {"call_count", "total_cputime", "total_time", "estimated_time_to_regain_access"} <= set(usage)
    _, _, stats = await get(http, f"{url}/sandbox/stats")
    assert stats["graph_requests"] == len(requests)


async def test_an_access_token_in_the_query_is_accepted_repeated_in_next_links_and_never_shown() -> None:
    network = SandboxNetwork(seed=3, n_posts=40, n_users=4, n_hashtags=2)
    secret = "EAAB-secret-value-0123456789"
    async with sandbox_server(network, tokens=[secret]) as server, aiohttp.ClientSession() as http:
        link = f"{server.url}/{network.hashtag_id(network.hashtags[0])}/recent_media"
        status, _, page = await get(http, link, user_id="1", limit="3", access_token=secret)
        assert status == 200 and f"access_token={secret}" in page["paging"]["next"]
        status, _, _ = await get(http, page["paging"]["next"])  # the link alone is enough
        assert status == 200
        header = {"Authorization": f"OAuth {secret}"}
        async with http.get(link, params={"user_id": "1", "limit": "3"}, headers=header) as response:
            assert response.status == 200 and "access_token" not in (await response.json())["paging"]["next"]
        async with http.get(f"{server.url}/sandbox/stats") as response:
            text = await response.text()
    assert secret not in text
    assert json.loads(text)["requests"] == {token_fingerprint(secret): 3}


async def test_bad_tokens_get_oauth_error_190(sandbox: Sandbox) -> None:
    url, _, _ = sandbox
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer stolen"}):
            async with http.get(f"{url}/ig_hashtag_search", params={"user_id": "1", "q": "x"}, headers=headers) as r:
                assert r.status == 400
                assert_graph_error(await r.json(), 190, transient=False)
        _, _, stats = await get(http, f"{url}/sandbox/stats")
    assert stats["rejected_tokens"] == 2 and stats["graph_requests"] == 0


async def test_transient_errors_say_so() -> None:
    network = SandboxNetwork(seed=3, n_posts=20, n_users=4, n_hashtags=2)
    faults = Faults(transient_every=1, max_faults_per_request=1)
    async with sandbox_server(network, faults=faults) as server, aiohttp.ClientSession(headers=AUTH) as http:
        status, headers, body = await get(http, f"{server.url}/ig_hashtag_search", user_id="1", q="cats")
        assert status == 503 and body["error"]["message"] == "Service temporarily unavailable"
        assert_graph_error(body, 2, transient=True)
        assert "X-App-Usage" in headers
        assert (await get(http, f"{server.url}/ig_hashtag_search", user_id="1", q="cats"))[0] == 200  # spared
        _, _, stats = await get(http, f"{server.url}/sandbox/stats")
    assert stats["faults"] == {"transient": 1}


async def test_hashtag_searches_are_counted_with_their_times(sandbox: Sandbox) -> None:
    url, network, http = sandbox
    for hashtag in network.hashtags[:3]:
        await get(http, f"{url}/v21.0/ig_hashtag_search", user_id="1", q=hashtag)
    await get(http, f"{url}/{network.hashtag_id(network.hashtags[0])}/recent_media", user_id="1")
    _, _, stats = await get(http, f"{url}/sandbox/stats")
    times = stats["hashtag_search_times"]
    assert stats["hashtag_searches"] == len(times) == 3 and times == sorted(times)
    assert stats["graph_requests"] == 4


async def test_owner_fields_cannot_be_asked_of_hashtag_media(sandbox: Sandbox) -> None:
    url, network, http = sandbox
    status, _, body = await get(http, f"{url}/{network.hashtag_id('coffee')}/recent_media", user_id="1",
                                fields="id,username")  # fmt: skip
    assert status == 400 and body["error"]["code"] == 100


async def test_hidden_likes_are_omitted(sandbox: Sandbox) -> None:
    url, network, http = sandbox
    hidden = next((a for a in network.accounts if a.hides_likes), None)
    if hidden is None:
        pytest.skip("this seed has no account hiding likes")
    media = [m for page in await walk_account(http, url, hidden.username, limit=50) for m in page["data"]]
    assert media and all("like_count" not in m for m in media)


async def test_images_are_served_and_counted(sandbox: Sandbox) -> None:
    url, network, http = sandbox
    media = next(m for m in network.media if m.corruption is None and m.kind == "IMAGE")
    async with http.get(f"{url}/media/{media.id}.jpg") as response:
        assert response.content_type == "image/jpeg" and (await response.read())[:3] == b"\xff\xd8\xff"
    _, _, stats = await get(http, f"{url}/sandbox/stats")
    assert stats["image_fetches"] == {media.id: 1}


async def test_a_request_that_keeps_failing_is_answered_after_max_faults_in_a_row() -> None:
    """Faults are due by a count every request shares; the cap keeps one request's retries from all landing on it."""
    network = SandboxNetwork(seed=3, n_posts=20, n_users=4, n_hashtags=2)
    faults = Faults(error_every=1, image_error_every=1, max_faults_per_request=2)
    media = next(m for m in network.media if m.corruption is None and m.kind == "IMAGE")
    async with sandbox_server(network, faults=faults) as server, aiohttp.ClientSession(headers=AUTH) as http:

        async def statuses(path: str, params: dict[str, str] | None = None) -> list[int]:
            codes = []
            for _ in range(4):
                async with http.get(f"{server.url}{path}", params=params) as response:
                    codes.append(response.status)
            return codes

        assert await statuses(f"/media/{media.id}.jpg") == [503, 503, 200, 503]
        search = {"user_id": "1", "q": network.hashtags[0]}
        assert await statuses("/ig_hashtag_search", search) == [500, 500, 200, 500]
        assert await statuses("/ig_hashtag_search", {**search, "q": network.hashtags[1]}) == [500, 500, 200, 500]


async def test_duplicated_posts_and_looping_cursors_on_both_kinds_of_paging() -> None:
    network = SandboxNetwork(seed=3, n_posts=80, n_users=10, n_hashtags=5)
    hashtag_id = network.hashtag_id("coffee") or ""
    account = max(network.accounts, key=lambda a: len(network.account_media(a)))
    faults = Faults(duplicate_across_pages=True, cursor_loop_after=5)
    async with sandbox_server(network, faults=faults) as server, aiohttp.ClientSession(headers=AUTH) as http:
        link = f"{server.url}/{hashtag_id}/recent_media?user_id=1&limit=5"
        first = (await get(http, link))[2]
        second = (await get(http, first["paging"]["next"]))[2]
        third = (await get(http, second["paging"]["next"]))[2]  # the page at offset 5 points back to the start
        fields = f"business_discovery.username({account.username}){{media.limit(5){{id}}}}"
        bd_first = (await get(http, f"{server.url}/1", fields=fields))[2]["business_discovery"]["media"]
        after = bd_first["paging"]["cursors"]["after"]
        fields = f"business_discovery.username({account.username}){{media.limit(5).after({after}){{id}}}}"
        bd_second = (await get(http, f"{server.url}/1", fields=fields))[2]["business_discovery"]["media"]
    recent = network.hashtag_media("coffee")
    assert second["data"][0]["id"] == visible_ids(recent[:5])[-1]  # the previous page's last post, again
    assert [m["id"] for m in third["data"]] == visible_ids(recent[:5])
    assert bd_second["data"][0]["id"] == visible_ids(network.account_media(account)[:5])[-1]
    assert bd_second["paging"]["cursors"]["after"] == bd_first["paging"]["cursors"]["before"]
