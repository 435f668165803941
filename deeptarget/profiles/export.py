"""Profile exports for downstream systems: JSON lines (one profile per line) or Parquet (typed columns, maps for the
hashtag and class shares), streamed in batches so any number of profiles fits in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from deeptarget.core.records import Profile
from deeptarget.store.metadata import MetadataStore
from deeptarget.store.versioned import atomic_write

SHARES = pa.map_(pa.string(), pa.float64())
PARQUET_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("username", pa.string()),
        ("followers_count", pa.int64()),
        ("post_count", pa.int64()),
        ("face_share", pa.float64()),
        ("median_engagement", pa.float64()),
        ("hashtags", SHARES),
        ("classes", pa.map_(pa.string(), SHARES)),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _columns(profiles: list[Profile]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [
            {
                **p.model_dump(exclude={"hashtags", "classes"}),
                "hashtags": list(p.hashtags.items()),
                "classes": [(head, list(shares.items())) for head, shares in p.classes.items()],
            }
            for p in profiles
        ],
        schema=PARQUET_SCHEMA,
    )


def export_profiles(store: MetadataStore, path: Path, fmt: str) -> int:
    """Write every profile to ``path`` (replaced atomically); returns how many."""
    count = 0

    def write(handle: BinaryIO) -> None:
        nonlocal count
        if fmt == "jsonl":
            for batch in store.iter_profiles():
                for profile in batch:
                    line = json.dumps(profile.model_dump(mode="json"), ensure_ascii=False) + "\n"
                    handle.write(line.encode())
                count += len(batch)
            return
        with pq.ParquetWriter(handle, PARQUET_SCHEMA, compression="zstd") as writer:
            for batch in store.iter_profiles():
                writer.write_batch(_columns(batch))
                count += len(batch)

    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"export format must be jsonl or parquet, not {fmt!r}")
    atomic_write(Path(path), write)
    return count
