"""The query API route by route, in this process (issue 14, item 6): ``create_app`` behind aiohttp's test server on
loopback, over a small deployment this module builds itself in a temp dir: a real SQLite metadata store, a real FAISS
snapshot written by the index writer, a hashtag model fitted on the posts, the owners' profiles, and a real Redis.

The posts are three topics of six (a colour each, noise on top), embedded by the configured (random-weight) model
through the query path itself, so an upload of a post's own picture finds that post at cosine 1 and its topic next.
Each post's hashtags, date, faces and owner are chosen so that every filter and ranking has one right answer.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from pydantic import SecretStr

from deeptarget import jobs
from deeptarget.api.app import MAX_K, OPERATIONS, create_app
from deeptarget.api.models import NeighbourBody
from deeptarget.core import keys
from deeptarget.core.records import InferResult, Owner, Post, PostStatus, Prediction, vector_id
from deeptarget.core.replies import at_once
from deeptarget.core.settings import Settings
from deeptarget.index.writer import IndexWriter
from deeptarget.jobs import Jobs
from deeptarget.models.explain import DEFAULT_METHOD
from deeptarget.models.heads import LinearHead
from deeptarget.query.service import QueryService
from deeptarget.runtime.embedded_redis import EmbeddedRedis
from deeptarget.store.metadata import MetadataStore
from deeptarget.training.linear import fit_logistic
from deeptarget.ui.pages import UI_ROUTES
from deeptarget.workers.upkeep import WriterUpkeep
from tests.conftest import make_settings
from tests.helpers import publish_read_side, route_table
from tests.queue_messages import queued_task_args

Client = TestClient[web.Request, web.Application]

API_KEY = "test-api-key-" + "k" * 16
MAX_UPLOAD = 200_000
MAX_RECORDS = 5
ALS_NEIGHBOURS = 5
TOPICS = ("sushi", "beach", "garden")
COLOURS = {"sushi": (200, 30, 30), "beach": (40, 80, 210), "garden": (40, 170, 50)}
SECOND_TAG = {"sushi": "food", "beach": "sea", "garden": "green"}
N_POSTS = 18
START = datetime(2026, 1, 1, tzinfo=UTC)
# Post i is of topic i % 3. u0 posts only sushi, u1 sushi and beach, u2 beach and garden, u3 only garden.
OWNER = {0: 0, 3: 0, 6: 0, 9: 0, 12: 1, 15: 1, 1: 1, 4: 1, 7: 1, 10: 2, 13: 2, 16: 2, 2: 2, 5: 2, 8: 3, 11: 3, 14: 3,
         17: 3}  # fmt: skip
WRITES = [("POST", "/train/hashtags"), ("POST", "/index/snapshot"), ("POST", "/ingest"), ("DELETE", "/posts/p0")]
GOOD_RECORD = {"id": "pushed-1", "media_url": "https://scontent.cdninstagram.com/pushed-1.jpg", "caption": "#new"}


def topic(i: int) -> str:
    return TOPICS[i % 3]


def posts_of(name: str) -> set[str]:
    return {f"p{i}" for i in range(N_POSTS) if topic(i) == name}


def photo(i: int) -> bytes:
    """Post i's picture: its topic's colour with noise of its own."""
    noise = np.random.default_rng(i).normal(0, 60, (80, 96, 3))
    pixels = np.clip(np.array(COLOURS[topic(i)]) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def post(i: int) -> Post:
    user = OWNER[i]
    return Post(
        id=f"p{i}",
        media_url=f"https://scontent.cdninstagram.com/p{i}.jpg",
        permalink=f"https://www.instagram.com/p/P{i}/",
        caption=f"#{topic(i)} #{SECOND_TAG[topic(i)]}",
        hashtags=[topic(i), SECOND_TAG[topic(i)]],
        like_count=i + 1,
        timestamp=START + timedelta(days=i),
        owner=Owner(id=f"u{user}", username=f"name{user}", followers_count=100 * (user + 1)),
    )


def faces(i: int) -> int:
    return 1 if i % 4 == 0 else 0


@dataclass
class Deployment:
    settings: Settings
    service: QueryService
    vectors: np.ndarray  # row i: post i's embedding
    model_id: str

    def cosine_ranking(self, query: np.ndarray, among: set[str] | None = None) -> list[tuple[str, float]]:
        """Every post (or those ``among``) by cosine to ``query``, best first: what an exact index must answer."""
        scores = self.vectors @ query
        ranked = [(f"p{i}", float(scores[i])) for i in np.argsort(-scores, kind="stable")]
        return [(pid, s) for pid, s in ranked if among is None or pid in among]


@pytest.fixture(scope="module")
def deployment(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """What workers leave behind, made directly: embedded posts, a published snapshot, a hashtag model, profiles."""
    settings = make_settings(
        tmp_path_factory.mktemp("api") / "data", redis_server.url, api_key=SecretStr(API_KEY),
        max_upload_bytes=MAX_UPLOAD, api_max_ingest_records=MAX_RECORDS, als_neighbours=ALS_NEIGHBOURS,
    )  # fmt: skip
    # Embedded by a service of their own: a reader that looked for a snapshot before there was one keeps that answer
    # for its check interval (0.1 s), which a fast machine can take to write all that follows.
    embedding = QueryService(settings)
    vectors = np.stack([embedding.embed_image(photo(i)) for i in range(N_POSTS)])
    model_id = embedding.embedder.model_id
    store = MetadataStore(settings.metadata_database)
    store.record_results(
        InferResult(
            post(i),
            None,
            Prediction(post_id=f"p{i}", status=PostStatus.EMBEDDED, model_id=model_id, faces=faces(i)),
            vectors[i],
        )
        for i in range(N_POSTS)
    )
    publish_read_side(settings, store, [f"p{i}" for i in range(N_POSTS)], [f"u{u}" for u in range(4)])
    return Deployment(settings, QueryService(settings), vectors, model_id)


@asynccontextmanager
async def app_client(settings: Settings, service: QueryService | None = None) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings, service=service))) as client:
        yield client


@pytest.fixture
async def api(deployment: Deployment, redis_url: str) -> AsyncIterator[Client]:
    """The API over the module's deployment, with the API key; Redis emptied before and after."""
    async with app_client(deployment.settings, deployment.service) as client:
        yield client


