"""The query API (aiohttp). The routes are listed once, in ``OPERATIONS``; ``/openapi.json`` is generated from it.

- ``GET  /similar?post_id=&k=``      posts most similar to an indexed post (the post itself first)
- ``POST /similar?k=``               posts most similar to an uploaded image (raw body or multipart field ``image``)
  (both filter with ``hashtag``, ``since``, ``until`` (ISO dates) and ``has_face``)
- ``POST /hashtags?n=``              hashtags suggested for an uploaded image
- ``POST /explain?head=&class=``     the uploaded image with a heat map of what drove a head's class (``similar=POST``:
  what makes it similar to an indexed post); ``format=png`` (default) or ``json`` (base64 PNG and the top classes)
- ``GET  /users/{user}``             a user's interest profile (by id or username)
- ``GET  /audiences?interest=``      the users most into an interest, ranked (``min_score``, ``min_posts``, ``limit``)
- ``POST /train/hashtags``           refit the hashtag model now (write: API key)
- ``POST /index/snapshot``           snapshot the index now (write: API key)
- ``POST /ingest``                   queue pushed posts (JSON lines) for the scraper (write: API key)
- ``DELETE /posts/{post_id}``        forget a post and take it out of the index (write: API key)
- ``GET  /healthz``                  every dependency and stage by name; 503 when one is down or behind
- ``GET  /readyz``                   reads can be served (database, index loaded); Redis not needed; else 503
- ``GET  /livez``                    the process answers (always 200); see ``api/health.py``
- ``GET  /metrics``                  Prometheus;  ``GET /openapi.json``: this API's OpenAPI document

Errors are JSON: ``{"error": "...", "reason": "..."}``, any malformed body included (400). Uploads are limited in
bytes (413) and pixels (422), and decoded a few at a time (503 with Retry-After when all slots stay busy); a body
must arrive within ``api_body_timeout_s`` (408). Write endpoints need the ``X-API-Key`` header to equal
``settings.api_key``; without a configured key they are off (403). ``server_limits`` gives ``deeptarget serve`` its
connection guards (header timeout, connections per client).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import prometheus_client
import redis.asyncio as aioredis
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import SecretStr
from redis.exceptions import RedisError

from deeptarget import jobs
from deeptarget.api import health
from deeptarget.api.models import (
    MAX_REJECTED_SHOWN,
    AudienceBody,
    AudienceMember,
    BadRecordBody,
    ClassProbability,
    DeletedBody,
    ExplainBody,
    HashtagsBody,
    HashtagScore,
    HealthBody,
    IngestBody,
    LiveBody,
    NeighbourBody,
    ReadyBody,
    SimilarBody,
    TaskAcceptedBody,
)
from deeptarget.api.openapi import API_KEY_HEADER, Operation, Param, openapi_document
from deeptarget.core.errors import (
    DeepTargetError,
    ImageRejected,
    IndexMismatchError,
    ModelNotReadyError,
    NotFoundError,
)
from deeptarget.core.records import Profile
from deeptarget.core.settings import Settings
from deeptarget.jobs import Jobs
from deeptarget.models.explain import DEFAULT_METHOD
from deeptarget.models.explain import METHODS as EXPLAIN_METHODS
from deeptarget.models.heads import HEAD_NAME_PATTERN, check_head_name
from deeptarget.query.explain import ExplainService
from deeptarget.query.service import Neighbour, PostFilter, QueryService
from deeptarget.runtime.app_server import ServerLimits
from deeptarget.scraper.push import IngestStream, PushedPost, body_records, parse_posts

LOG = logging.getLogger(__name__)

SERVICE_KEY = web.AppKey("service", QueryService)
SETTINGS_KEY = web.AppKey("settings", Settings)
REDIS_KEY = web.AppKey("redis", aioredis.Redis)
JOBS_KEY = web.AppKey("jobs", Jobs)
DECODES_KEY = web.AppKey("decodes", asyncio.Semaphore)
EXPLAIN_KEY = web.AppKey("explain", ExplainService)

REQUESTS = prometheus_client.Histogram(
    "deeptarget_api_request_seconds", "API latency by route and status", ["route", "status"]
)
INDEX_VECTORS = prometheus_client.Gauge("deeptarget_index_vectors", "Vectors in the index snapshot this API serves")
INDEX_VERSION = prometheus_client.Gauge("deeptarget_index_version", "Version of the index snapshot this API serves")
INDEX_AGE = prometheus_client.Gauge(
    "deeptarget_index_age_seconds",
    "How stale the index this API serves may be: since it last heard from the writer's change stream (without one: "
    "since the snapshot was published)",
)
MAX_K = 1000
MAX_MIN_POSTS = 1_000_000
BUSY_RETRY_AFTER_S = 1
UPLOAD_CHUNK = 256 * 1024
# What aiohttp's multipart reader raises on a body that does not match its Content-Type (a bad or missing
# boundary, a truncated part, garbage): the client's mistake, a 400.
_MALFORMED_MULTIPART = (ValueError, LookupError, AssertionError, HttpProcessingError, web.RequestPayloadError)


class ApiError(Exception):
    """An answer with a status, a message and a short stable reason (and headers, e.g. Retry-After)."""

    def __init__(
        self, status: int, message: str, reason: str, headers: dict[str, str] | None = None, close: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = headers or {}
        self.close = close  # the body is broken or too slow: answer, then close instead of reading the rest


def _error(status: int, message: str, reason: str | None = None) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status)


def _from_http_exception(err: web.HTTPException) -> web.Response:
    # aiohttp's default text is "<status>: <reason>"; a text given by a handler is the better message.
    text = err.text
    message = text if text and not text.startswith(f"{err.status}:") else err.reason
    response = _error(err.status, message, _REASONS.get(err.status))
    for name, value in err.headers.items():  # Allow (405), Retry-After...: the body is ours, the headers stay
        if name.lower() not in ("content-type", "content-length"):
            response.headers.add(name, value)
    return response


_REASONS = {405: "method_not_allowed", 413: "too_large"}


async def _expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` for a body declared over the limit: 413 at once (the client has sent none of it, so
    closing loses nothing), instead of asking for it with ``100 Continue``."""
    limit = request.app[SETTINGS_KEY].max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        response = _error(413, f"the body is over {limit} bytes", "too_large")
        return await _answer_and_close(request, response)
    if request.headers.get("Expect", "").lower() != "100-continue":
        return _error(417, "only Expect: 100-continue is understood", "bad_expect")
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own expect handler does: the answer has not begun
    return None


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        response = await handler(request)
    except web.HTTPException as err:
        response = _from_http_exception(err)
    except ApiError as err:
        response = _error(err.status, err.message, err.reason)
        response.headers.update(err.headers)
        if err.close:
            response = await _answer_and_close(request, response)
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
    except ConnectionError:  # the client went away: nobody to answer
        raise
    except Exception:  # a bug of ours: logged whole, answered as JSON without its details
        LOG.exception("%s %s failed", request.method, route)
        response = _error(500, "internal error (logged)", "internal")
    REQUESTS.labels(route, str(response.status)).observe(loop.time() - started)
    return response


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send the answer now and close the connection, instead of aiohttp lingering on to read the rest of the body."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()
    return response


