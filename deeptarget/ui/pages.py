"""The web UI's routes, on the API's application: pages rendered on the server (Jinja2), a little plain JavaScript
for the upload, thumbnails from the blob store.

- ``GET  /``                        search by image (drop or pick a picture) or by post (``post_id``), with filters
- ``POST /ui/search``               the results grid and the suggested hashtags for an uploaded image (a fragment)
- ``GET  /ui/audiences``            accounts ranked by their share of an interest; ``.csv`` and ``.json`` export it
- ``GET  /ui/accounts/{user}``      an account: its posts, interests, face share, engagement over time
- ``GET  /ui/system``               posts by status, rejections with examples, stages, queues, the index, reports
- ``GET  /ui/thumbs/{post_id}``     a post's thumbnail (``size`` 160 or 320, ``faces=1`` draws the face boxes)
- ``GET  /ui/reports/{folder}/{name}``  a file of an HTML report in ``reports_dir``
- ``GET|POST /ui/login``            the UI key, when ``ui_key`` is set (``ui.access``)

Every query goes through the same ``QueryService`` and limits as the JSON API (uploads: size, pixels, decode slots).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from deeptarget.api import health
from deeptarget.api.app import (
    _HAS_FACE,
    _MIN_POSTS,
    _MIN_SCORE,
    DECODES_KEY,
    MAX_K,
    REDIS_KEY,
    SERVICE_KEY,
    SETTINGS_KEY,
    _body_deadline,
    _bool_param,
    _check_bounds,
    _decode,
    _run,
    _upload,
)
from deeptarget.core.errors import (
    DeepTargetError,
    ImageRejected,
    IndexMismatchError,
    ModelNotReadyError,
    NotFoundError,
)
from deeptarget.core.records import PostStatus, Profile
from deeptarget.query.service import PostFilter, QueryService
from deeptarget.store.blobs import StorageUnavailable
from deeptarget.store.posts import StoredPost
from deeptarget.ui import access, charts
from deeptarget.ui.thumbnails import SIZES, Thumbnails

HERE = Path(__file__).parent
STATIC = {"ui.css": "text/css", "ui.js": "text/javascript"}
RESULT_COUNTS = (12, 24, 48)
AUDIENCE_LIMIT = 50
POSTS_PER_MEMBER = 4
CANDIDATE_POSTS = 200  # a member's latest posts among which those shown are picked
ACCOUNT_POSTS = 60
REPORT_TYPES = {".html": "text/html", ".png": "image/png", ".json": "application/json", ".csv": "text/csv"}
MAX_LOGIN_BYTES = 4096
FAILED_LOGIN_DELAY_S = 1.0
THUMBS_KEY = web.AppKey("thumbnails", Thumbnails)
UI_ROUTES = {("get", "/"), ("post", "/ui/search"), ("get", "/ui/audiences"), ("get", "/ui/audiences.{format}"),
             ("get", "/ui/accounts/{user}"), ("get", "/ui/system"), ("get", "/ui/thumbs/{post_id}"),
             ("get", "/ui/reports/{folder}/{name}"), ("get", "/ui/static/{name}"), ("get", "/ui/login"),
             ("post", "/ui/login"), ("post", "/ui/logout")}  # fmt: skip
"""The UI's routes as the router names them (``add_ui`` adds them; tests/test_ui.py checks the two agree)."""
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,  # templates ship with the package: no stat of each file at every render
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Card:
    """A post as a grid cell shows it."""

    post_id: str
    score: float | None
    hashtags: list[str]
    owner_id: str | None
    owner: str | None
    faces: int
    has_image: bool
    permalink: str | None
    when: datetime | None
    likes: int | None

    @classmethod
    def of(cls, stored: StoredPost, score: float | None = None) -> Card:
        owner = stored.post.owner
        return cls(
            post_id=stored.post.id,
            score=score,
            hashtags=stored.post.hashtags,
            owner_id=owner.id if owner else None,
            owner=(owner.username or owner.id) if owner else None,
            faces=stored.faces or 0,
            has_image=bool(stored.blob),
            permalink=stored.post.permalink,
            when=stored.post.timestamp,
            likes=stored.post.like_count,
        )


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    page = TEMPLATES.get_template(template).render(path=request.path, ui_locked=settings.ui_key is not None, **context)
    return web.Response(text=page, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": CSP})  # fmt: skip


# Scripts and styles from this site only, no inline script; images from here, data: and blob: (the upload's preview),
# none from the posts' CDNs.
CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


def behind_key(handler: Handler) -> Handler:
    """A route behind the UI key (``access``): a thumbnail or a report file as it is, errors staying JSON."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if not access.allowed(request, request.app[SETTINGS_KEY]):
            return access.refusal(request)
        return await handler(request)

    return guarded


def page(handler: Handler) -> Handler:
    """An HTML page: behind the UI key, and with errors shown as a page (the JSON API's middleware would answer
    them as JSON)."""

    async def shown(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPBadRequest, web.HTTPNotFound) as err:
            return render(request, "error.html", err.status, message=err.text or err.reason)
        except NotFoundError as err:
            return render(request, "error.html", 404, message=str(err))
        except (ModelNotReadyError, IndexMismatchError) as err:
            return render(request, "error.html", 503, message=str(err))
        except ImageRejected:
            raise  # the JSON middleware's answer (413 / 422) is what the upload script reads
        except DeepTargetError as err:
            return render(request, "error.html", 400, message=str(err))

    return behind_key(shown)


def same_site(handler: Handler) -> Handler:
    """A form POST only from this site's own pages: a browser says where a request comes from (``Sec-Fetch-Site``,
    W3C "Fetch Metadata Request Headers": same-origin, same-site, cross-site or none; else ``Origin``, RFC 6454), so
    another site's page cannot log a user out or in, or search with their session."""

    async def checked(request: web.Request) -> web.StreamResponse:
        fetch_site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        cross = fetch_site not in (None, "same-origin", "none") or (
            fetch_site is None and origin not in (None, "null") and origin != f"{request.scheme}://{request.host}"
        )
        if cross:
            return web.json_response({"error": "cross-site form posts are refused", "reason": "cross_site"},
                                     status=403)  # fmt: skip
        return await handler(request)

    return checked