async def answer(response: aiohttp.ClientResponse, status: int) -> Any:
    """The JSON body of an answer that must have ``status``."""
    assert response.status == status, (response.status, await response.text())
    assert response.content_type == "application/json"
    return await response.json()


async def get(client: Client, path: str, status: int = 200, **params: str | int) -> Any:
    async with client.get(path, params=params) as response:
        return await answer(response, status)


async def upload(client: Client, path: str, body: bytes | aiohttp.FormData, status: int = 200, **params: Any) -> Any:
    headers = {"Content-Type": "image/jpeg"} if isinstance(body, bytes) else None
    async with client.post(path, data=body, params=params, headers=headers) as response:
        return await answer(response, status)


def error(body: dict[str, Any], reason: str | None = None) -> str:
    """An ErrorBody's message; its reason must be ``reason``."""
    assert set(body) == {"error", "reason"} and body["error"], body
    assert body["reason"] == reason, body
    return str(body["error"])


def form(part: str, data: bytes, filename: str | None = "upload.jpg") -> aiohttp.FormData:
    multipart = aiohttp.FormData()
    multipart.add_field(part, data, filename=filename, content_type="image/jpeg")
    return multipart


def ids(body: dict[str, Any]) -> list[str]:
    return [r["post_id"] for r in body["results"]]


def assert_ranked(body: dict[str, Any]) -> None:
    """Neighbours in NeighbourBody's shape, best first, each once."""
    results = body["results"]
    assert all(set(r) == set(NeighbourBody.model_fields) for r in results), results
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(ids(body))) == len(results)


def queues_empty(client: redis.Redis) -> bool:
    return not any(client.llen(q) for q in jobs.all_queues) and not client.xlen(keys.ingest_stream)


# -- the routes, and which tests cover each ---------------------------------------------------------------------

