"""Deleting posts (a user removed them, or asked to be forgotten): the store forgets the embedding and predictions at
once, so queries stop returning them as soon as the index writer has removed them and snapshotted; the owners'
profiles are recomputed without them. The scraper's seen-set keeps the ids, so a deleted post is never fetched again.
"""

from __future__ import annotations

from deeptarget.jobs import Jobs
from deeptarget.store.metadata import MetadataStore


def delete_posts(store: MetadataStore, jobs: Jobs, post_ids: list[str]) -> list[str]:
    """Returns the ids that were known (unknown ones are ignored)."""
    deleted, owners = store.delete_posts(post_ids)
    jobs.remove_posts(deleted)
    jobs.update_profiles(owners)
    return deleted
