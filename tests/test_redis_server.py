"""The embedded Redis is not open to other local users (issue 12, H3): a password kept mode 0600 in a 0700 directory,
no CONFIG (which lets a client make Redis write files anywhere), and the URL written for other commands 0600 too."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from deeptarget.runtime.embedded_redis import EmbeddedRedis
from deeptarget.runtime.processes import start_embedded_redis
from tests.conftest import make_settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_embedded_redis_wants_its_password_and_refuses_config(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.set("k", "v")
        anonymous.close()
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command("CONFIG", "SET", "dir", "/tmp")
        # SYNC and PSYNC (found by the attacker's re-test) would stream a copy of every key to any client
        for command in (("DEBUG", "SLEEP", "0"), ("MODULE", "LIST"), ("REPLICAOF", "NO", "ONE"), ("SYNC",),
                        ("PSYNC", "?", "-1")):  # fmt: skip
            with pytest.raises(redis.ResponseError, match="unknown command"):
                client.execute_command(*command)
        client.close()
        assert server.password not in server.shown_url
        assert mode(tmp_path / "redis") == 0o700
        assert mode(tmp_path / "redis" / "password") == 0o600 and mode(tmp_path / "redis" / "redis.conf") == 0o600
    # The same directory keeps its password across restarts (the AOF and the clients' URLs stay valid).
    with EmbeddedRedis(tmp_path / "redis") as again:
        assert again.password == server.password


def test_the_url_file_other_commands_read_is_private(tmp_path: Path) -> None:
    settings, server = start_embedded_redis(make_settings(tmp_path / "data"))
    try:
        url_file = settings.redis_dir / "url"
        assert mode(url_file) == 0o600 and url_file.read_text() == settings.redis_url
        assert redis.Redis.from_url(url_file.read_text()).ping()
    finally:
        server.stop()


def test_a_restarted_embedded_redis_comes_back_where_clients_left_it(tmp_path: Path) -> None:
    """Re-test finding: it restarted on a new random port, and a running API, which read the URL once, stayed
    degraded for good. On its previous port (when free) every client reconnects by itself, and finds the data."""
    settings, server = start_embedded_redis(make_settings(tmp_path / "data"))
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
    client.set("kept", "1")
    server.stop(kill=True)  # a crash: Redis writes the AOF before it replies, so only power loss could lose the set
    again, server = start_embedded_redis(make_settings(tmp_path / "data"))
    try:
        assert again.redis_url == settings.redis_url
        assert client.get("kept") == b"1"  # the same client object, reconnected
    finally:
        client.close()
        server.stop()
    with socket.socket() as squatter:  # the old port taken by someone else: a free one instead, never a failure
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the old connections are in TIME_WAIT
        squatter.bind(("127.0.0.1", urlsplit(settings.redis_url).port or 0))
        squatter.listen()
        moved, server = start_embedded_redis(make_settings(tmp_path / "data"))
        try:
            assert moved.redis_url != settings.redis_url and redis.Redis.from_url(moved.redis_url).ping()
        finally:
            server.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_deeptarget_redis_stops_its_server_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    settings = make_settings(tmp_path / "data")
    env = {**os.environ, **settings.to_env()}
    env.pop("DEEPTARGET_REDIS_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "deeptarget", "redis"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline()]
        while "Ctrl-C stops it" not in lines[-1]:
            assert lines[-1], "".join(lines)
            lines.append(process.stdout.readline())
        url = (settings.redis_dir / "url").read_text()
        assert redis.Redis.from_url(url).ping()
        process.send_signal(sig)
        assert process.wait(timeout=30) == 0
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    finally:
        if process.poll() is None:
            process.kill()


def test_the_data_dir_is_private_whatever_the_umask(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    done = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0o022); from deeptarget.cli import main; "
                           f"sys.exit(main(['--data-dir', {str(data_dir)!r}, 'deadletter', 'list']))"],
                          env={**os.environ, "DEEPTARGET_REDIS_URL": "redis://127.0.0.1:9/0"}, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert data_dir.is_dir(), done.stderr
    assert mode(data_dir) == 0o700
