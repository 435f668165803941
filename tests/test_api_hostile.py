"""Hostile clients against a real ``deeptarget serve`` process, in raw bytes over loopback sockets (issue 12: M5, M6,
M7, L1/L2, L8, L11): half-sent requests and greedy clients, malformed multipart bodies, keys that are no UTF-8,
non-finite parameters, huge ingest batches. Each answer is JSON with a reason, nothing is a 500, and the API keeps
answering everyone else."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis
from pydantic import SecretStr

from deeptarget import jobs
from deeptarget.api.app import MAX_K, MAX_MIN_POSTS, create_app
from deeptarget.api.models import MAX_REJECTED_SHOWN
from deeptarget.core import keys
from deeptarget.query.service import NO_FILTER, Neighbour, PostFilter, QueryService
from deeptarget.runtime.app_server import AppServer
from deeptarget.runtime.embedded_redis import EmbeddedRedis
from tests.conftest import make_settings
from tests.helpers import KEY, served

WRITES = [(b"POST", b"/ingest"), (b"POST", b"/index/snapshot"), (b"POST", b"/train/hashtags"),
          (b"DELETE", b"/posts/p1")]  # fmt: skip
HALF_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Slow: "  # never finished


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> dict:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)

    def error(self) -> tuple[int, str | None]:
        """(status, reason) of an ErrorBody answer."""
        body = self.json()
        assert set(body) == {"error", "reason"} and body["error"], body
        return self.status, body["reason"]


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


def request(method: bytes, path: bytes, *headers: bytes, body: bytes = b"", key: bytes | None = None) -> bytes:
    """Raw request bytes with a right Content-Length; the server closes the connection after its answer."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: api", b"Connection: close", *headers]
    if key is not None:
        lines.append(b"X-API-Key: " + key)
    if not any(h.lower().startswith((b"content-length", b"transfer-encoding")) for h in headers):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def exchange(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 10) -> Answer:
    reader, writer = await connect(port, source)
    try:
        writer.write(data)
        return parse(await asyncio.wait_for(reader.read(), timeout))
    finally:
        writer.close()


