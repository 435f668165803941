"""Which index a collection of a given size gets, and building an IVF index with ``nprobe`` tuned for a recall target.

Exact search (flat) is right while it is fast: one query reads every vector, 100 MB at 20,000 1280-d vectors, about
10 ms here (measured at 100,000: p99 73 ms exact against 0.9 ms for IVF512 at recall@10 0.966). Beyond that an IVF
index is trained on a sample of the collection (k-means, ~40 vectors per list, ``nlist`` ~ 2 sqrt(n) rounded to a
power of two) and every vector is added; then ``nprobe`` is the smallest power of two whose recall@k against exact
search, measured on queries drawn from the collection itself (each query's own id left out), reaches the target.
The writer rebuilds again when the collection has grown ``regrow_factor`` times past what the lists were trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import faiss
import numpy as np

from deeptarget.core.settings import Settings
from deeptarget.index.vectors import PER_VECTOR_BYTES, VectorIndex

LOG = logging.getLogger(__name__)

Chunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
"""Called once; yields (int64 ids, float32 unit vectors) chunks of the whole collection."""


# How each IVF codec stores a vector: bytes per dimension, and its recall@10 against exact search on clustered
# synthetic 1280-d vectors (100k, IVF512, nprobe 8, measured here): the finest that fits the memory budget is used.
# Scalar quantizers keep what the rest of the index relies on (ids, removal, a hash-table direct map, memory-mapped
# lists); the reader's delta stays float (index.segments).
CODECS: dict[str, float] = {"Flat": 4.0, "SQ8": 1.0, "SQ6": 0.75, "SQ4": 0.5}  # recall 0.992, 0.979, 0.950, 0.860
# Re-scoring depths tried for a quantized base: answers are re-scored exactly (the query service does it from the
# metadata store's float embeddings) over depth x k candidates. At SQ4, 100k vectors, 4 x 10 candidates hold 0.96 of
# the exact top 10 and the code's own ranking 0.86 (bench/index_codecs.py); a larger collection packs neighbours
# closer, so the depth is tuned with nprobe (tune_nprobe).
RERANK_DEPTHS = (2, 4, 8, 16)
RERANK_FACTOR = 4  # the depth benchmarks use when they do not tune


def reranked(codec: str) -> bool:
    """Whether answers from an index of this codec are re-scored exactly (all but float ones are)."""
    return codec != "Flat"


@dataclass(frozen=True)
class IndexPolicy:
    ivf_from: int = 20_000
    regrow_factor: float = 4.0
    memory_budget: int = 8 * 2**30  # bytes the index may take (index_memory_budget)
    target_recall: float = 0.95
    tuning_margin: float = 0.02  # tuning queries come from the collection; new images are a little harder
    k: int = 10
    tuning_queries: int = 300
    vectors_per_list: int = 40
    kmeans_iterations: int = 10

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexPolicy:
        return cls(
            ivf_from=settings.index_ivf_from,
            target_recall=settings.index_target_recall,
            regrow_factor=settings.index_regrow_factor,
            memory_budget=int(settings.index_memory_budget),
        )

    def codec_for(self, n: int, dim: int) -> str:
        """The finest codec whose index of ``n`` vectors fits the memory budget (the coarsest when none does)."""
        for codec, per_dim in CODECS.items():
            if n * (dim * per_dim + PER_VECTOR_BYTES) <= self.memory_budget:
                return codec
        coarsest = list(CODECS)[-1]
        LOG.warning("%d vectors of %d-d exceed the index memory budget (%.1f GB) even as %s", n, dim,
                    self.memory_budget / 1e9, coarsest)  # fmt: skip
        return coarsest

    def nlist_for(self, n: int) -> int:
        return int(2 ** round(math.log2(max(16.0, 2 * math.sqrt(n)))))

    def wants_rebuild(self, index: VectorIndex) -> bool:
        """Exact grew past ``ivf_from``; an IVF grew ``regrow_factor`` times, or out of its codec's memory budget."""
        if index.kind == "flat":
            return index.ntotal >= self.ivf_from
        outgrown = self.codec_for(index.ntotal, index.dim) != index.codec and index.codec != list(CODECS)[-1]
        return outgrown or index.ntotal >= self.regrow_factor * max(1, index.trained_on)


@dataclass
class Tuning:
    nprobe: int
    recall: float
    curve: dict[int, float] = field(default_factory=dict)  # nprobe -> recall@k (at the deepest re-scoring)
    rerank: int = 1  # the re-scoring depth chosen (1: none)


