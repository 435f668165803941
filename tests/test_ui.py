"""The web UI over HTTP (issue 18): its pages, the thumbnails and the UI key, against ``create_app`` behind aiohttp's
test server on loopback, over a deployment made by the project's own stages (``tests/ui_data.py``). What a browser
sees of the same pages is ``test_ui_browser.py``'s."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from pydantic import SecretStr

from deeptarget.api.app import create_app
from deeptarget.core.records import PostStatus
from deeptarget.query.service import QueryService
from deeptarget.runtime.embedded_redis import EmbeddedRedis
from deeptarget.ui.pages import UI_ROUTES
from deeptarget.ui.thumbnails import BOX_COLOUR
from tests.conftest import make_settings
from tests.helpers import route_table
from tests.ui_data import BOMB_ID, UiDeployment, build_ui_deployment

Client = TestClient[web.Request, web.Application]
UI_KEY = "ui-key-" + "u" * 20


@pytest.fixture(scope="module")
def deployment(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> UiDeployment:
    return build_ui_deployment(tmp_path_factory.mktemp("ui") / "data", redis_server.url)


@pytest.fixture(scope="module")
def service(deployment: UiDeployment) -> QueryService:
    return QueryService(deployment.settings)


@pytest.fixture
async def ui(deployment: UiDeployment, service: QueryService) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(deployment.settings, service=service))) as client:
        yield client


def card_ids(html: str) -> list[str]:
    return re.findall(r'<figure class="card" data-post-id="([^"]+)"', html)


def with_faces(deployment: UiDeployment) -> list[str]:
    store = deployment.store
    return [p for p in deployment.media if (stored := store.post(p)) is not None and stored.face_boxes]


def crop(data: bytes, margin: float = 0.03) -> bytes:
    """A picture less ``margin`` of each side, encoded again: what a user uploads, cut from a post. (The tests'
    backbone has random weights at 96 px, so only a light cut is sure to find its post first: at 3% every one of
    the 30 does, at 5% 28, at 10% 18.)"""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    dx, dy = round(w * margin), round(h * margin)
    out = io.BytesIO()
    image.crop((dx, dy, w - dx, h - dy)).save(out, "JPEG", quality=90)
    return out.getvalue()


COVERED = {
    ("get", "/"): "test_search_by_post_shows_the_post_first_then_its_neighbours",
    ("post", "/ui/search"): "test_an_uploaded_cut_finds_the_post_it_was_cut_from_and_suggests_its_hashtags",
    ("get", "/ui/audiences"): "test_an_audience_lists_accounts_with_their_posts_and_exports_as_the_cli",
    ("get", "/ui/audiences.{format}"): "test_an_audience_lists_accounts_with_their_posts_and_exports_as_the_cli",
    ("get", "/ui/accounts/{user}"): "test_an_account_page_shows_its_posts_and_charts",
    ("get", "/ui/system"): "test_the_system_page_shows_the_stores_counts",
    ("get", "/ui/thumbs/{post_id}"): "test_thumbnails_come_from_the_store_once_with_cache_headers",
    ("get", "/ui/reports/{folder}/{name}"): "test_static_files_and_reports_only_by_name",
    ("get", "/ui/static/{name}"): "test_static_files_and_reports_only_by_name",
    ("get", "/ui/login"): "test_with_a_ui_key_pages_and_thumbnails_need_the_login",
    ("post", "/ui/login"): "test_with_a_ui_key_pages_and_thumbnails_need_the_login",
    ("post", "/ui/logout"): "test_with_a_ui_key_pages_and_thumbnails_need_the_login",
}


def test_every_route_of_the_ui_is_covered_here(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "data", "redis://127.0.0.1:1/0"))
    assert route_table(app) >= UI_ROUTES and set(COVERED) == UI_ROUTES
    assert all(callable(globals().get(name)) for name in COVERED.values())
    off = create_app(make_settings(tmp_path / "data", "redis://127.0.0.1:1/0", ui_enabled=False))
    assert not route_table(off) & UI_ROUTES


async def test_search_by_post_shows_the_post_first_then_its_neighbours(ui: Client, deployment: UiDeployment) -> None:
    post_id = next(iter(deployment.media))
    async with ui.get("/", params={"post_id": post_id, "k": "12"}) as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        html = await response.text()
    ids = card_ids(html)
    assert ids[0] == post_id and ids[1] == post_id and len(ids) == 13  # the origin, then 12 neighbours (itself first)
    assert f"/ui/thumbs/{post_id}?size=160&amp;faces=1" in html


async def test_an_uploaded_cut_finds_the_post_it_was_cut_from_and_suggests_its_hashtags(
    ui: Client, deployment: UiDeployment
) -> None:
    for post_id in list(deployment.media)[:5]:
        form = aiohttp.FormData()
        form.add_field("image", crop(deployment.images[post_id]), filename="cut.jpg", content_type="image/jpeg")
        async with ui.post("/ui/search", data=form, params={"k": "12"}) as response:
            assert response.status == 200, await response.text()
            html = await response.text()
        assert card_ids(html)[0] == post_id
        suggested = re.findall(r'<span class="tag">#([^<]+)</span>', html)
        assert suggested and set(suggested) & set(deployment.media[post_id].hashtags), suggested


async def test_filters_and_bad_input_answer_pages_not_tracebacks(ui: Client, deployment: UiDeployment) -> None:
    post_id = next(iter(deployment.media))
    faced = with_faces(deployment)
    assert faced, "the sandbox's astronaut posts have faces"
    async with ui.get("/", params={"post_id": post_id, "has_face": "true", "k": "48"}) as response:
        ids = card_ids(await response.text())[1:]
    assert ids and set(ids) <= set(faced)
    for params, status in [({"post_id": "nope"}, 404), ({"post_id": post_id, "k": "7"}, 400),
                           ({"post_id": post_id, "since": "yesterday"}, 400)]:  # fmt: skip
        async with ui.get("/", params=params) as response:
            assert response.status == status and response.content_type == "text/html", params
            assert 'class="problems"' in await response.text()
    form = aiohttp.FormData()
    form.add_field("image", b"not an image at all", filename="x.jpg", content_type="image/jpeg")
    async with ui.post("/ui/search", data=form) as response:  # the script shows the JSON error's text
        assert response.status == 422 and (await response.json())["reason"] == "not_an_image"


async def test_thumbnails_come_from_the_store_once_with_cache_headers(ui: Client, deployment: UiDeployment) -> None:
    post_id = next(iter(deployment.media))
    cache = deployment.settings.data_dir / "thumbnails"
    async with ui.get(f"/ui/thumbs/{post_id}", params={"size": "160"}) as response:
        assert response.status == 200 and response.content_type == "image/jpeg"
        assert response.headers["Cache-Control"] == "private, max-age=3600"
        etag = response.headers["ETag"]
        image = Image.open(io.BytesIO(await response.read()))
    assert max(image.size) == 160
    made = sorted(cache.rglob("*.jpg"))
    assert made and all(p.is_relative_to(cache) for p in made)
    mtimes = {p: p.stat().st_mtime_ns for p in made}
    async with ui.get(f"/ui/thumbs/{post_id}", params={"size": "160"}) as response:
        assert response.status == 200 and response.headers["ETag"] == etag
    assert {p: p.stat().st_mtime_ns for p in sorted(cache.rglob("*.jpg"))} == mtimes  # served from the cache
    async with ui.get(f"/ui/thumbs/{post_id}", params={"size": "160"}, headers={"If-None-Match": etag}) as response:
        assert response.status == 304
    async with ui.get(f"/ui/thumbs/{post_id}", params={"size": "320"}) as response:
        assert max(Image.open(io.BytesIO(await response.read())).size) == 320


async def test_face_boxes_are_drawn_where_the_store_says(ui: Client, deployment: UiDeployment) -> None:
    post_id = with_faces(deployment)[0]
    async with ui.get(f"/ui/thumbs/{post_id}", params={"size": "320", "faces": "1"}) as response:
        boxed = np.asarray(Image.open(io.BytesIO(await response.read())).convert("RGB")).astype(int)
    async with ui.get(f"/ui/thumbs/{post_id}", params={"size": "320"}) as response:
        plain = np.asarray(Image.open(io.BytesIO(await response.read())).convert("RGB")).astype(int)
    yellow = np.abs(boxed - np.array(BOX_COLOUR)).sum(axis=2) < 90
    assert yellow.sum() > 100 and (np.abs(plain - np.array(BOX_COLOUR)).sum(axis=2) < 90).sum() < yellow.sum() / 4


async def test_thumbnails_of_unknown_deleted_hostile_or_malformed_requests(
    ui: Client, deployment: UiDeployment
) -> None:
    for path in ["/ui/thumbs/unknown-post", "/ui/thumbs/..%2F..%2Fmetadata.sqlite3", "/ui/thumbs/%2Fetc%2Fpasswd"]:
        async with ui.get(path) as response:
            assert response.status == 404, path
    async with ui.get(f"/ui/thumbs/{next(iter(deployment.media))}", params={"size": "5000"}) as response:
        assert response.status == 400
    for _ in range(3):  # the bomb is refused from its header, each time, and the server carries on
        async with ui.get(f"/ui/thumbs/{BOMB_ID}") as response:
            assert response.status == 422 and (await response.json())["reason"] == "too_many_pixels"
    async with ui.get(f"/ui/thumbs/{next(iter(deployment.media))}") as response:
        assert response.status == 200
    gone = list(deployment.media)[-1]
    store = deployment.store
    store.delete_posts([gone])
    try:
        async with ui.get(f"/ui/thumbs/{gone}") as response:
            assert response.status == 404
    finally:
        assert store.post(gone) is not None and store.post(gone).status == PostStatus.DELETED  # type: ignore[union-attr]


async def test_an_audience_lists_accounts_with_their_posts_and_exports_as_the_cli(
    ui: Client, deployment: UiDeployment
) -> None:
    topic_tag = next(iter(deployment.media.values())).hashtags[0]
    async with ui.get("/ui/audiences", params={"interest": f"#{topic_tag}"}) as response:
        assert response.status == 200
        html = await response.text()
    accounts = re.findall(r'<a class="owner member-name" href="/ui/accounts/([^"]+)">', html)
    owners = {m.owner.id for m in deployment.media.values() if topic_tag in m.hashtags}
    assert accounts and set(accounts) <= owners
    shown = card_ids(html)  # each with a few of their posts, those with the hashtag first
    assert shown and topic_tag in deployment.media[shown[0]].hashtags
    async with ui.get("/ui/audiences.csv", params={"interest": f"#{topic_tag}"}) as response:
        assert response.status == 200 and "attachment" in response.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [r["user_id"] for r in rows] == accounts
    assert set(rows[0]) == {"user_id", "username", "score", "post_count", "followers_count", "median_engagement"}
    async with ui.get("/ui/audiences.json", params={"interest": f"#{topic_tag}"}) as response:
        body = await response.json(content_type=None)
    assert body["interest"] == f"hashtag:{topic_tag}" and [u["user_id"] for u in body["users"]] == accounts
    for bad in ({"min_posts": "0"}, {"min_score": "1.5"}, {"min_score": "nan"}, {"min_posts": "many"}):
        async with ui.get("/ui/audiences", params={"interest": f"#{topic_tag}", **bad}) as response:
            assert response.status == 400 and 'class="problems"' in await response.text(), bad
    async with ui.get("/ui/audiences", params={"interest": "#nobody-posts-this"}) as response:
        assert response.status == 404 and "no profile shows interest" in await response.text()


async def test_an_account_page_shows_its_posts_and_charts(ui: Client, deployment: UiDeployment) -> None:
    media = next(iter(deployment.media.values()))
    async with ui.get(f"/ui/accounts/{media.owner.username}") as response:
        assert response.status == 200
        html = await response.text()
    theirs = {m.id for m in deployment.media.values() if m.owner.id == media.owner.id}
    assert set(card_ids(html)) == theirs
    assert html.count('<svg class="chart') >= 1 and f"@{media.owner.username}" in html


async def test_the_system_page_shows_the_stores_counts(ui: Client, deployment: UiDeployment) -> None:
    async with ui.get("/ui/system") as response:
        assert response.status == 200
        html = await response.text()
    shown = dict(re.findall(r'<tr data-status="([a-z]+)"><td>[a-z]+</td><td class="count">(\d+)</td>', html))
    assert {k: int(v) for k, v in shown.items()} == deployment.store.status_counts()
    assert f"/ui/thumbs/{BOMB_ID}?size=160" in html  # a rejected post's example
    assert "DEEPTARGET_UI_KEY" in html  # the UI says how to close it


async def test_static_files_and_reports_only_by_name(ui: Client, deployment: UiDeployment) -> None:
    async with ui.get("/ui/static/ui.js") as response:
        assert response.status == 200 and "javascript" in response.content_type
    for path in ["/ui/static/..%2Fpages.py", "/ui/static/missing.css", "/ui/reports/x/index.html",
                 "/ui/reports/..%2F..%2F/metadata.sqlite3"]:  # fmt: skip
        async with ui.get(path) as response:
            assert response.status == 404, path
    report = deployment.settings.reports_dir / "system-test"
    report.mkdir(parents=True, exist_ok=True)
    (report / "index.html").write_text("<h1>report</h1>")
    (report / "secret.txt").write_text("not a report type")
    async with ui.get("/ui/reports/system-test/index.html") as response:
        assert response.status == 200 and "report" in await response.text()
    async with ui.get("/ui/reports/system-test/secret.txt") as response:
        assert response.status == 404
    async with ui.get("/ui/system") as response:
        assert "/ui/reports/system-test/index.html" in await response.text()


async def test_with_a_ui_key_pages_and_thumbnails_need_the_login(deployment: UiDeployment, service: QueryService,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    settings = deployment.settings.model_copy(update={"ui_key": SecretStr(UI_KEY)})
    post_id = next(iter(deployment.media))
    async with TestClient(TestServer(create_app(settings, service=service))) as client:
        async with client.get("/", headers={"Accept": "text/html"}, allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"].startswith("/ui/login?next=")
        async with client.get(f"/ui/thumbs/{post_id}") as response:
            assert response.status == 401 and (await response.json())["reason"] == "ui_key_required"
        async with client.post("/ui/login", data={"key": "wrong", "next": "/ui/system"}) as response:
            assert response.status == 401 and "not the key" in await response.text()
        assert not client.session.cookie_jar.filter_cookies(client.make_url("/"))
        async with client.post("/ui/login", data={"key": UI_KEY, "next": "//evil.example/"},
                               allow_redirects=False) as response:  # fmt: skip
            assert response.status == 303 and response.headers["Location"] == "/"  # no open redirect
            cookie = response.cookies["deeptarget_ui"]
            assert cookie["httponly"] and cookie["samesite"] == "Strict" and UI_KEY not in cookie.value
        async with client.get(f"/ui/thumbs/{post_id}") as response:
            assert response.status == 200
        async with client.get("/ui/system") as response:
            assert response.status == 200 and "asks for its key" in await response.text()
        async with client.post("/ui/logout", headers={"Sec-Fetch-Site": "cross-site"}) as response:
            assert response.status == 403  # another site's page cannot log the user out
        async with client.post(
            "/ui/login", data={"key": UI_KEY}, headers={"Origin": "https://evil.example"}
        ) as response:
            assert response.status == 403
        async with client.post("/ui/logout", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/ui/login"
        async with client.get(f"/ui/thumbs/{post_id}") as response:
            assert response.status == 401
        async with client.get("/ui/login", params={"next": "/ui/system"}) as response:
            assert response.status == 200 and 'value="/ui/system"' in await response.text()
    assert make_settings(tmp_path / "data", ui_key="  ").ui_key is None  # a blank key is no key: the UI is open
