"""Where a deployment's bucket is: ``s3://bucket/prefix`` (validated by the settings, used by ``store.bucket``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class BucketAddress:
    """``s3://bucket/prefix``: the prefix, if any, always ends with ``/``."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> BucketAddress:
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise ValueError(f"an object store URL is s3://bucket/prefix, not {parts.scheme or 'no'} scheme")
        if parts.username is not None or parts.password is not None:
            raise ValueError("an object store URL carries no credentials: boto3's credential chain provides them")
        if parts.query or parts.fragment:
            raise ValueError("an object store URL has no query or fragment")
        bucket = parts.hostname or ""
        if not 3 <= len(bucket) <= 63:
            raise ValueError(f"a bucket name has 3 to 63 characters, not {len(bucket)}")
        prefix = parts.path.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"
