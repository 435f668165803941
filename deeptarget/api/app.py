"""The query API (aiohttp).

- ``GET  /similar?post_id=&k=``   posts most similar to an indexed post (the post itself first)
- ``POST /similar?k=``            posts most similar to an uploaded image (raw body or multipart field ``image``)
- ``POST /hashtags?n=``           hashtags suggested for an uploaded image
- ``GET  /users/{user}``          a user's interest profile (by id or username)
- ``GET  /healthz``               Redis and index state; 503 when something is down
- ``GET  /metrics``               Prometheus

Errors are JSON: ``{"error": "...", "reason": "..."}``. Uploads are limited in bytes (413) and pixels (422).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import prometheus_client
import redis.asyncio as aioredis
from aiohttp import web

from deeptarget.config import Settings
from deeptarget.errors import (
    DeepTargetError,
    ImageRejected,
    IndexMismatchError,
    ModelNotReadyError,
    NotFoundError,
)
from deeptarget.query import QueryService

LOG = logging.getLogger(__name__)

SERVICE_KEY = web.AppKey("service", QueryService)
SETTINGS_KEY = web.AppKey("settings", Settings)
REDIS_KEY = web.AppKey("redis", aioredis.Redis)

REQUESTS = prometheus_client.Histogram(
    "deeptarget_api_request_seconds", "API latency by route and status", ["route", "status"]
)
MAX_K = 1000


def _error(status: int, message: str, reason: str | None = None) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        response = await handler(request)
    except web.HTTPException as err:
        # aiohttp's default text is "<status>: <reason>"; a text given by a handler is the better message.
        explicit = err.text and not err.text.startswith(f"{err.status}:")
        response = _error(err.status, err.text if explicit else err.reason)
    except ImageRejected as err:
        response = _error(413 if err.reason == "too_large" else 422, str(err), err.reason)
    except NotFoundError as err:
        response = _error(404, str(err))
    except (ModelNotReadyError, IndexMismatchError) as err:
        response = _error(503, str(err))
    except DeepTargetError as err:
        response = _error(400, str(err))
    REQUESTS.labels(route, str(response.status)).observe(loop.time() - started)
    return response


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None
    if not 1 <= value <= MAX_K:
        raise web.HTTPBadRequest(text=f"{name} must be between 1 and {MAX_K}")
    return value


async def _upload(request: web.Request) -> bytes:
    """The uploaded image: multipart field ``image`` (or the first file), or the raw body."""
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if getattr(part, "filename", None) or getattr(part, "name", None) == "image":
                return await part.read(decode=False)  # type: ignore[union-attr]
        raise web.HTTPBadRequest(text="multipart upload without an 'image' part")
    data = await request.read()
    if not data:
        raise web.HTTPBadRequest(text="empty upload: send the image as the body or as multipart field 'image'")
    return data


async def _run(func: Callable[..., Any], *args: Any) -> Any:
    """Model and index work runs off the event loop (torch and FAISS release the GIL)."""
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)


async def similar_by_post(request: web.Request) -> web.Response:
    post_id = request.query.get("post_id")
    if not post_id:
        raise web.HTTPBadRequest(text="post_id is required (or POST an image)")
    k = _int_param(request, "k", 10)
    results = await _run(request.app[SERVICE_KEY].similar_to_post, post_id, k)
    return web.json_response({"post_id": post_id, "results": [r.to_json() for r in results]})


async def similar_by_image(request: web.Request) -> web.Response:
    k = _int_param(request, "k", 10)
    data = await _upload(request)
    results = await _run(request.app[SERVICE_KEY].similar_to_image, data, k)
    return web.json_response({"results": [r.to_json() for r in results]})


async def hashtags(request: web.Request) -> web.Response:
    n = _int_param(request, "n", 10)
    data = await _upload(request)
    tags, neighbours = await _run(request.app[SERVICE_KEY].suggest_hashtags, data, n)
    return web.json_response(
        {
            "hashtags": [{"hashtag": t, "score": round(s, 6)} for t, s in tags],
            "neighbours": [nb.post_id for nb in neighbours],
        }
    )


async def user_profile(request: web.Request) -> web.Response:
    profile = await _run(request.app[SERVICE_KEY].profile, request.match_info["user"])
    return web.json_response(profile.model_dump(mode="json"))


async def healthz(request: web.Request) -> web.Response:
    checks: dict[str, Any] = {}
    healthy = True
    try:
        checks["redis"] = bool(await asyncio.wait_for(request.app[REDIS_KEY].ping(), timeout=2))
    except Exception as err:  # any failure to ping is "down", reported with its reason
        checks["redis"] = f"down: {type(err).__name__}: {err}"
        healthy = False
    index = request.app[SERVICE_KEY].snapshots.get()
    checks["index"] = {"vectors": index.ntotal, "model_id": index.model_id} if index is not None else "no snapshot yet"
    return web.json_response({"status": "ok" if healthy else "degraded", **checks}, status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=prometheus_client.generate_latest(), content_type="text/plain")


def create_app(settings: Settings, service: QueryService | None = None) -> web.Application:
    app = web.Application(client_max_size=settings.max_upload_bytes, middlewares=[errors_as_json])
    app[SETTINGS_KEY] = settings

    async def resources(app: web.Application) -> AsyncIterator[None]:
        app[SERVICE_KEY] = service or QueryService(settings)
        app[SERVICE_KEY].snapshots.get()  # load the index before the first request
        assert settings.redis_url, "the API needs settings.redis_url"
        app[REDIS_KEY] = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2)
        yield
        await app[REDIS_KEY].aclose()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/similar", similar_by_post)
    app.router.add_post("/similar", similar_by_image)
    app.router.add_post("/hashtags", hashtags)
    app.router.add_get("/users/{user}", user_profile)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
