"""What a source hands the engine: batches of posts, each with what stores their images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from deeptarget.core.records import Post


class Fetcher(Protocol):
    """Stores a post's image by URL: (sha256, bytes), or ImageRejected. Downloads, or files of a local source."""

    async def __call__(self, url: str) -> tuple[str, int]: ...


@dataclass(frozen=True)
class Batch:
    """Posts for the engine's pipeline (claim -> download -> sink), and what fetches their images."""

    posts: list[Post]
    fetcher: Fetcher
