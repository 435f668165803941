"""One S3-compatible bucket (AWS S3, MinIO, any server of the S3 REST API) under a key prefix, through boto3.

What the code relies on, and where S3 says so:

- A PUT is whole or absent: "Amazon S3 never adds partial objects; if you receive a success response, Amazon S3 added
  the entire object to the bucket" (S3 API reference, PutObject). Multipart uploads appear whole when completed.
- Reads after a write are strongly consistent, lists included (S3 User Guide, "Amazon S3 data consistency model",
  since December 2020). MinIO is strictly consistent too.
- ``If-None-Match: *`` on PutObject writes only when the key is absent and answers 412 PreconditionFailed otherwise
  (S3 User Guide, "Conditional writes", since August 2024); older servers ignore it, which is harmless for
  content-addressed keys (the same bytes are written again).

Every failure of the service, not of the request (connection refused or reset, timeouts, 5xx, SlowDown, a missing
bucket, rejected credentials), raises ``StorageUnavailable``: an outage to wait out, as a full disk is for the local
store, never a reason to reject a post. A missing key raises ``FileNotFoundError``. Credentials come from boto3's
standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance or pod role): they are never
settings, so they never reach a log, an error or a metric.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from prometheus_client import Counter, Histogram

from deeptarget.core.bucket_address import BucketAddress
from deeptarget.store.blobs import StorageUnavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REQUESTS = Counter(
    "deeptarget_object_store_requests",
    "Requests to the object store by operation and outcome (ok, missing: no such key, error: an outage)",
    ["operation", "outcome"],
)
SECONDS = Histogram(
    "deeptarget_object_store_seconds",
    "Time of one object-store request, retries by botocore included",
    ["operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# The request's own fault: the same request fails again, whatever the server's condition.
_REQUEST_FAULTS = {"InvalidArgument", "EntityTooLarge", "InvalidRequest", "KeyTooLongError", "MalformedXML"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_ALREADY_THERE = {"PreconditionFailed", "412"}


class Bucket:
    """Objects under ``address.prefix``; names are relative to it (``blobs/ab/cd/<sha256>``, ``index/CURRENT``)."""

    def __init__(
        self,
        address: BucketAddress,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        timeout_s: float = 10.0,
        attempts: int = 3,
    ) -> None:
        self.address = address
        self.endpoint_url = endpoint_url
        config = Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            # botocore's standard mode retries throttling and 5xx with jittered, capped backoff; what is left after
            # that is an outage, which the caller waits out with its own capped backoff.
            retries={"max_attempts": attempts, "mode": "standard"},
            max_pool_connections=32,
            # path-style addressing works for MinIO and moto without DNS per bucket, and for AWS too
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._region = region
        self._config = config
        self._clients: dict[int, S3Client] = {}
        self._clients_lock = threading.Lock()
        self._transfer = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20)

    @property
    def _client(self) -> S3Client:
        """This process's client: one made before a fork (a worker's pool) would share its connections with the
        parent's, so each process makes its own. Sessions are not thread-safe to make clients from: a lock."""
        pid = os.getpid()
        client = self._clients.get(pid)
        if client is None:
            with self._clients_lock:
                client = self._clients.get(pid)
                if client is None:
                    client = boto3.session.Session().client(
                        "s3", endpoint_url=self.endpoint_url, region_name=self._region, config=self._config
                    )
                    self._clients = {pid: client}
        return client

    def key(self, name: str) -> str:
        return self.address.prefix + name

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"Bucket({self.address}{where})"

    @contextmanager
    def _request(self, operation: str, name: str) -> Iterator[None]:
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        except botocore.exceptions.ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                outcome = "missing"
                raise FileNotFoundError(errno.ENOENT, f"no object {self.key(name)} in {self.address.bucket}") from None
            if code in _ALREADY_THERE:
                outcome = "ok"
                raise FileExistsError(errno.EEXIST, f"{self.key(name)} exists") from None
            if code in _REQUEST_FAULTS:
                raise OSError(errno.EINVAL, f"{operation} {self.key(name)} refused: {code}") from None
            raise StorageUnavailable(errno.EIO, f"object store {operation} {self.key(name)}: {code}") from None
        except botocore.exceptions.BotoCoreError as err:  # connection refused or reset, timeouts, no credentials
            raise StorageUnavailable(errno.EIO, f"object store {operation}: {type(err).__name__}") from None
        finally:
            REQUESTS.labels(operation, outcome).inc()
            SECONDS.labels(operation).observe(time.perf_counter() - started)

    def put_bytes(self, name: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write ``data`` whole; with ``if_absent``, only when no object has the name (False: one had)."""
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            with self._request("put", name):
                self._client.put_object(Bucket=self.address.bucket, Key=self.key(name), Body=data, **extra)
        except FileExistsError:
            return False
        return True

    def put_file(self, name: str, path: Path) -> None:
        """Upload a file whole (multipart past 64 MiB: the object appears when the last part is in)."""
        with self._request("put", name):
            self._client.upload_file(str(path), self.address.bucket, self.key(name), Config=self._transfer)

    def get_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        with self._request("get", name):
            answer = self._client.get_object(Bucket=self.address.bucket, Key=self.key(name))
            if max_bytes is not None and int(answer.get("ContentLength", 0)) > max_bytes:
                answer["Body"].close()
                raise OSError(errno.EFBIG, f"{self.key(name)} is larger than {max_bytes} bytes")
            return answer["Body"].read()

    def get_file(self, name: str, path: Path) -> None:
        """Download to ``path`` through a temporary file beside it: ``path`` is whole or absent."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.part-")
        os.close(fd)
        try:
            # One streamed GET: s3transfer's download_file adds a HEAD and a thread pool per call, which made a cold
            # image read 2-3x slower (bench/store.py); snapshots stream the same way, 1 MiB at a time.
            with self._request("get", name), open(tmp, "wb") as out:
                body = self._client.get_object(Bucket=self.address.bucket, Key=self.key(name))["Body"]
                for chunk in body.iter_chunks(2**20):
                    out.write(chunk)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        try:
            with self._request("head", name):
                self._client.head_object(Bucket=self.address.bucket, Key=self.key(name))
        except FileNotFoundError:
            return False
        return True

    def names(self, prefix: str) -> list[str]:
        """Names (relative to the bucket's prefix) that start with ``prefix``."""
        found: list[str] = []
        with self._request("list", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.address.bucket, Prefix=self.key(prefix)
            )
            for page in pages:
                found.extend(item["Key"][len(self.address.prefix) :] for item in page.get("Contents", []))
        return found

    def delete(self, name: str) -> None:
        with self._request("delete", name):
            self._client.delete_object(Bucket=self.address.bucket, Key=self.key(name))

    def probe(self) -> None:
        """Raises ``StorageUnavailable`` unless the bucket answers now (a HEAD of the bucket)."""
        with self._request("head", ""):
            self._client.head_bucket(Bucket=self.address.bucket)
