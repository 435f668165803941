"""A hostile instaloader folder (issue 12, L6): bombs, broken xz, deep or misshapen JSON, symlinks out of the folder,
FIFOs. Each bad post is rejected with its reason, the good ones next to it are collected, nothing outside is read."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from pathlib import Path

import pytest
import redis
import skimage.data

from deeptarget.sandbox import SandboxNetwork
from deeptarget.scraper import instaloader
from deeptarget.store.blobs import BlobStore
from tests.helpers import crawl, crawl_settings, jpeg_of, post_node
from tests.queue_messages import queued_post_refs

pytestmark = pytest.mark.timeout(30)  # the old code blocked for good on a FIFO

LIMIT = 1024 * 1024  # max_sidecar_bytes for the test: the bomb inflates to 24 times that


def wrapped(node: object, node_type: str = "Post") -> bytes:
    return json.dumps({"node": node, "instaloader": {"version": "4.14", "node_type": node_type}}).encode()


def bomb() -> bytes:
    """Valid JSON that inflates to 24 MiB: the old reader decompressed it whole."""
    body = b'{"node": {"id": "7001", "pad": "' + b"a" * (24 * LIMIT) + b'"}}'
    return lzma.compress(body, preset=0)


# name -> (sidecar suffix, bytes or a callable making the entry at that path, expected rejection reason)
def hostile_sidecars(outside: Path) -> dict[str, tuple[str, object, str]]:
    good = wrapped(post_node("7100", "fine #ok", 1))
    return {
        "xz_bomb": (".json.xz", bomb(), "too_large"),
        "plain_too_large": (".json", wrapped({"id": "7002", "pad": "a" * (2 * LIMIT)}), "too_large"),
        "truncated_xz": (".json.xz", lzma.compress(good)[:40], "bad_xz"),
        "not_xz": (".json.xz", b"not xz at all", "bad_xz"),
        "nested_100k": (".json", b'{"node": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "bad_json"),
        "nested_xz": (".json.xz", lzma.compress(b"{" + b'"a":{' * 100_000 + b"}" * 100_001), "bad_json"),
        "array": (".json", b"[1, 2, 3]", "bad_shape"),
        "not_utf8": (".json", b'{"node": {"id": "7003", "caption": "\xff\xfe"}}', "not_utf8"),
        "nan": (".json", b'{"node": {"id": "7004", "taken_at_timestamp": NaN}}', "bad_json"),
        "node_string": (".json", wrapped("a string"), "bad_field"),
        "count_string": (".json", wrapped(post_node("7005", "x", 1, edge_liked_by={"count": "120"})), "bad_field"),
        "edge_string": (".json", wrapped(post_node("7006", "x", 1, edge_liked_by="120")), "bad_field"),
        "count_huge": (".json", wrapped(post_node("7007", "x", 1, edge_liked_by={"count": 2**70})), "bad_field"),
        "count_bool": (".json", wrapped(post_node("7008", "x", 1, edge_media_to_comment={"count": True})), "bad_field"),
        "timestamp_string": (".json", wrapped(post_node("7009", "x", 1, taken_at_timestamp="yesterday")), "bad_field"),
        "timestamp_huge": (".json", wrapped(post_node("7010", "x", 1, taken_at_timestamp=1e300)), "bad_field"),
        "timestamp_inf": (".json", wrapped(post_node("7011", "x", 1)).replace(b"1795000000", b"1e999"), "bad_field"),
        "caption_edges_string": (
            ".json",
            wrapped(post_node("7012", "x", 1, edge_media_to_caption={"edges": "x"})),
            "bad_field",
        ),
        "owner_list": (".json", wrapped(post_node("7013", "x", 1, owner=[])), "bad_field"),
        "id_object": (".json", wrapped(post_node("7014", "x", 1) | {"id": {"a": 1}}), "bad_field"),
        "id_path": (".json", wrapped(post_node("../../etc", "x", 1)), "bad_field"),
        "shortcode_url": (".json", wrapped(post_node("7015", "x", 1, shortcode="x/../../evil?")), "bad_field"),
        "username_markup": (
            ".json",
            wrapped(post_node("7016", "x", 1, owner={"id": "9", "username": "[/]\x1b"})),
            "bad_field",
        ),
        "is_video_string": (".json", wrapped(post_node("7017", "x", 1, is_video="no")), "bad_field"),
        "no_id": (".json", wrapped(post_node("", "x", 1)), "no_id"),
        "symlink_passwd": (".json", lambda p: p.symlink_to("/etc/passwd"), "outside_folder"),
        "symlink_outside": (".json", lambda p: p.symlink_to(outside / "elsewhere_UTC.json"), "outside_folder"),
        "symlink_loop": (".json", lambda p: p.symlink_to(p), "unreadable"),
        "fifo": (".json", lambda p: os.mkfifo(p), "not_a_regular_file"),
        "fifo_xz": (".json.xz", lambda p: os.mkfifo(p), "not_a_regular_file"),
        "directory": (".json", lambda p: p.mkdir(), "not_a_regular_file"),
    }


def write_entry(path: Path, content: object) -> None:
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)  # type: ignore[arg-type]


def make_hostile_folder(root: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The folder, sidecar name -> expected rejection reason, and good post id -> its sidecar's stem."""
    outside = root / "outside"
    outside.mkdir(parents=True)
    # A well-formed post outside the folder, and its image: reachable only through symlinks.
    (outside / "elsewhere_UTC.json").write_bytes(wrapped(post_node("6666", "outside #secret", 1)))
    (outside / "secret.jpg").write_bytes(jpeg_of(skimage.data.camera()))
    folder = root / "downloads" / "hostile"
    folder.mkdir(parents=True)
    # A broken profile sidecar: the posts keep the owners their own nodes name.
    (folder / "sushi_lover_555.json.xz").write_bytes(b"\xfd7zXZ\x00 broken")
    expected, good = {}, {}
    for k, (case, (suffix, content, reason)) in enumerate(hostile_sidecars(outside).items()):
        stem = f"2026-01-01_00-{k:02d}-00_UTC"
        write_entry(folder / (stem + suffix), content)
        (folder / f"{stem}.jpg").write_bytes(jpeg_of(skimage.data.coffee()))
        expected[stem + suffix] = reason
        good_stem = f"2026-01-01_00-{k:02d}-30_UTC"  # a good post next to each hostile one
        good_id = str(8000 + k)
        (folder / f"{good_stem}.jpg").write_bytes(jpeg_of(skimage.data.chelsea()))
        (folder / f"{good_stem}.json").write_bytes(wrapped(post_node(good_id, f"good {case} #fine", k)))
        good[good_id] = good_stem
    # A folder symlinked in from outside: never entered.
    (outside / "linked").mkdir()
    (outside / "linked" / "2026-02-02_00-00-00_UTC.json").write_bytes(wrapped(post_node("6667", "linked", 1)))
    (outside / "linked" / "2026-02-02_00-00-00_UTC.jpg").write_bytes(jpeg_of(skimage.data.camera()))
    (folder / "linked").symlink_to(outside / "linked")
    return folder.parent, expected, good