async def server_name(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "deeptarget"  # not aiohttp's name and version


def _int_param(request: web.Request, param: Param) -> int:
    raw = request.query.get(param.name)
    if raw is None:
        assert isinstance(param.default, int)
        return param.default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{param.name} must be an integer") from None
    _check_bounds(param, value)
    return value


def _float_param(request: web.Request, param: Param) -> float:
    raw = request.query.get(param.name)
    if raw is None:
        assert isinstance(param.default, float)
        return param.default
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{param.name} must be a number") from None
    if not math.isfinite(value):  # NaN passes every comparison, so it would pass the bounds too
        raise web.HTTPBadRequest(text=f"{param.name} must be a finite number")
    _check_bounds(param, value)
    return value


def _check_bounds(param: Param, value: float) -> None:
    low = -math.inf if param.minimum is None else param.minimum
    high = math.inf if param.maximum is None else param.maximum
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{param.name} must be between {param.minimum} and {param.maximum}")


def _bool_param(request: web.Request, param: Param) -> bool | None:
    raw = request.query.get(param.name)
    if raw not in (None, "true", "false"):
        raise web.HTTPBadRequest(text=f"{param.name} must be true or false")
    return None if raw is None else raw == "true"


def _post_filter(request: web.Request) -> PostFilter:
    face = _bool_param(request, _HAS_FACE)
    query = request.query
    try:
        return PostFilter.parse(query.get("hashtag"), query.get("since"), query.get("until"), face)
    except (ValueError, OverflowError) as err:
        raise web.HTTPBadRequest(text=str(err)) from None


@asynccontextmanager
async def _body_deadline(request: web.Request) -> AsyncIterator[None]:
    """The body must arrive whole within ``api_body_timeout_s`` (a client trickling it holds a connection), and be
    readable (a broken chunked or gzip encoding is the client's fault)."""
    timeout = request.app[SETTINGS_KEY].api_body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {timeout:g} s", "body_timeout", close=True
        ) from None
    except web.RequestPayloadError as err:
        raise ApiError(
            400, f"the request body cannot be read: {_first_line(err)}", "unreadable_body", close=True
        ) from None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[-1].strip()[:200] if str(err).strip() else type(err).__name__


