"""The query API (aiohttp). The routes are listed once, in ``OPERATIONS``; ``/openapi.json`` is generated from it.

- ``GET  /similar?post_id=&k=``      posts most similar to an indexed post (the post itself first)
- ``POST /similar?k=``               posts most similar to an uploaded image (raw body or multipart field ``image``)
  (both filter with ``hashtag``, ``since``, ``until`` (ISO dates) and ``has_face``)
- ``POST /hashtags?n=``              hashtags suggested for an uploaded image
- ``GET  /users/{user}``             a user's interest profile (by id or username)
- ``GET  /audiences?interest=``      the users most into an interest, ranked (``min_score``, ``min_posts``, ``limit``)
- ``POST /train/hashtags``           refit the hashtag model now (write: API key)
- ``POST /index/snapshot``           snapshot the index now (write: API key)
- ``POST /ingest``                   queue pushed posts (JSON lines) for the scraper (write: API key)
- ``DELETE /posts/{post_id}``        forget a post and take it out of the index (write: API key)
- ``GET  /healthz``                  Redis and index state; 503 when something is down
- ``GET  /metrics``                  Prometheus;  ``GET /openapi.json``: this API's OpenAPI document

Errors are JSON: ``{"error": "...", "reason": "..."}``. Uploads are limited in bytes (413) and pixels (422). Write
endpoints need the ``X-API-Key`` header to equal ``settings.api_key``; without a configured key they are off (403).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import prometheus_client
import redis.asyncio as aioredis
from aiohttp import web
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from deeptarget import constants
from deeptarget.api.models import (
    AudienceBody,
    AudienceMember,
    BadRecordBody,
    DeletedBody,
    HashtagsBody,
    HashtagScore,
    HealthBody,
    IngestBody,
    NeighbourBody,
    SimilarBody,
    TaskAcceptedBody,
)
from deeptarget.api.openapi import API_KEY_HEADER, Operation, Param, openapi_document
from deeptarget.config import Settings
from deeptarget.errors import (
    DeepTargetError,
    ImageRejected,
    IndexMismatchError,
    ModelNotReadyError,
    NotFoundError,
)
from deeptarget.query import Neighbour, PostFilter, QueryService
from deeptarget.schema import Profile
from deeptarget.scraper.push import IngestStream, PushedPost, body_records, parse_posts

LOG = logging.getLogger(__name__)

SERVICE_KEY = web.AppKey("service", QueryService)
SETTINGS_KEY = web.AppKey("settings", Settings)
REDIS_KEY = web.AppKey("redis", aioredis.Redis)
CELERY_KEY = web.AppKey("celery", Celery)

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
    except (RedisError, KombuOperationalError) as err:  # a dependency is down: retry later, not a bug of ours
        LOG.warning("%s %s: Redis unavailable (%s)", request.method, route, type(err).__name__)
        response = _error(503, "a dependency is unavailable (Redis); try again shortly")
    REQUESTS.labels(route, str(response.status)).observe(loop.time() - started)
    return response


def _int_param(request: web.Request, name: str, default: int, low: int = 1, high: int = MAX_K) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be between {low} and {high}")
    return value


def _float_param(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    try:
        return default if raw is None else float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number") from None


def _post_filter(request: web.Request) -> PostFilter:
    has_face = request.query.get("has_face")
    if has_face not in (None, "true", "false"):
        raise web.HTTPBadRequest(text="has_face must be true or false")
    query = request.query
    try:
        face = None if has_face is None else has_face == "true"
        return PostFilter.parse(query.get("hashtag"), query.get("since"), query.get("until"), face)
    except ValueError as err:
        raise web.HTTPBadRequest(text=str(err)) from None


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


def _neighbours(results: list[Neighbour]) -> list[NeighbourBody]:
    return [NeighbourBody(**r.to_json()) for r in results]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body.model_dump(mode="json"), status=status)


async def similar_by_post(request: web.Request) -> web.Response:
    post_id = request.query.get("post_id")
    if not post_id:
        raise web.HTTPBadRequest(text="post_id is required (or POST an image)")
    k = _int_param(request, "k", 10)
    results = await _run(request.app[SERVICE_KEY].similar_to_post, post_id, k, _post_filter(request))
    return _json(SimilarBody(post_id=post_id, results=_neighbours(results)))


async def similar_by_image(request: web.Request) -> web.Response:
    k = _int_param(request, "k", 10)
    where = _post_filter(request)
    data = await _upload(request)
    results = await _run(request.app[SERVICE_KEY].similar_to_image, data, k, where)
    return _json(SimilarBody(results=_neighbours(results)))


async def hashtags(request: web.Request) -> web.Response:
    n = _int_param(request, "n", 10)
    data = await _upload(request)
    tags, neighbours = await _run(request.app[SERVICE_KEY].suggest_hashtags, data, n)
    scored = [HashtagScore(hashtag=t, score=round(s, 6)) for t, s in tags]
    return _json(HashtagsBody(hashtags=scored, neighbours=[nb.post_id for nb in neighbours]))


async def user_profile(request: web.Request) -> web.Response:
    profile = await _run(request.app[SERVICE_KEY].profile, request.match_info["user"])
    return _json(profile)


async def audiences(request: web.Request) -> web.Response:
    interest = request.query.get("interest", "").strip()
    if not interest:
        raise web.HTTPBadRequest(text="interest is required: a class (sushi, food:sushi) or a hashtag (#sushi)")
    key, members = await _run(
        request.app[SERVICE_KEY].audience,
        interest,
        _float_param(request, "min_score", 0.0),
        _int_param(request, "min_posts", 1, 1, 1_000_000),
        _int_param(request, "limit", 100),
        request.query.get("exclude_outliers", "false") == "true",
    )
    users = [
        AudienceMember(
            user_id=m.user_id,
            username=m.profile.username,
            score=round(m.score, 6),
            post_count=m.profile.post_count,
            followers_count=m.profile.followers_count,
            median_engagement=m.profile.median_engagement,
            follower_outlier=m.profile.follower_outlier,
        )
        for m in members
    ]
    return _json(AudienceBody(interest=key, users=users))


async def ingest(request: web.Request) -> web.Response:
    """Posts (each a ``PushedPost``) as JSON lines, one JSON object or a JSON array; each validated alone, the good
    ones queued for the scraper. 202 when any was queued, else 400; both answer each rejected record's reason."""
    body = await request.read()
    if not body.strip():
        raise web.HTTPBadRequest(text="empty body: send posts as JSON lines with at least id and media_url")
    try:
        records = await _run(body_records, body)
    except ValueError as err:
        raise web.HTTPBadRequest(text=str(err)) from None
    posts, bad = await _run(parse_posts, records)
    if posts:
        await IngestStream(request.app[REDIS_KEY]).push(posts)
    rejected = [BadRecordBody(line=b.line, reason=b.reason) for b in bad]
    return _json(IngestBody(accepted=len(posts), rejected=rejected), status=202 if posts else 400)


