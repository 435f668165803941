"""Graph-crawled ids, usernames and captions get the checks pushed and instaloader records get (issue 12, L8/L9): a
media or child id that is no id makes its node malformed, an owner that is no id and username leaves the post
without an owner, captions, hashtags and albums are bounded. Through the real ``posts_from_media``, a crawl of a
hostile Graph server on loopback, and a crawl of the sandbox (whose ids and usernames all still pass)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web

from deeptarget.cli.arguments import post_id as _post_id
from deeptarget.core.records import Owner
from deeptarget.runtime.app_server import AppServer
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.scraper.structures import MAX_ALBUM_CHILDREN, owner_from_account, posts_from_media
from tests.conftest import make_settings
from tests.helpers import crawl, crawl_settings, noise_jpeg, offered
from tests.queue_messages import queued_post_refs

pytestmark = pytest.mark.timeout(60)

HOSTILE_IDS = [
    "\x1b[31m../../evil[/]",
    "../../etc/passwd",
    "/abs",
    "[bold red]1[/]",
    "1\u202e2",
    "12\u200b3",
    "1 2",
    "1\n2",
    "-1",
    ".1",
    "１２３",  # fullwidth digits
    "x" * 129,
    "",
    1.5,
    True,
    -1,
    2**64,
    {"id": "1"},
    ["1"],
]
HOSTILE_OWNER_ID = "../../owner\x1b[2J"
HOSTILE_USERNAME = "[bold red]EVIL[/]\x1b[31m…\u202egnp.exe"
HOSTILE_USERNAMES = [HOSTILE_USERNAME, "a" * 31, "ann smith", "ann@x", "ann\x00", "ánn", "../ann", "[/]"]


def image(post_id: Any, url: str = "https://cdn.example/a.jpg") -> dict[str, Any]:
    return {"id": post_id, "media_type": "IMAGE", "media_url": url}


@pytest.mark.parametrize("post_id", HOSTILE_IDS, ids=ascii)
def test_a_media_id_that_is_no_id_makes_the_node_malformed(post_id: Any) -> None:
    with pytest.raises(ValueError) as raised:
        posts_from_media(image(post_id), source="graph")
    assert "\x1b" not in str(raised.value) and "\u202e" not in str(raised.value)  # the log line shows it escaped


@pytest.mark.parametrize("child_id", HOSTILE_IDS[:12], ids=ascii)
def test_a_child_id_that_is_no_id_makes_the_album_malformed(child_id: str) -> None:
    album = {"id": "30", "media_type": "CAROUSEL_ALBUM", "children": {"data": [image("301"), image(child_id)]}}
    with pytest.raises(ValueError):
        posts_from_media(album, source="graph")


def test_graph_ids_as_the_source_gives_them_still_pass() -> None:
    album = {"id": "17900000000000001", "media_type": "CAROUSEL_ALBUM", "children": {"data": [image("1"), image("2")]}}
    assert [p.id for p in posts_from_media(album, source="graph")] == ["17900000000000001", "17900000000000001_1"]
    assert [p.id for p in posts_from_media(image(17900000000000002), source="graph")] == ["17900000000000002"]
    assert [p.id for p in posts_from_media(image("partner-a.1:b_2"), source="graph")] == ["partner-a.1:b_2"]


@pytest.mark.parametrize(
    "owner",
    [Owner(id=HOSTILE_OWNER_ID, username=HOSTILE_USERNAME), Owner(id=HOSTILE_OWNER_ID, username="ann")]
    + [Owner(id="17841400100000000", username=name) for name in HOSTILE_USERNAMES],
    ids=ascii,
)
def test_a_hostile_owner_leaves_the_post_without_an_owner(owner: Owner) -> None:
    # The image and caption are good: one bad field costs the owner, not the post (the unknown owner hashtag media
    # have anyway), and the post is stored under no name that no command could reach or print.
    (post,) = posts_from_media({**image("40"), "caption": "#fine"}, source="graph", owner=owner)
    assert post.id == "40" and post.owner is None and post.hashtags == ["fine"]


def test_a_plausible_owner_is_kept() -> None:
    owner = Owner(id="17841400100000000", username="sunny_fox.2", followers_count=10)
    assert posts_from_media(image("41"), source="graph", owner=owner)[0].owner == owner
    assert posts_from_media(image("42"), source="graph", owner=Owner(id="5"))[0].owner == Owner(id="5")


@pytest.mark.parametrize(
    "account",
    [
        {"id": HOSTILE_OWNER_ID, "username": "sunny_fox"},
        {"id": "17841400100000000", "username": HOSTILE_USERNAME},
        {"id": ["17841400100000000"], "username": "sunny_fox"},
        {"id": "17841400100000000", "username": {"name": "x"}},
        "not an account",
    ],
    ids=ascii,
)
def test_an_account_answer_that_names_no_owner_gives_none(account: Any) -> None:
    assert owner_from_account(account, "sunny_fox") is None


@pytest.mark.parametrize("followers", [2**63, 2**70, -1, True, 1.5, "10", math.inf], ids=ascii)
def test_an_account_with_absurd_followers_keeps_its_owner_with_followers_unknown(followers: Any) -> None:
    owner = owner_from_account({"id": "17841400100000000", "username": "sunny_fox", "followers_count": followers}, "x")
    assert owner == Owner(id="17841400100000000", username="sunny_fox", followers_count=None)


def test_an_account_answer_without_id_or_username_falls_back_on_the_target() -> None:
    assert owner_from_account({"followers_count": 7}, "sunny_fox") == Owner(id="sunny_fox", username="sunny_fox",
                                                                            followers_count=7)  # fmt: skip


def test_captions_hashtags_and_albums_are_bounded() -> None:
    tags = " ".join(f"#t{k}" for k in range(40))
    long = posts_from_media({**image("50"), "caption": tags + " #" + "a" * 150 + " " + "x" * 100_000}, source="g")[0]
    assert len(long.caption or "") == 2200 and long.hashtags == [f"t{k}" for k in range(30)]
    sneaky = posts_from_media({**image("51"), "caption": "\x1b[31mred\x1b[0m\a line\nnext\tcol #ok"}, source="g")[0]
    assert sneaky.caption == "[31mred[0m line\nnext\tcol #ok" and sneaky.hashtags == ["ok"]
    with pytest.raises(ValueError):  # not UTF-8: neither SQLite nor PostgreSQL takes it, nor the batch it is in
        posts_from_media({**image("52"), "caption": "bad \ud800 half"}, source="g")
    children = [image(str(600 + k), f"https://cdn.example/{k}.jpg") for k in range(500)]
    album = {"id": "60", "media_type": "CAROUSEL_ALBUM", "children": {"data": children}}
    assert len(posts_from_media(album, source="g")) == MAX_ALBUM_CHILDREN


# -- a hostile Graph server on loopback, crawled by the real scraper ---------------------------------------------------
CHILDREN = [{"id": "121", "media_type": "IMAGE"}, {"id": "122", "media_type": "IMAGE"}]
GOOD_ALBUM = {"id": "12", "media_type": "CAROUSEL_ALBUM", "children": {"data": CHILDREN}}


@pytest.fixture
async def hostile_graph() -> AsyncIterator[str]:
    """A Graph server answering a hashtag page full of hostile ids and an account with a hostile id and username."""
    urls: dict[str, str] = {}

    def with_url(node: dict[str, Any], name: str) -> dict[str, Any]:
        node = {**node, "media_url": f"{urls['origin']}/img/{name}.jpg"}
        if "children" in node:
            data = [
                {**c, "media_url": f"{urls['origin']}/img/{name}_{k}.jpg"}
                for k, c in enumerate(node["children"]["data"])
            ]
            node["children"] = {"data": data}
        return node

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/ig_hashtag_search":
            return web.json_response({"data": [{"id": "1"}]})
        if request.path == "/1/recent_media":
            bad = [with_url(image(post_id), f"bad{k}") for k, post_id in enumerate(HOSTILE_IDS)]
            bad_child = {"id": "30", "media_type": "CAROUSEL_ALBUM",
                         "children": {"data": [image("301"), image("\x1b[2J../x")]}}  # fmt: skip
            good = [with_url(image("10"), "10"), with_url(image(11), "11"), with_url(GOOD_ALBUM, "12")]
            return web.json_response({"data": [*bad, with_url(bad_child, "30"), *good]})
        if request.path.startswith("/img/"):
            return web.Response(body=noise_jpeg(), content_type="image/jpeg")
        if "username(huge)" in request.query.get("fields", ""):  # followers past int64 ended the whole run
            media = {"data": [with_url(image("40"), "40")]}
            account = {"id": "17841400000000777", "username": "huge", "followers_count": 2**63, "media": media}
            return web.json_response({"business_discovery": account, "id": request.path.strip("/")})
        if request.query.get("fields", "").startswith("business_discovery"):
            media = {"data": [with_url(image("20"), "20"), with_url(image("21"), "21")]}
            account = {"id": HOSTILE_OWNER_ID, "username": HOSTILE_USERNAME, "followers_count": 10, "media": media}
            return web.json_response({"business_discovery": account, "id": request.path.strip("/")})
        return web.json_response({"error": {"message": "no such path", "code": 100}}, status=400)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    async with AppServer(app, "127.0.0.1", 0) as server:
        urls["origin"] = server.url
        yield server.url


async def test_a_crawl_of_hostile_ids_stores_only_ids_every_command_can_name(
    hostile_graph: str, tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    settings = make_settings(tmp_path / "data", redis_url, source_url=hostile_graph, hashtags=["ok"],
                             accounts=["evil", "huge"])  # fmt: skip
    counts = await crawl(settings)
    refs = {r["post"]["id"]: r for r in queued_post_refs(redis_client)}
    assert set(refs) == {"10", "11", "12", "12_1", "20", "21", "40"}
    assert refs["40"]["post"]["owner"] == {"id": "17841400000000777", "username": "huge", "followers_count": None}
    assert all(_post_id(post_id) == post_id for post_id in refs)  # what `deeptarget delete` / `query` take
    assert counts["malformed_media"] == len(HOSTILE_IDS) + 1  # the album with a hostile child too
    assert refs["20"]["post"]["owner"] is None and refs["21"]["post"]["owner"] is None
    assert all(r["blob"] and not r["rejected"] for r in refs.values())


async def test_a_sandbox_crawl_keeps_every_id_and_owner(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=21, n_posts=30, n_users=5, n_hashtags=2, corrupt_share=0.0)
    async with sandbox_server(network) as server:
        settings = crawl_settings(tmp_path, redis_url, network, server.url)
        await crawl(settings.model_copy(update={"hashtags": []}))  # accounts first: every post with its owner
        by_account = {r["post"]["id"]: r["post"] for r in queued_post_refs(redis_client)}
        await crawl(settings.model_copy(update={"accounts": []}))
    refs = {r["post"]["id"] for r in queued_post_refs(redis_client)}
    assert refs == offered(network, settings) == by_account.keys()  # hashtag posts are all some account's
    assert all(_post_id(post_id) == post_id for post_id in refs)
    owners = {a.id: (a.username, a.followers_count) for a in network.accounts}
    for post in by_account.values():
        owner = post["owner"]
        assert owners[owner["id"]] == (owner["username"], owner["followers_count"])
