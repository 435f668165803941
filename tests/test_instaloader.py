"""Instaloader download folders as a source: metadata sidecars (xz-compressed JSON), images, the profile's followers."""

from __future__ import annotations

import json
import lzma
from collections import Counter
from pathlib import Path

import redis
import skimage.data

from deeptarget.sandbox import SandboxNetwork
from tests.helpers import crawl, crawl_settings, jpeg_of, post_node
from tests.queue_messages import queued_post_refs


def sidecar(path: Path, node: dict, node_type: str = "Post", compress: bool = True) -> None:
    data = json.dumps({"node": node, "instaloader": {"version": "4.14", "node_type": node_type}}).encode()
    if compress:
        path.with_name(path.name + ".xz").write_bytes(lzma.compress(data))
    else:
        path.write_bytes(data)


def make_profile_folder(root: Path) -> Path:
    folder = root / "sushi_lover"
    folder.mkdir(parents=True)
    sidecar(
        folder / "sushi_lover_555.json",
        {"id": "555", "username": "sushi_lover", "edge_followed_by": {"count": 4200}},
        "Profile",
    )
    (folder / "2026-11-20_18-04-11_UTC.jpg").write_bytes(jpeg_of(skimage.data.coffee()))
    sidecar(folder / "2026-11-20_18-04-11_UTC.json", post_node("9001", "Lunch #Sushi #tokyo", 120))
    (folder / "2026-11-21_09-00-00_UTC_1.jpg").write_bytes(jpeg_of(skimage.data.chelsea()))  # a carousel
    (folder / "2026-11-21_09-00-00_UTC_2.jpg").write_bytes(jpeg_of(skimage.data.astronaut()))
    sidecar(folder / "2026-11-21_09-00-00_UTC.json", post_node("9002", "cats #cats", 80, __typename="GraphSidecar"),
            compress=False)  # fmt: skip
    sidecar(folder / "2026-11-22_12-00-00_UTC.json", post_node("9003", "a reel", 5, is_video=True))
    (folder / "2026-11-22_12-00-00_UTC.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (folder / "2026-11-23_07-00-00_UTC.jpg").write_bytes(b"<html>saved an error page</html>")
    sidecar(folder / "2026-11-23_07-00-00_UTC.json", post_node("9004", "broken #sushi", 1))
    (folder / "2026-11-23_08-00-00_UTC.json.xz").write_bytes(b"not xz at all")
    return folder


async def test_a_folder_is_read_once_with_owners_and_followers(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    folder = make_profile_folder(tmp_path / "downloads")
    network = SandboxNetwork(seed=1, n_posts=1)
    settings = crawl_settings(tmp_path, redis_url, network, "http://127.0.0.1:9", hashtags=[], accounts=[],
                              instaloader_dirs=[folder.parent])  # fmt: skip
    counts = await crawl(settings)
    refs = {r["post"]["id"]: r for r in queued_post_refs(redis_client)}
    assert set(refs) == {"9001", "9002", "9004"}
    sushi = refs["9001"]["post"]
    assert sushi["hashtags"] == ["sushi", "tokyo"] and sushi["like_count"] == 120 and sushi["comments_count"] == 2
    assert sushi["owner"] == {"id": "555", "username": "sushi_lover", "followers_count": 4200}
    assert sushi["source"] == "instaloader" and sushi["permalink"] == "https://www.instagram.com/p/C9001/"
    assert refs["9001"]["blob"] and refs["9002"]["blob"]  # the carousel's first image
    assert refs["9004"]["rejected"] == "not_an_image"
    assert counts["skipped_video"] == 1 and counts["malformed_media"] == 1

    (folder / "2026-11-24_10-00-00_UTC.jpg").write_bytes(jpeg_of(skimage.data.rocket()))  # a new download arrives
    sidecar(folder / "2026-11-24_10-00-00_UTC.json", post_node("9005", "launch #space", 9))
    again = await crawl(settings)
    ids = Counter(r["post"]["id"] for r in queued_post_refs(redis_client))
    assert set(ids) == {"9001", "9002", "9004", "9005"} and max(ids.values()) == 1
    assert again["duplicate"] == 3