COVERED = {
    ("get", "/similar"): "test_similar_to_a_post_ranks_by_cosine_and_its_topic_first",
    ("post", "/similar"): "test_similar_to_an_uploaded_image_raw_or_multipart_with_filters",
    ("post", "/hashtags"): "test_hashtags_for_an_image_come_from_its_neighbours_factors",
    ("post", "/explain"): "test_explain_a_class_or_a_similarity_as_png_or_json",
    ("get", "/users/{user}"): "test_a_profile_by_user_id_or_username",
    ("get", "/audiences"): "test_an_audience_ranks_users_by_their_share_of_the_interest",
    ("post", "/train/hashtags"): "test_train_and_snapshot_queue_their_task_with_the_key",
    ("post", "/index/snapshot"): "test_train_and_snapshot_queue_their_task_with_the_key",
    ("post", "/ingest"): "test_ingest_queues_the_good_records_and_reports_the_bad_by_line",
    ("delete", "/posts/{post_id}"): "test_delete_forgets_the_post_and_queues_its_removal",
    ("get", "/healthz"): "test_healthz_names_the_missing_writer_then_is_ok_with_its_heartbeat",
    ("get", "/readyz"): "test_livez_readyz_metrics_and_the_openapi_document",
    ("get", "/livez"): "test_livez_readyz_metrics_and_the_openapi_document",
    ("get", "/metrics"): "test_livez_readyz_metrics_and_the_openapi_document",
    ("get", "/openapi.json"): "test_livez_readyz_metrics_and_the_openapi_document",
}


def test_every_route_of_the_app_is_covered_here(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "data", "redis://127.0.0.1:1/0"))
    api = route_table(app) - UI_ROUTES  # the UI's: test_ui.py
    assert api == {(op.method, op.path) for op in OPERATIONS} == set(COVERED)
    assert all(callable(globals().get(name)) for name in COVERED.values())


# -- reads ------------------------------------------------------------------------------------------------------


async def test_similar_to_a_post_ranks_by_cosine_and_its_topic_first(api: Client, deployment: Deployment) -> None:
    body = await get(api, "/similar", post_id="p0", k=6)
    assert body["post_id"] == "p0" and len(body["results"]) == 6
    assert_ranked(body)
    assert ids(body)[0] == "p0" and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert set(ids(body)) == posts_of("sushi")  # the same colour is nearer than any other
    exact = dict(deployment.cosine_ranking(deployment.vectors[0]))
    for result in body["results"]:
        assert result["score"] == pytest.approx(exact[result["post_id"]], abs=1e-4)
    first = body["results"][0]
    assert first == {"post_id": "p0", "score": first["score"], "hashtags": ["sushi", "food"], "owner": "name0",
                     "permalink": "https://www.instagram.com/p/P0/", "faces": 1}  # fmt: skip
    assert len((await get(api, "/similar", post_id="p5"))["results"]) == 10  # k's default

    # Filters: the nearest posts that pass, fetched past the unfiltered top k when needed.
    beach = await get(api, "/similar", post_id="p0", k=3, hashtag="#Beach")  # normalised like stored hashtags
    assert_ranked(beach)
    assert ids(beach) == [pid for pid, _ in deployment.cosine_ranking(deployment.vectors[0], posts_of("beach"))][:3]
    dated = await get(api, "/similar", post_id="p0", k=10, since="2026-01-10", until="2026-01-15T00:00:00+00:00")
    assert set(ids(dated)) == {"p9", "p10", "p11", "p12", "p13"}  # since inclusive, until exclusive
    with_face = await get(api, "/similar", post_id="p1", k=10, has_face="true")
    assert set(ids(with_face)) == {"p0", "p4", "p8", "p12", "p16"} and {r["faces"] for r in with_face["results"]} == {1}
    without = await get(api, "/similar", post_id="p1", k=MAX_K, has_face="false", hashtag="garden")
    assert set(ids(without)) == {f"p{i}" for i in range(N_POSTS) if topic(i) == "garden" and not faces(i)}

    # Errors: JSON with a message, never a 500.
    assert "post_id" in error(await get(api, "/similar", 400))
    assert "p-unknown" in error(await get(api, "/similar", 404, post_id="p-unknown"))
    for bad in ({"k": "0"}, {"k": "ten"}, {"k": str(MAX_K + 1)}, {"since": "yesterday"}, {"until": "2026-13-01"},
                {"has_face": "maybe"}):  # fmt: skip
        message = error(await get(api, "/similar", 400, post_id="p0", **bad))
        assert next(iter(bad)) in message, (bad, message)


