"""The compose deployment holds no default secret and exposes nothing by accident (issue 12, L12).

The file is read as compose reads it (YAML, then ``${VAR:?}`` / ``${VAR:-default}`` interpolation), and the Redis
service's command line is run for real on the embedded ``redis-server`` binary: it must demand the password and
refuse ``CONFIG``, as ``docker compose up`` would start it.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from deeptarget.runtime.embedded_redis import free_port, redis_server_binary
from tests.helpers import COMPOSE, SECRET_ENV, VARIABLE, MissingVariable, compose

ROOT = Path(__file__).resolve().parents[1]
SECRETS = ("DEEPTARGET_API_KEY", "REDIS_PASSWORD", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "GRAFANA_ADMIN_PASSWORD")


def test_no_secret_has_a_default_and_each_is_demanded() -> None:
    text = COMPOSE.read_text()
    for match in VARIABLE.finditer(text):
        if match["name"] in SECRETS:
            assert match["op"] == ":?", f"{match[0]}: a secret must be demanded (:?), never defaulted"
    for missing in SECRETS:
        env = {name: value for name, value in SECRET_ENV.items() if name != missing}
        with pytest.raises(MissingVariable, match=missing):
            compose(env)
        with pytest.raises(MissingVariable, match=missing):
            compose({**env, missing: ""})  # an empty secret is no secret
    assert compose(SECRET_ENV)["services"]


def test_only_the_api_and_grafana_publish_a_port_and_on_loopback_by_default() -> None:
    services = compose(SECRET_ENV)["services"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert published == {"api": ["127.0.0.1:8800:8800"], "grafana": ["127.0.0.1:3000:3000"]}
    operator_choice = compose({**SECRET_ENV, "DEEPTARGET_API_BIND": "0.0.0.0"})["services"]["api"]["ports"]
    assert operator_choice == ["0.0.0.0:8800:8800"]


def test_every_client_uses_the_passwords() -> None:
    config = compose(SECRET_ENV)
    env = config["x-deeptarget"]["environment"]
    assert env["DEEPTARGET_REDIS_URL"] == f"redis://:{SECRET_ENV['REDIS_PASSWORD']}@redis:6379/0"
    assert f":{SECRET_ENV['POSTGRES_PASSWORD']}@postgres:" in env["DEEPTARGET_DATABASE_URL"]
    assert config["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRET_ENV["POSTGRES_PASSWORD"]
    # redis-cli (the healthcheck) authenticates from REDISCLI_AUTH
    assert config["services"]["redis"]["environment"]["REDISCLI_AUTH"] == SECRET_ENV["REDIS_PASSWORD"]


def test_images_are_pinned_to_a_patch_release() -> None:
    config = compose(SECRET_ENV)
    images = [s["image"] for s in config["services"].values() if "image" in s and s["image"] != "deeptarget:latest"]
    base = re.search(r"^FROM (\S+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert base is not None
    for image in [*images, base[1]]:
        # PostgreSQL numbers its patch releases major.minor (16.6); the others major.minor.patch
        # PostgreSQL numbers its patch releases major.minor (16.6), MinIO by date (RELEASE.2024-12-18T13-15-44Z),
        # Prometheus with a v (v3.1.0); the others major.minor.patch
        release = r"\d+\.\d+" if image.startswith("postgres:") else r"v?\d+\.\d+\.\d+"
        if "/minio/" in image:
            release = r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ"
        assert re.fullmatch(rf"[\w./-]+:{release}(-[\w.-]+)?(@sha256:[0-9a-f]{{64}})?", image), image


@pytest.fixture
def compose_redis(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """The compose Redis service's own command line, run on the embedded redis-server binary."""
    password = SECRET_ENV["REDIS_PASSWORD"]
    service = compose(SECRET_ENV)["services"]["redis"]
    assert service["command"][:2] == ["sh", "-c"]
    line = service["command"][2]
    words = shlex.split(line.removeprefix("exec "))
    assert words[0] == "redis-server"
    port = free_port()
    command = [redis_server_binary(), *words[1:], "--port", str(port), "--dir", str(tmp_path), "--bind", "127.0.0.1"]
    # The shell of the container expands $REDIS_PASSWORD; here the same from the service's environment.
    command = [word.replace("$REDIS_PASSWORD", service["environment"]["REDIS_PASSWORD"]) for word in command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                redis.Redis(port=port, password=password, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, "the compose Redis command line did not start"
                assert time.monotonic() < deadline, "the compose Redis did not answer"
                time.sleep(0.05)
        yield port, password
    finally:
        process.terminate()
        process.wait(timeout=10)


def ask(port: int, *command: str) -> bytes:
    """One command in RESP on a new connection, its first reply line (no client library retries in between)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        payload = f"*{len(command)}\r\n" + "".join(f"${len(part)}\r\n{part}\r\n" for part in command)
        conn.sendall(payload.encode())
        return conn.makefile("rb").readline()


def test_the_compose_redis_demands_the_password_and_refuses_config(compose_redis: tuple[int, str]) -> None:
    port, password = compose_redis
    assert ask(port, "PING").startswith(b"-NOAUTH")
    assert ask(port, "AUTH", "wrong").startswith(b"-WRONGPASS")
    assert ask(port, "SET", "x", "1").startswith(b"-NOAUTH")
    client = redis.Redis(port=port, password=password, socket_timeout=2)
    assert client.ping()
    for command in (
        ("CONFIG", "SET", "dir", "/tmp"),
        ("DEBUG", "SLEEP", "0"),
        ("MODULE", "LIST"),
        ("REPLICAOF", "NO", "ONE"),
    ):
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command(*command)
