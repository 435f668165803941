"""The sandbox source: an aiohttp server on loopback that models the Instagram Graph API as Meta documents it.

Endpoints (an optional ``/v21.0``-style version prefix is accepted):
- ``GET /ig_hashtag_search?user_id=&q=`` -> ``{"data": [{"id": ...}]}``
- ``GET /{hashtag-id}/recent_media`` and ``/top_media`` with ``user_id``, ``fields``, ``limit`` (<= 50): media of the
  last 24 hours (recent) or the most liked (top); owner fields cannot be asked for (#100); like_count is left out
  when the owner hides likes. Every page's ``paging.cursors.after`` is the same value (it names the result set), there
  is no ``before``, and the ``next`` link (the same query with that ``after`` and an opaque ``__paging_token``) is the
  way on; it is absent on the last page. ``after`` alone, without a token, gets the second page.
- ``GET /{ig-user-id}?fields=business_discovery.username(NAME){followers_count,media_count,media{...}}``
  (``media.after(C).limit(N){...}``, ``media.before(C)``): the account and a page of its media, with
  ``paging.cursors.before/after`` only (no ``next``/``previous``; the last page has no ``after``), and only when the
  media take more than one page.
- ``GET /media/{id}.jpg``, ``/media/{id}_{k}.jpg``: pictures (some broken on purpose: truncated, garbage, an HTML
  page); ``/media/{id}.mp4``, ``/media/{id}_v{j}.mp4``: videos (not pictures, and counted apart).
- ``GET /sandbox/stats``: what the server saw, tokens named by fingerprint (never by value); ``GET /sandbox/accounts``:
  the usernames.

The model, by default (see sandbox/paging.py, sandbox/limits.py, sandbox/network.py):
- pages are windows of the unfiltered result set, filtered afterwards: media the caller may not see (``visible``
  False) are left out, so pages come short and some come empty, with a ``next`` link all the same;
- albums have image and video children in any order, some only videos; hashtag edges give an album no ``media_url``,
  business discovery gives it its first child's (a video's, for some);
- access tokens come as ``access_token`` (the documented way) or ``Authorization: Bearer``/``OAuth``; an unknown one
  gets #190. Tokens belong to apps (``apps``: token -> app id, default one app); every call counts against its app's
  and its own budget over a rolling hour; every answer carries ``X-App-Usage`` and ``X-Business-Use-Case-Usage``;
  #4 (HTTP 403) pauses every token of the app, #17/#32/#613/#80002 (HTTP 400) and HTTP 429 pause the token, for the
  wait they announce (``Retry-After``, ``estimated_time_to_regain_access``) or ``Faults.default_pause_s``; calls
  made while paused are answered with the throttle again and counted as violations;
- error bodies are ``{"error": {"message", "type", "code", "error_subcode"?, "is_transient", "fbtrace_id"}}``.

``Faults`` (sandbox/faults.py) switch on more failures: throttles, transient Graph errors, 5xx bursts, resets, slow
and truncated answers, duplicated posts, looping cursors, failing image fetches, lower budgets.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

import numpy as np
from aiohttp import web
from aiohttp.typedefs import Handler

from deeptarget.runtime.app_server import AppServer
from deeptarget.sandbox import images, paging
from deeptarget.sandbox.faults import Faults
from deeptarget.sandbox.limits import (
    DEFAULT_IG_USER,
    INVALID_TOKEN,
    THROTTLES,
    TRANSIENT,
    GraphError,
    GraphFailure,
    Limits,
    bad_request,
    throttle_error,
)
from deeptarget.sandbox.network import Media, SandboxNetwork

NETWORK_KEY = web.AppKey("network", SandboxNetwork)
TOKENS_KEY = web.AppKey("tokens", frozenset)
STATS_KEY = web.AppKey("stats", dict)
FAULTS_KEY = web.AppKey("faults", Faults)
LIMITS_KEY = web.AppKey("limits", Limits)

OWNER_FIELDS = {"owner", "username"}
# IG Hashtag Recent Media, Limitations: "Responses are paginated with a maximum limit of 50 results per page" (asked
# for more, we give 50: what the API does then is not documented).
MAX_LIMIT = 50
DEFAULT_LIMIT = 25  # Graph API Paginated Results: the samples' limit=25 (assumed to be the default when none is given)
_VERSION_PREFIXES = ("", r"/{version:v\d+\.\d+}")


def token_fingerprint(token: str) -> str:
    """How tokens are named in logs and stats: never by value."""
    return hashlib.sha256(token.encode()).hexdigest()[:10]


def graph_error(status: int, code: int, message: str, kind: str = "OAuthException") -> web.Response:
    return GraphError(status, code, message, kind).response()


def _split_fields(spec: str) -> list[str]:
    """Top-level comma split that respects {...} and (...) nesting."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in spec:
        if char in "{(":
            depth += 1
        elif char in "})":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if current:
        parts.append("".join(current).strip())
    return [p for p in parts if p]