async def test_similar_to_an_uploaded_image_raw_or_multipart_with_filters(api: Client, deployment: Deployment) -> None:
    raw = await upload(api, "/similar", photo(4), k=6)
    assert raw["post_id"] is None and ids(raw)[0] == "p4" and raw["results"][0]["score"] >= 0.9999
    assert_ranked(raw)
    assert set(ids(raw)) == posts_of("beach")
    assert await upload(api, "/similar", form("image", photo(4)), k=6) == raw
    # Any part with a file name is the image when none is called "image"; other fields are skipped.
    named = aiohttp.FormData()
    named.add_field("note", "a field before the file")
    named.add_field("file", photo(4), filename="beach.jpg", content_type="image/jpeg")
    assert await upload(api, "/similar", named, k=6) == raw

    sushi = await upload(api, "/similar", photo(4), k=2, hashtag="sushi")
    assert ids(sushi) == [pid for pid, _ in deployment.cosine_ranking(deployment.vectors[4], posts_of("sushi"))][:2]
    beach_faces = await upload(api, "/similar", photo(4), k=3, hashtag="beach", has_face="true")
    assert ids(beach_faces)[0] == "p4" and set(ids(beach_faces)) == {"p4", "p16"}  # only two beach posts with faces
    late = await upload(api, "/similar", photo(4), k=MAX_K, since="2026-01-15")
    assert set(ids(late)) == {"p14", "p15", "p16", "p17"}

    # Bad bodies and parameters.
    assert "empty upload" in error(await upload(api, "/similar", b"", 400))
    error(await upload(api, "/similar", photo(4) + b"\0" * MAX_UPLOAD, 413), "too_large")
    error(await upload(api, "/similar", form("image", b"\0" * (MAX_UPLOAD + 1)), 413), "too_large")
    rejected = await upload(api, "/similar", b"GIF89a but not really an image at all", 422)
    assert rejected["reason"] and rejected["error"]
    no_image = aiohttp.FormData(default_to_multipart=True)  # text fields only would be sent urlencoded
    no_image.add_field("note", "no file here")
    error(await upload(api, "/similar", no_image, 400), "no_image_part")
    async with api.post("/similar", data=b"--nope\r\n\r\n", headers={"Content-Type": "multipart/form-data"}) as bad:
        error(await answer(bad, 400), "malformed_multipart")
    assert "k must be" in error(await upload(api, "/similar", photo(4), 400, k=0))
    assert "since" in error(await upload(api, "/similar", photo(4), 400, since="soon"))


async def test_hashtags_for_an_image_come_from_its_neighbours_factors(api: Client, deployment: Deployment) -> None:
    body = await upload(api, "/hashtags", photo(0), n=3)
    assert set(body) == {"hashtags", "neighbours"}
    neighbours = body["neighbours"]
    assert len(neighbours) == ALS_NEIGHBOURS and neighbours[0] == "p0" and set(neighbours) <= posts_of("sushi")
    tags = body["hashtags"]
    assert len(tags) == 3 and all(set(t) == {"hashtag", "score"} for t in tags)
    scores = [t["score"] for t in tags]
    assert scores == sorted(scores, reverse=True)
    assert {t["hashtag"] for t in tags[:2]} == {"sushi", "food"}  # the neighbours' own hashtags first
    model = deployment.service.hashtag_model()
    expected = model.suggest(np.array([vector_id(pid) for pid in neighbours], np.int64), n=3)
    assert [(t["hashtag"], t["score"]) for t in tags] == [(tag, round(score, 6)) for tag, score in expected]
    assert len((await upload(api, "/hashtags", form("image", photo(7)), n=1))["hashtags"]) == 1

    assert "n must be" in error(await upload(api, "/hashtags", photo(0), 400, n=0))
    assert "empty upload" in error(await upload(api, "/hashtags", b"", 400))
    error(await upload(api, "/hashtags", b"\xff" * (MAX_UPLOAD + 10), 413), "too_large")