async def delete_post(request: web.Request) -> web.Response:
    from deeptarget.deletion import delete_posts

    post_id = request.match_info["post_id"]
    store = request.app[SERVICE_KEY].store
    deleted = await _run(delete_posts, store, request.app[CELERY_KEY], [post_id])
    if not deleted:
        raise NotFoundError(f"post {post_id} is not known")
    return _json(DeletedBody(deleted=deleted))


def _send(task: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def send(request: web.Request) -> web.Response:
        queue = constants.task_queues[task]
        await _run(lambda: request.app[CELERY_KEY].send_task(task, queue=queue))
        return _json(TaskAcceptedBody(task=task, queue=queue), status=202)

    return send


async def healthz(request: web.Request) -> web.Response:
    healthy = True
    redis_state: bool | str
    try:
        redis_state = bool(await asyncio.wait_for(request.app[REDIS_KEY].ping(), timeout=2))
    except Exception as err:  # any failure to ping is "down"; its text would name internal hosts and ports
        redis_state = f"down: {type(err).__name__}"
        healthy = False
    index = request.app[SERVICE_KEY].snapshots.get()
    index_state: dict[str, object] | str = "no snapshot yet"
    if index is not None:
        index_state = {"vectors": index.ntotal, "model_id": index.model_id, "kind": index.kind, "nprobe": index.nprobe}
    body = HealthBody(status="ok" if healthy else "degraded", redis=redis_state, index=index_state)
    return _json(body, status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=prometheus_client.generate_latest(), content_type="text/plain")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(OPERATIONS))


