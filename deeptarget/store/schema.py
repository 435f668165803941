"""The metadata store's tables, created when a store opens (``CREATE ... IF NOT EXISTS``: opening an existing store
changes nothing).

Column types come from the database (databases.py): INTEGER/REAL/BLOB in SQLite, BIGINT/DOUBLE PRECISION/BYTEA in
PostgreSQL (whose INTEGER is 32 bits and REAL 4 bytes: too small for vector ids and times). ``posts.status`` holds a
``PostStatus`` value (core/records.py).
"""

from __future__ import annotations

from deeptarget.store.databases import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS posts (
    post_id TEXT PRIMARY KEY,
    vector_id {int} NOT NULL UNIQUE,
    source TEXT NOT NULL,
    media_url TEXT, permalink TEXT, caption TEXT,
    hashtags TEXT NOT NULL DEFAULT '[]',
    like_count {int}, comments_count {int}, timestamp TEXT,
    owner_id TEXT, owner_username TEXT, owner_followers {int},
    blob TEXT,
    status TEXT NOT NULL DEFAULT 'queued',
    reason TEXT,
    faces {int}, face_confidence {real}, face_boxes TEXT,
    classes TEXT,
    model_id TEXT,
    embedding {blob},
    indexed_seq {int},
    updated_at {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS posts_owner ON posts(owner_id);
CREATE INDEX IF NOT EXISTS posts_status ON posts(status);
CREATE INDEX IF NOT EXISTS posts_indexed_seq ON posts(indexed_seq);
CREATE TABLE IF NOT EXISTS profiles (
    user_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    updated_at {real} NOT NULL
);
-- counters: unused (nothing reads or writes it); kept, and copied, for the deployments whose stores have it
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value {int} NOT NULL);
CREATE TABLE IF NOT EXISTS interests (
    interest TEXT NOT NULL,  -- 'class:<head>:<label>' or 'hashtag:<tag>'
    user_id TEXT NOT NULL,
    score {real} NOT NULL,   -- the profile's weight share for it
    PRIMARY KEY (interest, user_id)
){without_rowid};
CREATE INDEX IF NOT EXISTS interests_ranked ON interests(interest, score DESC);
CREATE INDEX IF NOT EXISTS interests_user ON interests(user_id);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,      -- JSON: what builds the embedder again (models.embedder.EmbedderSpec)
    registered_at {real} NOT NULL
);
"""

COPIED_AS_ROWS = {"posts": "post_id", "counters": "name", "models": "model_id"}
"""What a copy of the store (copy.py) moves row by row, with each table's key; profiles go through ``save_profile``,
which rebuilds their interests."""


def create_schema(db: Database) -> None:
    db.create_schema(SCHEMA.format(**db.types))
