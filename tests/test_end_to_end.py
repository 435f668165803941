"""The whole flow on real parts: embedded Redis, the sandbox over HTTP, the scraper, real Celery worker processes
(infer/profiles/train and a separate index writer), the metadata store, FAISS snapshots, the API."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import redis
from pydantic import SecretStr

from deeptarget import jobs
from deeptarget.api.app import create_app
from deeptarget.core import keys
from deeptarget.core.records import vector_id
from deeptarget.core.settings import Settings
from deeptarget.index.deltas import DeltaStream
from deeptarget.index.segments import LiveReader
from deeptarget.index.vectors import SnapshotStore
from deeptarget.jobs import Jobs
from deeptarget.runtime.app_server import AppServer
from deeptarget.runtime.embedded_redis import EmbeddedRedis, free_port
from deeptarget.runtime.processes import spawn_worker, stop_processes
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.sandbox.network import Media
from deeptarget.store.metadata import MetadataStore
from deeptarget.store.versioned import VersionedDir
from tests.conftest import make_settings, snapshot_size, wait_for_worker
from tests.helpers import crawl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass
class Run:
    settings: Settings
    network: SandboxNetwork
    store: MetadataStore
    logs: Path
    posts: set[str]  # the post ids the crawl of the configured targets must collect (SandboxNetwork.offered)

    def indexed_media(self) -> list[Media]:
        """Visible media with images, in network order, whose first image (the album's own id) was indexed."""
        return [m for m in self.network.media if m.id in self.posts and self.store.post(m.id).status == "indexed"]


def _wait(condition, timeout_s: float, what: str, workers: list[subprocess.Popen[bytes]], logs: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for worker in workers:
            assert worker.poll() is None, f"a worker died: see {logs}"
        if time.monotonic() > deadline:
            tails = "\n".join(p.read_text()[-3000:] for p in logs.glob("worker-*.log"))
            raise AssertionError(f"{what} not reached in {timeout_s} s\n{tails}")
        time.sleep(0.2)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def run(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    """The whole flow, once with the metadata store on SQLite and once on PostgreSQL (as several hosts share it)."""
    redis.Redis.from_url(redis_server.url).flushall()
    root = tmp_path_factory.mktemp("e2e")
    network = SandboxNetwork(seed=21, n_posts=60, n_users=10, n_hashtags=6, corrupt_share=0.08)
    database = {}
    if request.param == "postgresql":
        database["database_url"] = request.getfixturevalue("postgres_server").create_database()
    settings = make_settings(
        root / "data",
        redis_server.url,
        **database,
        batch_size=8,
        page_size=10,
        hashtags=network.hashtags,
        accounts=[a.username for a in network.accounts],
    )
    logs = root / "logs"
    logs.mkdir()
    workers = [
        spawn_worker(
            settings,
            [jobs.infer_queue, jobs.profiles_queue, jobs.train_queue],
            name="infer",
            log_file=logs / "worker-infer.log",
        ),
        spawn_worker(settings, [jobs.index_queue], name="index", pool="solo", log_file=logs / "worker-index.log"),
    ]
    try:
        for worker, name in zip(workers, ("infer", "index"), strict=True):
            wait_for_worker(settings, name, worker, logs / f"worker-{name}.log")

        async def crawl_sandbox() -> None:
            async with sandbox_server(network) as server:
                await crawl(settings.model_copy(update={"source_url": server.url}))

        asyncio.run(crawl_sandbox())
        store = MetadataStore(settings.metadata_database)
        seen = redis.Redis.from_url(redis_server.url).scard(keys.seen_posts_key)

        def settled() -> bool:
            counts = store.status_counts()
            return counts.get("indexed", 0) + counts.get("rejected", 0) == seen and not counts.get("embedded")

        _wait(settled, 300, "every post indexed or rejected", workers, logs)
        send = Jobs.for_settings(settings)
        send.snapshot()
        send.train_hashtags()
        snapshots, models = VersionedDir(settings.index_dir, ".faiss"), VersionedDir(settings.hashtag_model_dir, ".npz")
        indexed = store.status_counts()["indexed"]
        _wait(
            lambda: snapshot_size(settings.index_dir) == indexed and models.current(),
            120,
            "snapshot with every indexed post and a hashtag model",
            workers,
            logs,
        )
        _wait(lambda: store.profile_backlog() == 0, 120, "profiles up to date", workers, logs)
        assert snapshots.current()
        # On PostgreSQL no process fell back to a SQLite file of its own.
        assert (settings.data_dir / "metadata.sqlite3").exists() == (request.param == "sqlite")
        posts = network.offered(settings.hashtags, settings.accounts, settings.hashtag_edge)
        yield Run(settings, network, store, logs, posts)
    finally:
        stop_processes(workers, timeout_s=20)


@pytest.fixture
async def api(run: Run) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    settings = run.settings.model_copy(update={"max_upload_bytes": 2_000_000})
    async with AppServer(create_app(settings)) as server, aiohttp.ClientSession() as http:
        yield server.url, http


def test_every_post_is_indexed_or_rejected_with_a_reason_none_lost_none_twice(run: Run) -> None:
    media_ids = run.posts
    assert len(media_ids) >= 30
    stored = {pid: run.store.post(pid) for pid in media_ids}
    assert all(p is not None for p in stored.values()), "a post was lost"
    assert sum(run.store.status_counts().values()) == len(media_ids), "a post no target offers was stored"
    statuses = {pid: p.status for pid, p in stored.items()}
    assert set(statuses.values()) <= {"indexed", "rejected"}
    assert all(p.reason for p in stored.values() if p.status == "rejected")
    index = SnapshotStore(run.settings.index_dir).load()
    indexed = [pid for pid, s in statuses.items() if s == "indexed"]
    assert index.ntotal == len(indexed)  # nothing indexed twice
    assert all(vector_id(pid) in index for pid in indexed)
    assert sum(s == "indexed" for s in statuses.values()) >= len(media_ids) - 10


def test_broken_images_are_rejected_with_their_reasons(run: Run) -> None:
    broken = [m for m in run.network.media if m.corruption and m.id in run.posts]
    assert {m.corruption for m in broken} >= {"truncated", "html"}
    expected = {
        "html": {"not_an_image"},
        "truncated": {"truncated_image", "corrupt_image"},
        "garbage": {"not_an_image", "corrupt_image"},
    }
    for media in broken:
        stored = run.store.post(media.id)
        assert stored.status == "rejected" and stored.reason in expected[media.corruption], (media, stored)


def test_every_user_with_posts_has_a_profile_counting_them(run: Run) -> None:
    owners = run.store.owner_ids()
    assert len(owners) >= 5
    albums = 0
    for owner in owners:
        profile = run.store.profile(owner)
        images = {p.post.id for p in run.store.user_posts(owner) if p.status == "indexed"}
        # A carousel album is one post however many of its images were indexed.
        posts = [m for m in run.network.media if m.owner.id == owner and images & set(m.image_ids)]
        assert sum(len(images & set(m.image_ids)) for m in posts) == len(images)  # each image is one of theirs
        assert profile is not None and profile.post_count == len(posts)
        albums += sum(len(images & set(m.image_ids)) > 1 for m in posts)
        assert abs(sum(profile.hashtags.values()) - 1) < 1e-3
    assert albums, "no album with several indexed images: the test proves nothing about albums"
    published = redis.Redis.from_url(run.settings.redis_url).xlen(keys.profiles_stream)
    assert published >= len(owners)


async def test_similar_by_post_id_returns_the_post_first(run: Run, api) -> None:
    url, http = api
    for media in run.indexed_media()[:5]:
        async with http.get(f"{url}/similar", params={"post_id": media.id, "k": "5"}) as response:
            assert response.status == 200
            results = (await response.json())["results"]
        assert results[0]["post_id"] == media.id and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(results) == 5 and results[0]["hashtags"] == list(media.hashtags)


async def test_an_uploaded_copy_of_a_posts_image_finds_that_post_first(run: Run, api) -> None:
    url, http = api
    for media in run.indexed_media()[:5]:
        async with http.post(f"{url}/similar?k=3", data=media.image_bytes()) as response:
            assert response.status == 200, await response.text()
            results = (await response.json())["results"]
        assert results[0]["post_id"] == media.id and results[0]["score"] > 0.999


async def test_hashtag_suggestions_for_uploaded_images(run: Run, api) -> None:
    url, http = api
    vocabulary = {t for m in run.network.media for t in m.hashtags}
    hits = 0
    indexed = run.indexed_media()[:12]
    for media in indexed:
        form = aiohttp.FormData()
        form.add_field("image", media.image_bytes(), filename="upload.jpg", content_type="image/jpeg")
        async with http.post(f"{url}/hashtags?n=5", data=form) as response:
            assert response.status == 200, await response.text()
            payload = await response.json()
        tags = [h["hashtag"] for h in payload["hashtags"]]
        assert len(tags) == 5 and set(tags) <= vocabulary
        assert payload["neighbours"][0] == media.id
        hits += media.topic.hashtag in tags
    assert hits >= len(indexed) // 2, f"the post's own topic was in the top 5 for only {hits}/{len(indexed)}"


async def test_user_profiles_by_id_and_username(run: Run, api) -> None:
    url, http = api
    indexed = run.indexed_media()
    account = max(run.network.accounts, key=lambda a: sum(m.owner is a for m in indexed))
    async with http.get(f"{url}/users/{account.username}") as by_name, http.get(f"{url}/users/{account.id}") as by_id:
        assert by_name.status == by_id.status == 200
        assert (await by_name.json())["user_id"] == (await by_id.json())["user_id"] == account.id
    async with http.get(f"{url}/users/nobody") as response:
        assert response.status == 404 and "nobody" in (await response.json())["error"]


async def test_bad_requests_get_json_errors(run: Run, api) -> None:
    url, http = api
    cases = [
        (http.get(f"{url}/similar"), 400),
        (http.get(f"{url}/similar", params={"post_id": "404404"}), 404),
        (http.get(f"{url}/similar", params={"post_id": run.indexed_media()[0].id, "k": "0"}), 400),
        (http.post(f"{url}/similar", data=b"<html>not an image</html>"), 422),
        (http.post(f"{url}/hashtags", data=b""), 400),
        (http.post(f"{url}/similar", data=np.zeros(3_000_000, np.uint8).tobytes()), 413),
    ]
    for request, status in cases:
        async with request as response:
            assert response.status == status, await response.text()
            assert "error" in await response.json()


async def test_health_and_metrics(run: Run, api) -> None:
    url, http = api
    async with http.get(f"{url}/healthz") as response:
        health = await response.json()
        assert response.status == 200 and health["redis"] is True and health["index"]["vectors"] > 0
    async with http.get(f"{url}/metrics") as response:
        assert "deeptarget_api_request_seconds" in await response.text()


async def test_similar_with_filters(run: Run, api) -> None:
    url, http = api
    media = run.indexed_media()[0]
    tag = media.topic.hashtag
    params = {"post_id": media.id, "k": "8", "hashtag": f"#{tag.upper()}"}
    async with http.get(f"{url}/similar", params=params) as response:
        results = (await response.json())["results"]
    assert results and all(tag in r["hashtags"] for r in results)
    for has_face in ("true", "false"):
        async with http.get(f"{url}/similar", params={"post_id": media.id, "has_face": has_face}) as response:
            faces = [r["faces"] for r in (await response.json())["results"]]
        assert all((f > 0) == (has_face == "true") for f in faces)
    async with http.get(f"{url}/similar", params={"post_id": media.id, "since": "2999-01-01"}) as response:
        assert response.status == 200 and (await response.json())["results"] == []
    async with http.get(f"{url}/similar", params={"post_id": media.id, "until": "yesterday"}) as response:
        assert response.status == 400 and "ISO" in (await response.json())["error"]


async def test_audiences_rank_users_by_their_share_of_an_interest(run: Run, api) -> None:
    url, http = api
    tag = run.indexed_media()[0].topic.hashtag
    async with http.get(f"{url}/audiences", params={"interest": f"#{tag}", "limit": "50"}) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["interest"] == f"hashtag:{tag}"
    scores = [u["score"] for u in body["users"]]
    assert scores and scores == sorted(scores, reverse=True)
    for user in body["users"]:
        assert run.store.profile(user["user_id"]).hashtags[tag] == pytest.approx(user["score"], abs=1e-6)
    async with http.get(f"{url}/audiences", params={"interest": "#nothing-like-it"}) as response:
        assert response.status == 404 and "hashtag:nothing-like-it" in (await response.json())["error"]


async def test_openapi_document_describes_every_route(run: Run, api) -> None:
    url, http = api
    async with http.get(f"{url}/openapi.json") as response:
        document = await response.json()
    assert document["openapi"].startswith("3.")
    assert {"/similar", "/hashtags", "/users/{user}", "/audiences", "/train/hashtags", "/healthz"} <= set(
        document["paths"]
    )
    assert set(document["paths"]["/similar"]) == {"get", "post"}
    assert document["paths"]["/train/hashtags"]["post"]["security"] == [{"ApiKey": []}]
    assert "SimilarBody" in document["components"]["schemas"]


async def test_write_endpoints_need_the_api_key(run: Run) -> None:
    async with (
        AppServer(create_app(run.settings)) as server,
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/train/hashtags") as response,
    ):
        assert response.status == 403 and "DEEPTARGET_API_KEY" in (await response.json())["error"]
    keyed = run.settings.model_copy(update={"api_key": SecretStr("s3cret-key")})
    models = VersionedDir(run.settings.hashtag_model_dir, ".npz")
    before = models.current()
    async with AppServer(create_app(keyed)) as server, aiohttp.ClientSession() as http:
        for headers in ({}, {"X-API-Key": "guess"}):
            async with http.post(f"{server.url}/train/hashtags", headers=headers) as response:
                assert response.status == 401, await response.text()
        async with http.post(f"{server.url}/train/hashtags", headers={"X-API-Key": "s3cret-key"}) as response:
            assert response.status == 202 and (await response.json())["queue"] == jobs.train_queue
    deadline = time.monotonic() + 60
    while models.current() == before:  # the running worker refits on demand
        assert time.monotonic() < deadline, "the hashtag model was not refitted"
        time.sleep(0.2)


def test_audience_query_and_profile_export_from_the_cli(run: Run, tmp_path: Path) -> None:
    env = {**os.environ, **run.settings.model_copy(update={"redis_url": None}).to_env()}
    tag = run.indexed_media()[0].topic.hashtag

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "deeptarget", *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    audience = json.loads(cli("query", "audience", tag, "-k", "3"))
    assert audience["interest"] == f"hashtag:{tag}" and 1 <= len(audience["users"]) <= 3
    assert "profiles written" in cli("profiles", "export", str(tmp_path / "profiles.parquet"))
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "profiles.parquet").num_rows == len(run.store.profiles())


def test_query_cli_reads_the_newest_snapshot_without_redis(run: Run) -> None:
    media = run.indexed_media()[0]
    env = {**os.environ, **run.settings.model_copy(update={"redis_url": None}).to_env()}

    def query(*args: str) -> object:
        done = subprocess.run([sys.executable, "-m", "deeptarget", "query", *args], env=env, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    assert query("similar", "--post-id", media.id, "-k", "3")[0]["post_id"] == media.id
    assert query("user", media.owner.username)["user_id"] == media.owner.id
    done = subprocess.run([sys.executable, "-m", "deeptarget", "query", "user", "nobody"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2 and "no profile for user 'nobody'" in done.stderr


async def test_health_reports_a_dead_redis(run: Run) -> None:
    dead = run.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with AppServer(create_app(dead)) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/healthz") as response:
            health = await response.json()
        assert response.status == 503 and health["redis"].startswith("down")
        async with http.get(f"{server.url}/similar", params={"post_id": run.indexed_media()[0].id}) as response:
            assert response.status in (200, 404)  # queries need no Redis: they read the snapshot and the store


async def test_a_deleted_post_leaves_the_index_and_its_owners_profile(run: Run) -> None:
    """Last in this module: it deletes a post from the shared run."""
    keyed = run.settings.model_copy(update={"api_key": SecretStr("s3cret-key")})
    # A single image: an album stays one post of its owner's while any of its images is left.
    media = next(m for m in run.indexed_media() if m.kind == "IMAGE")
    owner_posts = run.store.profile(media.owner.id).post_count
    key = {"X-API-Key": "s3cret-key"}
    async with AppServer(create_app(keyed)) as server, aiohttp.ClientSession() as http:
        async with http.delete(f"{server.url}/posts/{media.id}") as response:
            assert response.status == 401
        async with http.delete(f"{server.url}/posts/{media.id}", headers=key) as response:
            assert response.status == 200 and (await response.json())["deleted"] == [media.id]
        async with http.delete(f"{server.url}/posts/no-such-post", headers=key) as response:
            assert response.status == 404
        deadline = time.monotonic() + 60
        while True:
            async with http.get(f"{server.url}/similar", params={"post_id": media.id}) as response:
                if response.status == 404:
                    break
            assert time.monotonic() < deadline, "the deleted post is still in the published index"
            await asyncio.sleep(0.2)
    assert run.settings.redis_url  # a reader that starts now, from the base and the writer's changes since
    reader = LiveReader(SnapshotStore(run.settings.index_dir), DeltaStream.from_url(run.settings.redis_url))
    index = reader.get()
    reader.close()
    assert index is not None and vector_id(media.id) not in index
    assert run.store.post(media.id).status == "deleted"
    deadline = time.monotonic() + 60
    while run.store.profile(media.owner.id).post_count != owner_posts - 1:
        assert time.monotonic() < deadline, "the owner's profile still counts the deleted post"
        await asyncio.sleep(0.2)
