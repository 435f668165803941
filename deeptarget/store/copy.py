"""Copying a metadata store to another, on either database: how a deployment that grew past one host moves its
SQLite store to PostgreSQL (``deeptarget store-copy --to postgresql://...``), or the other way for a laptop.

Posts (embeddings, predictions, statuses and index sequence numbers included, so a copied store matches the index
snapshots beside it) and the small tables go row by row; profiles go through ``save_profile``, which rebuilds their
interests. Every write is an upsert, so a copy cut short is finished by running it again. Stop the writers first:
what they write during the copy may be left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deeptarget.store.metadata import MetadataStore
from deeptarget.store.schema import COPIED_AS_ROWS


@dataclass(frozen=True)
class CopyCounts:
    posts: int
    profiles: int
    models: int


def copy_store(
    source: MetadataStore,
    destination: MetadataStore,
    on_progress: Callable[[str, int], None] = lambda table, n: None,
    batch: int = 1000,
) -> CopyCounts:
    counts = {}
    for table in COPIED_AS_ROWS:  # posts, counters (unused, kept for the stores that have rows in it), models
        counts[table] = 0
        for rows in source.tables.rows_of(table, batch):
            destination.tables.put_rows(table, rows)
            counts[table] += len(rows)
            on_progress(table, len(rows))
    profiles = 0
    for page in source.iter_profiles(batch):
        for profile in page:
            destination.save_profile(profile)
        profiles += len(page)
        on_progress("profiles", len(page))
    return CopyCounts(posts=counts["posts"], profiles=profiles, models=counts["models"])
