"""Helpers shared by several test modules (no test module imports another): crawls of the sandbox, test images and
datasets, a real ``deeptarget serve`` process, the compose file as compose reads it, and what the outage tests read
in logs and queues. Fixtures stay in ``conftest.py``; faults from outside in ``faults.py`` (also used by
``bench/faults.py``); the local PostgreSQL server in ``postgres.py``; reading Celery messages in ``queue_messages.py``.

Heavy imports (torch) are made inside the helper that needs them, so that a scraper test importing this module does
not load them.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import resource
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import redis
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from PIL import Image

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.core.records import Owner, Post, PostRef
from deeptarget.core.replies import at_once
from deeptarget.core.settings import Settings
from deeptarget.jobs import Jobs
from deeptarget.runtime.embedded_redis import free_port
from deeptarget.sandbox import SandboxNetwork
from deeptarget.sandbox.network import Media
from deeptarget.scraper import CelerySink, Crawler
from deeptarget.store.blobs import BlobStore
from deeptarget.store.metadata import MetadataStore
from tests.conftest import make_settings, wait_for
from tests.queue_messages import queued_post_refs

# -- images and datasets ----------------------------------------------------------------------------------------


def noise_jpeg() -> bytes:
    """A 64x64 JPEG of seeded noise: the same bytes every time."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def jpeg_of(image: np.ndarray) -> bytes:
    """An RGB or grey array as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG")
    return buffer.getvalue()


def make_dataset(root: Path, per_class: int = 12) -> None:
    """A labelled folder of three visually distinct classes (tomatoes, sky, grass) and one broken file in sky."""
    rng = np.random.default_rng(0)
    colours = {"tomatoes": (200, 30, 30), "sky": (40, 80, 210), "grass": (40, 170, 50)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (96, 128, 3)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG")
            (root / name / f"{i}.jpg").write_bytes(buffer.getvalue())
    (root / "sky" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")


def calibrated_random_weights(path: Path, image_size: int = 96, seed: int = 0) -> Path:
    """A random MobileNetV2 whose BatchNorm statistics are calibrated on noise (as pretrained weights have them),
    saved as a state dict: a weights file like a user's own (see ``test_finetune.py`` for why)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, image_size, image_size))
    torch.save(model.state_dict(), path)
    return path


def send_photo_batch(settings: Settings, photos: Path, prefix: str) -> list[str]:
    """The first five photos of each class of a ``make_dataset`` folder as one infer task; returns their post ids."""
    blobs = BlobStore(settings.blob_dir)
    refs = []
    for i, path in enumerate(sorted(photos.glob("*/[0-4].jpg"))):
        post = Post(id=f"{prefix}-{path.parent.name}-{i}", like_count=10 + i,
                    owner=Owner(id=f"owner-{path.parent.name}", followers_count=1000))  # fmt: skip
        refs.append(PostRef(post=post, blob=blobs.put(path.read_bytes())).model_dump(mode="json"))
    Jobs.for_settings(settings).infer(refs)
    return [r["post"]["id"] for r in refs]


def publish_read_side(settings: Settings, store: MetadataStore, post_ids: list[str], owner_ids: list[str]) -> None:
    """What the index writer, the train task and the profiles task leave behind for these stored posts: a published
    index snapshot, a hashtag model, the owners' profiles."""
    from deeptarget.index.vectors import SnapshotStore
    from deeptarget.index.writer import IndexWriter
    from deeptarget.models.hashtags import HashtagModel
    from deeptarget.profiles.builder import rebuild_profiles
    from deeptarget.profiles.outliers import FollowerBoundsCache

    writer = IndexWriter(store, SnapshotStore(settings.index_dir))
    writer.add(store.embeddings(post_ids))
    writer.close()
    image_ids, tags = store.image_hashtags()
    HashtagModel.fit_with(settings, image_ids, tags).save(settings.hashtag_model_dir)
    bounds = FollowerBoundsCache(store, settings.follower_outlier_k).get()
    rebuild_profiles(store, owner_ids, settings.profile_half_life_days, bounds)


