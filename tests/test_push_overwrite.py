"""Who may overwrite a post (issue 12, M4), on real parts: the sandbox crawled over HTTP, the real Redis ingest stream
and seen set, real worker processes writing the store, the index and the API.

A crawl is the truth about its own posts: a pushed record for an id a crawl stored rewrites nothing, whether the
scraper knows the id (it ignores the push) or has forgotten it (the store refuses the write). Pushed and crawled posts
share one id space, so the pusher's id is the post's id everywhere; the first record of a pushed id wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from deeptarget import jobs
from deeptarget.api.app import create_app
from deeptarget.core import keys
from deeptarget.core.records import Owner, Post, Prediction, vector_id
from deeptarget.index.vectors import SnapshotStore
from deeptarget.jobs import Jobs
from deeptarget.runtime.app_server import AppServer
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.scraper.push import IngestStream, parse_posts
from deeptarget.store.metadata import MetadataStore, StoredPost
from tests.conftest import WorkerFactory, make_settings
from tests.helpers import crawl, crawl_settings, image_url, offered, pushable, stat, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HOSTILE = {"caption": "hijacked #evil", "hashtags": ["evil"], "like_count": 999_999, "comments_count": 7,
           "owner": {"id": "attacker", "username": "attacker", "followers_count": 1},
           "permalink": "https://evil.example/p/1/"}  # fmt: skip


def fields(stored: StoredPost | None) -> tuple[object, ...]:
    """What a push must not change: every field, the source, the image and the outcome."""
    assert stored is not None
    return stored.post.model_dump_json(), stored.blob, stored.status, stored.vector_id


async def push(redis_url: str, *records: dict[str, object]) -> None:
    posts, bad = parse_posts([json.dumps(r) for r in records])
    assert not bad, bad
    client = aioredis.Redis.from_url(redis_url)
    try:
        await IngestStream(client).push(posts)
    finally:
        await client.aclose()


async def test_a_push_never_rewrites_a_crawled_post_and_the_first_push_of_an_id_wins(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, start_worker: WorkerFactory
) -> None:
    network = SandboxNetwork(seed=61, n_posts=16, n_users=3, n_hashtags=1, corrupt_share=0.0)
    async with sandbox_server(network) as server:
        # Hashtag crawls bring posts without their owner: the case a pushed owner used to fill in (and rewrite all).
        settings = crawl_settings(tmp_path, redis_url, network, server.url, accounts=[])
        follow = settings.model_copy(update={"hashtags": []})  # later rounds only take pushed posts
        start_worker(settings, [jobs.infer_queue, jobs.profiles_queue], "infer")
        start_worker(settings, [jobs.index_queue], "index", pool="solo")
        store = MetadataStore(settings.metadata_database)
        crawled = offered(network, settings)
        await crawl(settings)
        await until(lambda: store.status_counts().get("indexed") == len(crawled), "every crawled post indexed")
        x, y = [m for m in network.media if m.id in crawled and m.kind == "IMAGE"][:2]
        before = {m.id: fields(store.post(m.id)) for m in (x, y)}
        assert store.post(x.id).post.owner is None and store.post(x.id).post.source == "graph"
        other = [m for m in pushable(network) if m.id not in (x.id, y.id)]

        # x: the scraper has seen it and ignores the push. y: a scraper that forgot it (a Redis without the seen set,
        # another host's) fetches the pushed image, and the store refuses the write. z: a new id, stored as pushed.
        redis_client.srem(keys.seen_posts_key, y.id)
        first_z = {"id": "partner-z", "media_url": image_url(server.url, other[2]), "caption": "first #partner"}
        await push(redis_url, {"id": x.id, "media_url": image_url(server.url, other[0]), **HOSTILE},
                   {"id": y.id, "media_url": image_url(server.url, other[1]), **HOSTILE}, first_z)  # fmt: skip
        await crawl(follow)
        # z and y were one batch, one infer task, one transaction of the store: z stored, y's fate is known.
        await until(lambda: (p := store.post("partner-z")) is not None and p.status == "indexed", "z indexed")
        assert {m.id: fields(store.post(m.id)) for m in (x, y)} == before
        await until(lambda: stat(redis_client, "refused:known_from_a_crawl") == 1, "the refusal of y counted")
        z = fields(store.post("partner-z"))

        # z pushed again with an owner and other fields (the scraper has seen it), then with another image by a
        # scraper that forgot it: the first push wins both times.
        await push(redis_url, {"id": "partner-z", "media_url": image_url(server.url, other[3]), **HOSTILE})
        await crawl(follow)
        redis_client.srem(keys.seen_posts_key, "partner-z")
        sentinel = {"id": "partner-s", "media_url": image_url(server.url, other[5])}  # shares z's infer task
        await push(redis_url, {"id": "partner-z", "media_url": image_url(server.url, other[4]), **HOSTILE}, sentinel)
        await crawl(follow)
        await until(lambda: (p := store.post("partner-s")) is not None and p.status == "indexed", "the sentinel")
        assert fields(store.post("partner-z")) == z
        await until(lambda: stat(redis_client, "refused:pushed_before") == 1, "the refusal of z's second image")

        Jobs.for_settings(settings).snapshot()
        await until(lambda: vector_id("partner-z") in (SnapshotStore(settings.index_dir).load() or []), "a snapshot")
        async with AppServer(create_app(settings)) as api, aiohttp.ClientSession() as http:
            response = await http.get(f"{api.url}/similar", params={"post_id": "partner-z", "k": "3"})
            assert response.status == 200
            similar = (await response.json())["results"]

    assert {m.id: fields(store.post(m.id)) for m in (x, y)} == before  # caption, hashtags, likes, owner, image
    assert fields(store.post("partner-z")) == z
    stored_z = store.post("partner-z")
    assert stored_z.post.source == "push" and stored_z.post.caption == "first #partner" and stored_z.post.owner is None
    assert stat(redis_client, "push_ignored:known_id") == 2  # x, and z pushed again
    assert similar[0]["post_id"] == "partner-z"  # the pusher's id names the post in the API
    log = (tmp_path / "worker-infer.log").read_text()
    assert f"post {y.id} not written: a crawl stored this post" in log
    assert "post partner-z not written: this id was pushed before" in log
    assert store.profile("attacker") is None and not store.user_posts("attacker")


def embedded(post: Post, blob: str, value: float) -> tuple[Post, str, Prediction, np.ndarray]:
    prediction = Prediction(post_id=post.id, status="embedded", model_id="m")
    return post, blob, prediction, np.full(4, value, np.float32)


def test_the_store_decides_who_may_overwrite_a_post(metadata_database: str) -> None:
    """The rule in the store itself, on SQLite and PostgreSQL (its SQL differs: the upsert's WHERE)."""
    store = MetadataStore(metadata_database)
    owner = Owner(id="u1", username="ann", followers_count=10)
    crawled = Post(id="c1", caption="#sea", hashtags=["sea"], like_count=5)
    hostile = Post(id="c1", source="push", caption="#evil", hashtags=["evil"], like_count=9, owner=Owner(id="bad"))
    assert store.record_results([embedded(crawled, "a" * 64, 1.0)]).refused == {}
    assert store.record_results([embedded(hostile, "b" * 64, 2.0)]).refused == {"c1": "known_from_a_crawl"}
    assert store.record_results([embedded(hostile, "a" * 64, 2.0)]).refused == {"c1": "known_from_a_crawl"}
    assert store.upsert_posts([hostile]) == {"c1": "known_from_a_crawl"}
    assert store.upsert_posts([crawled.model_copy(update={"owner": owner})]) == {}  # a crawl learns the owner
    kept = store.post("c1")
    assert kept.post.caption == "#sea" and kept.post.owner == owner and kept.blob == "a" * 64
    assert store.embeddings(["c1"]).vectors.tolist() == [[1.0] * 4]

    pushed = Post(id="p1", source="push", caption="first", hashtags=["first"], owner=Owner(id="partner"))
    again = Post(id="p1", source="feed", caption="second", hashtags=["second"], owner=owner)
    assert store.record_results([embedded(pushed, "c" * 64, 1.0)]).refused == {}
    assert store.record_results([embedded(pushed, "c" * 64, 3.0)]).refused == {}  # a retry, a re-embedding
    assert store.record_results([embedded(again, "d" * 64, 4.0)]).refused == {"p1": "pushed_before"}
    assert store.upsert_posts([again]) == {"p1": "pushed_before"}
    # A crawl's fields alone never mix with a pushed image; the crawl with its own image replaces the row whole.
    assert store.upsert_posts([Post(id="p1", caption="crawled", owner=owner)]) == {"p1": "pushed_first"}
    assert store.post("p1").post.caption == "first" and store.embeddings(["p1"]).vectors.tolist() == [[3.0] * 4]
    recorded = store.record_results([embedded(Post(id="p1", caption="crawled #real"), "e" * 64, 5.0)])
    assert recorded.refused == {} and recorded.owners == {"partner"}  # whose profile loses the post
    replaced = store.post("p1")
    assert replaced.post.source == "graph" and replaced.post.caption == "crawled #real"
    assert replaced.post.hashtags == [] and replaced.post.owner is None and replaced.blob == "e" * 64
    assert store.record_results([embedded(again, "e" * 64, 6.0)]).refused == {"p1": "known_from_a_crawl"}


# -- L8: a pushed record's source is the server's to say; its permalink is a link people may open ----------------------
HOSTILE_PERMALINKS = [
    ("javascript:alert(document.cookie)", "permalink: an https URL of the post is required"),
    ("JaVaScRiPt:alert(1)", "permalink: an https URL of the post is required"),
    ("data:text/html,<script>alert(1)</script>", "permalink: an https URL of the post is required"),
    ("vbscript:msgbox(1)", "permalink: an https URL of the post is required"),
    ("file:///etc/passwd", "permalink: an https URL of the post is required"),
    ("http://www.instagram.com/p/abc/", "permalink: an https URL of the post is required"),
    ("/p/abc/", "permalink: an https URL of the post is required"),
    ("//evil.example/p/abc/", "permalink: an https URL of the post is required"),
    ("www.instagram.com/p/abc/", "permalink: an https URL of the post is required"),
    ("https://", "permalink: the URL has no host"),
    ("https:///p/abc/", "permalink: the URL has no host"),
    ("https://user:pw@www.instagram.com/p/abc/", "permalink: no user:password@ in the URL"),
    ("https://www.instagram.com:99999/p/abc/", "permalink: not a URL"),
    ("https://[::1/p/abc/", "permalink: not a URL"),
    ("https://www.instagram.com/p/a\x00b/", "permalink: control characters are not allowed"),
    ("https://www.instagram.com/p/\x1b[31mred/", "permalink: control characters are not allowed"),
    ("https://www.instagram.com/p/abc/\n", "permalink: control characters are not allowed"),
    (" https://www.instagram.com/p/abc/", "permalink: spaces and backslashes are not allowed"),
    ("https://www.instagram.com\\@evil.example/", "permalink: spaces and backslashes are not allowed"),
    ("https://www.instagram.com/p/\u202egpj.exe/", "permalink: invisible formatting characters"),
    ("https://www.insta\u200bgram.com/p/abc/", "permalink: invisible formatting characters"),
    ("https://www.instagram.com/p/" + "a" * 2048, "permalink: longer than 2048 characters"),
    (12345, "permalink: must be a string"),
    (["https://www.instagram.com/p/abc/"], "permalink: must be a string"),
]


@pytest.mark.parametrize(("permalink", "why"), HOSTILE_PERMALINKS)
def test_a_hostile_permalink_is_refused_with_its_reason(permalink: object, why: str) -> None:
    record = {"id": "p1", "media_url": "https://cdn.example/1.jpg", "permalink": permalink}
    posts, bad = parse_posts([json.dumps(record)])
    assert not posts and len(bad) == 1 and bad[0].reason.startswith(why), bad


def test_a_permalink_is_an_absolute_https_url_or_nothing() -> None:
    links = ["https://www.instagram.com/p/abc/", "HTTPS://www.instagram.com/p/abc/?igsh=1", None]
    posts, bad = parse_posts([json.dumps({"id": "p1", "media_url": "http://cdn.example/1.jpg", "permalink": link})
                              for link in links])  # fmt: skip
    assert not bad and [p.permalink for p in posts] == links


def test_a_pushed_record_cannot_name_its_source() -> None:
    for source in ("graph", "instaloader", "push", None):
        posts, bad = parse_posts([json.dumps({"id": "p1", "media_url": "https://cdn.example/1.jpg", "source": source})])
        assert not posts and bad[0].reason.startswith("unknown field(s): source"), bad
    posts, _ = parse_posts([json.dumps({"id": "p1", "media_url": "https://cdn.example/1.jpg"})], source="feed")
    assert posts[0].source == "feed" and posts[0].pushed
    with pytest.raises(ValueError, match="a pushed record's source"):  # no caller can make a push pass for a crawl
        parse_posts([json.dumps({"id": "p1", "media_url": "https://cdn.example/1.jpg"})], source="graph")  # type: ignore[arg-type]


async def test_ingest_stores_pushed_posts_as_push_and_refuses_a_bad_permalink(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """Through ``POST /ingest`` into the real Redis stream."""
    key = "k" * 20
    settings = make_settings(tmp_path / "data", redis_url, api_key=SecretStr(key))
    body = "\n".join(json.dumps(r) for r in [
        {"id": "ok1", "media_url": "https://cdn.example/1.jpg", "permalink": "https://www.instagram.com/p/ok1/"},
        {"id": "bad1", "media_url": "https://cdn.example/2.jpg", "permalink": "javascript:alert(1)"},
        {"id": "bad2", "media_url": "https://cdn.example/3.jpg", "source": "graph"},
    ]).encode()  # fmt: skip
    async with AppServer(create_app(settings)) as api, aiohttp.ClientSession() as http:
        response = await http.post(f"{api.url}/ingest", data=body, headers={"X-API-Key": key})
        assert response.status == 202
        answer = await response.json()
    assert answer["accepted"] == 1
    reasons = {r["line"]: r["reason"] for r in answer["rejected"]}
    assert reasons[2].startswith("permalink: an https URL of the post is required")
    assert reasons[3].startswith("unknown field(s): source")
    entries = redis_client.xrange(keys.ingest_stream)
    assert [Post.model_validate_json(fields[b"post"]).source for _, fields in entries] == ["push"]
