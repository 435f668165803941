from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import redis
from prometheus_client import REGISTRY

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.sandbox import SandboxNetwork, sandbox_server
from deeptarget.scraper.tokens import fingerprint
from deeptarget.store.blobs import BlobStore
from tests.helpers import assert_each_image_once, crawl, crawl_settings, offered, server_stats
from tests.queue_messages import queued_post_refs, queued_task_args


async def test_a_crawl_enqueues_every_post_once_and_rejects_broken_images(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=11, n_posts=70, n_users=10, n_hashtags=5, corrupt_share=0.1)
    async with sandbox_server(network) as server:
        settings = crawl_settings(tmp_path, redis_url, network, server.url)
        counts = await crawl(settings)
        stats = await server_stats(server.url)

    expected = offered(network, settings)
    assert_each_image_once(redis_client, stats, expected)
    refs = queued_post_refs(redis_client)
    by_id = {r["post"]["id"]: r for r in refs}
    for media in (m for m in network.media if m.visible and m.kind == "IMAGE"):
        ref = by_id[media.id]
        if media.corruption == "html":
            assert ref["rejected"] == "not_an_image" and ref["blob"] is None
        elif media.corruption is None:
            assert ref["rejected"] is None and ref["blob"] in BlobStore(settings.blob_dir)
            assert ref["post"]["owner"]["followers_count"] == media.owner.followers_count  # accounts come first
            assert ref["post"]["hashtags"] == list(media.hashtags)
    assert counts["enqueued"] == len(expected)
    assert counts["duplicate"] > 0  # every post met twice: by account and by hashtag
    batches = [args[0] for name, args in queued_task_args(redis_client, "infer")]
    assert batches and all(1 <= len(batch) <= settings.batch_size for batch in batches)
    # Tokens are named by fingerprint in the server's stats, never by value.
    assert all(len(fp) == 10 for fp in stats["requests"])
    # Queue lag is exported: what waits on the infer queue after the crawl
    depth = REGISTRY.get_sample_value("deeptarget_queue_depth", {"queue": jobs.infer_queue})
    assert depth == redis_client.llen(jobs.infer_queue) > 0


async def test_a_second_run_fetches_nothing_again(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> None:
    network = SandboxNetwork(seed=12, n_posts=30, n_users=6, n_hashtags=3)
    async with sandbox_server(network) as server:
        settings = crawl_settings(tmp_path, redis_url, network, server.url)
        await crawl(settings)
        second = await crawl(settings)  # all targets were done: a new round that only meets seen posts
        stats = await server_stats(server.url)
    assert second.get("enqueued", 0) == 0 and second["duplicate"] > 0
    assert max(stats["image_fetches"].values()) == 1
    assert len(queued_post_refs(redis_client)) == len(offered(network, settings))


async def test_posts_met_first_under_a_hashtag_learn_their_owner_later(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=13, n_posts=25, n_users=5, n_hashtags=3)
    async with sandbox_server(network) as server:
        hashtags_only = crawl_settings(tmp_path, redis_url, network, server.url, accounts=[])
        await crawl(hashtags_only)
        accounts_only = crawl_settings(tmp_path, redis_url, network, server.url, hashtags=[])
        counts = await crawl(accounts_only)
    refs = queued_post_refs(redis_client)
    assert all(r["post"]["owner"] is None for r in refs)  # hashtag media carry no owner, as on the real API
    merges = [
        p for name, args in queued_task_args(redis_client, "profiles") if name == jobs.merge_task for p in args[0]
    ]
    under_hashtags = network.offered(hashtags_only.hashtags)
    assert {p["id"] for p in merges} == under_hashtags
    assert counts["merged_owner"] == len(under_hashtags)
    assert counts.get("enqueued", 0) == len(network.offered(accounts=accounts_only.accounts) - under_hashtags)


async def test_unknown_accounts_and_hashtags_do_not_stop_the_crawl(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=14, n_posts=20, n_users=4, n_hashtags=2)
    async with sandbox_server(network) as server:
        settings = crawl_settings(
            tmp_path,
            redis_url,
            network,
            server.url,
            accounts=["nobody_here"],
            hashtags=[*network.hashtags, "neverused"],
        )
        counts = await crawl(settings)
        # The account that failed does not hold the round open: the next run is a new round over the hashtags.
        again = await crawl(settings)
    assert counts["target_error:110"] == 1 and counts["unknown_hashtag"] == 1
    assert again.get("page:hashtag", 0) >= len(network.hashtags) and again["target_error:110"] == 1
    assert {r["post"]["id"] for r in queued_post_refs(redis_client)} == network.offered(network.hashtags)


async def test_a_scraper_stopped_half_way_resumes_without_fetching_any_post_twice(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=15, n_posts=120, n_users=10, n_hashtags=4)
    async with sandbox_server(network) as server:
        settings = crawl_settings(
            tmp_path, redis_url, network, server.url, page_size=5, download_concurrency=2, target_concurrency=1
        )
        env = {**os.environ, **settings.to_env()}

        async def scrape() -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "deeptarget", "scrape", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip

        first = await scrape()
        while redis_client.scard(keys.seen_posts_key) < 20:
            assert first.returncode is None, (await first.stderr.read()).decode()[-2000:]
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGTERM)  # graceful: finish the page in hand, save the cursor, exit
        _, stderr = await asyncio.wait_for(first.communicate(), timeout=60)
        assert first.returncode == 0, stderr.decode()[-2000:]
        half = redis_client.scard(keys.seen_posts_key)
        assert 20 <= half < len(offered(network, settings))

        second = await scrape()
        _, stderr = await asyncio.wait_for(second.communicate(), timeout=120)
        assert second.returncode == 0, stderr.decode()[-2000:]
        stats = await server_stats(server.url)

    assert_each_image_once(redis_client, stats, offered(network, settings))


