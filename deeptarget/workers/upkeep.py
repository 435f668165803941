"""The index writer's own loop beside its tasks: a heartbeat for /healthz, and the catch-up from the store.

Why a catch-up and not an outbox (issue 13, item 3): the metadata store is already the index's journal. A post the
infer task stored is ``embedded`` until the writer indexes it, and ``posts_status`` indexes that column, so "stored
but never indexed" is one cheap query over the posts in flight. If the infer task dies, or cannot reach Redis, between
its store write and its sends, the writer finds the post within ``index_catch_up_after_s + index_catch_up_every_s``
and indexes it, whatever died when. An outbox would need a second table written in the same transaction, a drainer in
every infer worker and deduplication between drainers, to rebuild what the status column already says.

The owners' profile updates ride along: the infer task sends them before its index task, so a post still
``embedded`` may have lost both, and the catch-up sends them again before indexing (idempotent; a send that fails
leaves the batch for the next round, so nothing is indexed without its profiles being asked for).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis
from prometheus_client import Counter

from deeptarget.core import keys
from deeptarget.core.replies import at_once
from deeptarget.core.settings import Settings
from deeptarget.index.writer import IndexWriter
from deeptarget.store.metadata import EmbeddingRows, MetadataStore
from deeptarget.workers.transient import is_transient

LOG = logging.getLogger(__name__)

CAUGHT_UP = Counter("deeptarget_index_caught_up_total", "Index changes the writer found in the store with no task")
UPKEEP_FAILURES = Counter("deeptarget_index_upkeep_failures_total", "Upkeep rounds that failed, by step", ["step"])

SendProfiles = Callable[[list[str]], None]


class WriterUpkeep:
    """Every ``index_catch_up_every_s``: refresh the heartbeat (Redis), then catch up (the store; Redis for the
    profile sends). Each step fails alone: a Redis outage stops the heartbeat, never the catch-up of what needs no
    Redis; an outage is logged when it starts and when it ends, not every round."""

    def __init__(
        self,
        settings: Settings,
        writer: IndexWriter,
        store: MetadataStore,
        client: redis.Redis,
        send_profiles: SendProfiles,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.store = store
        self.client = client
        self.send_profiles = send_profiles
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: dict[str, str] = {}  # step -> the error it has failed with since the last success
        self._rival_reported = False  # another writer's heartbeat seen (said once)

    def start(self) -> WriterUpkeep:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="index-upkeep", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.settings.index_catch_up_every_s)

    def tick(self) -> int:
        """One round; returns the changes caught up."""
        self._step("heartbeat", self.heartbeat)
        changed = self._step("catch-up", self.catch_up) or 0
        if changed:
            self._step("heartbeat", self.heartbeat)  # what it now holds
        return changed

    def heartbeat(self) -> None:
        beat = {"at": time.time(), "pid": os.getpid(), "host": socket.gethostname(), **self.writer.status()}
        self._check_alone(at_once(self.client.get(keys.index_writer_key)), beat)
        ttl = max(1, int(3 * self.settings.health_writer_stale_s))
        self.client.set(keys.index_writer_key, json.dumps(beat), ex=ttl)

    def _check_alone(self, previous: bytes | None, beat: dict[str, object]) -> None:
        """Say so when another writer's fresh heartbeat is there: the data dir's lock only keeps out writers on the
        same disk, and with a bucket each host has its own (two writers publish over each other's snapshots)."""
        try:
            other = json.loads(previous) if previous else None
        except ValueError:
            return
        if not isinstance(other, dict) or (other.get("host"), other.get("pid")) == (beat["host"], beat["pid"]):
            return
        at = other.get("at")
        fresh = isinstance(at, int | float) and time.time() - at < self.settings.health_writer_stale_s
        if fresh and not self._rival_reported:
            self._rival_reported = True
            LOG.error("another index writer is alive (pid %s on %s): two writers publish over each other's "
                      "snapshots; the index queue needs exactly one consumer", other.get("pid"),
                      other.get("host"))  # fmt: skip

    def catch_up(self) -> int:
        changed = self.writer.catch_up(self.settings.index_catch_up_after_s, before_add=self._profiles_of)
        CAUGHT_UP.inc(changed)
        return changed

    def _profiles_of(self, rows: EmbeddingRows) -> None:
        owners = self.store.owners_of(rows.post_ids)
        if owners:
            self.send_profiles(sorted(owners))

    def _step(self, step: str, run: Callable[[], int | None]) -> int | None:
        try:
            result = run()
        except Exception as err:  # the loop outlives any failure; the next round tries again
            UPKEEP_FAILURES.labels(step).inc()
            what = f"{type(err).__name__}: {err}"[:300]
            if self._failing.get(step) != what:
                log = LOG.warning if is_transient(err) else LOG.error
                log("index writer %s failed (%s); trying again every %.0f s", step, what,
                    self.settings.index_catch_up_every_s, exc_info=not is_transient(err))  # fmt: skip
            self._failing[step] = what
            return None
        if self._failing.pop(step, None) is not None:
            LOG.warning("index writer %s works again", step)
        return result