async def _upload(request: web.Request) -> bytes:
    """The uploaded image: multipart field ``image`` (or the first file), or the raw body."""
    async with _body_deadline(request):
        if request.content_type.startswith("multipart/"):
            return await _multipart_image(request)
        data = await request.read()
    if not data:
        raise web.HTTPBadRequest(text="empty upload: send the image as the body or as multipart field 'image'")
    return data


async def _multipart_image(request: web.Request) -> bytes:
    limit = request.app[SETTINGS_KEY].max_upload_bytes
    read = 0
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):  # a nested multipart: not an image
                continue
            wanted = bool(part.filename) or part.name == "image"
            chunks = []
            while chunk := await part.read_chunk(UPLOAD_CHUNK):
                read += len(chunk)
                if read > limit:  # parts are counted as they come, skipped ones too: no part is read whole first
                    raise ImageRejected("too_large", f"the upload is over {limit} bytes")
                if wanted:
                    chunks.append(chunk)
            if wanted:
                return b"".join(chunks)
    except web.HTTPRequestEntityTooLarge:
        raise ImageRejected("too_large", f"the upload is over {limit} bytes") from None
    except _MALFORMED_MULTIPART as err:
        raise ApiError(
            400, f"malformed multipart body: {_first_line(err)}", "malformed_multipart", close=True
        ) from None
    raise ApiError(400, "multipart upload without an 'image' part", "no_image_part")


async def _run(func: Callable[..., Any], *args: Any) -> Any:
    """Model and index work runs off the event loop (torch and FAISS release the GIL)."""
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)


async def _decode(request: web.Request, func: Callable[..., Any], *args: Any) -> Any:
    """Image work (decode, embed) for an upload, at most ``api_decode_concurrency`` at once: an upload that finds no
    slot within ``api_decode_wait_s`` is answered 503 with Retry-After, not queued without bound."""
    slots = request.app[DECODES_KEY]
    if not await _acquire(slots, request.app[SETTINGS_KEY].api_decode_wait_s):
        raise ApiError(503, "busy decoding other uploads: try again shortly", "busy",
                       {"Retry-After": str(BUSY_RETRY_AFTER_S)})  # fmt: skip
    try:
        return await _run(func, *args)
    finally:
        slots.release()