async def test_explain_a_class_or_a_similarity_as_png_or_json(api: Client, deployment: Deployment) -> None:
    settings = deployment.settings
    fit = fit_logistic(deployment.vectors, np.arange(N_POSTS) % 3, 3, l2=1e-3)
    LinearHead("topic", 1, list(TOPICS), fit.weight, fit.bias, deployment.model_id, {}).save(settings.heads_dir)
    body = await upload(api, "/explain", photo(0), head="topic", format="json")
    assert set(body) == {"explained", "score", "method", "head", "classes", "png"}
    assert body["explained"] == "class:sushi" and body["head"] == "topic" and body["method"] == DEFAULT_METHOD
    assert body["classes"][0]["name"] == "sushi" and len(body["classes"]) == 3
    assert body["score"] == body["classes"][0]["probability"] and sum(c["probability"] for c in body["classes"]) <= 1
    assert base64.b64decode(body["png"])[:8] == b"\x89PNG\r\n\x1a\n"

    params = {"head": "topic", "class": "garden", "method": "gradcam"}  # format=png, the default; multipart too
    async with api.post("/explain", data=form("image", photo(1)), params=params) as response:
        assert response.status == 200 and response.content_type == "image/png"
        assert (await response.read())[:8] == b"\x89PNG\r\n\x1a\n"

    similar = await upload(api, "/explain", photo(0), similar="p0", format="json")  # p0's own picture
    assert similar["explained"] == "similar:p0" and similar["score"] == pytest.approx(1.0, abs=1e-4)
    assert similar["classes"] == [] and similar["head"] is None
    both = await upload(api, "/explain", photo(3), similar="p1", head="topic", format="json")
    assert both["explained"] == "similar:p1" and both["score"] < 0.99 and both["classes"][0]["name"] == "sushi"

    assert "no head 'nohead'" in error(await upload(api, "/explain", photo(0), 404, head="nohead"))
    assert "no class 'dog'" in error(await upload(api, "/explain", photo(0), 404, head="topic", **{"class": "dog"}))
    assert "not in the index" in error(await upload(api, "/explain", photo(0), 404, similar="unknown"))
    assert "head name" in error(await upload(api, "/explain", photo(0), 400, head="Bad/Name"))
    assert "head is required" in error(await upload(api, "/explain", photo(0), 400))
    assert "format must be" in error(await upload(api, "/explain", photo(0), 400, head="topic", format="gif"))
    assert "method must be" in error(await upload(api, "/explain", photo(0), 400, head="topic", method="lime"))
    error(await upload(api, "/explain", b"<html>not a picture</html>", 422, head="topic"), "not_an_image")
    error(await upload(api, "/explain", b"\xff" * (MAX_UPLOAD + 10), 413, head="topic"), "too_large")


async def test_a_profile_by_user_id_or_username(api: Client) -> None:
    u0 = await get(api, "/users/u0")
    assert u0["user_id"] == "u0" and u0["username"] == "name0" and u0["post_count"] == 4
    assert u0["followers_count"] == 100 and 0 < u0["face_share"] < 1  # of p0, p3, p6, p9 only p0 shows a face
    assert set(u0["hashtags"]) == {"sushi", "food"} and math.isclose(sum(u0["hashtags"].values()), 1.0)
    assert u0["hashtags"]["sushi"] == pytest.approx(0.5)
    assert await get(api, "/users/name0") == u0
    u1 = await get(api, "/users/u1")
    assert u1["post_count"] == 5 and set(u1["hashtags"]) == {"sushi", "food", "beach", "sea"}
    assert u1["hashtags"]["beach"] == pytest.approx(u1["hashtags"]["sea"])  # each post's weight split over its tags
    assert "nobody" in error(await get(api, "/users/nobody", 404))


async def test_an_audience_ranks_users_by_their_share_of_the_interest(api: Client) -> None:
    body = await get(api, "/audiences", interest="#sushi")
    assert body["interest"] == "hashtag:sushi"
    users = body["users"]
    assert [u["user_id"] for u in users] == ["u0", "u1"]  # u0 posts only sushi; u2 and u3 none
    assert users[0]["score"] > users[1]["score"] > 0
    u0 = await get(api, "/users/u0")
    assert users[0] == {"user_id": "u0", "username": "name0", "score": pytest.approx(u0["hashtags"]["sushi"]),
                        "post_count": 4, "followers_count": 100, "median_engagement": u0["median_engagement"],
                        "follower_outlier": u0["follower_outlier"]}  # fmt: skip
    assert await get(api, "/audiences", interest="sushi") == body  # no head has a class sushi: the hashtag
    assert [u["user_id"] for u in (await get(api, "/audiences", interest="#sushi", min_posts=5))["users"]] == ["u1"]
    assert [u["user_id"] for u in (await get(api, "/audiences", interest="#sushi", limit=1))["users"]] == ["u0"]
    high = await get(api, "/audiences", interest="#sushi", min_score=users[1]["score"] + 0.01)
    assert [u["user_id"] for u in high["users"]] == ["u0"]
    assert [u["user_id"] for u in (await get(api, "/audiences", interest="#garden"))["users"]] == ["u3", "u2"]

    assert "interest is required" in error(await get(api, "/audiences", 400))
    assert "#nothing" in error(await get(api, "/audiences", 404, interest="#nothing"))
    assert "finite" in error(await get(api, "/audiences", 400, interest="#sushi", min_score="nan"))
    assert "min_posts" in error(await get(api, "/audiences", 400, interest="#sushi", min_posts=0))


