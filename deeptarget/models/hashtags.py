"""Hashtag suggestions: implicit ALS over the images x hashtags matrix (the hashtag study's algorithm).

Images play implicit's "users" and hashtags its "items". A new image has no row in the matrix, so it borrows one:
its k nearest indexed images in FAISS -> the mean of their ALS image factors -> scores against every hashtag's
factors -> the top n. An image that is itself in the model uses its own factors.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from deeptarget.core.errors import ModelFitError, ModelNotReadyError
from deeptarget.core.settings import Settings
from deeptarget.store.versioned import VersionedDir, atomic_write

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class HashtagModel:
    image_ids: np.ndarray  # int64 (n,), sorted: the FAISS vector ids of the training images
    image_factors: np.ndarray  # float32 (n, f)
    hashtags: list[str]  # (m,)
    hashtag_factors: np.ndarray  # float32 (m, f)
    popularity: np.ndarray  # int64 (m,) images per hashtag, for the fallback and for reports
    version: int = 0

    @classmethod
    def fit(
        cls,
        image_ids: np.ndarray,
        image_hashtags: Sequence[Sequence[str]],
        *,
        factors: int = 32,
        iterations: int = 20,
        regularization: float = 0.05,
        alpha: float = 20.0,
        weighting: str = "constant",
        min_count: int = 1,
        seed: int = 0,
    ) -> HashtagModel:
        """Fit on (vector id, hashtags) rows; images without any kept hashtag are left out.

        Confidence of an (image, hashtag) pair: ``alpha`` (``constant``), or ``alpha`` times its BM25 or TF-IDF
        weight (``bm25``, ``tfidf``), which discounts hashtags that are on everything (#love, #instagood).
        """
        from implicit.cpu.als import AlternatingLeastSquares  # CPU class directly: the factory may pick a GPU
        from implicit.nearest_neighbours import bm25_weight, tfidf_weight

        if weighting not in ("constant", "bm25", "tfidf"):
            raise ValueError(f"hashtag weighting must be 'constant', 'bm25' or 'tfidf', not {weighting!r}")

        counts = Counter(t for tags in image_hashtags for t in set(tags))
        vocabulary = sorted(t for t, c in counts.items() if c >= min_count)
        column = {t: i for i, t in enumerate(vocabulary)}
        rows: list[int] = []
        cols: list[int] = []
        kept_ids: list[int] = []
        for vid, tags in zip(np.asarray(image_ids, np.int64), image_hashtags, strict=True):
            tag_cols = sorted({column[t] for t in tags if t in column})
            if not tag_cols:
                continue
            rows.extend([len(kept_ids)] * len(tag_cols))
            cols.extend(tag_cols)
            kept_ids.append(int(vid))
        if not kept_ids or not vocabulary:
            raise ModelFitError("no image has a hashtag: nothing to fit")
        order = np.argsort(np.array(kept_ids, np.int64), kind="stable")
        remap = np.empty_like(order)
        remap[order] = np.arange(len(order))
        matrix = sp.csr_matrix(
            (np.ones(len(rows), np.float32), (remap[np.array(rows)], np.array(cols))),
            shape=(len(kept_ids), len(vocabulary)),
        )
        if weighting == "bm25":
            matrix = bm25_weight(matrix, K1=100, B=0.8).tocsr()
        elif weighting == "tfidf":
            matrix = tfidf_weight(matrix).tocsr()
        matrix = (matrix * alpha).astype(np.float32)
        # implicit warns (and slows down) when BLAS runs its own threads inside its parallel loops; it checks
        # when the model is built, so build it inside the limit too.
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=factors, iterations=iterations, regularization=regularization, random_state=seed
            )
            model.fit(matrix, show_progress=False)
        image_factors = np.asarray(model.user_factors, np.float32)
        hashtag_factors = np.asarray(model.item_factors, np.float32)
        if not (np.isfinite(image_factors).all() and np.isfinite(hashtag_factors).all()):
            raise ModelFitError("ALS produced NaN/inf factors: lower alpha or raise regularization")
        return cls(
            image_ids=np.array(kept_ids, np.int64)[order],
            image_factors=image_factors,
            hashtags=vocabulary,
            hashtag_factors=hashtag_factors,
            popularity=np.array([counts[t] for t in vocabulary], np.int64),
        )

    @classmethod
    def fit_with(
        cls, settings: Settings, image_ids: np.ndarray, image_hashtags: Sequence[Sequence[str]]
    ) -> HashtagModel:
        """``fit`` with the ALS options from the settings."""
        return cls.fit(
            image_ids,
            image_hashtags,
            factors=settings.als_factors,
            iterations=settings.als_iterations,
            regularization=settings.als_regularization,
            alpha=settings.als_alpha,
            weighting=settings.als_weighting,
        )

    def factors_of(self, vector_ids: np.ndarray) -> np.ndarray:
        """Factors of the given images that are in the model, (k, f); unknown ids are skipped."""
        ids = np.asarray(vector_ids, np.int64)
        pos = np.searchsorted(self.image_ids, ids)
        pos = np.clip(pos, 0, len(self.image_ids) - 1)
        found = self.image_ids[pos] == ids
        factors: np.ndarray = self.image_factors[pos[found]]
        return factors

    def suggest(self, neighbour_ids: np.ndarray, n: int = 10, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        """Top-n hashtags for an image described by its FAISS neighbours (or by itself when indexed)."""
        factors = self.factors_of(neighbour_ids)
        if len(factors) == 0:
            raise ModelNotReadyError("none of the image's neighbours is in the hashtag model yet")
        scores = self.hashtag_factors @ factors.mean(axis=0)
        banned = set(exclude)
        order = np.argsort(-scores, kind="stable")
        out = [(self.hashtags[i], float(scores[i])) for i in order if self.hashtags[i] not in banned]
        return out[:n]

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> int:
        """Write and publish a new version; returns its number."""
        versions = VersionedDir(directory, ".npz")
        versions.root.mkdir(parents=True, exist_ok=True)
        version = versions.next_version()
        meta = {
            "version": version,
            "created": time.time(),
            "images": len(self.image_ids),
            "hashtags": len(self.hashtags),
        }
        atomic_write(
            versions.path(version),
            lambda handle: np.savez(
                handle,
                image_ids=self.image_ids,
                image_factors=self.image_factors,
                hashtags=np.array(self.hashtags),
                hashtag_factors=self.hashtag_factors,
                popularity=self.popularity,
                meta=np.array(json.dumps(meta)),
            ),
        )
        versions.publish(version)
        versions.prune(3)
        LOG.info("hashtag model v%d: %d images x %d hashtags", version, len(self.image_ids), len(self.hashtags))
        return version

    @classmethod
    def load(cls, directory: Path, version: int | None = None) -> HashtagModel:
        versions = VersionedDir(directory, ".npz")
        version = versions.current() if version is None else version
        if version is None:
            raise ModelNotReadyError(f"no hashtag model in {directory} yet: run the train task (deeptarget train)")
        with np.load(versions.fetch(version), allow_pickle=False) as data:
            return cls(
                image_ids=data["image_ids"],
                image_factors=data["image_factors"],
                hashtags=[str(t) for t in data["hashtags"]],
                hashtag_factors=data["hashtag_factors"],
                popularity=data["popularity"],
                version=version,
            )
