"""A real S3-protocol server for the tests: moto's standalone server (``moto_server``, a Flask app speaking the S3 REST
API over HTTP) in a process of its own on loopback, and a TCP relay in front of it that a test stops and starts to
take the bucket away and bring it back.

Why a relay: moto keeps its objects in the server process's memory, so killing that process would lose them, which
a MinIO or S3 restart does not. The relay's stop is what clients see of a restart (connections reset mid-request,
then refused) while the objects stay, as they do on a server with disks.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deeptarget.runtime.embedded_redis import free_port

# Any credentials do for moto; set so that boto3's chain never looks further (no instance-metadata request: that is
# an address outside loopback, which tests never call).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "deeptarget-test",
    "AWS_SECRET_ACCESS_KEY": "deeptarget-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class S3Server:
    """``moto_server`` on a free loopback port, its output in ``log``."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> S3Server:
        binary = Path(sys.executable).with_name("moto_server")
        with self.log.open("ab") as out:
            self._process = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log.read_text()[-2000:]
                raise RuntimeError(f"moto_server exited with {self._process.returncode}: {tail}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                return self
            time.sleep(0.1)
        raise RuntimeError(f"moto_server did not answer in 30 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def create_bucket(self) -> str:
        """A new, empty bucket of its own for one test."""
        import boto3

        name = f"dt-{uuid.uuid4().hex[:16]}"
        client = boto3.session.Session().client("s3", endpoint_url=self.url, region_name="us-east-1",
                                                aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                                aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        client.create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.session.Session().client("s3", endpoint_url=self.url, region_name="us-east-1",
                                                aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                                aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        names: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            names.extend(item["Key"] for item in page.get("Contents", []))
        return names


class Relay:
    """A TCP relay on its own loopback port to ``target_port``; ``stop()`` closes the listener and resets every
    connection through it (a server going down), ``start()`` listens on the same port again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.delay_s = 0.0  # held before each chunk goes on: a slow server (or network), not a dead one

    def start(self) -> Relay:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="relay-accept").start()
        return self

    @property
    def running(self) -> bool:
        return self._listener is not None

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.close()  # linger 0: a reset, as when the server's host goes away
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True, name="relay-pump").start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for conn in (source, sink):
                    if conn in self._open:
                        self._open.discard(conn)
                        conn.close()


@dataclass
class TestBucket:
    """One test's bucket on the shared server, reached through a relay of its own."""

    server: S3Server
    relay: Relay
    name: str

    __test__ = False  # not a test class, whatever pytest makes of its name

    @property
    def url(self) -> str:
        return f"s3://{self.name}/"

    @property
    def settings(self) -> dict[str, object]:
        """The settings that put a deployment on this bucket (through the relay)."""
        return {"object_store_url": self.url, "object_store_endpoint": self.relay.url, "object_store_timeout_s": 2.0}

    def objects(self, prefix: str = "") -> list[str]:
        return self.server.objects(self.name, prefix)

    @contextlib.contextmanager
    def slow(self, delay_s: float) -> Iterator[None]:
        """Every chunk through the relay held ``delay_s`` for the body of the ``with``."""
        self.relay.delay_s = delay_s
        try:
            yield
        finally:
            self.relay.delay_s = 0.0

    @contextlib.contextmanager
    def away(self) -> Iterator[None]:
        """The bucket unreachable for the body of the ``with``."""
        self.relay.stop()
        try:
            yield
        finally:
            self.relay.start()


def http_ok(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except (urllib.error.URLError, OSError):
        return False
    return True


def set_credentials() -> None:
    for name, value in CREDENTIALS.items():
        os.environ.setdefault(name, value)