async def test_unknown_paths_and_methods_are_json_errors(api: Client) -> None:
    error(await get(api, "/nothing-here", 404))
    async with api.put("/similar") as response:
        error(await answer(response, 405), "method_not_allowed")
        assert set(response.headers["Allow"].split(",")) == {"GET", "POST"}


# -- health, metrics, the document ------------------------------------------------------------------------------


async def test_healthz_names_the_missing_writer_then_is_ok_with_its_heartbeat(
    api: Client, deployment: Deployment, redis_client: redis.Redis
) -> None:
    degraded = await get(api, "/healthz", 503)
    assert degraded["status"] == "degraded" and degraded["problems"] == ["writer"]
    assert degraded["writer"]["ok"] is False and "no heartbeat" in degraded["writer"]["error"]
    assert degraded["redis"] is True and degraded["database"]["ok"] is True and degraded["blobs"]["ok"] is True
    index = degraded["index"]
    assert index["vectors"] == N_POSTS and index["model_id"] == deployment.model_id and index["kind"] == "flat"
    assert degraded["backlog"] == {"ok": True, "error": None, "unindexed": 0, "oldest_s": None}
    assert degraded["queues"] == dict.fromkeys(jobs.all_queues, 0) and degraded["ingest"]["waiting"] == 0

    settings = deployment.settings
    store = MetadataStore(settings.metadata_database)
    writer = IndexWriter.from_settings(settings, store)
    try:
        WriterUpkeep(settings, writer, store, redis_client, Jobs.for_settings(settings).update_profiles).tick()
    finally:
        writer.close()
    healthy = await get(api, "/healthz")
    assert healthy["status"] == "ok" and healthy["problems"] == []
    assert healthy["writer"]["ok"] is True and healthy["writer"]["vectors"] == N_POSTS