# post id -> (what is at the image's place, the rejection the post gets)
def hostile_images(folder: Path, outside: Path) -> dict[str, str]:
    cases = {
        "9101": (lambda p: p.symlink_to(outside / "secret.jpg"), "not_allowed"),
        "9102": (lambda p: p.symlink_to("/etc/passwd"), "not_allowed"),
        "9103": (lambda p: os.mkfifo(p), "not_a_regular_file"),
        "9104": (lambda p: p.write_bytes(b"\xff\xd8" + b"\x00" * (3 * LIMIT)), "too_large"),
        "9105": (lambda p: p.symlink_to(folder / "missing.jpg"), "unreadable"),
        # a hard link to a file outside (found by the attacker's re-test): the path is inside, the inode is not
        "9106": (lambda p: os.link(outside / "secret.jpg", p), "hard_link"),
    }
    reasons = {}
    for k, (post_id, (make, reason)) in enumerate(cases.items()):
        stem = f"2026-03-03_00-{k:02d}-00_UTC"
        (folder / f"{stem}.json").write_bytes(wrapped(post_node(post_id, "image case #x", 1)))
        make(folder / f"{stem}.jpg")
        reasons[post_id] = reason
    return reasons


def test_each_hostile_sidecar_is_rejected_with_its_reason(tmp_path: Path) -> None:
    root, expected, good = make_hostile_folder(tmp_path)
    found = {sidecar.name: result for sidecar, result in instaloader.scan(root, LIMIT)}
    rejected = {name: r.reason for name, r in found.items() if isinstance(r, instaloader.SidecarRejected)}
    assert rejected == expected
    posts = {r.post.id for r in found.values() if isinstance(r, instaloader.FolderPost) and r.post}
    assert posts == set(good), "every good post is read, nothing from outside the folder"
    assert not any("6666" in str(r) or "secret" in str(r) for r in found.values())


async def test_a_hostile_folder_is_crawled_the_good_posts_collected(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    root, expected, good = make_hostile_folder(tmp_path)
    image_cases = hostile_images(root / "hostile", tmp_path / "outside")
    network = SandboxNetwork(seed=1, n_posts=1)
    settings = crawl_settings(tmp_path, redis_url, network, "http://127.0.0.1:9", hashtags=[], accounts=[],
                              instaloader_dirs=[root], max_sidecar_bytes=LIMIT, max_image_bytes=LIMIT)  # fmt: skip
    counts = await crawl(settings)
    refs = {r["post"]["id"]: r for r in queued_post_refs(redis_client)}
    assert set(refs) == set(good) | set(image_cases)
    assert all(refs[i]["blob"] and not refs[i]["rejected"] for i in good)
    assert {i: refs[i]["rejected"] for i in image_cases} == image_cases
    assert counts["malformed_media"] == len(expected)
    for reason in set(image_cases.values()):
        assert counts[f"rejected:{reason}"] == list(image_cases.values()).count(reason)
    outside_bytes = [(tmp_path / "outside" / "secret.jpg").read_bytes(), Path("/etc/passwd").read_bytes()]
    assert not any(hashlib.sha256(data).hexdigest() in BlobStore(settings.blob_dir) for data in outside_bytes)


def test_xz_decoder_memory_is_bounded(tmp_path: Path) -> None:
    """An xz header may ask for a huge dictionary: the decoder refuses it instead of allocating it."""
    body = wrapped(post_node("7200", "x", 1))
    filters = [{"id": lzma.FILTER_LZMA2, "dict_size": 1536 * 1024 * 1024}]
    (tmp_path / "2026-01-01_00-00-00_UTC.json.xz").write_bytes(lzma.compress(body, filters=filters))
    ((_, result),) = list(instaloader.scan(tmp_path, LIMIT))
    assert isinstance(result, instaloader.SidecarRejected) and result.reason == "bad_xz"
