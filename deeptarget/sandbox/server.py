"""The sandbox source: an aiohttp server that speaks the Instagram Graph API's shape on loopback.

Endpoints (an optional ``/v21.0``-style version prefix is accepted):
- ``GET /ig_hashtag_search?user_id=&q=`` -> ``{"data": [{"id": ...}]}``
- ``GET /{hashtag-id}/recent_media`` and ``/top_media`` with ``user_id``, ``fields``, ``limit`` (<= 50), ``after``:
  media of the last 24 hours, cursor-paged; like_count is omitted when the owner hides likes; owner fields cannot be
  requested on hashtag media (error 100), as on the real API.
- ``GET /{ig-user-id}?fields=business_discovery.username(NAME){followers_count,media_count,media{...}}``
  (``media.after(C).limit(N){...}`` pages) -> the account, its follower count and a page of its media.
- ``GET /media/{id}.jpg``: the picture (some are broken on purpose: truncated, garbage, an HTML page).
- ``GET /sandbox/stats``: what the server saw (requests and call times per token fingerprint, image fetches per
  media id), for tests and the demo; ``GET /sandbox/accounts``: the usernames.

Access tokens come as ``access_token`` or ``Authorization: Bearer``; an unknown one gets OAuth error 190.
``Faults`` (sandbox/faults.py) switch on the failures real APIs have: throttling, 5xx bursts, resets, slow and
truncated answers, duplicated posts, looping cursors, failing image fetches.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import timedelta
from urllib.parse import urlencode

from aiohttp import web

from deeptarget.http_server import AppServer
from deeptarget.sandbox.faults import Faults
from deeptarget.sandbox.network import Media, SandboxNetwork

NETWORK_KEY = web.AppKey("network", SandboxNetwork)
TOKENS_KEY = web.AppKey("tokens", frozenset)
STATS_KEY = web.AppKey("stats", dict)
FAULTS_KEY = web.AppKey("faults", Faults)

OWNER_FIELDS = {"owner", "username"}
MAX_LIMIT = 50
_VERSION_PREFIXES = ("", r"/{version:v\d+\.\d+}")


def token_fingerprint(token: str) -> str:
    """How tokens are named in logs and stats: never by value."""
    return hashlib.sha256(token.encode()).hexdigest()[:10]


def graph_error(status: int, code: int, message: str, kind: str = "OAuthException") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": code}}, status=status)


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        kind, value = base64.urlsafe_b64decode(cursor.encode()).decode().split(":")
        if kind != "o":
            raise ValueError(kind)
        return max(0, int(value))
    except (ValueError, UnicodeDecodeError) as err:
        raise web.HTTPBadRequest(text=f"bad cursor: {err}") from err


def _split_fields(spec: str) -> list[str]:
    """Top-level comma split that respects {...} and (...) nesting."""
    parts, depth, current = [], 0, []
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


def _media_json(media: Media, fields: Iterable[str], origin: str) -> dict[str, object]:
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
                if int(media.id) % 2:  # the real API leaves media_url out for some videos
                    out["media_url"] = f"{origin}/media/{media.id}.mp4"
            elif media.kind == "CAROUSEL_ALBUM":
                out["media_url"] = f"{origin}/media/{media.id}_0.jpg"
            else:
                out["media_url"] = f"{origin}/media/{media.id}.jpg"
        elif name.startswith("children") and media.kind == "CAROUSEL_ALBUM":
            children: list[dict[str, object]] = [
                {"id": f"{media.id}{k}", "media_type": "IMAGE", "media_url": f"{origin}/media/{media.id}_{k}.jpg"}
                for k in range(media.children)
            ]
            children.append({"id": f"{media.id}9", "media_type": "VIDEO"})
            out["children"] = {"data": children}
        elif name == "permalink":
            out["permalink"] = f"{origin}/p/{media.id}/"
        elif name == "timestamp":
            out["timestamp"] = media.timestamp.strftime("%Y-%m-%dT%H:%M:%S+0000")
        elif name == "like_count" and not media.owner.hides_likes:
            out["like_count"] = media.like_count
        elif name == "comments_count":
            out["comments_count"] = media.comments_count
    return out


def _page(
    items: list[Media], offset: int, limit: int, fields: list[str], origin: str, next_url: str, faults: Faults
) -> dict:
    chunk = items[offset : offset + limit]
    if faults.duplicate_across_pages and offset > 0:
        chunk = [items[offset - 1], *chunk]
    body: dict[str, object] = {"data": [_media_json(m, fields, origin) for m in chunk]}
    if offset + limit < len(items):
        after = _cursor(0 if faults.cursor_loop_after == offset else offset + limit)
        body["paging"] = {"cursors": {"after": after}, "next": f"{next_url}&after={after}"}
    elif chunk:
        body["paging"] = {"cursors": {"after": _cursor(offset + len(chunk))}}
    return body


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    for scheme in ("Bearer ", "OAuth "):
        if header.startswith(scheme):
            return header[len(scheme) :].strip()
    return request.query.get("access_token")


@web.middleware
async def _auth_and_stats(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    stats = request.app[STATS_KEY]
    if request.path.startswith(("/media/", "/sandbox/")):
        return await handler(request)
    token = _token(request)
    if not token or (request.app[TOKENS_KEY] and token not in request.app[TOKENS_KEY]):
        stats["rejected_tokens"] += 1
        return graph_error(400, 190, "Invalid OAuth access token - Cannot parse access token")
    fp = token_fingerprint(token)
    stats["requests"][fp] += 1
    stats["calls"][fp].append(time.time())
    return await _with_faults(request, handler)


async def _with_faults(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    faults, stats = request.app[FAULTS_KEY], request.app[STATS_KEY]
    stats["graph_requests"] += 1
    n = stats["graph_requests"]
    key = request.path + "?" + urlencode(sorted((k, v) for k, v in request.query.items() if k != "access_token"))
    if faults.due(faults.throttle_every, n):  # throttles are not failures: a client waits on them, spending no retry
        stats["faults"]["throttle"] += 1
        headers = faults.throttle_headers()
        if faults.throttle_code is None:
            return web.json_response({"error": {"message": "rate limited", "code": 4}}, status=429, headers=headers)
        message = f"({faults.throttle_code}) Application request limit reached"
        return web.json_response({"error": {"message": message, "code": faults.throttle_code}}, status=400,
                                 headers=headers)  # fmt: skip
    fault = _counted(stats, key, None if faults.spared(stats["faulted"], key) else _graph_fault(faults, stats, n))
    if fault == "server_error":
        return web.Response(status=faults.error_status, text="Service Unavailable")
    if fault == "reset":
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    if fault == "slow":
        await asyncio.sleep(faults.slow_s)
    response = await handler(request)
    if fault == "malformed" and isinstance(response, web.Response) and response.body:
        body = bytes(response.body)  # type: ignore[arg-type]
        response = web.Response(body=body[: len(body) // 2], content_type="application/json")
    response.headers.update(faults.usage_headers())
    return response


def _graph_fault(faults: Faults, stats: dict, n: int) -> str | None:
    """The failure the nth Graph request is due, if any (bursts of server errors run on over the next requests)."""
    if stats["burst_left"] > 0 or faults.due(faults.error_every, n):
        stats["burst_left"] = (stats["burst_left"] or faults.error_burst) - 1
        return "server_error"
    for fault, every in (("reset", faults.reset_every), ("slow", faults.slow_every),
                         ("malformed", faults.malformed_every)):  # fmt: skip
        if faults.due(every, n):
            return fault
    return None


def _limit(request: web.Request) -> int:
    try:
        return max(1, min(MAX_LIMIT, int(request.query.get("limit", "25"))))
    except ValueError as err:
        raise web.HTTPBadRequest(text="limit must be an integer") from err


async def hashtag_search(request: web.Request) -> web.Response:
    network = request.app[NETWORK_KEY]
    if "user_id" not in request.query:
        return graph_error(400, 100, "(#100) The parameter user_id is required", "GraphMethodException")
    query = request.query.get("q", "").lstrip("#").casefold()
    hashtag_id = network.hashtag_id(query)
    return web.json_response({"data": [{"id": hashtag_id}] if hashtag_id else []})


async def hashtag_media(request: web.Request) -> web.Response:
    network = request.app[NETWORK_KEY]
    edge = request.match_info["edge"]
    hashtag = network.hashtag_by_id(request.match_info["node"])
    if hashtag is None:
        return graph_error(400, 100, "(#100) Unsupported get request", "GraphMethodException")
    if "user_id" not in request.query:
        return graph_error(400, 100, "(#100) The parameter user_id is required", "GraphMethodException")
    fields = _split_fields(request.query.get("fields", "id"))
    if OWNER_FIELDS & set(fields):
        return graph_error(
            400, 100, "(#100) Tried accessing nonexisting field (owner) on hashtag media", "OAuthException"
        )
    items = [m for m in network.media if hashtag in m.hashtags]
    if edge == "recent_media":  # the real API only returns media of the last 24 hours
        cutoff = network.now - timedelta(hours=24)
        items = sorted((m for m in items if m.timestamp >= cutoff), key=lambda m: m.timestamp, reverse=True)
    else:
        items = sorted(items, key=lambda m: (-m.like_count, m.id))
    origin = str(request.url.origin())
    base = (
        f"{origin}{request.path}?user_id={request.query['user_id']}&fields={','.join(fields)}&limit={_limit(request)}"
    )
    offset, faults = _offset(request.query.get("after")), request.app[FAULTS_KEY]
    return web.json_response(_page(items, offset, _limit(request), fields, origin, base, faults))


_DISCOVERY_RE = re.compile(r"^business_discovery\.username\(([^)]+)\)\{(.*)\}$")
_MEDIA_EDGE_RE = re.compile(r"^media((?:\.\w+\([^)]*\))*)\{(.*)\}$")


async def node(request: web.Request) -> web.Response:
    network = request.app[NETWORK_KEY]
    fields = request.query.get("fields", "")
    match = _DISCOVERY_RE.match(fields)
    if not match:
        return graph_error(400, 100, "(#100) Unsupported get request", "GraphMethodException")
    account = network.account_by_username.get(match.group(1))
    if account is None:
        return graph_error(400, 110, f"Invalid user id: no business account {match.group(1)!r}", "OAuthException")
    origin = str(request.url.origin())
    out: dict[str, object] = {"id": account.id}
    for field in _split_fields(match.group(2)):
        if field in ("username", "id", "followers_count", "media_count"):
            out[field] = {
                "username": account.username,
                "id": account.id,
                "followers_count": account.followers_count,
                "media_count": sum(1 for m in network.media if m.owner is account),
            }[field]
            continue
        media_match = _MEDIA_EDGE_RE.match(field)
        if not media_match:
            continue
        modifiers = dict(re.findall(r"\.(\w+)\(([^)]*)\)", media_match.group(1)))
        limit = max(1, min(MAX_LIMIT, int(modifiers.get("limit", "25"))))
        items = sorted((m for m in network.media if m.owner is account), key=lambda m: m.timestamp, reverse=True)
        media_fields = _split_fields(media_match.group(2))
        out["media"] = _page(
            items,
            _offset(modifiers.get("after")),
            limit,
            media_fields,
            origin,
            f"{origin}{request.path}?",
            request.app[FAULTS_KEY],
        )
    return web.json_response({"business_discovery": out, "id": request.match_info["node"]})


def _image_fault(faults: Faults, stats: dict, image_id: str) -> str | None:
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


def _counted(stats: dict, key: str, fault: str | None) -> str | None:
    """Counts the fault by kind and by request (in a row); an answer without one ends the request's run."""
    if fault is None:
        stats["faulted"].pop(key, None)
    else:
        stats["faulted"][key] += 1
        stats["faults"][fault] += 1
    return fault


