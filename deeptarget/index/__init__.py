"""The FAISS side, for the index writer and notebooks: ``VectorIndex`` (flat or IVF, stable int64 ids), its on-disk
snapshots (``SnapshotStore``), what readers serve (``LiveReader``: the newest snapshot plus the writer's changes
since, from a Redis stream; ``index.segments``), the single ``IndexWriter``, how an IVF
is built and tuned, and clustered synthetic vectors for benchmarks. Names are imported on first use
(``deeptarget.core.lazy``), so importing the package does not load FAISS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deeptarget.core.lazy import lazy_exports

if TYPE_CHECKING:
    from deeptarget.index.builder import IndexPolicy, Tuning, build_ivf, recall_at_k, tune_nprobe
    from deeptarget.index.segments import LiveIndex, LiveReader
    from deeptarget.index.synthetic import ClusteredVectors
    from deeptarget.index.vectors import SnapshotStore, VectorIndex
    from deeptarget.index.writer import IndexWriter

__all__ = [
    "ClusteredVectors",
    "IndexPolicy",
    "IndexWriter",
    "LiveIndex",
    "LiveReader",
    "SnapshotStore",
    "Tuning",
    "VectorIndex",
    "build_ivf",
    "recall_at_k",
    "tune_nprobe",
]

_EXPORTS = {
    "IndexPolicy": "deeptarget.index.builder",
    "Tuning": "deeptarget.index.builder",
    "build_ivf": "deeptarget.index.builder",
    "recall_at_k": "deeptarget.index.builder",
    "tune_nprobe": "deeptarget.index.builder",
    "ClusteredVectors": "deeptarget.index.synthetic",
    "LiveIndex": "deeptarget.index.segments",
    "LiveReader": "deeptarget.index.segments",
    "SnapshotStore": "deeptarget.index.vectors",
    "VectorIndex": "deeptarget.index.vectors",
    "IndexWriter": "deeptarget.index.writer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