class ExactNeighbours:
    """Exact top-k inner-product neighbours of fixed queries, accumulated over a stream of chunks."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0 or len(self.queries) == 0:
            return
        scores, rows = faiss.knn(self.queries, np.ascontiguousarray(vectors, np.float32), min(self.k, len(ids)),
                                 metric=faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        all_scores = np.hstack([self.scores, scores])
        all_ids = np.hstack([self.ids, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)])
        best = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_scores, best, axis=1)
        self.ids = np.take_along_axis(all_ids, best, axis=1)


def recall_at_k(found: np.ndarray, exact: np.ndarray, query_ids: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k (each query's own id left out of both) that ``found`` holds."""
    hits = 0
    total = 0
    for row_found, row_exact, own in zip(found, exact, query_ids, strict=True):
        truth = [i for i in row_exact if i != own and i >= 0][:k]
        got = {i for i in row_found if i != own and i >= 0}
        hits += len(got.intersection(truth))
        total += len(truth)
    return hits / max(1, total)


def tune_nprobe(
    index: VectorIndex, queries: np.ndarray, query_ids: np.ndarray, exact: np.ndarray, policy: IndexPolicy
) -> Tuning:
    """The smallest power-of-two ``nprobe`` reaching the recall target plus the margin (the largest tried when none
    does). Measured at 1M: in-collection 0.957 gave 0.936 on fresh queries at the same nprobe, hence the margin.

    A quantized base is tuned for what it serves: depth x k candidates re-scored exactly, so the recall that counts
    is the share of the exact top k among the candidates (exact re-scoring ranks them perfectly), and the depth is
    the smallest of ``RERANK_DEPTHS`` that reaches the target at that nprobe. Tuning the code's own ranking instead
    chased a recall SQ4 never reaches, up to nprobe = nlist. ``curve`` holds each nprobe's recall at the deepest."""
    depths = RERANK_DEPTHS if reranked(index.codec) else (1,)
    wanted = policy.target_recall + policy.tuning_margin
    curve: dict[int, float] = {}
    nprobe, depth = 1, depths[-1]
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, (policy.k + 1) * depths[-1])
        by_depth = {d: recall_at_k(found[:, : (policy.k + 1) * d], exact, query_ids, policy.k) for d in depths}
        curve[nprobe] = by_depth[depths[-1]]
        reaching = [d for d in depths if by_depth[d] >= wanted]
        if reaching or nprobe >= index.nlist:
            depth = reaching[0] if reaching else depths[-1]
            break
        nprobe *= 2
    if curve[nprobe] < policy.target_recall:
        LOG.warning("IVF recall@%d reaches only %.3f at nprobe %d", policy.k, curve[nprobe], nprobe)
    index.nprobe, index.rerank = nprobe, depth
    return Tuning(nprobe, by_depth[depth], curve, depth)


def build_ivf(
    dim: int,
    model_id: str,
    sample: np.ndarray,
    sample_ids: np.ndarray,
    chunks: Chunks,
    total: int,
    policy: IndexPolicy,
    progress: Callable[[int], None] | None = None,
) -> tuple[VectorIndex, Tuning]:
    """Train on ``sample`` (with its ids; the first ``tuning_queries`` rows also serve as tuning queries), add every
    chunk, tune ``nprobe``. ``total`` is the collection size the list count and the codec are chosen for."""
    nlist = min(policy.nlist_for(total), max(1, len(sample) // policy.vectors_per_list))
    codec = policy.codec_for(total, dim)
    LOG.info("training IVF%d,%s on %d of %d vectors", nlist, codec, len(sample), total)
    index = VectorIndex.trained_ivf(dim, model_id, sample, nlist, policy.kmeans_iterations, codec)
    queries, query_ids = sample[: policy.tuning_queries], sample_ids[: policy.tuning_queries]
    exact = ExactNeighbours(queries, policy.k + 1)
    for ids, vectors in chunks():
        index.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
        exact.update(ids, vectors)
        if progress:
            progress(len(ids))
    index.trained_on = index.ntotal
    tuning = tune_nprobe(index, queries, query_ids, exact.ids, policy)
    LOG.info("IVF%d,%s with %d vectors: nprobe %d (re-scoring %dx) gives recall@%d %.3f", nlist, codec,
             index.ntotal, tuning.nprobe, tuning.rerank, policy.k, tuning.recall)  # fmt: skip
    return index, tuning
