"""Switching the embedder (another backbone, or fine-tuned weights): the stored posts are embedded again from their
stored images by the workers, which must already run with the new settings, and the index is then rebuilt for the
new model. Until the rebuild, queries keep the old snapshot (image queries embed with its model: see
``QueryService.query_embedder``); predictions, faces and profiles follow each batch."""

from __future__ import annotations

import time
from collections.abc import Callable

from deeptarget.core.records import PostRef
from deeptarget.jobs import Jobs
from deeptarget.store.metadata import MetadataStore


def send_reembed(store: MetadataStore, jobs: Jobs, model_id: str, batch_size: int) -> int:
    """Queue every usable post that another model embedded for the infer task; returns how many."""
    sent = 0
    for posts in store.stale_posts(model_id, batch=batch_size):
        refs = [PostRef(post=p.post, blob=p.blob) for p in posts]
        jobs.infer(refs)
        sent += len(refs)
    return sent


def wait_until_reembedded(
    store: MetadataStore,
    model_id: str,
    timeout_s: float,
    on_progress: Callable[[int], None] = lambda left: None,
    poll_s: float = 1.0,
) -> int:
    """Wait until no usable post is left from another model; returns how many are left (0 unless timed out)."""
    deadline = time.monotonic() + timeout_s
    while (left := store.count_stale(model_id)) and time.monotonic() < deadline:
        on_progress(left)
        time.sleep(poll_s)
    return left


def rebuild_index(jobs: Jobs) -> None:
    jobs.rebuild_index()
