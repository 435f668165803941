"""Redis key names, in one place (the Celery queues and task names are in ``deeptarget/jobs.py``).

Every key starts with ``deeptarget:`` so that one Redis can be shared with other applications.
"""

key_prefix = "deeptarget:"

seen_posts_key = key_prefix + "seen"
"""SET of post ids whose image was fetched and handed to the workers. Membership means 'never fetch again'."""

claim_key_prefix = key_prefix + "claim:"
"""``claim:<post id>``: a scraper is working on this post; expires after ``claim_ttl_s`` so a crashed scraper's
posts become available again."""

download_failures_key = key_prefix + "download-failures"
"""HASH post id -> how many times its download failed after its retries; cleared when the post is committed."""

owner_known_key = key_prefix + "owner-known"
"""SET of post ids whose owner (and follower count) the workers have been told about."""

cursor_key = key_prefix + "cursors"
"""HASH ``<source>|<kind>|<target>`` -> next-page cursor (a hashtag's saved ``next`` link without its token, an
account's ``after``), or a marker once the target was crawled to the end; ``<...>|failed`` while its last crawl ended
on an error (it keeps its cursor and does not hold the round open)."""

scraper_stats_key = key_prefix + "stats:scraper"
"""HASH of scraper counters (pages, posts enqueued, duplicates, rejections by reason)."""

ingest_stream = key_prefix + "ingest"
"""STREAM of pushed posts (field ``post``: JSON) waiting for a scraper to fetch their images; group ``scrapers``."""

ingest_dead_stream = key_prefix + "ingest:dead"
"""STREAM of pushed entries delivered ``push.MAX_DELIVERIES`` times and never handled (fields entry, reason, post)."""

ingest_later_key = key_prefix + "ingest:later"
"""ZSET of posts (JSON) whose download failed, scored by when they go back on the ingest stream (scraper/later.py)."""

token_key_prefix = key_prefix + "tokens:"
"""``tokens:calls:<fingerprint>`` (ZSET, the token's calls in the rolling window), ``tokens:pause:<fingerprint>``,
``tokens:app-pause:<app>`` (every token of that app pauses: Graph error #4)."""

retired_tokens_key = key_prefix + "tokens:retired"
"""SET of fingerprints of access tokens the API called invalid (OAuth 190); never used again."""

hashtag_queries_key_prefix = key_prefix + "hashtag-queries:"
"""``hashtag-queries:<ig user id>``: ZSET hashtag -> time of its first search in the rolling 7 days (30 allowed)."""

hashtag_ids_key = key_prefix + "hashtag-ids"
"""HASH hashtag -> Graph hashtag id (a search costs quota; the id never changes)."""

profiles_stream = key_prefix + "profiles"
"""STREAM of updated user profiles (field ``profile``: JSON) for downstream consumers."""

profiles_stream_maxlen = 100_000
"""Approximate cap on the profiles stream; consumers that fall further behind read profiles from the API."""

deadletter_stream = key_prefix + "deadletter"
"""STREAM of tasks that failed for good (field ``letter``: JSON with task, args, error); see workers/deadletter.py."""

hashtag_model_version_key = key_prefix + "models:hashtags:version"
"""STRING: the newest published hashtag model version."""

index_writer_key = key_prefix + "index-writer"
"""STRING (JSON): the index writer's heartbeat (time, vectors, seq, snapshot version), refreshed every
``index_catch_up_every_s`` with a TTL; /healthz reads it to tell a live writer from a dead one."""

task_done_key_prefix = key_prefix + "task-done:"
"""``task-done:<task id>``: the task finished (kept twice the visibility timeout): a copy Redis delivers again because
the acknowledgement was lost (an outage, a kill right after the task) is skipped instead of run again."""
