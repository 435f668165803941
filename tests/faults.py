"""Faults from outside, shared by the fault tests and ``bench/faults.py``: a small real file system to fill up, the
kill of a process with everything it started, and what both need around a deployment (the sandbox in a thread of
its own, an HTTP status, the published snapshot's size)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from deeptarget.core.settings import Settings
from deeptarget.index.vectors import SnapshotStore
from deeptarget.sandbox import SandboxNetwork, sandbox_server


class CannotMount(RuntimeError):
    """No tmpfs here (not root, no ``mount``, or the mount refused): the caller skips, saying why."""


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``) at ``mount_point`` (made if missing), unmounted afterwards: a real
    file system that a test can fill up, which only root may mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        raise CannotMount("filling a real file system needs root (a tmpfs mount)")
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise CannotMount(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Writes a file in ``directory`` until its file system is full, to the last byte; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def kill_9(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to a process started in a session of its own and to everything in it (a worker's pool children): no
    chance to clean up."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def sandbox_in_thread(network: SandboxNetwork) -> Iterator[str]:
    """The sandbox served from an event loop of its own, so that the test's waits can block; yields its URL."""
    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), asyncio.Event()
    url: list[str] = []

    async def serve() -> None:
        async with sandbox_server(network) as server:
            url.append(server.url)
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not started.wait(30):
        raise RuntimeError("the sandbox did not start")
    try:
        yield url[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def snapshot_total(settings: Settings) -> int:
    index = SnapshotStore(settings.index_dir).load()
    return -1 if index is None else index.ntotal


def http_status(url: str, timeout_s: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0
