"""Follower-count outliers, as in the likability study: an account whose follower count lies outside median +- k * MAD
of the accounts seen so far is marked, so that engagement statistics (likes / followers) and audiences can leave out
the celebrities and the near-empty accounts that would dominate them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from deeptarget.store.metadata import MetadataStore


@dataclass(frozen=True)
class FollowerBounds:
    median: float
    mad: float  # median absolute deviation (unscaled)
    k: float
    accounts: int

    @property
    def low(self) -> float:
        return self.median - self.k * self.mad

    @property
    def high(self) -> float:
        return self.median + self.k * self.mad

    def is_outlier(self, followers: int | None) -> bool | None:
        """None when the follower count is unknown or too few accounts were seen to judge (fewer than 10)."""
        if followers is None or self.accounts < 10:
            return None
        return not self.low <= followers <= self.high

    @classmethod
    def of(cls, followers: np.ndarray, k: float) -> FollowerBounds:
        if len(followers) == 0:
            return cls(0.0, 0.0, k, 0)
        median = float(np.median(followers))
        return cls(median, float(np.median(np.abs(followers - median))), k, len(followers))


class FollowerBoundsCache:
    """Bounds over the store's accounts, recomputed at most every ``max_age_s`` (a scan of every owner)."""

    def __init__(self, store: MetadataStore, k: float, max_age_s: float = 60.0) -> None:
        self.store = store
        self.k = k
        self.max_age_s = max_age_s
        self._bounds: FollowerBounds | None = None
        self._at = 0.0

    def get(self) -> FollowerBounds:
        if self._bounds is None or time.monotonic() - self._at > self.max_age_s:
            self._bounds = FollowerBounds.of(self.store.follower_counts(), self.k)
            self._at = time.monotonic()
        return self._bounds