def _children(media: Media, origin: str) -> list[dict[str, object]]:
    """An album's children in order: images ``<id>_<k>.jpg`` (k counts images), videos ``<id>_v<j>.mp4``."""
    out: list[dict[str, object]] = []
    images = videos = 0
    for position, kind in enumerate(media.layout):
        if kind == "IMAGE":
            url, images = f"{origin}/media/{media.id}_{images}.jpg", images + 1
        else:
            url, videos = f"{origin}/media/{media.id}_v{videos}.mp4", videos + 1
        out.append({"id": f"{media.id}{position}", "media_type": kind, "media_url": url})
    return out


def _media_json(media: Media, fields: Iterable[str], origin: str, album_url: bool = True) -> dict[str, object]:
    """A media node with the fields asked for. ``album_url``: whether an album has a media_url of its own."""
    out: dict[str, object] = {}
    for name in fields:
        if name == "id":
            out["id"] = media.id
        elif name == "caption":
            out["caption"] = media.caption
        elif name == "media_type":
            out["media_type"] = media.kind
        elif name == "media_url":
            if media.kind == "VIDEO":
                # IG User Business Discovery: "The media_url field is omitted for video media that contains
                # copyrighted or licensed audio ... or that has been flagged for a copyright violation" (here: every
                # other video)
                if int(media.id) % 2:
                    out["media_url"] = f"{origin}/media/{media.id}.mp4"
            elif media.kind == "CAROUSEL_ALBUM":
                # IG Hashtag Recent Media and Top Media, returnable fields: "media_url (not returned for Album IG
                # Media)". Elsewhere an album's media_url is its first child's, a video's when that comes first (seen
                # in the field; the IG Media reference does not say), so a client that falls back on it fetches one.
                if album_url:
                    out["media_url"] = _children(media, origin)[0]["media_url"]
            else:
                out["media_url"] = f"{origin}/media/{media.id}.jpg"
        elif (name == "children" or name.startswith("children{")) and media.kind == "CAROUSEL_ALBUM":
            # IG Hashtag Recent Media, returnable fields: "children (only returned for Album IG Media)"
            wanted = {"id", *_split_fields(name[len("children{") : -1])} if name != "children" else {"id"}
            out["children"] = {"data": [{k: v for k, v in c.items() if k in wanted} for c in _children(media, origin)]}
        elif name == "permalink":
            out["permalink"] = f"{origin}/p/{media.id}/"
        elif name == "timestamp":
            out["timestamp"] = media.timestamp.strftime("%Y-%m-%dT%H:%M:%S+0000")
        elif name == "like_count" and not media.owner.hides_likes:
            out["like_count"] = media.like_count
        elif name == "comments_count":
            out["comments_count"] = media.comments_count
    return out


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    for scheme in ("Bearer ", "OAuth "):
        if header.startswith(scheme):
            return header[len(scheme) :].strip()
    return request.query.get("access_token")


