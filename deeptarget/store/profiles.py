"""Profiles in the metadata store, and audiences: each profile is saved with its interests (the ``interests`` table:
user x interest share), which audience queries read ranked; plus who has posts to profile, and how far behind the
stored profiles are."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from deeptarget.core.records import Profile
from deeptarget.store.connection import USABLE, StoreConnection


@dataclass(frozen=True)
class Audience:
    user_id: str
    score: float
    profile: Profile


def profile_interests(profile: Profile) -> list[tuple[str, float]]:
    """A profile's interests as (key, share): ``class:<head>:<label>`` and ``hashtag:<tag>``."""
    keys = [
        (f"class:{head}:{label}", share) for head, labels in profile.classes.items() for label, share in labels.items()
    ]
    return keys + [(f"hashtag:{tag}", share) for tag, share in profile.hashtags.items()]


class Profiles:
    def __init__(self, conn: StoreConnection) -> None:
        self._conn = conn

    def save_profile(self, profile: Profile) -> None:
        """Store a profile and its interests (the index that audience queries read)."""
        with self._conn.transaction() as db:
            db.execute(
                "INSERT INTO profiles (user_id, profile, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(user_id) DO UPDATE SET profile = excluded.profile, updated_at = excluded.updated_at",
                (profile.user_id, profile.model_dump_json(), time.time()),
            )
            db.execute("DELETE FROM interests WHERE user_id = ?", (profile.user_id,))
            db.executemany(
                "INSERT INTO interests (interest, user_id, score) VALUES (?, ?, ?)",
                [(interest, profile.user_id, score) for interest, score in profile_interests(profile)],
            )

    def backfill_interests(self) -> None:
        """Profiles saved before the interests table existed get their rows once."""
        empty = self._conn.fetchone("SELECT 1 FROM interests LIMIT 1") is None
        if empty and self._conn.fetchone("SELECT 1 FROM profiles LIMIT 1") is not None:
            for profile in self.profiles():
                self.save_profile(profile)

    def profile(self, user_id: str) -> Profile | None:
        row = self._conn.fetchone("SELECT profile FROM profiles WHERE user_id = ?", (user_id,))
        return None if row is None else Profile.model_validate_json(row["profile"])

    def iter_profiles(self, batch: int = 1000) -> Iterator[list[Profile]]:
        """Every profile in batches, by user id (for exports of any size)."""
        last = ""
        while True:
            rows = self._conn.fetchall(
                "SELECT user_id, profile FROM profiles WHERE user_id > ? ORDER BY user_id LIMIT ?", (last, batch)
            )
            if not rows:
                return
            last = rows[-1]["user_id"]
            yield [Profile.model_validate_json(r["profile"]) for r in rows]

    def profiles(self) -> list[Profile]:
        rows = self._conn.fetchall("SELECT profile FROM profiles ORDER BY user_id")
        return [Profile.model_validate_json(r["profile"]) for r in rows]

    def audience(
        self,
        interest: str,
        min_score: float = 0.0,
        min_posts: int = 1,
        limit: int = 100,
        exclude_outliers: bool = False,
    ) -> list[Audience]:
        """Users ranked by their share of ``interest`` (a key of ``profile_interests``), best first."""
        db = self._conn.db
        outliers = f"AND NOT {db.json_flag('p.profile', 'follower_outlier')}" if exclude_outliers else ""
        rows = self._conn.fetchall(
            f"""SELECT i.user_id, i.score, p.profile FROM interests i JOIN profiles p ON p.user_id = i.user_id
               WHERE i.interest = ? AND i.score >= ? AND {db.json_number("p.profile", "post_count")} >= ?
               {outliers} ORDER BY i.score DESC, i.user_id LIMIT ?""",
            (interest, min_score, min_posts, limit),
        )
        return [Audience(r["user_id"], float(r["score"]), Profile.model_validate_json(r["profile"])) for r in rows]

    def has_interest(self, interest: str) -> bool:
        return self._conn.fetchone("SELECT 1 FROM interests WHERE interest = ? LIMIT 1", (interest,)) is not None

    def owner_ids(self) -> list[str]:
        """Owners with usable posts: whom profiles are built for."""
        rows = self._conn.fetchall(f"SELECT DISTINCT owner_id FROM posts WHERE owner_id IS NOT NULL AND {USABLE}")
        return sorted(r[0] for r in rows)

    def profile_backlog(self) -> int:
        """Owners whose stored profile does not count all their usable posts yet (0 when profiles are current)."""
        with self._conn.lock:  # both reads at one moment
            counts = self._conn.fetchall(
                # albums count once in a profile: their images share the album's permalink (profiles.album_key)
                "SELECT owner_id, COUNT(DISTINCT COALESCE(permalink, post_id)) FROM posts "
                f"WHERE owner_id IS NOT NULL AND {USABLE} GROUP BY owner_id"
            )
            stored = {
                r[0]: json.loads(r[1]).get("post_count", 0)
                for r in self._conn.fetchall("SELECT user_id, profile FROM profiles")
            }
        return sum(1 for owner, n in counts if stored.get(owner) != n)
