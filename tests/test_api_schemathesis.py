"""A bounded schemathesis pass (issue 12): a real third-party client generates requests from our own
``/openapi.json`` and sends them to a real ``deeptarget serve`` process (real Redis, an API key, a small real index
with a hashtag model and profiles), running every check it has. It must find no server error and no answer that
breaks the document (status, content type, headers, body schema), and the API must refuse what the document refuses.

Two allowances, each for a check that assumes the schema says everything: a schema-valid upload need not be a
usable image (422), and pushed records are checked beyond what JSON Schema can state (a timestamp range, what a
hashtag may contain, URL rules: 400 with each record's reason). Offline and bounded: no example database, no cache,
a fixed seed, a few hundred cases.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from deeptarget.core.records import Owner, Post, Prediction
from deeptarget.core.settings import Settings
from deeptarget.index.writer import IndexWriter
from deeptarget.jobs import Jobs
from deeptarget.models.embedder import Embedder
from deeptarget.models.heads import LinearHead
from deeptarget.runtime.embedded_redis import EmbeddedRedis
from deeptarget.store.metadata import MetadataStore
from deeptarget.workers.upkeep import WriterUpkeep
from tests.conftest import make_settings
from tests.helpers import KEY, publish_read_side, served

pytestmark = pytest.mark.timeout(300)

TAGS = ["sushi", "ramen", "coffee", "beach", "dogs", "cats"]
POSTS, USERS = 24, 4
MAX_EXAMPLES = 25  # per operation and phase: about 600 cases in all, 10 to 20 s here


def build_index(settings: Settings) -> None:
    """What workers leave behind, made directly: posts embedded by the configured model, a snapshot of them, a
    hashtag model and the owners' profiles. Real images are not needed; real vectors of the right model are."""
    embedder = Embedder.from_settings(settings)
    rng = np.random.default_rng(5)
    vectors = embedder([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(POSTS)])
    start = datetime(2026, 1, 1, tzinfo=UTC)
    posts = [
        Post(id=f"p{i}", media_url=f"https://scontent.cdninstagram.com/p{i}.jpg", caption=f"#{TAGS[i % 6]}",
             hashtags=[TAGS[i % 6], TAGS[(i + 1) % 6]], like_count=i, comments_count=i // 2,
             timestamp=start + timedelta(days=i),
             owner=Owner(id=f"u{i % USERS}", username=f"user{i % USERS}", followers_count=100 * (i % USERS + 1)))
        for i in range(POSTS)
    ]  # fmt: skip
    store = MetadataStore(settings.metadata_database)
    store.record_results(
        (post, None, Prediction(post_id=post.id, status="embedded", model_id=embedder.model_id, faces=i % 2), vector)
        for i, (post, vector) in enumerate(zip(posts, vectors, strict=True))
    )
    publish_read_side(settings, store, [p.id for p in posts], [f"u{i}" for i in range(USERS)])
    weight = rng.normal(0, 1, (len(TAGS), embedder.dim)).astype(np.float32)
    head = LinearHead("food", 1, TAGS, weight, np.zeros(len(TAGS), np.float32), embedder.model_id, {})
    head.save(settings.heads_dir)  # for /explain


@contextmanager
def index_writer(settings: Settings) -> Iterator[None]:
    """A live index writer beside the API (its heartbeat and catch-up loop), as a deployment has: /healthz is 200."""
    store = MetadataStore(settings.metadata_database)
    writer = IndexWriter.from_settings(settings, store)
    upkeep = WriterUpkeep(settings, writer, store, redis.Redis.from_url(settings.redis_url or ""),
                          Jobs.for_settings(settings).update_profiles).start()  # fmt: skip
    try:
        yield
    finally:
        upkeep.stop()
        writer.close()