async def test_livez_readyz_metrics_and_the_openapi_document(api: Client) -> None:
    assert await get(api, "/livez") == {"status": "alive"}
    ready = await get(api, "/readyz")
    assert ready["status"] == "ready" and ready["problems"] == [] and ready["index"]["ok"] is True
    await get(api, "/similar", post_id="p0", k=1)
    async with api.get("/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    assert 'deeptarget_api_request_seconds_count{route="/similar",status="200"}' in text
    document = await get(api, "/openapi.json")
    paths = {(method, path) for path, item in document["paths"].items() for method in item}
    assert paths == {(op.method, op.path) for op in OPERATIONS}
    assert document["paths"]["/train/hashtags"]["post"]["security"], "a write endpoint documents its key"


# -- writes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "", "   "])
async def test_write_endpoints_are_closed_without_a_key(
    deployment: Deployment, redis_client: redis.Redis, key: str | None
) -> None:
    settings = deployment.settings.model_copy(update={"api_key": None if key is None else SecretStr(key)})
    if key is not None:  # the settings' validator makes a blank key none; the app refuses one that got past it too
        assert make_settings(settings.data_dir, api_key=SecretStr(key)).api_key is None
    async with app_client(settings, deployment.service) as client:
        for method, path in WRITES:
            for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": API_KEY}):
                body = json.dumps(GOOD_RECORD).encode()
                async with client.request(method, path, data=body, headers=headers) as response:
                    assert "DEEPTARGET_API_KEY" in error(await answer(response, 403)), (method, path)
    assert queues_empty(redis_client)
    assert deployment.service.store.post("p0") is not None


async def test_write_endpoints_refuse_a_missing_or_wrong_key(api: Client, redis_client: redis.Redis) -> None:
    for method, path in WRITES:
        for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": API_KEY[:-1]}, {"X-API-Key": API_KEY + "x"}):
            async with api.request(method, path, data=json.dumps(GOOD_RECORD), headers=headers) as response:
                assert "X-API-Key" in error(await answer(response, 401)), (method, path, headers)
    assert queues_empty(redis_client)


async def test_train_and_snapshot_queue_their_task_with_the_key(api: Client, redis_client: redis.Redis) -> None:
    for path, task, queue in (("/train/hashtags", jobs.train_task, jobs.train_queue),
                              ("/index/snapshot", jobs.snapshot_task, jobs.index_queue)):  # fmt: skip
        async with api.post(path, headers={"X-API-Key": API_KEY}) as response:
            assert await answer(response, 202) == {"task": task, "queue": queue}
        assert [name for name, _ in queued_task_args(redis_client, queue)] == [task]


async def test_ingest_queues_the_good_records_and_reports_the_bad_by_line(
    api: Client, redis_client: redis.Redis
) -> None:
    key = {"X-API-Key": API_KEY}
    lines = [json.dumps(GOOD_RECORD), json.dumps({"id": "no-media-url"}), "not json"]
    async with api.post("/ingest", data="\n".join(lines), headers=key) as response:
        body = await answer(response, 202)
    assert body["accepted"] == 1 and body["rejected_count"] == 2
    assert [r["line"] for r in body["rejected"]] == [2, 3] and all(r["reason"] for r in body["rejected"])
    entries = at_once(redis_client.xrange(keys.ingest_stream))
    assert len(entries) == 1 and b"pushed-1" in b"".join(v for _, fields in entries for v in fields.values())

    async with api.post("/ingest", data=json.dumps([{"id": "x"}, {"id": "y"}]), headers=key) as response:
        nothing = await answer(response, 400)  # a JSON array, every element rejected: nothing queued
    assert nothing["accepted"] == 0 and [r["line"] for r in nothing["rejected"]] == [1, 2]
    async with api.post("/ingest", data=b"  \n", headers=key) as response:
        assert "empty body" in error(await answer(response, 400))
    too_many = "\n".join(json.dumps({**GOOD_RECORD, "id": f"many-{i}"}) for i in range(MAX_RECORDS + 1))
    async with api.post("/ingest", data=too_many, headers=key) as response:
        error(await answer(response, 413), "too_many_records")
    async with api.post("/ingest", data=b"[" + b"{}," * 3, headers=key) as response:
        error(await answer(response, 400))
    assert redis_client.xlen(keys.ingest_stream) == 1  # only the first request queued anything


async def test_delete_forgets_the_post_and_queues_its_removal(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """On a store of its own: the module's deployment stays whole for the other tests."""
    settings = make_settings(tmp_path / "data", redis_url, api_key=SecretStr(API_KEY))
    store = MetadataStore(settings.metadata_database)
    vectors = np.eye(2, 8, dtype=np.float32)
    store.record_results(
        InferResult(
            Post(id=pid, owner=Owner(id="u9")),
            None,
            Prediction(post_id=pid, status=PostStatus.EMBEDDED, model_id="m"),
            v,
        )
        for pid, v in zip(["d1", "d2"], vectors, strict=True)
    )
    async with app_client(settings) as client:
        async with client.delete("/posts/d1", headers={"X-API-Key": API_KEY}) as response:
            assert await answer(response, 200) == {"deleted": ["d1"]}
        async with client.delete("/posts/never-stored", headers={"X-API-Key": API_KEY}) as response:
            assert "never-stored" in error(await answer(response, 404))
    deleted, kept = store.post("d1"), store.post("d2")
    assert (
        deleted is not None and deleted.status == PostStatus.DELETED and list(store.embeddings(["d1"]).post_ids) == []
    )
    assert kept is not None and kept.status == PostStatus.EMBEDDED
    assert queued_task_args(redis_client, jobs.index_queue) == [(jobs.remove_task, [["d1"]])]
    assert [(name, args) for name, args in queued_task_args(redis_client, jobs.profiles_queue)] == [
        (jobs.profiles_task, [["u9"]])
    ]