async def media_image(request: web.Request) -> web.Response:
    network = request.app[NETWORK_KEY]
    media = network.media_by_id.get(request.match_info["media_id"])
    child = int(request.match_info.get("child") or 0)
    if media is None or media.kind == "VIDEO" or (media.kind == "CAROUSEL_ALBUM" and child >= media.children):
        raise web.HTTPNotFound(text="no such image")
    faults, stats = request.app[FAULTS_KEY], request.app[STATS_KEY]
    image_id = media.image_ids[child]
    fault = _image_fault(faults, stats, image_id)
    if fault == "image_error":
        return web.Response(status=503, text="Service Unavailable")
    content_type = "text/html" if media.corruption == "html" else "image/jpeg"
    body = media.image_bytes(child)
    if fault == "image_slow":  # headers and half the body, then a stall past the client's timeout
        response = web.StreamResponse(headers={"Content-Type": content_type, "Content-Length": str(len(body))})
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(faults.slow_s)
        await response.write(body[len(body) // 2 :])
        return response
    stats["image_fetches"][image_id] += 1  # by the post id the image becomes
    return web.Response(body=body, content_type=content_type)


async def stats(request: web.Request) -> web.Response:
    data = request.app[STATS_KEY]
    return web.json_response(
        {
            "requests": dict(data["requests"]),
            "rejected_tokens": data["rejected_tokens"],
            "image_fetches": dict(data["image_fetches"]),
            "calls": {fp: list(times) for fp, times in data["calls"].items()},
            "faults": dict(data["faults"]),
        }
    )


async def accounts(request: web.Request) -> web.Response:
    return web.json_response([a.username for a in request.app[NETWORK_KEY].accounts])


def create_app(network: SandboxNetwork, tokens: Iterable[str] = (), faults: Faults | None = None) -> web.Application:
    """The sandbox as an aiohttp application. ``tokens``: accepted access tokens (empty: any non-empty token)."""
    app = web.Application(middlewares=[_auth_and_stats])
    app[NETWORK_KEY] = network
    app[TOKENS_KEY] = frozenset(tokens)
    app[FAULTS_KEY] = faults or Faults()
    app[STATS_KEY] = {
        "requests": Counter(),
        "rejected_tokens": 0,
        "image_fetches": Counter(),
        "calls": defaultdict(list),
        "faults": Counter(),
        "graph_requests": 0,
        "image_requests": 0,
        "faulted": Counter(),  # failures in a row by request, for Faults.max_faults_per_request
        "burst_left": 0,
    }
    app.router.add_get("/sandbox/stats", stats)
    app.router.add_get("/sandbox/accounts", accounts)
    app.router.add_get(r"/media/{media_id:\d+}.jpg", media_image)
    app.router.add_get(r"/media/{media_id:\d+}_{child:\d+}.jpg", media_image)
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
) -> AppServer:
    """The sandbox as a server to start inside an event loop (``async with sandbox_server(network) as server``)."""
    return AppServer(create_app(network, tokens, faults), host, port)
