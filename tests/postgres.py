"""A real PostgreSQL server for the tests, run from the server binaries that the ``pgserver`` wheel (a dev dependency)
carries, so that no system package is needed. PostgreSQL refuses to run as root: under root the server runs as the
``postgres`` user (or ``nobody``) from a copy of the binaries in a folder that user can reach."""

from __future__ import annotations

import importlib.util
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


def server_binaries() -> Path:
    """The folder holding ``bin/``, ``lib/`` and ``share/`` of a PostgreSQL installation."""
    spec = importlib.util.find_spec("pgserver")  # finds the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
        if (install / "bin" / "postgres").is_file():
            return install
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*"), reverse=True):
        if (candidate / "bin" / "postgres").is_file():
            return candidate
    raise RuntimeError("no PostgreSQL server binaries: install the dev extra (pip install -e .[dev]: pgserver)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Durability off: a test server's data is thrown away (bench/store.py turns it back on).
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class LocalPostgres:
    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.settings = {**FAST, "max_connections": "300", **(settings or {})}
        self.root = Path(tempfile.mkdtemp(prefix="deeptarget-pg-"))
        self.port = _free_port()
        self.user: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.install = Path()
        self._names = itertools.count(1)

    def _run_as(self) -> list[str]:
        """The prefix that drops root: setpriv only switches ids and execs (no PAM session, unlike runuser/su)."""
        if not self.user:
            return []
        entry = pwd.getpwnam(self.user)
        return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]

    def start(self, timeout_s: float = 60.0) -> LocalPostgres:
        try:
            return self._init_and_launch(timeout_s)
        except BaseException:
            self.stop()  # nothing of a server that never came up is left behind
            raise

    def _init_and_launch(self, timeout_s: float) -> LocalPostgres:
        install = server_binaries()
        if os.geteuid() == 0:
            self.user = "postgres" if _user_exists("postgres") else "nobody"
            self.root.chmod(0o755)
            install = self._copy_for_the_server_user(install)
            shutil.chown(self.root, self.user)
        self.install = install
        done = subprocess.run(
            [*self._run_as(), str(install / "bin" / "initdb"), "-D", str(self.root / "data"), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")
        return self._launch(timeout_s)

    def _launch(self, timeout_s: float) -> LocalPostgres:
        install, data, log = self.install, self.root / "data", self.root / "server.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [*self._run_as(), str(install / "bin" / "postgres"), "-D", str(data), "-p", str(self.port),
                 "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
                 *(arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}"))],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.url("postgres")).close()
                return self
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def _copy_for_the_server_user(self, install: Path) -> Path:
        """The installation copied where the server's user can read it, in the same layout: the wheel's binaries
        find their shared libraries at ``$ORIGIN/../../../pgserver.libs``."""
        copy = self.root / "install" / install.parent.name / install.name
        for part in ("bin", "lib", "share"):
            shutil.copytree(install / part, copy / part, symlinks=True)
        libs = install.parent.parent / f"{install.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, self.root / "install" / libs.name, symlinks=True)
        return copy

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def restart(self, timeout_s: float = 60.0) -> None:
        """Stop the server (its clients' connections break) and start it again on the same data and port."""
        self._shut_down()
        self._launch(timeout_s)

    def stop(self) -> None:
        self._shut_down()
        shutil.rmtree(self.root, ignore_errors=True)

    def _shut_down(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected). setpriv execs, so the process is the postmaster."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