# -- search ------------------------------------------------------------------------------------------------------
def _count(request: web.Request) -> int:
    raw = request.query.get("k", str(RESULT_COUNTS[1]))
    if raw not in {str(k) for k in RESULT_COUNTS}:
        raise web.HTTPBadRequest(text=f"k must be one of {', '.join(map(str, RESULT_COUNTS))}")
    return int(raw)


def _filter(request: web.Request) -> PostFilter:
    query = request.query
    face = _bool_param(request, _HAS_FACE) if query.get("has_face") else None
    try:
        return PostFilter.parse(query.get("hashtag") or None, query.get("since") or None,
                                query.get("until") or None, face)  # fmt: skip
    except (ValueError, OverflowError) as err:
        raise web.HTTPBadRequest(text=str(err)) from None


def _search_post(service: QueryService, post_id: str, k: int, where: PostFilter) -> tuple[list[Card], Card | None]:
    """The grid for an indexed post, and the post itself."""
    found = service.similar_posts(service.post_vector(post_id), k, where)
    stored = service.store.post(post_id)
    return [Card.of(p, score) for p, score in found], Card.of(stored) if stored is not None else None


async def search_page(request: web.Request) -> web.Response:
    query = request.query
    k, where = _count(request), _filter(request)
    post_id = query.get("post_id", "").strip() or None
    cards, origin = (None, None) if post_id is None else await _run(_search_post, request.app[SERVICE_KEY], post_id,
                                                                      k, where)  # fmt: skip
    return render(request, "search.html", cards=cards, origin=origin, hashtags=None, query=dict(query), k=k,
                  counts=RESULT_COUNTS)  # fmt: skip


def _search_upload(service: QueryService, data: bytes, k: int, where: PostFilter,
                   n_tags: int) -> tuple[list[Card], list[tuple[str, float]] | str]:  # fmt: skip
    """The grid for an upload and its hashtags (or why there are none), from one embedding."""
    vector = service.embed_image(data)
    cards = [Card.of(p, score) for p, score in service.similar_posts(vector, k, where)]
    try:
        tags: list[tuple[str, float]] | str = service.suggest_hashtags_for_vector(vector, n_tags)
    except ModelNotReadyError as err:
        tags = str(err)
    return cards, tags


