from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from deeptarget.sandbox import Faults, SandboxNetwork, sandbox_server

AUTH = {"Authorization": "Bearer good-token"}


@pytest.fixture
async def sandbox() -> AsyncIterator[tuple[str, SandboxNetwork, aiohttp.ClientSession]]:
    network = SandboxNetwork(seed=3, n_posts=80, n_users=10, n_hashtags=5)
    async with sandbox_server(network, tokens=["good-token"]) as server, aiohttp.ClientSession(headers=AUTH) as http:
        yield server.url, network, http


def test_the_network_is_deterministic_from_its_seed() -> None:
    a, b = SandboxNetwork(seed=5, n_posts=40), SandboxNetwork(seed=5, n_posts=40)
    assert [m.id for m in a.media] == [m.id for m in b.media]
    assert a.media[3].image_bytes() == b.media[3].image_bytes()
    assert [m.caption for m in a.media] != [m.caption for m in SandboxNetwork(seed=6, n_posts=40).media]
    assert {m.corruption for m in SandboxNetwork(n_posts=300).media} >= {None, "truncated", "html", "garbage"}
    assert any(m.has_face for m in a.media) and not all(m.has_face for m in a.media)


async def test_hashtag_search_and_cursor_paging_cover_every_post_once(sandbox) -> None:
    url, network, http = sandbox
    async with http.get(f"{url}/v21.0/ig_hashtag_search", params={"user_id": "1", "q": "#Coffee"}) as response:
        hashtag_id = (await response.json())["data"][0]["id"]
    seen, after = [], None
    while True:
        params = {"user_id": "1", "fields": "id,caption,like_count,media_url,timestamp", "limit": "7"}
        if after:
            params["after"] = after
        async with http.get(f"{url}/{hashtag_id}/recent_media", params=params) as response:
            page = await response.json()
        seen += [m["id"] for m in page["data"]]
        if "next" not in page.get("paging", {}):
            break
        after = page["paging"]["cursors"]["after"]
    assert sorted(seen) == sorted(m.id for m in network.media if "coffee" in m.hashtags)


async def test_owner_fields_cannot_be_asked_of_hashtag_media(sandbox) -> None:
    url, network, http = sandbox
    params = {"user_id": "1", "fields": "id,username"}
    async with http.get(f"{url}/{network.hashtag_id('coffee')}/recent_media", params=params) as response:
        assert response.status == 400 and (await response.json())["error"]["code"] == 100


async def test_hidden_likes_are_omitted(sandbox) -> None:
    url, network, http = sandbox
    hidden = next((a for a in network.accounts if a.hides_likes), None)
    if hidden is None:
        pytest.skip("this seed has no account hiding likes")
    fields = f"business_discovery.username({hidden.username}){{followers_count,media{{id,like_count}}}}"
    async with http.get(f"{url}/1", params={"fields": fields}) as response:
        media = (await response.json())["business_discovery"]["media"]["data"]
    assert media and all("like_count" not in m for m in media)


async def test_business_discovery_gives_followers_and_paged_media(sandbox) -> None:
    url, network, http = sandbox
    account = max(network.accounts, key=lambda a: sum(m.owner is a for m in network.media))
    fields = f"business_discovery.username({account.username}){{id,followers_count,media_count,media.limit(2){{id}}}}"
    async with http.get(f"{url}/1", params={"fields": fields}) as response:
        found = (await response.json())["business_discovery"]
    assert found["followers_count"] == account.followers_count
    assert found["media_count"] == sum(m.owner is account for m in network.media)
    assert len(found["media"]["data"]) == min(2, found["media_count"])


async def test_bad_tokens_get_oauth_error_190(sandbox) -> None:
    url, _, _ = sandbox
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer stolen"}):
            async with http.get(f"{url}/ig_hashtag_search", params={"user_id": "1", "q": "x"}, headers=headers) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == 190


async def test_images_are_served_and_counted(sandbox) -> None:
    url, network, http = sandbox
    media = next(m for m in network.media if m.corruption is None)
    async with http.get(f"{url}/media/{media.id}.jpg") as response:
        assert response.content_type == "image/jpeg" and (await response.read())[:3] == b"\xff\xd8\xff"
    async with http.get(f"{url}/sandbox/stats") as response:
        assert (await response.json())["image_fetches"] == {media.id: 1}


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
