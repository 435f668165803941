"""Fault drill (issue 13): the whole deployment on real processes, one fault at a time, measured from outside.

    .venv/bin/python bench/faults.py [--posts 1500] [--faults none,redis-5,redis-60,writer-kill,disk-full,sigterm]
                                     [--json faults.json] [--keep DIR]

Each fault gets a fresh deployment in a directory of its own, started as an operator starts one: the sandbox Graph
API (``--posts`` media) on loopback, a redis-server with AOF on (``EmbeddedRedis``), and ``python -m deeptarget``
``scrape --forever``, ``worker`` (infer and profiles), ``worker --queues index --pool solo`` (the index writer),
``beat`` and ``serve``, all with the project's default settings except the data directory, the source, its
hashtags and accounts, and random weights (the drill measures recovery, not accuracy; ``--weights`` to change it).

The faults, injected from outside once a quarter of the offered posts is stored:

- ``redis-5``, ``redis-60``: redis-server killed with SIGKILL, started again on the same port and directory 5 or 60 s
  later;
- ``writer-kill``: the index writer killed with SIGKILL five times, each while a snapshot's temporary file is on disk
  when one is caught (the drill says how many were), and started again at once, as ``restart: always`` does;
- ``disk-full``: the data directory (blobs, metadata store, snapshots) is a 1 GiB tmpfs (root only; otherwise skipped
  with the reason), filled for 60 s once a tenth of the posts is stored;
- ``sigterm``: SIGTERM to the main process of each service while busy (as compose and systemd stop one), then each
  started again.

No process is restarted by the drill except after its own kill or SIGTERM; one that exits by itself is started
again and listed under "restarted by hand". While each run lasts, a client calls ``GET /similar?post_id=`` about 20
times a second (any answer but 200 counts as failed) and ``GET /healthz`` 10 times a second.

A run is over when every offered post is stored and indexed or rejected (with a reason), the published snapshot
holds exactly the indexed posts ("indexed after"), and no task waits or is held by a worker ("queues quiet after":
a task a killed worker held comes back only after the visibility timeout, 300 s, though the index writer's catch-up
has done its work by then). Printed per fault: stored of offered, duplicates in the index, images the sandbox served
more than once, dead letters, restarts by hand, the times from the fault's end to the next post stored and to both
ends above, how much longer the whole run took than the one without a fault (the fault's own duration included),
and the API's answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.faults, when run as a script

from deeptarget import jobs
from deeptarget.core import keys
from deeptarget.core.records import vector_id
from deeptarget.core.replies import at_once
from deeptarget.core.settings import Settings
from deeptarget.index.vectors import SnapshotStore
from deeptarget.runtime.embedded_redis import EmbeddedRedis
from deeptarget.sandbox import SandboxNetwork
from tests.faults import CannotMount, fill, http_status, kill_9, sandbox_in_thread, small_tmpfs, snapshot_total

FAULTS = ("none", "redis-5", "redis-60", "writer-kill", "disk-full", "sigterm")
SETTLE_DEADLINE_S = 900.0  # after the fault's end; a run past it is reported as not recovered
STOP_GRACE_S = {"infer": 60.0, "index": 60.0}  # docker-compose.yml's stop_grace_period for the workers
DEFAULT_GRACE_S = 10.0  # compose's default for the others
console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass
class Outcome:
    fault: str
    offered: int
    stored: int = 0
    indexed: int = 0
    rejected: int = 0
    rejected_without_reason: int = 0
    index_duplicates: int = 0
    index_missing: int = 0
    images_fetched_twice: int = 0
    dead_letters: int = 0
    restarted_by_hand: list[str] = field(default_factory=list)
    recovered: bool = False
    resumed_s: float | None = None  # fault's end -> the next post stored
    slower_s: float | None = None  # total_s less the run without a fault's (the fault's own duration included)
    indexed_s: float | None = None  # fault's end -> every post indexed or rejected, and published
    recovery_s: float | None = None  # fault's end -> that, and no task waiting or held
    total_s: float = 0.0
    similar_ok: int = 0
    similar_calls: int = 0
    similar_failed: dict[str, int] = field(default_factory=dict)  # answer (0: none in 5 s) -> how many
    healthz_503_after_s: float | None = None  # fault's start -> first 503
    healthz_200_after_s: float | None = None  # fault's end -> first 200 after it
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the fault could not be made here
    exit_codes: dict[str, int | None] = field(default_factory=dict)


# -- the deployment -------------------------------------------------------------------------------------------------


SERVICES: dict[str, list[str]] = {
    "index": ["worker", "--queues", jobs.index_queue, "--pool", "solo", "--name", "index"],
    "infer": ["worker", "--name", "infer"],  # every queue but the index writer's
    "beat": ["beat"],
    "api": ["serve"],
    "scraper": ["scrape", "--forever", "--interval", "5"],
}


class Deployment:
    """The services as real processes, each in a session of its own (a kill reaches its pool children)."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.expected_exit: set[str] = set()  # stopped by the drill: not a restart by hand
        self.restarted_by_hand: list[str] = []

    def start(self, name: str) -> None:
        with (self.logs / f"{name}.log").open("ab") as out:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "deeptarget", *SERVICES[name]],
                env={**os.environ, **self.settings.to_env()},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.expected_exit.discard(name)

    def start_all(self) -> None:
        for name in SERVICES:
            self.start(name)

    def kill(self, name: str) -> None:
        self.expected_exit.add(name)
        kill_9(self.processes[name])

    def terminate_all(self) -> dict[str, int | None]:
        """SIGTERM to each main process at once, then each waited for up to its stop grace (then killed)."""
        self.expected_exit.update(self.processes)
        stopping = time.monotonic()
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, process in self.processes.items():
            grace = STOP_GRACE_S.get(name, DEFAULT_GRACE_S)
            try:
                codes[name] = process.wait(timeout=max(0.1, grace - (time.monotonic() - stopping)))
            except subprocess.TimeoutExpired:
                codes[name] = None  # past its grace: what compose would SIGKILL
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return codes

    def check(self) -> None:
        """A process that exited without the drill stopping it is what a person would have to restart."""
        for name, process in self.processes.items():
            if process.poll() is not None and name not in self.expected_exit:
                console.print(f"[red]{name} exited by itself ({process.returncode}); started again[/red]")
                self.restarted_by_hand.append(name)
                self.start(name)

    def stop(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is None:
                self.expected_exit.add(name)
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def api_url(self) -> str | None:
        """Where the API listens: the last address it logged (a restarted one picks a new port)."""
        log = self.logs / "api.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        prefix = "deeptarget API at "
        found = [line.removeprefix(prefix).strip() for line in lines if line.startswith(prefix)]
        return found[-1] if found else None


# -- what is measured -----------------------------------------------------------------------------------------------


def rows(settings: Settings) -> dict[str, tuple[str, str | None]]:
    """post id -> (status, reason), from the metadata store's SQLite file (read-only)."""
    try:
        with sqlite3.connect(f"file:{settings.metadata_database}?mode=ro", uri=True, timeout=10) as db:
            found = db.execute("SELECT post_id, status, reason FROM posts").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return {}
    return {post_id: (status, reason) for post_id, status, reason in found}


def quiet(client: redis.Redis) -> bool:
    """No task waiting on a queue, none delivered and unacknowledged (kombu's Redis transport)."""
    try:
        return not client.hlen("unacked") and not any(client.llen(q) for q in jobs.all_queues)
    except redis.RedisError:
        return False


def all_indexed(settings: Settings, expected: set[str]) -> bool:
    """Every offered post stored and done with (indexed or rejected), the published snapshot holding the indexed."""
    stored = rows(settings)
    if not expected <= set(stored) or any(s not in ("indexed", "rejected") for s, _ in stored.values()):
        return False
    return snapshot_total(settings) == sum(s == "indexed" for s, _ in stored.values())


class Prober:
    """``GET /similar`` at ~20/s once a post is indexed (the first one it finds; answers counted from the first 200
    on), ``GET /healthz`` at 10/s, each answer recorded."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.similar: list[int] = []
        self.healthz: list[tuple[float, int]] = []
        self.post_id: str | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._similar, daemon=True),
                         threading.Thread(target=self._health, daemon=True)]  # fmt: skip

    def __enter__(self) -> Prober:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _similar(self) -> None:
        while not self._stop.wait(0.05):
            base = self.deployment.api_url()
            if self.post_id is None:
                self.post_id = self._an_indexed_post()
            if base is None or self.post_id is None:
                continue
            status = http_status(f"{base}/similar?post_id={self.post_id}&k=5")
            if status == 200 or self.similar:  # from the first answer on: before it, the API may not have the index
                self.similar.append(status)

    def _an_indexed_post(self) -> str | None:
        if snapshot_total(self.deployment.settings) <= 0:
            return None
        return next((p for p, (s, _) in rows(self.deployment.settings).items() if s == "indexed"), None)

    def _health(self) -> None:
        while not self._stop.wait(0.1):
            base = self.deployment.api_url()
            if base is not None:
                self.healthz.append((time.monotonic(), http_status(f"{base}/healthz", timeout_s=2.0)))

    def first(self, status: int, after: float, equal: bool = True) -> float | None:
        """Seconds from ``after`` to the first /healthz answer that is (or, ``equal=False``, is not) ``status``."""
        for at, got in list(self.healthz):
            if at >= after and (got == status) == equal:
                return at - after
        return None


# -- the faults -----------------------------------------------------------------------------------------------------


class Drill:
    def __init__(self, root: Path, network: SandboxNetwork, url: str, weights: str) -> None:
        self.root = root
        self.network = network
        self.redis = EmbeddedRedis(root / "redis").start()
        self.settings = Settings(
            data_dir=root / "data",
            redis_url=self.redis.url,
            source_url=url,
            hashtags=network.hashtags,
            accounts=[a.username for a in network.accounts],
            weights=weights,
            api_port=0,
        )
        self.expected = network.offered(self.settings.hashtags, self.settings.accounts, self.settings.hashtag_edge)
        self.deployment = Deployment(self.settings, root)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, socket_timeout=5, socket_connect_timeout=2)

    def wait(self, condition: Callable[[], object], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.deployment.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.2)

    def stored_share(self) -> float:
        return len(rows(self.settings)) / max(1, len(self.expected))

    def until_busy(self) -> None:
        self.wait(lambda: self.stored_share() >= 0.25, "a quarter of the posts stored", 600)

    def redis_away(self, seconds: float) -> tuple[float, float]:
        self.until_busy()
        started = time.monotonic()
        self.redis.stop(kill=True)
        while time.monotonic() - started < seconds:
            self.deployment.check()
            time.sleep(0.2)
        self.redis = EmbeddedRedis(self.redis.directory, port=self.redis.port).start()
        return started, time.monotonic()

    def writer_kills(self, outcome: Outcome, times: int = 5) -> tuple[float, float]:
        self.until_busy()
        started = time.monotonic()
        caught = 0
        for _ in range(times):
            deadline = time.monotonic() + 20
            temp = None
            while temp is None and time.monotonic() < deadline:  # a snapshot in the middle, when one comes
                temp = next(iter(self.settings.index_dir.glob(".v*.faiss.tmp-*")), None)
                if temp is None:
                    time.sleep(0.001)
            self.deployment.kill("index")
            caught += temp is not None and temp.exists()
            self.deployment.start("index")
            time.sleep(3)  # its replay and first tasks before the next kill
        outcome.notes.append(f"{caught} of {times} kills with a snapshot's temporary file on disk")
        return started, time.monotonic()

    def disk_full(self, outcome: Outcome, seconds: float = 60.0) -> tuple[float, float]:
        """The data volume full (blobs, the metadata store, the snapshots), early: while the crawl downloads and the
        workers write."""
        self.wait(lambda: self.stored_share() >= 0.1, "a tenth of the posts stored", 600)
        started = time.monotonic()
        filler = fill(self.settings.data_dir)
        free = shutil.disk_usage(self.settings.data_dir).free
        outcome.notes.append(f"data disk full for {seconds:.0f} s ({free} bytes left)")
        while time.monotonic() - started < seconds:
            self.deployment.check()
            time.sleep(0.2)
        filler.unlink()
        return started, time.monotonic()

    def sigterm(self, outcome: Outcome) -> tuple[float, float]:
        self.until_busy()
        started = time.monotonic()
        outcome.exit_codes = self.deployment.terminate_all()
        outcome.notes.append(f"SIGTERM to all: stopped in {time.monotonic() - started:.1f} s")
        self.deployment.start_all()
        return started, time.monotonic()


def run_fault(fault: str, network: SandboxNetwork, url: str, root: Path, weights: str) -> Outcome:
    root.mkdir(parents=True)
    drill = Drill(root, network, url, weights)
    outcome = Outcome(fault, offered=len(drill.expected))
    with contextlib.ExitStack() as stack:
        if fault == "disk-full":
            try:
                stack.enter_context(small_tmpfs(drill.settings.data_dir, "1g"))
            except CannotMount as why:
                outcome.skipped = str(why)
                drill.redis.stop()
                return outcome
        stack.callback(lambda: drill.redis.stop())  # the one running at the end (a fault starts a new one)
        stack.callback(drill.deployment.stop)
        run_and_measure(drill, fault, outcome, url)
    return outcome


def run_and_measure(drill: Drill, fault: str, outcome: Outcome, url: str) -> None:
    began = time.monotonic()
    drill.deployment.start_all()
    with Prober(drill.deployment) as prober:
        if fault in ("redis-5", "redis-60"):
            fault_start, fault_end = drill.redis_away(float(fault.removeprefix("redis-")))
        elif fault == "writer-kill":
            fault_start, fault_end = drill.writer_kills(outcome)
        elif fault == "disk-full":
            fault_start, fault_end = drill.disk_full(outcome)
        elif fault == "sigterm":
            fault_start, fault_end = drill.sigterm(outcome)
        else:
            fault_start = fault_end = began
        client = drill.client()
        deadline = time.monotonic() + SETTLE_DEADLINE_S
        try:
            if fault != "none":
                before = len(rows(drill.settings))
                drill.wait(lambda: len(rows(drill.settings)) > before or all_indexed(drill.settings, drill.expected),
                           "a post stored after the fault", deadline - time.monotonic())  # fmt: skip
                outcome.resumed_s = time.monotonic() - fault_end
            drill.wait(lambda: all_indexed(drill.settings, drill.expected), "every post indexed or rejected",
                       deadline - time.monotonic())  # fmt: skip
            outcome.indexed_s = time.monotonic() - fault_end
            # A task a killed worker held waits for its redelivery (the visibility timeout), though the index
            # writer's catch-up has already done its work: the queues are quiet only after it ran again.
            drill.wait(lambda: quiet(client), "no task waiting or held", deadline - time.monotonic())
            outcome.recovered = True
            outcome.recovery_s = time.monotonic() - fault_end
        except TimeoutError as error:
            outcome.notes.append(str(error))
        outcome.total_s = time.monotonic() - began
        if fault != "none":
            outcome.healthz_503_after_s = prober.first(503, fault_start)
            outcome.healthz_200_after_s = prober.first(200, fault_end)
        time.sleep(1)  # a few /similar calls after the end too
    outcome.similar_calls = len(prober.similar)
    outcome.similar_ok = sum(s == 200 for s in prober.similar)
    outcome.similar_failed = {str(k): n for k, n in sorted(Counter(s for s in prober.similar if s != 200).items())}
    measure(drill, outcome, client, url)


def measure(drill: Drill, outcome: Outcome, client: redis.Redis, url: str) -> None:
    stored = rows(drill.settings)
    outcome.stored = len(drill.expected & set(stored))
    outcome.indexed = sum(s == "indexed" for s, _ in stored.values())
    outcome.rejected = sum(s == "rejected" for s, _ in stored.values())
    outcome.rejected_without_reason = sum(s == "rejected" and not r for s, r in stored.values())
    index = SnapshotStore(drill.settings.index_dir).load()
    if index is not None:
        outcome.index_duplicates = max(0, index.ntotal - outcome.indexed)
        outcome.index_missing = sum(vector_id(p) not in index for p, (s, _) in stored.items() if s == "indexed")
    with urllib.request.urlopen(f"{url}/sandbox/stats", timeout=10) as response:
        fetches = json.loads(response.read())["image_fetches"]
    outcome.images_fetched_twice = sum(n > 1 for n in fetches.values())
    with suppress(redis.RedisError):
        outcome.dead_letters = at_once(client.xlen(keys.deadletter_stream))
    if drill.settings.deadletter_path.exists():
        outcome.dead_letters += len(drill.settings.deadletter_path.read_text().splitlines())
    outcome.restarted_by_hand = list(drill.deployment.restarted_by_hand)
    leftovers = list(drill.settings.index_dir.glob(".*.tmp-*"))
    if leftovers:
        outcome.notes.append(f"{len(leftovers)} snapshot temporary files left")


def show(outcomes: list[Outcome]) -> None:
    table = Table(title="fault drill: every offered post, stored and indexed once, nothing done by hand")
    columns = ("fault", "stored", "indexed", "rejected", "dup. in index", "fetched twice", "dead letters",
               "restarted by hand", "stored again after s", "indexed after s", "queues quiet after s", "/similar ok",
               "slower than none by s", "/healthz 503 / 200 after s")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "fault" else "right")
    for o in outcomes:
        if o.skipped:
            table.add_row(o.fault, f"skipped: {o.skipped}", *[""] * 12)
            continue
        health = "-" if o.healthz_503_after_s is None else f"{o.healthz_503_after_s:.1f}"
        health += " / " + ("-" if o.healthz_200_after_s is None else f"{o.healthz_200_after_s:.1f}")
        table.add_row(
            o.fault,
            f"{o.stored} of {o.offered}",
            str(o.indexed),
            str(o.rejected),
            str(o.index_duplicates),
            str(o.images_fetched_twice),
            str(o.dead_letters),
            ", ".join(o.restarted_by_hand) or "-",
            "-" if o.resumed_s is None else f"{o.resumed_s:.1f}",
            "-" if o.indexed_s is None else f"{o.indexed_s:.1f}",
            "not recovered" if not o.recovered else f"{o.recovery_s:.1f}",
            f"{o.similar_ok} of {o.similar_calls}",
            "-" if o.slower_s is None else f"{o.slower_s:.1f}",
            health,
        )
    console.print(table)
    for o in outcomes:
        for note in o.notes:
            console.print(f"  {o.fault}: {note}")
        if o.similar_failed:
            console.print(f"  {o.fault}: /similar answers other than 200 (0: none in 5 s): {o.similar_failed}")
        if o.exit_codes:
            console.print(f"  {o.fault}: exit codes after SIGTERM {o.exit_codes}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=1500, help="media in the sandbox")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--weights", default="none", help="the workers' weights (default: random)")
    parser.add_argument("--json", type=Path, help="write the outcomes here as JSON")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (logs, data)")
    args = parser.parse_args()
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if unknown := sorted(set(faults) - set(FAULTS)):
        parser.error(f"unknown faults: {', '.join(unknown)}")
    network = SandboxNetwork(seed=13, n_posts=args.posts, n_users=max(8, args.posts // 50), n_hashtags=8)
    root = args.keep or Path(tempfile.mkdtemp(prefix="deeptarget-faults-"))
    outcomes: list[Outcome] = []
    for number, fault in enumerate(faults):
        console.rule(f"{fault} ({number + 1} of {len(faults)})")
        with sandbox_in_thread(network) as url:  # one per fault: its fetch counts are that run's
            outcome = run_fault(fault, network, url, root / fault, args.weights)
        baseline = next((o for o in outcomes if o.fault == "none" and o.recovered), None)
        if baseline is not None and outcome.recovered and fault != "none":
            outcome.slower_s = outcome.total_s - baseline.total_s
        outcomes.append(outcome)
        show([outcome])
    show(outcomes)
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(o.recovered or o.skipped for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