async def search_upload(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    k, where = _count(request), _filter(request)
    data = await _upload(request)
    cards, tags = await _decode(request, _search_upload, service, data, k, where, 10)
    return render(request, "results.html", cards=cards, hashtags=tags, origin=None)


# -- audiences ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    user_id: str
    score: float
    profile: Profile
    posts: list[Card]


def _audience(
    request: web.Request, limit: int = AUDIENCE_LIMIT, with_posts: bool = True
) -> tuple[str, list[Member]] | None:
    query = request.query
    interest = query.get("interest", "").strip()
    if not interest:
        return None
    try:  # a blank field is its default, as the form shows it
        min_score = float(query.get("min_score") or _MIN_SCORE.default)  # type: ignore[arg-type]
        min_posts = int(query.get("min_posts") or _MIN_POSTS.default)  # type: ignore[arg-type]
    except ValueError:
        raise web.HTTPBadRequest(text="min_score must be a number and min_posts a whole number") from None
    if not math.isfinite(min_score):
        raise web.HTTPBadRequest(text="min_score must be a finite number")
    _check_bounds(_MIN_SCORE, min_score)
    _check_bounds(_MIN_POSTS, min_posts)
    service = request.app[SERVICE_KEY]
    key, members = service.audience(interest, min_score, min_posts, limit, query.get("exclude") == "1")
    if not with_posts:
        return key, [Member(m.user_id, m.score, m.profile, []) for m in members]
    return key, [
        Member(m.user_id, m.score, m.profile,
               [Card.of(p) for p in _shown_posts(service, m.user_id, POSTS_PER_MEMBER, key)])
        for m in members
    ]  # fmt: skip


def _shown_posts(service: QueryService, user_id: str, limit: int, interest: str | None = None) -> list[StoredPost]:
    """A user's latest posts that have an image and are not deleted (of the last ``CANDIDATE_POSTS``); for an
    interest key (``hashtag:sushi``, ``class:food:sushi``), the posts that make the user into it first: those with
    the hashtag, or by the class's probability."""
    posts = service.store.recent_user_posts(user_id, CANDIDATE_POSTS)
    kind, _, name = (interest or "").partition(":")
    if kind == "hashtag":
        posts.sort(key=lambda p: name not in p.post.hashtags)  # stable: latest first within each group
    elif kind == "class":
        head, _, label = name.partition(":")
        posts.sort(key=lambda p: -p.classes.get(head, {}).get(label, 0.0))
    return posts[:limit]


async def audiences_page(request: web.Request) -> web.Response:
    found = await _run(_audience, request)
    key, members = found if found is not None else (None, [])
    return render(request, "audiences.html", key=key, members=members, query=dict(request.query))


EXPORT_FIELDS = ("user_id", "username", "score", "post_count", "followers_count", "median_engagement")


def _export_rows(members: list[Member]) -> list[dict[str, Any]]:
    return [
        {"user_id": m.user_id, "username": m.profile.username, "score": round(m.score, 6),
         "post_count": m.profile.post_count, "followers_count": m.profile.followers_count,
         "median_engagement": m.profile.median_engagement}
        for m in members
    ]  # fmt: skip


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula (OWASP, "CSV Injection"): usernames are strangers' text."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


async def audience_export(request: web.Request) -> web.Response:
    fmt = request.match_info["format"]
    found = await _run(_audience, request, MAX_K, False)  # as many as the JSON API gives, without their posts
    if found is None:
        raise web.HTTPBadRequest(text="interest is required")
    key, members = found
    rows = _export_rows(members)
    name = "audience-" + "".join(c if c.isascii() and c.isalnum() else "-" for c in key)[:80]
    headers = {"Cache-Control": "no-store"}
    if fmt == "json":
        headers["Content-Disposition"] = f'attachment; filename="{name}.json"'
        return web.Response(text=json.dumps({"interest": key, "users": rows}, indent=1),
                            content_type="application/json", headers=headers)  # fmt: skip
    out = io.StringIO()
    writer = csv.DictWriter(out, EXPORT_FIELDS)
    writer.writeheader()
    writer.writerows({field: _csv_cell(row[field]) for field in EXPORT_FIELDS} for row in rows)
    headers["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    return web.Response(text=out.getvalue(), content_type="text/csv", headers=headers)


# -- an account --------------------------------------------------------------------------------------------------
def _account(service: QueryService, user: str) -> dict[str, Any]:
    profile = service.profile(user)
    posts = [p for p in service.store.user_posts(profile.user_id) if p.status != PostStatus.DELETED]
    posts.sort(key=lambda p: (p.post.timestamp is not None, p.post.timestamp or datetime.min), reverse=True)
    engagement = [(p.post.timestamp, p.post.engagement) for p in posts]
    points = [(when, value) for when, value in engagement if when is not None and value is not None]
    interests = {head: charts.bars(list(classes.items())) for head, classes in sorted(profile.classes.items())}
    return {
        "profile": profile,
        "cards": [Card.of(p) for p in posts[:ACCOUNT_POSTS]],
        "post_total": len(posts),
        "interests": interests,
        "hashtag_chart": charts.bars(list(profile.hashtags.items())),
        "engagement_chart": charts.timeline(points),
        "median_likes": statistics.median([p.post.like_count for p in posts if p.post.like_count is not None] or [0]),
    }


async def account_page(request: web.Request) -> web.Response:
    context = await _run(_account, request.app[SERVICE_KEY], request.match_info["user"])
    return render(request, "account.html", **context)


# -- the system --------------------------------------------------------------------------------------------------
def _system(service: QueryService, reports_dir: Path) -> dict[str, Any]:
    store, now = service.store, time.time()
    index = service.snapshots.get()
    return {
        "activity": store.status_activity(now - 300, now - 3600),  # status -> (posts, last 5 min, last hour)
        "rejections": store.rejection_reasons(),
        "examples": store.rejected_examples(),
        "index": None if index is None else {
            "vectors": index.ntotal, "kind": index.kind, "codec": index.codec, "version": index.version,
            "age_s": None if index.created is None else max(0.0, now - index.created),
        },
        "reports": _reports(reports_dir),
    }  # fmt: skip


def _reports(reports_dir: Path) -> list[tuple[str, float]]:
    """The report folders that hold an index.html, newest first."""
    if not reports_dir.is_dir():
        return []
    found = [(d.name, d.stat().st_mtime) for d in reports_dir.iterdir() if (d / "index.html").is_file()]
    return sorted(found, key=lambda item: -item[1])[:30]


async def system_page(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    service = request.app[SERVICE_KEY]
    facts = await _run(_system, service, settings.reports_dir)
    checks = await health.health(settings, service, request.app[REDIS_KEY])
    status_chart = charts.bars([(k, float(v[0])) for k, v in facts["activity"].items()], "{:,.0f}")
    rejection_chart = charts.bars([(k, float(v)) for k, v in facts["rejections"].items()], "{:,.0f}")
    return render(request, "system.html", health=checks, status_chart=status_chart, rejection_chart=rejection_chart,
                  **facts)  # fmt: skip


# -- files -------------------------------------------------------------------------------------------------------
async def thumbnail(request: web.Request) -> web.StreamResponse:
    size_raw, faces = request.query.get("size", str(SIZES[0])), request.query.get("faces") == "1"
    if size_raw not in {str(s) for s in SIZES}:
        raise web.HTTPBadRequest(text=f"size must be one of {', '.join(map(str, SIZES))}")
    post_id = request.match_info["post_id"]
    stored = await _run(request.app[SERVICE_KEY].store.post, post_id)
    if stored is None or stored.status == PostStatus.DELETED:
        raise NotFoundError(f"post {post_id} is not known")
    thumbnails = request.app[THUMBS_KEY]
    try:
        path = await _run(thumbnails.cached, stored, int(size_raw), faces)
        if path is None:
            data = await _run(thumbnails.image, stored)
            path = await _decode(request, thumbnails.make, stored, int(size_raw), faces, data)
    except StorageUnavailable:
        raise web.HTTPServiceUnavailable(text="the blob store is unavailable; try again shortly",
                                         headers={"Retry-After": "5"}) from None  # fmt: skip
    # FileResponse answers If-None-Match and If-Modified-Since itself (its ETag: the file's mtime and size)
    return web.FileResponse(path, headers={"Cache-Control": THUMB_CACHE, "Content-Type": "image/jpeg"})


# The same post may lose its image (deleted) or the UI may be locked: browsers keep a thumbnail an hour, shared caches
# never (it may be behind the UI key).
THUMB_CACHE = "private, max-age=3600"


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC:  # a fixed list: no name from the client is joined to a path
        raise web.HTTPNotFound(text="no such file")
    return web.FileResponse(HERE / "static" / name, headers={"Cache-Control": "public, max-age=300",
                                                             "Content-Type": STATIC[name]})  # fmt: skip


async def report_file(request: web.Request) -> web.StreamResponse:
    reports_dir = request.app[SETTINGS_KEY].reports_dir
    folder, name = request.match_info["folder"], request.match_info["name"]

    def find() -> Path | None:  # matched against what the directory lists, never joined from the request's text
        folders = {d.name: d for d in reports_dir.iterdir() if d.is_dir()} if reports_dir.is_dir() else {}
        found = folders.get(folder)
        files = {f.name: f for f in found.iterdir() if f.is_file()} if found is not None else {}
        path = files.get(name)
        return path if path is not None and path.suffix in REPORT_TYPES else None

    path = await _run(find)
    if path is None:
        raise web.HTTPNotFound(text="no such report file")
    return web.FileResponse(path, headers={"Content-Type": REPORT_TYPES[path.suffix], "Cache-Control": "no-cache",
                                           "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                           "style-src 'self' 'unsafe-inline'; script-src 'none'"})  # fmt: skip


# -- logging in --------------------------------------------------------------------------------------------------
async def login_page(request: web.Request) -> web.Response:
    return render(request, "login.html", next=access.local_path(request.query.get("next")), failed=False)


async def login(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    if request.content_length is None or request.content_length > MAX_LOGIN_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_LOGIN_BYTES, actual_size=request.content_length or 0)
    async with _body_deadline(request):
        form = await request.post()
    given, target = str(form.get("key", "")), access.local_path(str(form.get("next", "/")))
    if not access.key_matches(given, settings):
        await asyncio.sleep(FAILED_LOGIN_DELAY_S)  # guesses cost time (per connection: see docs)
        return render(request, "login.html", 401, next=target, failed=True)
    response = web.Response(status=303, headers={"Location": target})
    access.set_session(response, request, settings)
    return response


async def logout(request: web.Request) -> web.Response:
    response = web.Response(status=303, headers={"Location": "/ui/login"})
    response.del_cookie(access.COOKIE, path="/")
    return response


def add_ui(app: web.Application) -> None:
    """The UI's routes on the API's application (``create_app`` calls this when ``ui_enabled``)."""
    settings = app[SETTINGS_KEY]

    async def thumbnails(app: web.Application) -> Any:
        app[THUMBS_KEY] = Thumbnails.for_settings(settings)
        yield

    app.cleanup_ctx.append(thumbnails)
    assert DECODES_KEY in app  # thumbnails share the uploads' decode slots
    routes = {
        ("get", "/"): page(search_page),
        ("post", "/ui/search"): same_site(page(search_upload)),
        ("get", "/ui/audiences"): page(audiences_page),
        ("get", "/ui/audiences.{format:csv|json}"): page(audience_export),
        ("get", "/ui/accounts/{user}"): page(account_page),
        ("get", "/ui/system"): page(system_page),
        ("get", "/ui/thumbs/{post_id}"): behind_key(thumbnail),
        ("get", "/ui/reports/{folder}/{name}"): behind_key(report_file),
        ("get", "/ui/static/{name}"): static_file,
        ("get", "/ui/login"): login_page,
        ("post", "/ui/login"): same_site(login),
        ("post", "/ui/logout"): same_site(logout),
    }
    for (method, path), handler in routes.items():
        app.router.add_route(method.upper(), path, handler)