@web.middleware
async def _graph(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Graph requests: the token, the counts, the limits and the faults, then the usage headers on the answer."""
    stats, limits = request.app[STATS_KEY], request.app[LIMITS_KEY]
    if request.path.startswith(("/media/", "/sandbox/")):
        return await handler(request)
    token = _token(request)
    if not token or (request.app[TOKENS_KEY] and token not in request.app[TOKENS_KEY]):
        stats["rejected_tokens"] += 1  # a token we cannot name belongs to no app: no usage headers
        return INVALID_TOKEN.response()
    fp, app, wall = token_fingerprint(token), limits.app_of(token), time.time()
    stats["requests"][fp] += 1
    stats["calls"][fp].append(wall)
    stats["graph_requests"] += 1
    if request.path.rstrip("/").endswith("/ig_hashtag_search"):
        stats["hashtag_search_times"].append(wall)
    pause = limits.call(app, fp, time.monotonic())
    response: web.StreamResponse
    try:
        if pause is not None:
            response = limits.throttled(pause, time.monotonic())
        else:
            response = await _with_faults(request, handler, app, fp)
    except GraphFailure as failure:
        response = failure.error.response()
    ig_user = request.query.get("user_id") or request.match_info.get("node") or DEFAULT_IG_USER
    response.headers.update(limits.headers(app, fp, ig_user, time.monotonic()))
    return response


async def _with_faults(request: web.Request, handler: Handler, app: str, fp: str) -> web.StreamResponse:
    faults, stats, limits = request.app[FAULTS_KEY], request.app[STATS_KEY], request.app[LIMITS_KEY]
    stats["served"] += 1  # the count faults are due by: calls a pause turned away do not move it
    n = stats["served"]
    key = request.path + "?" + urlencode(sorted((k, v) for k, v in request.query.items() if k != "access_token"))
    # Throttles are not failures: a client waits on them, spending no retry.
    if faults.due(faults.app_throttle_every, n):
        stats["faults"]["app_throttle"] += 1
        return limits.throttled(limits.pause("app", app, THROTTLES[4], time.monotonic()), time.monotonic())
    if faults.due(faults.throttle_every, n):
        stats["faults"]["throttle"] += 1
        scope, error = throttle_error(faults.throttle_code)
        pause = limits.pause(scope, app if scope == "app" else fp, error, time.monotonic())
        return limits.throttled(pause, time.monotonic())
    fault = _counted(stats, key, None if faults.spared(stats["faulted"], key) else _graph_fault(faults, stats, n))
    if fault == "transient":
        return TRANSIENT.response()
    if fault == "server_error":
        return web.Response(status=faults.error_status, text="Service Unavailable")
    if fault == "reset":
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    if fault == "slow":
        await asyncio.sleep(faults.slow_s)
    response = await handler(request)
    body = response.body if isinstance(response, web.Response) else None
    if fault == "malformed" and isinstance(body, bytes) and body:  # JSON answers' bytes; a streamed payload is left
        response = web.Response(body=body[: len(body) // 2], content_type="application/json")
    return response


def _graph_fault(faults: Faults, stats: dict[str, Any], n: int) -> str | None:
    """The failure the nth Graph request is due, if any (bursts of server errors run on over the next requests)."""
    if stats["burst_left"] > 0 or faults.due(faults.error_every, n):
        stats["burst_left"] = (stats["burst_left"] or faults.error_burst) - 1
        return "server_error"
    for fault, every in (("transient", faults.transient_every), ("reset", faults.reset_every),
                         ("slow", faults.slow_every), ("malformed", faults.malformed_every)):  # fmt: skip
        if faults.due(every, n):
            return fault
    return None


def _limit(value: str | None) -> int:
    try:
        return max(1, min(MAX_LIMIT, int(value or DEFAULT_LIMIT)))
    except ValueError as err:
        raise bad_request("(#100) Param limit must be a number") from err


def _require_user_id(request: web.Request) -> None:
    # IG Hashtag Search and IG Hashtag Recent Media: user_id, "The ID for person querying the data", is required.
    if "user_id" not in request.query:
        raise bad_request("(#100) The parameter user_id is required")


async def hashtag_search(request: web.Request) -> web.Response:
    network = request.app[NETWORK_KEY]
    _require_user_id(request)
    query = request.query.get("q", "").lstrip("#").casefold()
    hashtag_id = network.hashtag_id(query)
    return web.json_response({"data": [{"id": hashtag_id}] if hashtag_id else []})


def _unsupported(node: str) -> GraphFailure:
    message = (f"Unsupported get request. Object with ID '{node}' does not exist, cannot be loaded due to missing "
               "permissions, or does not support this operation.")  # fmt: skip
    return bad_request(message, subcode=33)


async def hashtag_media(request: web.Request) -> web.Response:
    network, faults = request.app[NETWORK_KEY], request.app[FAULTS_KEY]
    node, edge = request.match_info["node"], request.match_info["edge"]
    hashtag = network.hashtag_by_id(node)
    if hashtag is None:
        raise _unsupported(node)
    _require_user_id(request)
    fields = _split_fields(request.query.get("fields", "id"))
    # IG Hashtag Recent Media, Limitations: "You cannot request the username field on returned media objects."
    if OWNER_FIELDS & set(fields):
        raise bad_request("(#100) Tried accessing nonexisting field (username) on hashtag media", kind="OAuthException")
    limit = _limit(request.query.get("limit"))
    items = network.hashtag_media(hashtag, edge)
    result_set = paging.hashtag_result_set(node, edge)
    after, paging_token = request.query.get("after"), request.query.get(paging.PAGING_TOKEN)
    offset = paging.hashtag_offset(after, paging_token, result_set, limit)
    origin = str(request.url.origin())
    chunk = paging.visible_page(items, offset, limit, faults)
    body: dict[str, object] = {"data": [_media_json(m, fields, origin, album_url=False) for m in chunk]}
    page = paging.hashtag_paging(request.url, result_set, offset, limit, len(items), faults)
    if page is not None:
        body["paging"] = page
    return web.json_response(body)


_DISCOVERY_RE = re.compile(r"^business_discovery\.username\(([^)]+)\)\{(.*)\}$")
_MEDIA_EDGE_RE = re.compile(r"^media((?:\.\w+\([^)]*\))*)\{(.*)\}$")


async def node(request: web.Request) -> web.Response:
    network, faults = request.app[NETWORK_KEY], request.app[FAULTS_KEY]
    match = _DISCOVERY_RE.match(request.query.get("fields", ""))
    if not match:
        raise _unsupported(request.match_info["node"])
    account = network.account_by_username.get(match.group(1))
    if account is None:
        # The answer for a username that is no Business or Creator account (code and subcode as seen in the field).
        raise GraphFailure(GraphError(400, 110, "Invalid user id", subcode=2207013))
    origin = str(request.url.origin())
    items = network.account_media(account)
    out: dict[str, object] = {"id": account.id}
    for field in _split_fields(match.group(2)):
        if field in ("username", "id", "followers_count", "media_count"):
            # IG User: media_count is the "Total number of IG Media published on your app user's account": all of
            # them, those the caller may not see too (a client that counts on it to stop is caught).
            values = {"username": account.username, "id": account.id, "followers_count": account.followers_count,
                      "media_count": len(items)}  # fmt: skip
            out[field] = values[field]
            continue
        media_match = _MEDIA_EDGE_RE.match(field)
        if not media_match:
            continue
        modifiers = dict(re.findall(r"\.(\w+)\(([^)]*)\)", media_match.group(1)))
        limit = _limit(modifiers.get("limit"))
        offset = paging.discovery_offset(modifiers.get("after"), modifiers.get("before"), account.id, limit)
        media_fields = _split_fields(media_match.group(2))
        chunk = paging.visible_page(items, offset, limit, faults)
        media: dict[str, object] = {"data": [_media_json(m, media_fields, origin) for m in chunk]}
        page = paging.discovery_paging(account.id, offset, limit, len(items), faults)
        if page is not None:
            media["paging"] = page
        out["media"] = media
    return web.json_response({"business_discovery": out, "id": request.match_info["node"]})


def _image_fault(faults: Faults, stats: dict[str, Any], image_id: str) -> str | None:
    """The failure this image fetch gets, if any, counted."""
    stats["image_requests"] += 1
    n = stats["image_requests"]
    fault = None
    if not faults.spared(stats["faulted"], image_id):
        if faults.due(faults.image_error_every, n):
            fault = "image_error"
        elif faults.due(faults.image_slow_every, n):
            fault = "image_slow"
    return _counted(stats, image_id, fault)


def _counted(stats: dict[str, Any], key: str, fault: str | None) -> str | None:
    """Counts the fault by kind and by request (in a row); an answer without one ends the request's run."""
    if fault is None:
        stats["faulted"].pop(key, None)
    else:
        stats["faulted"][key] += 1
        stats["faults"][fault] += 1
    return fault


async def media_image(request: web.Request) -> web.StreamResponse:
    network = request.app[NETWORK_KEY]
    media = network.media_by_id.get(request.match_info["media_id"])
    child = int(request.match_info.get("child") or 0)
    if media is None or media.kind == "VIDEO" or child >= len(media.image_ids):
        raise web.HTTPNotFound(text="no such image")
    faults, stats = request.app[FAULTS_KEY], request.app[STATS_KEY]
    image_id = media.image_ids[child]
    fault = _image_fault(faults, stats, image_id)
    if fault == "image_error":
        return web.Response(status=503, text="Service Unavailable")
    content_type = "text/html" if media.corruption == "html" else "image/jpeg"
    # Rendered in a thread, not on the event loop: tests run the sandbox in the client's own loop, and a render there
    # (tens of ms each, the first one imports scikit-image's loaders: a second or more on a loaded machine) holds up
    # the client too, whose downloads then time out on answers already sent and fetch them again.
    body = await asyncio.to_thread(media.image_bytes, child)
    if fault == "image_slow":  # headers and half the body, then a stall past the client's timeout
        response = web.StreamResponse(headers={"Content-Type": content_type, "Content-Length": str(len(body))})
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(faults.slow_s)
        await response.write(body[len(body) // 2 :])
        return response
    # By the post id the image becomes, and only when the client is still there to take it: one that gave up during
    # the render (its timeout) got nothing, and fetches it again without having fetched it whole.
    if request.transport is not None and not request.transport.is_closing():
        stats["image_fetches"][image_id] += 1
    return web.Response(body=body, content_type=content_type)


async def media_video(request: web.Request) -> web.Response:
    """A video: some bytes that are no picture (a client that takes a video for an image gets these)."""
    media = request.app[NETWORK_KEY].media_by_id.get(request.match_info["media_id"])
    child = request.match_info.get("child")
    videos = media.layout.count("VIDEO") if media is not None else 0
    if media is None or (child is None and media.kind != "VIDEO") or (child is not None and int(child) >= videos):
        raise web.HTTPNotFound(text="no such video")
    name = media.id if child is None else f"{media.id}_v{child}"
    request.app[STATS_KEY]["video_fetches"][name] += 1
    body = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + np.random.default_rng(media.image_seed).bytes(2048)
    return web.Response(body=body, content_type="video/mp4")


async def stats(request: web.Request) -> web.Response:
    data, limits = request.app[STATS_KEY], request.app[LIMITS_KEY]
    return web.json_response(
        {
            "requests": dict(data["requests"]),
            "rejected_tokens": data["rejected_tokens"],
            "image_fetches": dict(data["image_fetches"]),
            "video_fetches": dict(data["video_fetches"]),
            "calls": {fp: list(times) for fp, times in data["calls"].items()},
            "faults": dict(data["faults"]),
            "graph_requests": data["graph_requests"],
            "hashtag_searches": len(data["hashtag_search_times"]),
            "hashtag_search_times": list(data["hashtag_search_times"]),
            "token_apps": dict(limits.token_apps),
            "pauses": list(limits.pauses),
            "app_pause_violations": dict(limits.app_pause_violations),
            "token_pause_violations": dict(limits.token_pause_violations),
        }
    )


async def accounts(request: web.Request) -> web.Response:
    return web.json_response([a.username for a in request.app[NETWORK_KEY].accounts])


def create_app(
    network: SandboxNetwork,
    tokens: Iterable[str] = (),
    faults: Faults | None = None,
    *,
    apps: Mapping[str, str] | None = None,
) -> web.Application:
    """The sandbox as an aiohttp application. ``tokens``: accepted access tokens (empty: any non-empty token);
    ``apps``: the app each token belongs to (missing: one default app)."""
    app = web.Application(middlewares=[_graph])
    app[NETWORK_KEY] = network
    app[TOKENS_KEY] = frozenset(tokens)
    app[FAULTS_KEY] = faults or Faults()
    app[LIMITS_KEY] = Limits(app[FAULTS_KEY], dict(apps or {}))
    app[STATS_KEY] = {
        "requests": Counter(),
        "rejected_tokens": 0,
        "image_fetches": Counter(),
        "video_fetches": Counter(),
        "calls": defaultdict(list),
        "faults": Counter(),
        "graph_requests": 0,  # every Graph request a known token made
        "served": 0,  # those no pause turned away
        "hashtag_search_times": [],
        "image_requests": 0,
        "faulted": Counter(),  # failures in a row by request, for Faults.max_faults_per_request
        "burst_left": 0,
    }

    async def preload_photos(app: web.Application) -> None:
        # Before the first answer rather than during it: a client fetching the first pictures would otherwise wait
        # (past its timeout, on a loaded machine) for the import of scikit-image's readers.
        await asyncio.to_thread(images.preload, {source for topic in network.topics for source in topic.sources})

    app.on_startup.append(preload_photos)
    app.router.add_get("/sandbox/stats", stats)
    app.router.add_get("/sandbox/accounts", accounts)
    app.router.add_get(r"/media/{media_id:\d+}.jpg", media_image)
    app.router.add_get(r"/media/{media_id:\d+}_{child:\d+}.jpg", media_image)
    app.router.add_get(r"/media/{media_id:\d+}.mp4", media_video)
    app.router.add_get(r"/media/{media_id:\d+}_v{child:\d+}.mp4", media_video)
    for prefix in _VERSION_PREFIXES:
        app.router.add_get(prefix + "/ig_hashtag_search", hashtag_search)
        app.router.add_get(prefix + r"/{node:\d+}/{edge:recent_media|top_media}", hashtag_media)
        app.router.add_get(prefix + r"/{node:\d+}", node)
    return app


def sandbox_server(
    network: SandboxNetwork,
    host: str = "127.0.0.1",
    port: int = 0,
    tokens: Iterable[str] = (),
    faults: Faults | None = None,
    *,
    apps: Mapping[str, str] | None = None,
) -> AppServer:
    """The sandbox as a server to start inside an event loop (``async with sandbox_server(network) as server``)."""
    return AppServer(create_app(network, tokens, faults, apps=apps), host, port)