async def _acquire(slots: asyncio.Semaphore, wait_s: float) -> bool:
    if not slots.locked():
        return await slots.acquire()  # a free slot: taken at once
    if wait_s <= 0:
        return False
    try:
        return await asyncio.wait_for(slots.acquire(), timeout=wait_s)
    except TimeoutError:
        return False


def _neighbours(results: list[Neighbour]) -> list[NeighbourBody]:
    return [NeighbourBody(**r.to_json()) for r in results]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body.model_dump(mode="json"), status=status)


async def similar_by_post(request: web.Request) -> web.Response:
    post_id = request.query.get("post_id")
    if not post_id:
        raise web.HTTPBadRequest(text="post_id is required (or POST an image)")
    k = _int_param(request, _K)
    results = await _run(request.app[SERVICE_KEY].similar_to_post, post_id, k, _post_filter(request))
    return _json(SimilarBody(post_id=post_id, results=_neighbours(results)))


async def similar_by_image(request: web.Request) -> web.Response:
    k = _int_param(request, _K)
    where = _post_filter(request)
    data = await _upload(request)
    results = await _decode(request, request.app[SERVICE_KEY].similar_to_image, data, k, where)
    return _json(SimilarBody(results=_neighbours(results)))


async def hashtags(request: web.Request) -> web.Response:
    n = _int_param(request, _N)
    data = await _upload(request)
    tags, neighbours = await _decode(request, request.app[SERVICE_KEY].suggest_hashtags, data, n)
    scored = [HashtagScore(hashtag=t, score=round(s, 6)) for t, s in tags]
    return _json(HashtagsBody(hashtags=scored, neighbours=[nb.post_id for nb in neighbours]))


def _explained(service: ExplainService, data: bytes, head: str | None, class_name: str | None,
               similar: str | None, method: str) -> tuple[ExplainBody, bytes]:  # fmt: skip
    """The explanation as the API answers it (JSON body, PNG), made off the event loop."""
    explanation = service.explain(data, head, class_name, similar, method)
    png = explanation.png()
    classes = [ClassProbability(name=c, probability=round(p, 6)) for c, p in explanation.classes]
    body = ExplainBody(explained=explanation.explained, score=round(explanation.score, 6), method=explanation.method,
                       head=head, classes=classes, png=base64.b64encode(png).decode())  # fmt: skip
    return body, png


async def explain(request: web.Request) -> web.Response:
    query = request.query
    head, class_name, similar = query.get("head"), query.get("class"), query.get("similar")
    answer_format, method = query.get("format", "png"), query.get("method", DEFAULT_METHOD)
    if answer_format not in ("png", "json"):
        raise web.HTTPBadRequest(text="format must be png or json")
    if method not in EXPLAIN_METHODS:
        raise web.HTTPBadRequest(text=f"method must be one of {', '.join(EXPLAIN_METHODS)}")
    if head is None and similar is None:
        raise web.HTTPBadRequest(text="head is required (or similar=POST_ID)")
    if class_name is not None and head is None:
        raise web.HTTPBadRequest(text="class needs head")
    if head is not None:
        try:
            check_head_name(head)
        except ValueError as err:
            raise web.HTTPBadRequest(text=str(err)) from None
    if similar == "" or class_name == "":
        raise web.HTTPBadRequest(text="similar and class must not be empty")
    data = await _upload(request)
    body, png = await _decode(request, _explained, request.app[EXPLAIN_KEY], data, head, class_name, similar, method)
    if answer_format == "json":
        return _json(body)
    return web.Response(body=png, content_type="image/png")


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
        _float_param(request, _MIN_SCORE),
        _int_param(request, _MIN_POSTS),
        _int_param(request, _LIMIT),
        bool(_bool_param(request, _EXCLUDE_OUTLIERS)),
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


def _ingest_records(body: bytes, limit: int) -> Sequence[str | bytes]:
    records = body_records(body)
    count = sum(1 for r in records if r.strip())
    if count > limit:
        raise ApiError(413, f"{count} records in one request; at most {limit}: split the batch", "too_many_records")
    return records