async def test_two_scraper_processes_on_the_same_targets_fetch_each_post_once_between_them(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=16, n_posts=90, n_users=6, n_hashtags=3)
    async with sandbox_server(network) as server:
        settings = crawl_settings(tmp_path, redis_url, network, server.url, page_size=5, download_concurrency=4)

        async def scrape(token: str) -> asyncio.subprocess.Process:
            env = {**os.environ, **settings.to_env(), "DEEPTARGET_ACCESS_TOKENS": json.dumps([token])}
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "deeptarget", "scrape", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip

        scrapers = [await scrape("token-one"), await scrape("token-two")]
        for scraper in scrapers:
            _, stderr = await asyncio.wait_for(scraper.communicate(), timeout=180)
            assert scraper.returncode == 0, stderr.decode()[-2000:]
        stats = await server_stats(server.url)

    assert_each_image_once(redis_client, stats, offered(network, settings))
    assert set(stats["requests"]) == {fingerprint("token-one"), fingerprint("token-two")}  # both were crawling


async def test_carousels_give_every_image_child_and_videos_are_skipped(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    network = SandboxNetwork(seed=17, n_posts=50, n_users=5, n_hashtags=3, corrupt_share=0.0, video_share=0.2,
                             carousel_share=0.25)  # fmt: skip
    visible = [m for m in network.media if m.visible]
    albums = [m for m in visible if m.kind == "CAROUSEL_ALBUM" and m.image_ids]
    video_albums = [m for m in visible if m.kind == "CAROUSEL_ALBUM" and not m.image_ids]
    videos = [m for m in visible if m.kind == "VIDEO"]
    assert albums and videos and video_albums
    async with sandbox_server(network) as server:
        settings = crawl_settings(tmp_path, redis_url, network, server.url)
        counts = await crawl(settings)
        stats = await server_stats(server.url)
    assert_each_image_once(redis_client, stats, offered(network, settings))
    album = albums[0]
    children = [r for r in queued_post_refs(redis_client) if r["post"]["id"] in album.image_ids]
    assert len(children) == album.children and all(r["post"]["caption"] == album.caption for r in children)
    # profiles count an album once by the permalink its images share (profiles.builder.album_key)
    assert len({r["post"]["permalink"] for r in children}) == 1 and children[0]["post"]["permalink"]
    # An album of videos is a video: its own media_url (a video's) is never fetched, nothing is rejected for it.
    assert stats["video_fetches"] == {}
    assert not {m.id for m in video_albums} & {r["post"]["id"] for r in queued_post_refs(redis_client)}
    assert counts["skipped_video"] >= len(videos) + len(video_albums)  # met through the account and hashtags
    assert counts["carousel_images"] >= sum(m.children for m in albums)