_K = Param("k", "integer", f"how many results (1..{MAX_K}, default 10)")
_FILTERS = (
    Param("hashtag", "string", "only posts with this hashtag"),
    Param("since", "string", "only posts from this ISO date/time on", format="date-time"),
    Param("until", "string", "only posts before this ISO date/time", format="date-time"),
    Param("has_face", "boolean", "only posts with (true) or without (false) a face"),
)
OPERATIONS: list[Operation] = [
    Operation("get", "/similar", "Posts most similar to an indexed post", SimilarBody,
              (Param("post_id", "string", "the query post", required=True), _K, *_FILTERS), errors=(400, 404, 503)),
    Operation("post", "/similar", "Posts most similar to an uploaded image", SimilarBody, (_K, *_FILTERS),
              upload=True, errors=(400, 413, 422, 503)),
    Operation("post", "/hashtags", "Hashtags suggested for an uploaded image", HashtagsBody,
              (Param("n", "integer", "how many hashtags (default 10)"),), upload=True, errors=(400, 413, 422, 503)),
    Operation("get", "/users/{user}", "A user's interest profile", Profile,
              (Param("user", "string", "user id or username", where="path"),), errors=(404,)),
    Operation("get", "/audiences", "The users most into an interest, ranked by their share of it", AudienceBody, (
        Param("interest", "string", "a class (sushi, or head:class) or a hashtag (#sushi)", required=True),
        Param("min_score", "number", "the least share of the interest (0..1)"),
        Param("min_posts", "integer", "the least number of posts a user must have"),
        Param("limit", "integer", f"how many users (1..{MAX_K}, default 100)"),
        Param("exclude_outliers", "boolean", "leave out accounts whose follower count is an outlier"),
    ), errors=(400, 404)),
    Operation("post", "/train/hashtags", "Refit the hashtag model now (a task on the train queue)", TaskAcceptedBody,
              write=True, errors=()),
    Operation("post", "/index/snapshot", "Snapshot the index now (a task on the index queue)", TaskAcceptedBody,
              write=True, errors=()),
    Operation("post", "/ingest", "Queue posts (JSON lines, a JSON object or an array, each with id and media_url) "
              "for the scraper; bad records are reported by line", IngestBody, write=True, errors=(400, 413),
              request=PushedPost, request_lines=True, status=202, request_description=(
                  "Posts for the scraper to fetch, each validated alone: a bad one is rejected with its line (or "
                  "array position) and reason, the others are queued. Unknown fields are rejected; without "
                  "hashtags, the caption's #tags are used. Each line (or element) is at most 64 KiB."),
              error_models=((400, IngestBody, "Nothing queued: every record was rejected (IngestBody, with each "
                             "one's reason), or the body is empty or not a JSON array (ErrorBody)"),)),
    Operation("delete", "/posts/{post_id}", "Delete a post: forgotten by the store, removed from the index",
              DeletedBody, (Param("post_id", "string", "the post", where="path"),), write=True, errors=(404,)),
    Operation("get", "/healthz", "Redis and index state", HealthBody, errors=(503,)),
    Operation("get", "/metrics", "Prometheus metrics (text format)", None, errors=()),
    Operation("get", "/openapi.json", "This document", None, errors=()),
]  # fmt: skip
HANDLERS: dict[tuple[str, str], Callable[[web.Request], Awaitable[web.Response]]] = {
    ("get", "/similar"): similar_by_post,
    ("post", "/similar"): similar_by_image,
    ("post", "/hashtags"): hashtags,
    ("get", "/users/{user}"): user_profile,
    ("get", "/audiences"): audiences,
    ("post", "/train/hashtags"): _send(constants.train_task),
    ("post", "/index/snapshot"): _send(constants.snapshot_task),
    ("post", "/ingest"): ingest,
    ("delete", "/posts/{post_id}"): delete_post,
    ("get", "/healthz"): healthz,
    ("get", "/metrics"): metrics,
    ("get", "/openapi.json"): openapi,
}


def _requires_key(settings: Settings, handler: Callable[[web.Request], Awaitable[web.Response]]):
    async def checked(request: web.Request) -> web.Response:
        if settings.api_key is None or not settings.api_key.get_secret_value().strip():
            raise web.HTTPForbidden(text="write endpoints are disabled: set DEEPTARGET_API_KEY on the API")
        given = request.headers.get(API_KEY_HEADER, "")
        if not hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
            raise web.HTTPUnauthorized(text=f"this endpoint needs the {API_KEY_HEADER} header with the API key")
        return await handler(request)

    return checked


def create_app(settings: Settings, service: QueryService | None = None) -> web.Application:
    app = web.Application(client_max_size=settings.max_upload_bytes, middlewares=[errors_as_json])
    app[SETTINGS_KEY] = settings

    async def resources(app: web.Application) -> AsyncIterator[None]:
        import faiss

        from deeptarget.workers.app import create_celery

        # Requests run concurrently on the executor's threads; an OpenMP team per single-query search would only
        # oversubscribe the cores (measured at 1M: p50 18 ms at 1 client, 190 ms at 4, against 1.3 ms for the index).
        # The OpenMP thread count is per thread, so each executor thread sets its own.
        executor = ThreadPoolExecutor(
            max_workers=2 * (os.cpu_count() or 1), thread_name_prefix="query", initializer=faiss.omp_set_num_threads,
            initargs=(1,),
        )  # fmt: skip
        asyncio.get_running_loop().set_default_executor(executor)

        app[SERVICE_KEY] = service or QueryService(settings)
        app[SERVICE_KEY].snapshots.get()  # load the index before the first request
        assert settings.redis_url, "the API needs settings.redis_url"
        app[REDIS_KEY] = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2)
        app[CELERY_KEY] = create_celery(settings)
        yield
        await app[REDIS_KEY].aclose()
        executor.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(resources)
    for op in OPERATIONS:
        handler = HANDLERS[(op.method, op.path)]
        app.router.add_route(op.method.upper(), op.path, _requires_key(settings, handler) if op.write else handler)
    return app