async def ingest(request: web.Request) -> web.Response:
    """Posts (each a ``PushedPost``) as JSON lines, one JSON object or a JSON array; each validated alone (off the
    event loop), the good ones queued for the scraper. 202 when any was queued, else 400; both count the rejected
    records and give the first ``MAX_REJECTED_SHOWN`` with their reasons."""
    async with _body_deadline(request):
        body = await request.read()
    if not body.strip():
        raise web.HTTPBadRequest(text="empty body: send posts as JSON lines with at least id and media_url")
    try:
        records = await _run(_ingest_records, body, request.app[SETTINGS_KEY].api_max_ingest_records)
    except ValueError as err:
        raise web.HTTPBadRequest(text=str(err)) from None
    posts, bad = await _run(parse_posts, records)
    if posts:
        await IngestStream(request.app[REDIS_KEY]).push(posts)
    rejected = [BadRecordBody(line=b.line, reason=b.reason) for b in bad[:MAX_REJECTED_SHOWN]]
    answer = IngestBody(accepted=len(posts), rejected_count=len(bad), rejected=rejected)
    return _json(answer, status=202 if posts else 400)


async def delete_post(request: web.Request) -> web.Response:
    from deeptarget.ops.deletion import delete_posts

    post_id = request.match_info["post_id"]
    store = request.app[SERVICE_KEY].store
    deleted = await _run(delete_posts, store, request.app[JOBS_KEY], [post_id])
    if not deleted:
        raise NotFoundError(f"post {post_id} is not known")
    return _json(DeletedBody(deleted=deleted))


def _send(task: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def send(request: web.Request) -> web.Response:
        queue = jobs.task_queues[task]
        await _run(request.app[JOBS_KEY].send, task)
        return _json(TaskAcceptedBody(task=task, queue=queue), status=202)

    return send


async def healthz(request: web.Request) -> web.Response:
    body = await health.health(request.app[SETTINGS_KEY], request.app[SERVICE_KEY], request.app[REDIS_KEY])
    return _json(body, status=200 if body.status == "ok" else 503)


async def readyz(request: web.Request) -> web.Response:
    body = await health.ready(request.app[SERVICE_KEY])
    return _json(body, status=200 if body.status == "ready" else 503)


async def livez(request: web.Request) -> web.Response:
    return _json(LiveBody(status="alive"))


async def metrics(request: web.Request) -> web.Response:
    index = request.app[SERVICE_KEY].snapshots.get()  # what this replica serves, as of this scrape
    if index is not None:
        INDEX_VECTORS.set(index.ntotal)
        INDEX_VERSION.set(index.version or 0)
        if index.created is not None:
            INDEX_AGE.set(max(0.0, time.time() - index.created))
    return web.Response(body=prometheus_client.generate_latest(), content_type="text/plain")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(OPERATIONS))


_K = Param("k", "integer", "how many results", minimum=1, maximum=MAX_K, default=10)
_N = Param("n", "integer", "how many hashtags", minimum=1, maximum=MAX_K, default=10)
_HAS_FACE = Param("has_face", "boolean", "only posts with (true) or without (false) a face")
_FORMAT = Param("format", "string", "png: the image itself; json: ExplainBody (a base64 PNG and the classes)",
                enum=("png", "json"), default_text="png")  # fmt: skip