def check_real_uploads(url: str) -> None:
    """The index is real: an uploaded photo finds neighbours and hashtags, and is explained (schemathesis' bytes are
    never one)."""
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(photo, "JPEG")
    explain = (("/explain?head=food&format=json", "classes"), ("/explain?similar=p3&format=json", "png"))
    for path, key in (("/similar?k=5", "results"), ("/hashtags?n=3", "hashtags"), *explain):
        call = urllib.request.Request(url + path, data=photo.getvalue(), headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(call, timeout=60) as answer:
            assert answer.status == 200 and json.loads(answer.read())[key], path


def config(report_dir: Path) -> str:
    """schemathesis.toml: every check, realistic ids half of the time, nothing kept between runs."""
    posts = [f"p{i}" for i in range(POSTS)] + ["unknown-post"]
    users = [f"u{i}" for i in range(USERS)] + [f"user{i}" for i in range(USERS)]
    return f"""
seed = 20261201
headers = {{ "X-API-Key" = "${{DEEPTARGET_TEST_API_KEY}}" }}
request-timeout = 30.0

[cache]
enabled = false

[reports.json]
enabled = true
path = "{report_dir / "run.json"}"

[generation]
max-examples = {MAX_EXAMPLES}
database = "none"

[checks]
enabled = true

[dictionaries.posts]
values = {json.dumps(posts)}

[dictionaries.users]
values = {json.dumps(users)}

[dictionaries.interests]
values = ["#sushi", "sushi", "#coffee", "ramen", "nothing-like-it"]

[dictionaries.heads]
values = ["food", "nohead"]

[parameters]
"query.post_id" = {{ dictionary = "posts", probability = 0.5 }}
"path.post_id" = {{ dictionary = "posts", probability = 0.5 }}
"path.user" = {{ dictionary = "users", probability = 0.5 }}
"query.interest" = {{ dictionary = "interests", probability = 0.5 }}
"query.head" = {{ dictionary = "heads", probability = 0.5 }}
"query.similar" = {{ dictionary = "posts", probability = 0.5 }}

[[operations]]
include-operation-id = ["post_similar", "post_hashtags"]
# Schema-valid bytes (schemathesis makes real 1x1 GIFs) need not be a usable image: 422, documented.
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "422"]

[[operations]]
include-operation-id = "post_explain"
# The same (422), and what the schema cannot say: head or similar is required, class needs head (400); an unknown
# head, class or post (404).
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "422"]

[[operations]]
include-operation-id = "post_ingest"
# Records are checked beyond what JSON Schema can say (timestamp range, hashtag words, URL rules): a 400 that gives
# each record's reason, documented.
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403"]
"""


def test_schemathesis_finds_no_server_error_and_no_answer_that_breaks_the_document(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    redis.Redis.from_url(redis_server.url).flushall()
    settings_dir = tmp_path / "data"
    build_index(make_settings(settings_dir, redis_server.url))
    work = tmp_path / "schemathesis"
    work.mkdir()
    (work / "schemathesis.toml").write_text(config(work))
    env = {
        **os.environ,
        "DEEPTARGET_TEST_API_KEY": KEY,
        "HYPOTHESIS_STORAGE_DIRECTORY": str(work / ".hypothesis"),  # nothing written outside tmp
        "NO_COLOR": "1",
    }
    with served(settings_dir, redis_server.url) as port, index_writer(make_settings(settings_dir, redis_server.url)):
        check_real_uploads(f"http://127.0.0.1:{port}")
        done = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(work / "schemathesis.toml"), "run",
             f"http://127.0.0.1:{port}/openapi.json", "--checks", "all", "--no-color"],
            cwd=work, env=env, capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
    output = done.stdout + done.stderr
    run = json.loads((work / "run.json").read_text())
    cases = run["test_cases"]
    print(f"schemathesis: {cases['generated']} cases, {cases['with_failures']} with failures, "
          f"{len(run['errors'])} errors, {run['running_time']:.1f} s")  # fmt: skip
    assert KEY not in output
    assert done.returncode == 0 and run["failures"] == [] and run["errors"] == [], output[-6000:]
    assert run["complete"] and run["operations"]["tested"] == run["operations"]["total"] == 14
    assert cases["generated"] >= 300
