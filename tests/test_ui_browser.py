"""The web UI in a real browser (issue 18): Playwright driving Debian's headless Chromium against a real
``deeptarget serve`` process over a small indexed deployment (``tests/ui_data.py``). Screenshots of each page go to
``test-artifacts/ui/`` for people to look at.

``./dt test`` installs Debian's ``chromium`` where it can (root and apt-get); without it these tests are skipped here,
and fail under CI, which must run them. Chromium runs with the flags this machine's closed network needs (no
background networking, component updates or sync) and a fresh profile each run.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from deeptarget.runtime.embedded_redis import EmbeddedRedis
from tests.helpers import served
from tests.ui_data import UiDeployment, build_ui_deployment

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]  # fmt: skip
LOADED = "sel => [...document.querySelectorAll(sel)].every(i => i.complete && i.naturalWidth > 0)"

pytestmark = pytest.mark.timeout(180)


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: Debian's chromium is missing (./dt test installs it)")
        pytest.skip("no chromium here (Debian's package chromium; ./dt test installs it when run as root)")
    return found


@pytest.fixture(scope="module")
def deployment(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> UiDeployment:
    return build_ui_deployment(tmp_path_factory.mktemp("ui-browser") / "data", redis_server.url)


@pytest.fixture(scope="module")
def base_url(deployment: UiDeployment, redis_server: EmbeddedRedis) -> Iterator[str]:
    with served(deployment.settings.data_dir, redis_server.url, face_policy="tag") as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda err: errors.append(str(err)))
    yield opened
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def cut(data: bytes) -> bytes:
    """The post's picture less 3% of each side, encoded again (see test_ui.crop for why so light a cut)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    out = io.BytesIO()
    image.crop((round(w * 0.03), round(h * 0.03), w - round(w * 0.03), h - round(h * 0.03))).save(out, "JPEG")
    return out.getvalue()


def test_an_upload_shows_a_grid_of_loaded_thumbnails_first_the_post_it_was_cut_from(
    page: Any, base_url: str, deployment: UiDeployment
) -> None:
    post_id = next(iter(deployment.media))
    page.goto(f"{base_url}/")
    page.set_input_files("#image", files=[{"name": "cut.jpg", "mimeType": "image/jpeg",
                                           "buffer": cut(deployment.images[post_id])}])  # fmt: skip
    page.wait_for_selector("#found .grid .card")
    page.wait_for_function(LOADED, arg="#found .grid img")
    cards = page.locator("#found .grid .card")
    assert cards.count() >= 12 and cards.first.get_attribute("data-post-id") == post_id
    assert page.locator(".suggested li").count() > 0  # the hashtags suggested for the upload
    page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)

    page.set_viewport_size({"width": 390, "height": 844})  # a phone: two columns, nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(ARTIFACTS / "search-phone.png"))


def test_a_broken_upload_says_why_on_the_page(page: Any, base_url: str) -> None:
    page.goto(f"{base_url}/")
    page.set_input_files("#image", files=[{"name": "x.jpg", "mimeType": "image/jpeg", "buffer": b"not a picture"}])
    page.wait_for_selector("#status.error")
    assert "not_an_image" in page.inner_text("#status")


def test_search_an_audience_then_open_an_account(page: Any, base_url: str, deployment: UiDeployment) -> None:
    tag = next(iter(deployment.media.values())).hashtags[0]
    page.goto(f"{base_url}/ui/audiences")
    page.fill("input[name=interest]", f"#{tag}")
    page.click("form.filters button[type=submit]")
    page.wait_for_selector(".member")
    page.wait_for_function(LOADED, arg=".member img")
    assert page.locator(".member").count() >= 1 and page.locator(".member .card").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "audiences.png"), full_page=True)

    first = page.locator(".member-name").first
    username = first.inner_text().lstrip("@")
    first.click()
    page.wait_for_url("**/ui/accounts/**")
    page.wait_for_function(LOADED, arg=".grid img")
    assert username in page.inner_text("h1")
    theirs = {m.id for m in deployment.media.values() if m.owner.username == username}
    shown = {c.get_attribute("data-post-id") for c in page.locator(".grid .card").all()}
    assert shown == theirs
    page.screenshot(path=str(ARTIFACTS / "account.png"), full_page=True)


def test_the_system_page_shows_the_counts_the_store_has(page: Any, base_url: str, deployment: UiDeployment) -> None:
    page.goto(f"{base_url}/ui/system")
    rows = page.locator("tr[data-status]").all()
    shown = {row.get_attribute("data-status"): int(row.locator("td.count").inner_text()) for row in rows}
    assert shown == deployment.store.status_counts()
    page.screenshot(path=str(ARTIFACTS / "system.png"), full_page=True)