_EXPLAIN = (
    Param("head", "string", "the head whose class is explained (required unless similar is given)",
          pattern=HEAD_NAME_PATTERN),
    Param("class", "string", "the class to explain (default: the head's most probable one)", min_length=1),
    Param("similar", "string", "explain what makes the image similar to this indexed post", min_length=1),
    Param("method", "string", "captum's Grad-CAM (one pass: fast) or occlusion (49 passes: better on the deletion "
          "check)", enum=EXPLAIN_METHODS, default_text=DEFAULT_METHOD),
    _FORMAT,
)  # fmt: skip
_FILTERS = (
    Param("hashtag", "string", "only posts with this hashtag"),
    Param("since", "string", "only posts from this ISO date/time on", format="date-time"),
    Param("until", "string", "only posts before this ISO date/time", format="date-time"),
    _HAS_FACE,
)
_MIN_SCORE = Param("min_score", "number", "the least share of the interest", minimum=0.0, maximum=1.0, default=0.0)
_MIN_POSTS = Param("min_posts", "integer", "the least number of posts a user must have", minimum=1,
                   maximum=MAX_MIN_POSTS, default=1)  # fmt: skip
_LIMIT = Param("limit", "integer", "how many users", minimum=1, maximum=MAX_K, default=100)
_EXCLUDE_OUTLIERS = Param("exclude_outliers", "boolean", "leave out accounts whose follower count is an outlier")
_UPLOAD_ERRORS = (400, 408, 413, 422, 503)
OPERATIONS: list[Operation] = [
    Operation("get", "/similar", "Posts most similar to an indexed post", SimilarBody,
              (Param("post_id", "string", "the query post", required=True, min_length=1), _K, *_FILTERS),
              errors=(400, 404, 503)),
    Operation("post", "/similar", "Posts most similar to an uploaded image", SimilarBody, (_K, *_FILTERS),
              upload=True, errors=_UPLOAD_ERRORS),
    Operation("post", "/hashtags", "Hashtags suggested for an uploaded image", HashtagsBody, (_N,), upload=True,
              errors=_UPLOAD_ERRORS),
    Operation("post", "/explain", "The uploaded image with a heat map of the regions that drove a head's class, or "
              "that make it similar to an indexed post (captum: Grad-CAM or occlusion)", ExplainBody, _EXPLAIN,
              upload=True, binary="image/png", errors=(*_UPLOAD_ERRORS, 404)),
    Operation("get", "/users/{user}", "A user's interest profile", Profile,
              (Param("user", "string", "user id or username", where="path"),), errors=(404,)),
    Operation("get", "/audiences", "The users most into an interest, ranked by their share of it", AudienceBody, (
        Param("interest", "string", "a class (sushi, or head:class) or a hashtag (#sushi)", required=True,
              min_length=1),
        _MIN_SCORE, _MIN_POSTS, _LIMIT, _EXCLUDE_OUTLIERS,
    ), errors=(400, 404)),
    Operation("post", "/train/hashtags", "Refit the hashtag model now (a task on the train queue)", TaskAcceptedBody,
              write=True, status=202, errors=(503,)),
    Operation("post", "/index/snapshot", "Snapshot the index now (a task on the index queue)", TaskAcceptedBody,
              write=True, status=202, errors=(503,)),
    Operation("post", "/ingest", "Queue posts (JSON lines, a JSON object or an array, each with id and media_url) "
              "for the scraper; bad records are reported by line", IngestBody, write=True, errors=(400, 408, 413, 503),
              request=PushedPost, request_lines=True, status=202, request_description=(
                  "Posts for the scraper to fetch, each validated alone: a bad one is rejected with its line (or "
                  "array position) and reason, the others are queued. Unknown fields are rejected; without "
                  "hashtags, the caption's #tags are used. Each line (or element) is at most 64 KiB; a request "
                  "carries at most api_max_ingest_records records (10000 by default; more: 413)."),
              error_models=((400, IngestBody, "Nothing queued: every record was rejected (IngestBody, with each "
                             "one's reason), or the body is empty or not a JSON array (ErrorBody)"),)),
    Operation("delete", "/posts/{post_id}", "Delete a post: forgotten by the store, removed from the index",
              DeletedBody, (Param("post_id", "string", "the post", where="path"),), write=True, errors=(404, 503)),
    Operation("get", "/healthz", "Every dependency and stage by name: 200 when all are well, 503 (degraded) when "
              "one is down or behind (problems names them); reads may still work", HealthBody, errors=(503,),
              error_models=((503, HealthBody, "Degraded: the body names the problems"),)),
    Operation("get", "/readyz", "Whether reads can be served (database, index loaded; Redis not needed): 200 "
              "ready, 503 not ready", ReadyBody, errors=(503,),
              error_models=((503, ReadyBody, "Not ready: the body names the problems"),)),
    Operation("get", "/livez", "The process answers (always 200)", LiveBody, errors=()),
    Operation("get", "/metrics", "Prometheus metrics (text format)", None, errors=(), text=True),
    Operation("get", "/openapi.json", "This document", None, errors=(), document=True),
]  # fmt: skip
HANDLERS: dict[tuple[str, str], Callable[[web.Request], Awaitable[web.Response]]] = {
    ("get", "/similar"): similar_by_post,
    ("post", "/similar"): similar_by_image,
    ("post", "/hashtags"): hashtags,
    ("post", "/explain"): explain,
    ("get", "/users/{user}"): user_profile,
    ("get", "/audiences"): audiences,
    ("post", "/train/hashtags"): _send(jobs.train_task),
    ("post", "/index/snapshot"): _send(jobs.snapshot_task),
    ("post", "/ingest"): ingest,
    ("delete", "/posts/{post_id}"): delete_post,
    ("get", "/healthz"): healthz,
    ("get", "/readyz"): readyz,
    ("get", "/livez"): livez,
    ("get", "/metrics"): metrics,
    ("get", "/openapi.json"): openapi,
}