def route_table(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route an aiohttp application serves."""
    return {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.resource is not None}


# -- crawls of the sandbox --------------------------------------------------------------------------------------


def crawl_settings(tmp_path: Path, redis_url: str, network: SandboxNetwork, url: str, **extra: object) -> Settings:
    """Settings that crawl every hashtag and account of ``network`` served at ``url``."""
    values: dict[str, object] = {
        "source_url": url,
        "hashtags": network.hashtags,
        "accounts": [a.username for a in network.accounts],
        "page_size": 10,
        "batch_size": 8,
    }
    return make_settings(tmp_path / "data", redis_url, **{**values, **extra})


async def crawl(settings: Settings) -> dict[str, int]:
    """One crawl round in this process; returns its counts."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        crawler = Crawler(settings, client, CelerySink(Jobs.for_settings(settings)), BlobStore(settings.blob_dir))
        return await crawler.run()
    finally:
        await client.aclose()


def offered(network: SandboxNetwork, settings: Settings) -> set[str]:
    """The posts a crawl of these settings' targets must collect, each once (the sandbox's documented model)."""
    return network.offered(settings.hashtags, settings.accounts, settings.hashtag_edge)


def everything(sandbox: SandboxNetwork) -> set[str]:
    """What a crawl of every hashtag and account must collect (crawl_settings follows them all)."""
    return sandbox.offered(sandbox.hashtags, [a.username for a in sandbox.accounts])


async def server_stats(url: str) -> dict[str, Any]:
    """The sandbox's own count of what it was asked (``/sandbox/stats``)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/sandbox/stats") as response:
        stats: dict[str, Any] = await response.json()
        return stats


def assert_each_image_once(client: redis.Redis, stats: dict[str, Any], expected: set[str]) -> None:
    """Every expected post on the infer queue exactly once, and each of their images fetched whole exactly once."""
    ids = Counter(r["post"]["id"] for r in queued_post_refs(client))
    assert set(ids) == expected and max(ids.values()) == 1
    assert set(stats["image_fetches"]) == expected and max(stats["image_fetches"].values()) == 1


def pushable(network: SandboxNetwork) -> list[Media]:
    """The media a partner can push: visible ones with a picture (no videos, no albums of videos only)."""
    return [m for m in network.media if m.visible and m.image_ids]


def image_url(url: str, media: Media) -> str:
    """The media's (first) picture: an album's first image is its child 0."""
    return f"{url}/media/{media.id}_0.jpg" if media.kind == "CAROUSEL_ALBUM" else f"{url}/media/{media.id}.jpg"


def post_node(media_id: str, caption: str, likes: int, **extra: object) -> dict[str, Any]:
    """An instaloader sidecar's ``node`` for a post of ``sushi_lover``."""
    return {
        "id": media_id,
        "shortcode": f"C{media_id}",
        "taken_at_timestamp": 1795000000,
        "edge_media_to_caption": {"edges": [{"node": {"text": caption}}]},
        "edge_liked_by": {"count": likes},
        "edge_media_to_comment": {"count": 2},
        "owner": {"id": "555", "username": "sushi_lover"},
        "is_video": False,
        **extra,
    }


def stat(client: redis.Redis, name: str) -> int:
    """One of the scraper's counters in Redis."""
    return int(at_once(client.hget(keys.scraper_stats_key, name)) or 0)


async def until(condition: Callable[[], object], what: str, timeout_s: float = 90) -> None:
    """``wait_for`` off the event loop."""
    await asyncio.to_thread(wait_for, condition, what, timeout_s)


# -- outages ----------------------------------------------------------------------------------------------------

# What the scraper logs when a dependency goes away and when it is back (scraper/outages.py).
UNAVAILABLE = re.compile(r"(\w+) unavailable \(")
AVAILABLE_AGAIN = re.compile(r"(\w+) available again after")

# Bounds short enough for a test: a dead worker's task comes back after 4 + 1 s, the writer catches up after 2 + 1 s.
FAST_RECOVERY = {
    "visibility_timeout_s": 4,
    "redelivery_check_s": 1.0,
    "index_catch_up_every_s": 1.0,
    "index_catch_up_after_s": 2.0,
}


def queues_quiet(client: redis.Redis) -> bool:
    """No task waiting on a queue, none delivered and unacknowledged."""
    return not client.hlen("unacked") and not any(client.llen(q) for q in jobs.all_queues)


def assert_no_dead_letters(client: redis.Redis, settings: Settings) -> None:
    letters = client.xrange(keys.deadletter_stream)
    assert not letters, letters
    assert not settings.deadletter_path.exists(), settings.deadletter_path.read_text()


def spawn_cli(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m deeptarget <args>`` in a session of its own (``kill_9`` takes its children too), configured by
    ``settings``, its output in a file (a pipe nobody reads would stall it)."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "deeptarget", *args], env={**os.environ, **settings.to_env()},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


# -- a real ``deeptarget serve`` process --------------------------------------------------------------------------

KEY = secrets.token_urlsafe(24)  # the API key of every ``served`` process


def _few_fds() -> None:  # 128 file descriptors: 300 connections held open would take them all
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@contextmanager
def served(data_dir: Path, redis_url: str, **overrides: object) -> Iterator[int]:
    """A real ``deeptarget serve`` process with the API key ``KEY``; yields its port. Its log never shows the key."""
    settings = make_settings(data_dir, redis_url, api_port=free_port(), **overrides)
    env = {**os.environ, **settings.to_env(), "DEEPTARGET_API_KEY": KEY}
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "deeptarget", "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, preexec_fn=_few_fds)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"deeptarget API at" not in log.read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield settings.api_port
    finally:
        process.terminate()
        process.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert KEY not in text
    # no bug of ours (the API logs it and answers 500) and nothing aiohttp could not handle
    assert not re.search(r"ERROR +(deeptarget\.api|aiohttp\.server: Unhandled exception)", text), text[-3000:]


# -- the compose file, as compose reads it ----------------------------------------------------------------------

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message} (compose's interpolation syntax)
VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<rest>[^}]*))?\}")
SECRET_ENV = {"DEEPTARGET_API_KEY": "a" * 32, "REDIS_PASSWORD": "b" * 64, "POSTGRES_PASSWORD": "c" * 64,
              "MINIO_ROOT_PASSWORD": "d" * 64, "GRAFANA_ADMIN_PASSWORD": "e" * 32}  # fmt: skip


class MissingVariable(KeyError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``$$`` is a literal ``$``; ``:?`` fails when unset or empty."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match["name"], match["op"], match["rest"] or ""
        value = env.get(name)
        if op in (":?", "?") and not (value if op == ":?" else value is not None):
            raise MissingVariable(f"{name}: {rest}")
        if op in (":-", "-") and not (value if op == ":-" else value is not None):
            return rest
        return value or ""

    return VARIABLE.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def compose(env: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml as compose reads it: parsed (anchors and merges resolved), then ``env`` substituted in
    every string (substituting in the text first would parse a default like ``["a"]`` as a list, not a string)."""

    def substituted(value: Any) -> Any:
        if isinstance(value, str):
            return interpolate(value, env)
        if isinstance(value, list):
            return [substituted(item) for item in value]
        if isinstance(value, dict):
            return {key: substituted(item) for key, item in value.items()}
        return value

    loaded: dict[str, Any] = substituted(yaml.safe_load(COMPOSE.read_text()))
    return loaded