async def closed_after(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when it closed it (loop time)."""
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        data = b""
    return data, asyncio.get_running_loop().time()


@pytest.fixture(scope="module")
def api(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One serve process for the tests that leave it as they found it."""
    redis.Redis.from_url(redis_server.url).flushall()
    with served(tmp_path_factory.mktemp("hostile") / "data", redis_server.url, api_max_ingest_records=50) as port:
        yield port


# -- M6: slow and greedy clients --------------------------------------------------------------------------------
async def test_half_sent_requests_neither_starve_the_api_nor_stay_open(tmp_path: Path, redis_url: str) -> None:
    """300 half-sent requests from one address took all 256 descriptors of the API and held them for good. Now one
    address holds 8 connections at most (one more: 503, closed at once), headers must come within 3 s, and bodies
    within 3 s (408): everyone else is answered meanwhile, and every slow connection is closed."""
    limits = {"api_header_timeout_s": 3.0, "api_body_timeout_s": 3.0, "api_max_connections_per_client": 8}
    with served(tmp_path / "data", redis_url, **limits) as port:
        loop = asyncio.get_running_loop()
        opened = loop.time()
        held = []
        for _ in range(8):
            reader, writer = await connect(port)
            writer.write(HALF_HEADERS)
            held.append((reader, writer))
        # a slow body each, from another address: complete headers, then a few bytes of the promised 1000
        slow_bodies = []
        uploads = ((b"/ingest", b"application/json"), (b"/similar", b"multipart/form-data; boundary=b"))
        for path, content_type in uploads:
            reader, writer = await connect(port, "127.0.0.3")
            head = request(b"POST", path, b"Content-Type: " + content_type, b"Content-Length: 1000", key=KEY.encode())
            writer.write(head + b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n[{"id"')
            slow_bodies.append((reader, writer))

        # the same address again: refused at once, with a reason
        reader, writer = await connect(port)
        refusal = parse(await asyncio.wait_for(reader.read(), 5))
        writer.close()
        assert refusal.error() == (503, "too_many_connections") and refusal.headers["retry-after"] == "1"
        # 291 more half-sent ones: each closed at once (a 503, or a reset as the server closes on unread bytes)
        greedy = []
        for _ in range(291):
            reader, writer = await connect(port)
            writer.write(HALF_HEADERS)
            greedy.append((reader, writer))
        for reader, _ in greedy:
            data, _ = await closed_after(reader, 5)
            assert not data or data.startswith(b"HTTP/1.1 503 "), data
        # a real request from this machine is answered, and quickly
        started = loop.time()
        answer = await exchange(port, request(b"GET", b"/livez"), source="127.0.0.2", timeout=5)
        assert answer.status == 200 and loop.time() - started < 2
        assert answer.headers["server"] == "deeptarget"

        # the slow bodies: 408 after their 3 s, then closed
        for reader, writer in slow_bodies:
            data, at = await closed_after(reader, 10)
            assert parse(data).error() == (408, "body_timeout")
            assert 2.5 < at - opened < 8
            writer.close()
        # the half-sent headers: closed after their 3 s, without an answer
        for reader, writer in held:
            data, at = await closed_after(reader, 10)
            assert data == b"" and 2.5 < at - opened < 8, (data, at - opened)
            writer.close()
        for _, writer in greedy:
            writer.close()
        # their slots are free again
        assert (await exchange(port, request(b"GET", b"/livez"), timeout=5)).status == 200


async def test_an_idle_keep_alive_connection_is_closed_after_the_header_timeout(tmp_path: Path, redis_url: str) -> None:
    with served(tmp_path / "data", redis_url, api_header_timeout_s=1.0) as port:
        reader, writer = await connect(port)
        loop = asyncio.get_running_loop()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")  # keep-alive: the connection stays
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(parse(head + b"").headers["content-length"])
        await reader.readexactly(length)
        answered = loop.time()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a")  # the next request, half-sent
        data, at = await closed_after(reader, 10)
        assert data == b"" and 0.5 < at - answered < 5
        writer.close()


# -- L1/L2: malformed multipart bodies, keys that are no UTF-8 -------------------------------------------------
def _multipart(body: bytes, content_type: bytes = b"multipart/form-data; boundary=b", path: bytes = b"/similar"):
    return request(b"POST", path, b"Content-Type: " + content_type, body=body)


PART = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
MALFORMED_MULTIPART = {
    "no boundary parameter": _multipart(PART + b"abc\r\n--b--\r\n", b"multipart/form-data"),
    "empty boundary": _multipart(PART + b"abc\r\n--b--\r\n", b"multipart/form-data; boundary="),
    "quoted empty boundary": _multipart(b"--\r\n\r\nabc", b'multipart/mixed; boundary=""'),
    "boundary not in the body": _multipart(PART + b"abc\r\n--b--\r\n", b"multipart/form-data; boundary=zzz"),
    "boundary over 70 characters": _multipart(PART, b"multipart/form-data; boundary=" + b"b" * 200),
    "boundary not UTF-8": _multipart(PART, b"multipart/form-data; boundary=\xff\xfe"),
    "garbage body": _multipart(b"\xff\xfe\x00 garbage, no boundary anywhere \x00\x01"),
    "nested multipart without a boundary": _multipart(b"--b\r\nContent-Type: multipart/mixed\r\n\r\nabc\r\n--b--\r\n"),
    "part headers never end": _multipart(b"--b\r\nContent-Disposition: form-data; name=" + b"x" * 20_000),
    "hashtags: no boundary": _multipart(PART, b"multipart/form-data", b"/hashtags"),
    "hashtags: garbage": _multipart(b"\x00" * 64 + b"--", path=b"/hashtags"),
    "gzip that is not": request(b"POST", b"/similar", b"Content-Encoding: gzip", body=b"not gzip at all"),
    "deflate that is not": request(b"POST", b"/hashtags", b"Content-Encoding: deflate", body=b"0123456789"),
}


@pytest.mark.parametrize("case", MALFORMED_MULTIPART)
async def test_a_malformed_upload_body_is_a_400_with_a_reason(api: int, case: str) -> None:
    """Issue 12, L1: these were 500s (aiohttp's multipart reader raising into the handler)."""
    status, reason = (await exchange(api, MALFORMED_MULTIPART[case])).error()
    assert status == 400 and reason in {"malformed_multipart", "unreadable_body", None}, (status, reason)


async def test_multipart_parts_count_against_the_upload_limit(tmp_path: Path, redis_url: str) -> None:
    """A part that is not the image is not read whole first (nor a huge image part)."""
    with served(tmp_path / "data", redis_url, max_upload_bytes=100_000) as port:
        filler = b'--b\r\nContent-Disposition: form-data; name="other"\r\n\r\n' + b"x" * 300_000 + b"\r\n"
        answer = await exchange(port, _multipart(filler + PART + b"abc\r\n--b--\r\n"))
        assert answer.error() == (413, "too_large")
        answer = await exchange(port, _multipart(PART + b"x" * 300_000 + b"\r\n--b--\r\n", path=b"/hashtags"))
        assert answer.error() == (413, "too_large")


HOSTILE_KEYS = [bytes(range(0x80, 0x100)), b"\x80", b"\xff" * 64, b"\xc3\x28", "ключ".encode(), b"\xfe" + KEY.encode()]


@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_a_key_that_is_no_utf8_is_a_401(api: int, method: bytes, path: bytes) -> None:
    """Issue 12, L2: raw bytes 0x80-0xff in X-API-Key were a 500 (str.encode of surrogates)."""
    for key in HOSTILE_KEYS:
        answer = await exchange(api, request(method, path, body=b"{}", key=key))
        assert answer.status == 401, (key, answer)
        assert answer.error()[0] == 401 and KEY.encode() not in answer.body


async def test_the_right_key_still_opens_a_write_endpoint(api: int, redis_client: redis.Redis) -> None:
    answer = await exchange(api, request(b"POST", b"/index/snapshot", key=KEY.encode()))
    assert answer.status == 202 and answer.json() == {"task": jobs.snapshot_task, "queue": "index"}


# -- L8: parameters ---------------------------------------------------------------------------------------------
BAD_PARAMETERS = [
    b"/audiences?interest=x&min_score=NaN", b"/audiences?interest=x&min_score=nan",
    b"/audiences?interest=x&min_score=inf", b"/audiences?interest=x&min_score=-inf",
    b"/audiences?interest=x&min_score=Infinity",
    b"/audiences?interest=x&min_score=1e400", b"/audiences?interest=x&min_score=1.5",
    b"/audiences?interest=x&min_score=-0.1", b"/audiences?interest=x&min_score=",
    b"/audiences?interest=x&min_posts=0", b"/audiences?interest=x&min_posts=nan",
    b"/audiences?interest=x&min_posts=%d" % (MAX_MIN_POSTS + 1), b"/audiences?interest=x&limit=0",
    b"/audiences?interest=x&limit=inf", b"/audiences?interest=x&limit=1e3", b"/audiences?interest=x&exclude_outliers=1",
    b"/audiences?interest=%20", b"/similar?post_id=p&k=NaN", b"/similar?post_id=p&k=%d" % (MAX_K + 1),
    b"/similar?post_id=p&k=-1", b"/similar?post_id=p&k=" + b"9" * 5000, b"/similar?post_id=p&has_face=yes",
    b"/similar?post_id=p&since=yesterday", b"/similar?post_id=p&until=9999-99-99", b"/similar?post_id=",
]  # fmt: skip


@pytest.mark.parametrize("target", BAD_PARAMETERS, ids=[t.decode()[:60] for t in BAD_PARAMETERS])
async def test_a_bad_parameter_is_a_400(api: int, target: bytes) -> None:
    """Issue 12, L8: min_score=NaN (and inf) was accepted."""
    assert (await exchange(api, request(b"GET", target))).error()[0] == 400


async def test_bad_upload_parameters_are_a_400_before_the_body_is_read(api: int) -> None:
    for target in (b"/similar?k=nan", b"/similar?k=0", b"/hashtags?n=inf", b"/hashtags?n=1001"):
        assert (await exchange(api, request(b"POST", target, body=b"image"))).error()[0] == 400


# -- L11: headers and the document ------------------------------------------------------------------------------
async def test_a_405_keeps_its_allow_header_and_no_answer_names_aiohttp(api: int) -> None:
    for method, path, allowed in ((b"PATCH", b"/similar", {"GET", "POST"}), (b"TRACE", b"/healthz", {"GET"}),
                                  (b"PUT", b"/ingest", {"POST"}), (b"GET", b"/posts/p1", {"DELETE"})):  # fmt: skip
        answer = await exchange(api, request(method, path))
        assert answer.error() == (405, "method_not_allowed")
        assert set(answer.headers["allow"].split(",")) == allowed
        assert answer.headers["server"] == "deeptarget"
    for target in (b"/healthz", b"/metrics", b"/openapi.json", b"/nowhere"):
        assert (await exchange(api, request(b"GET", target))).headers["server"] == "deeptarget"


@pytest.mark.parametrize("path", [b"/similar", b"/ingest"])
async def test_a_body_declared_over_the_limit_is_refused_before_it_is_sent(api: int, path: bytes) -> None:
    """Re-test finding: ``Expect: 100-continue`` with a 5 GB Content-Length got ``100 Continue``."""
    headers = [b"Content-Length: 5000000000", b"Expect: 100-continue"]
    started = time.monotonic()
    answer = await exchange(api, request(b"POST", path, *headers, key=KEY.encode()), timeout=5)
    assert answer.error() == (413, "too_large")
    assert time.monotonic() - started < 3


# Requests aiohttp refuses itself, before any handler runs (found by the attacker's re-test: plain-text 400s that
# named aiohttp and its version in Server).
UNPARSEABLE = {
    "unknown content-encoding": request(b"POST", b"/ingest", b"Content-Encoding: br", body=b"xxxx", key=KEY.encode()),
    "url over 8190 bytes": request(b"GET", b"/similar?post_id=" + b"a" * 9000),
    "header line over 8190 bytes": request(b"GET", b"/healthz", b"X-Big: " + b"a" * 9000),
    "content-length and chunked": request(
        b"POST", b"/ingest", b"Content-Length: 4", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"
    ),
    "negative content-length": request(b"POST", b"/ingest", b"Content-Length: -1"),
    "nul in a header": request(b"GET", b"/healthz", b"X-Nul: a\x00b"),
    "bad chunk size": request(b"POST", b"/ingest", b"Transfer-Encoding: chunked", body=b"zz\r\nabc\r\n0\r\n\r\n"),
    "http/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "not http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
    "non-ascii request line": b"GET /h\xffz HTTP/1.1\r\nHost: api\r\n\r\n",
}


@pytest.mark.parametrize("case", list(UNPARSEABLE))
async def test_a_request_aiohttp_cannot_parse_gets_our_json_error(api: int, case: str) -> None:
    answer = await exchange(api, UNPARSEABLE[case])
    assert 400 <= answer.status < 500, (case, answer)
    assert answer.error()[1] == "malformed_request", (case, answer)
    assert answer.headers["server"] == "deeptarget" and b"aiohttp" not in answer.body
    assert (await exchange(api, request(b"GET", b"/livez"))).status == 200  # and the API goes on


async def test_the_document_names_every_status_and_each_parameters_bounds(api: int) -> None:
    document = (await exchange(api, request(b"GET", b"/openapi.json"))).json()
    paths = document["paths"]
    statuses = {f"{m.upper()} {p}": sorted(op["responses"]) for p, ops in paths.items() for m, op in ops.items()}
    assert statuses["POST /train/hashtags"] == statuses["POST /index/snapshot"] == ["202", "401", "403", "503"]
    assert statuses["POST /ingest"] == ["202", "400", "401", "403", "408", "413", "503"]
    assert statuses["POST /similar"] == statuses["POST /hashtags"] == ["200", "400", "408", "413", "422", "503"]
    assert statuses["DELETE /posts/{post_id}"] == ["200", "401", "403", "404", "503"]

    def schema(path: str, method: str, name: str) -> dict:
        (param,) = [p for p in paths[path][method]["parameters"] if p["name"] == name]
        return param["schema"]

    assert schema("/similar", "get", "k") == {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}
    assert schema("/hashtags", "post", "n") == {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}
    assert schema("/audiences", "get", "limit") == {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 100}
    assert schema("/audiences", "get", "min_posts")["maximum"] == MAX_MIN_POSTS
    assert schema("/audiences", "get", "min_score") == {"type": "number", "minimum": 0, "maximum": 1, "default": 0}
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


# -- M7: /ingest ------------------------------------------------------------------------------------------------
def _bad_lines(count: int) -> bytes:
    return b"\n".join(b'{"id": "p%d", "colour": "%s"}' % (i, b"x" * 30) for i in range(count))


async def test_a_2mb_body_of_bad_records_gets_a_small_answer_and_the_api_stays_responsive(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """Issue 12, M7: a 2 MB body froze the API for 10 s and was answered with 69 MB."""
    body = _bad_lines(40_000)[: 2 * 1024 * 1024]
    body = body[: body.rindex(b"\n")]
    lines = body.count(b"\n") + 1
    with served(tmp_path / "data", redis_url, api_max_ingest_records=100_000) as port:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            headers = {"X-API-Key": KEY, "Content-Type": "application/x-ndjson"}
            ingest = asyncio.create_task(http.post(f"{url}/ingest", data=body, headers=headers))
            slowest = 0.0
            while not ingest.done():  # /livez keeps answering while the body is parsed
                started = time.monotonic()
                async with http.get(f"{url}/livez") as health:
                    assert health.status == 200
                slowest = max(slowest, time.monotonic() - started)
            response = await ingest
            raw = await response.read()
            assert response.status == 400
    answer = json.loads(raw)
    assert answer["accepted"] == 0 and answer["rejected_count"] == lines
    assert len(answer["rejected"]) == MAX_REJECTED_SHOWN and answer["rejected"][0]["line"] == 1
    assert "unknown field(s): colour" in answer["rejected"][0]["reason"]
    assert len(raw) < 16_000, len(raw)  # a few KB
    assert slowest < 1.0, slowest
    assert redis_client.xlen(keys.ingest_stream) == 0


async def test_more_records_than_a_request_may_carry_is_a_413_and_queues_nothing(
    api: int, redis_client: redis.Redis
) -> None:
    good = b"\n".join(b'{"id": "p%d", "media_url": "https://scontent.cdninstagram.com/%d.jpg"}' % (i, i)
                      for i in range(51))  # fmt: skip
    headers = (b"Content-Type: application/x-ndjson",)
    answer = await exchange(api, request(b"POST", b"/ingest", *headers, body=good, key=KEY.encode()))
    assert answer.error() == (413, "too_many_records") and b"51 records" in answer.body
    assert redis_client.xlen(keys.ingest_stream) == 0
    fifty = good.rsplit(b"\n", 1)[0] + b"\n\n\n"  # blank lines are no records
    answer = await exchange(api, request(b"POST", b"/ingest", *headers, body=fifty, key=KEY.encode()))
    assert answer.status == 202 and answer.json() == {"accepted": 50, "rejected_count": 0, "rejected": []}
    assert redis_client.xlen(keys.ingest_stream) == 50


# -- M5: concurrent decodes -------------------------------------------------------------------------------------
class GatedService(QueryService):
    """The real service; image queries wait at a gate the test opens, so 'a decode in progress' lasts on demand."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.entered = threading.Event()
        self.gate = threading.Event()

    def similar_to_image(self, data: bytes, k: int = 10, where: PostFilter = NO_FILTER) -> list[Neighbour]:
        self.entered.set()
        self.gate.wait(20)
        return super().similar_to_image(data, k, where)


async def test_uploads_beyond_the_decode_slots_get_a_503_with_retry_after(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path / "data", redis_url, api_key=SecretStr(KEY), api_decode_concurrency=1,
                             api_decode_wait_s=0.2)  # fmt: skip
    service = GatedService(settings)
    async with AppServer(create_app(settings, service)) as server, aiohttp.ClientSession() as http:
        first = asyncio.create_task(http.post(f"{server.url}/similar", data=b"not an image"))
        await asyncio.get_running_loop().run_in_executor(None, service.entered.wait, 10)
        async with http.post(f"{server.url}/hashtags", data=b"not an image") as busy:
            assert busy.status == 503 and busy.headers["Retry-After"] == "1"
            assert (await busy.json())["reason"] == "busy"
        service.gate.set()
        response = await first
        assert response.status == 422  # the real decode ran, once its slot was there
        async with http.post(f"{server.url}/hashtags", data=b"not an image") as after:
            assert after.status == 422  # the slot is free again