def key_equals(given: str, key: SecretStr) -> bool:
    """Whether text a client sent is the key, compared in constant time. aiohttp reads header (and form) bytes as
    UTF-8 with surrogateescape: any bytes at all come back out as they went in."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.get_secret_value().encode())


def _requires_key(
    settings: Settings, handler: Callable[[web.Request], Awaitable[web.Response]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def checked(request: web.Request) -> web.Response:
        if settings.api_key is None or not settings.api_key.get_secret_value().strip():
            raise web.HTTPForbidden(text="write endpoints are disabled: set DEEPTARGET_API_KEY on the API")
        if not key_equals(request.headers.get(API_KEY_HEADER, ""), settings.api_key):
            raise web.HTTPUnauthorized(text=f"this endpoint needs the {API_KEY_HEADER} header with the API key")
        return await handler(request)

    return checked


def create_app(settings: Settings, service: QueryService | None = None) -> web.Application:
    app = web.Application(client_max_size=settings.max_upload_bytes, middlewares=[errors_as_json])
    app[SETTINGS_KEY] = settings
    app[DECODES_KEY] = asyncio.Semaphore(settings.api_decode_concurrency or max(2, os.cpu_count() or 1))
    app.on_response_prepare.append(server_name)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        import faiss

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
        app[EXPLAIN_KEY] = ExplainService(settings, app[SERVICE_KEY])
        assert settings.redis_url, "the API needs settings.redis_url"
        app[REDIS_KEY] = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2)
        app[JOBS_KEY] = Jobs.for_settings(settings)
        yield
        if service is None:  # ours: stop its index follower
            app[SERVICE_KEY].snapshots.close()
        await app[REDIS_KEY].aclose()
        executor.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(resources)
    for op in OPERATIONS:
        handler = HANDLERS[(op.method, op.path)]
        route_handler = _requires_key(settings, handler) if op.write else handler
        app.router.add_route(op.method.upper(), op.path, route_handler, expect_handler=_expect_continue)
    if settings.ui_enabled:
        from deeptarget.ui.pages import add_ui  # it uses this module's helpers

        add_ui(app)
    return app


def server_limits(settings: Settings) -> ServerLimits:
    """How ``deeptarget serve`` guards its connections (``http_server.ServerLimits``)."""
    return ServerLimits(settings.api_header_timeout_s, settings.api_max_connections_per_client)
