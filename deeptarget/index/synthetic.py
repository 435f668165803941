"""Synthetic unit vectors with the cluster structure of real image embeddings, for index benchmarks and tests.

Uniform random vectors have no neighbourhoods (every point is about equally far from every other), which makes
every approximate index look broken. Real embeddings form clusters of very uneven sizes, each stretched along a few
directions of its own, and clusters group into broader themes (dog breeds lie near each other). So:

- ``n_groups`` theme centres uniform on the sphere, cluster centres scattered around them (cosine ~0.6 to their
  theme), cluster sizes from a Zipf-like law;
- per cluster, an anisotropic Gaussian along ``rank`` random axes of its own (scales that decay and vary by
  cluster), plus a little isotropic noise; normalised.

With the default ``spread`` a point's cosine to its centre is about 0.7 and to another point of its cluster about
0.5, as for ImageNet-trained CNN features of one class. (A low-rank noise subspace shared by every cluster looks
similar but is wrong: its high-variance directions dominate k-means, which then cuts every cluster across many
lists; no real collection behaves like that.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ClusteredVectors:
    dim: int
    n_clusters: int = 4000
    n_groups: int = 200
    seed: int = 0
    rank: int = 48
    spread: float = 1.0
    isotropic: float = 0.25
    # drawn from the fields above by __post_init__
    _centres: np.ndarray = field(init=False, repr=False, compare=False)
    _axes: np.ndarray = field(init=False, repr=False, compare=False)
    _scales: np.ndarray = field(init=False, repr=False, compare=False)
    _weights: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        themes = _unit(rng.standard_normal((self.n_groups, self.dim)))
        scatter = _unit(rng.standard_normal((self.n_clusters, self.dim)))
        centres = _unit(themes[rng.integers(0, self.n_groups, self.n_clusters)] + 1.3 * scatter).astype(np.float32)
        axes = np.stack([rng.choice(self.dim, self.rank, replace=False) for _ in range(self.n_clusters)])
        decay = 1.0 / np.sqrt(1.0 + np.arange(self.rank) / 8.0)
        scales = rng.lognormal(0.0, 0.5, (self.n_clusters, self.rank)) * decay
        scales *= self.spread / np.sqrt((scales**2).sum(axis=1, keepdims=True))  # noise norm ~ spread
        weights = 1.0 / np.arange(1, self.n_clusters + 1) ** 0.7
        object.__setattr__(self, "_centres", centres)
        object.__setattr__(self, "_axes", axes)
        object.__setattr__(self, "_scales", scales.astype(np.float32))
        object.__setattr__(self, "_weights", rng.permutation(weights / weights.sum()))

    def chunks(self, n: int, chunk: int = 65_536, stream: int = 0) -> Iterator[np.ndarray]:
        """``n`` float32 unit vectors in chunks; ``stream`` picks an independent draw (e.g. 1 for queries)."""
        rng = np.random.default_rng((self.seed, stream))
        centres, axes, scales = self._centres, self._axes, self._scales
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            labels = rng.choice(self.n_clusters, size=size, p=self._weights)
            # a Python float: a NumPy float64 scalar would make the whole chunk float64 (NumPy 2 promotion, NEP 50)
            x = rng.standard_normal((size, self.dim), dtype=np.float32) * float(self.isotropic / np.sqrt(self.dim))
            x += centres[labels]
            z = rng.standard_normal((size, self.rank), dtype=np.float32) * scales[labels]
            # a cluster's axes are distinct (drawn without replacement), so plain fancy-index addition is exact, and
            # many times faster than np.add.at
            x[np.arange(size)[:, None], axes[labels]] += z
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield x

    def sample(self, n: int, stream: int = 0) -> np.ndarray:
        return np.concatenate(list(self.chunks(n, stream=stream)))


def _unit(x: np.ndarray) -> np.ndarray:
    unit: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit
