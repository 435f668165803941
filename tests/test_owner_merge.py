"""Who may name a crawled post's owner (issue 12, M4, the owner merge): the row's own source fills an unknown owner or
refreshes the same owner's username and followers, never names another; another crawl's merge (an instaloader
folder for a Graph post) changes nothing. In the store on SQLite and PostgreSQL, and end to end: the sandbox crawled
over HTTP, real worker processes, then a hostile instaloader folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis
import skimage.data

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.core.records import Owner, Post, Prediction
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.store.metadata import MetadataStore, StoredPost
from tests.conftest import WorkerFactory
from tests.helpers import crawl, crawl_settings, jpeg_of, offered, post_node, stat, until

ANN = Owner(id="u1", username="ann", followers_count=10)
ATTACKER = Owner(id="attacker", username="attacker", followers_count=1)


def embedded(post: Post, blob: str = "a" * 64) -> tuple[Post, str, Prediction, np.ndarray]:
    return post, blob, Prediction(post_id=post.id, status="embedded", model_id="m"), np.ones(4, np.float32)


def snapshot(stored: StoredPost | None) -> tuple[object, ...]:
    assert stored is not None
    return stored.post.model_dump_json(), stored.blob, stored.status, stored.vector_id


def test_only_the_rows_own_source_names_its_owner_and_never_another_one(metadata_database: str) -> None:
    store = MetadataStore(metadata_database)
    under_hashtag = Post(id="g1", caption="#sea", hashtags=["sea"], like_count=5)  # Graph hashtag media: no owner
    assert store.record_results([embedded(under_hashtag)]).refused == {}
    hostile = Post(id="g1", source="instaloader", caption="#evil", hashtags=["evil"], like_count=9, owner=ATTACKER)
    assert store.upsert_posts([hostile]) == {"g1": "crawled_by_another_source"}  # not even an unknown owner
    assert store.post("g1").post.owner is None and store.post("g1").post.caption == "#sea"

    assert store.upsert_posts([under_hashtag.model_copy(update={"owner": ANN})]) == {}  # the account crawl's merge
    refreshed = Owner(id="u1", username="ann.b", followers_count=12)
    assert store.upsert_posts([under_hashtag.model_copy(update={"owner": refreshed})]) == {}
    assert store.post("g1").post.owner == refreshed
    kept = snapshot(store.post("g1"))
    assert store.upsert_posts([under_hashtag.model_copy(update={"owner": ATTACKER})]) == {"g1": "owner_differs"}
    assert store.upsert_posts([hostile]) == {"g1": "crawled_by_another_source"}
    assert store.upsert_posts([hostile.model_copy(update={"owner": refreshed})]) == {"g1": "crawled_by_another_source"}
    assert snapshot(store.post("g1")) == kept
    assert not store.user_posts("attacker") and store.owners_of(["g1"]) == {"u1"}

    # An instaloader row is its own source's likewise; a row without any owner still learns one from that source.
    folder = Post(id="i1", source="instaloader", caption="#cat", hashtags=["cat"], owner=ANN)
    assert store.record_results([embedded(folder, "b" * 64)]).refused == {}
    assert store.upsert_posts([Post(id="i1", owner=ATTACKER)]) == {"i1": "crawled_by_another_source"}
    assert store.upsert_posts([folder.model_copy(update={"owner": ATTACKER})]) == {"i1": "owner_differs"}
    assert store.post("i1").post.owner == ANN


def test_a_merge_that_reaches_the_store_before_its_post_does(metadata_database: str) -> None:
    """The scraper sends a merge for a post it met before, whose infer task may still wait: the merge makes the row,
    and the crawl that met the post first replaces it whole if the merge came from another source."""
    store = MetadataStore(metadata_database)
    assert store.upsert_posts([Post(id="r1", source="instaloader", caption="#evil", owner=ATTACKER)]) == {}
    recorded = store.record_results([embedded(Post(id="r1", caption="#sea", hashtags=["sea"]))])
    assert recorded.refused == {} and recorded.owners == {"attacker"}  # whose profile loses the post
    row = store.post("r1")
    assert row.post.source == "graph" and row.post.owner is None and row.post.caption == "#sea"
    assert row.status == "embedded" and not store.user_posts("attacker")

    # From the same source (the account crawl's merge before the hashtag post's infer) the owner is kept.
    assert store.upsert_posts([Post(id="r2", owner=ANN)]) == {}
    assert store.record_results([embedded(Post(id="r2", caption="#sea", hashtags=["sea"]))]).owners == {"u1"}
    assert store.post("r2").post.owner == ANN and store.post("r2").post.caption == "#sea"


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_an_instaloader_folder_never_rewrites_a_graph_posts_owner(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, start_worker: WorkerFactory
) -> None:
    """The attacker's re-test: a Graph crawl stored a post with its owner (learnt from the account crawl after the
    hashtag crawl, the same source) and one without; an instaloader folder names both with the attacker as owner.
    Neither changes; each refusal is logged and counted."""
    network = SandboxNetwork(seed=71, n_posts=14, n_users=3, n_hashtags=1, corrupt_share=0.0)
    async with sandbox_server(network) as server:
        by_hashtag = crawl_settings(tmp_path, redis_url, network, server.url, accounts=[])
        start_worker(by_hashtag, [jobs.infer_queue, jobs.profiles_queue], "infer")
        store = MetadataStore(by_hashtag.metadata_database)
        under_hashtag = sorted(i for i in offered(network, by_hashtag) if i in network.media_by_id)
        owner = network.media_by_id[under_hashtag[0]].owner
        account = by_hashtag.model_copy(update={"hashtags": [], "accounts": [owner.username]})
        owned = under_hashtag[0]
        ownerless = next(i for i in under_hashtag if network.media_by_id[i].owner != owner)
        await crawl(by_hashtag)
        await crawl(account)  # a merge: the same source learns the owner of the hashtag post
        everything = offered(network, by_hashtag) | offered(network, account)
        await until(lambda: all((p := store.post(i)) is not None and p.status != "queued" for i in everything),
                    "every crawled post stored")  # fmt: skip
        await until(lambda: store.post(owned).post.owner is not None, "the account crawl's merge stored")
        assert store.post(owned).post.owner == Owner(id=owner.id, username=owner.username,
                                                     followers_count=owner.followers_count)  # fmt: skip
        assert store.post(ownerless).post.owner is None
        before = {i: snapshot(store.post(i)) for i in (owned, ownerless)}

        folder = tmp_path / "downloads" / "attacker"
        folder.mkdir(parents=True)
        for k, post_id in enumerate((owned, ownerless)):
            node = post_node(post_id, "hijacked #evil", 999_999, owner={"id": "attacker", "username": "attacker"})
            stem = f"2024-01-0{k + 7}_00-00-00_UTC"
            (folder / f"{stem}.json").write_text(json.dumps({"node": node, "instaloader": {"node_type": "Post"}}))
            (folder / f"{stem}.jpg").write_bytes(jpeg_of(skimage.data.camera()))
        # The scraper sends no merge for a post whose owner it knows; one that forgot (a Redis without the set,
        # another host's) does, and the store refuses it.
        redis_client.srem(keys.owner_known_key, owned)
        folder_only = account.model_copy(update={"accounts": [], "instaloader_dirs": [folder.parent]})
        counts = await crawl(folder_only)
        assert counts["merged_owner"] == 2  # sent: the store is what decides
        await until(lambda: stat(redis_client, "refused:crawled_by_another_source") == 2, "both refusals counted")
        # The folder's merges count as known for the folder only: the Graph account crawl may still send the real
        # owner of the post it has none for yet.
        assert not redis_client.sismember(keys.owner_known_key, ownerless)

    assert {i: snapshot(store.post(i)) for i in (owned, ownerless)} == before
    assert not store.user_posts("attacker") and store.profile("attacker") is None
    log = (tmp_path / "worker-infer.log").read_text()
    assert f"merge_posts: post {owned} not written: another crawl stored this post" in log
