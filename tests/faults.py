"""Faults from outside, shared by the fault tests and ``bench/faults.py``: a small real file system to fill up, and
the kill of a process with everything it started."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path


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
