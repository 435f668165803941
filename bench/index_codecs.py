"""How much each IVF codec loses on real CNN features, against the synthetic vectors the scale benchmarks use.

    .venv/bin/python bench/index_codecs.py --assets ../shared/assets

Real features: the Food-101 subset in ``../shared/assets`` (1,000 photos, 10 classes), each embedded by MobileNetV2
with the real ImageNet weights there, as itself and in ``--views`` - 1 augmented views (mirror, crops of 80-90%,
both), so the collection has near neighbours of every kind: views of one photo, photos of one dish, other dishes.
Queries are the views of held-out photos (none of their views is indexed). For each codec ``index.builder`` may
choose (``CODECS``), an IVF of the index writer's shape is trained and searched at the nprobe that reaches the
target in float (IVF-Flat), and recall@10 is measured against exact float search, on the real features and on as
many synthetic ones (``index.synthetic``), so the two can be compared. The embeddings are cached under
``--data-dir``. Each codec also with the query service's exact re-scoring of 4x the candidates from float vectors
(``QueryService.similar_to_vector``). Last line: ``recall@10 = X``, re-scored, of the codec that 10M 1280-d
vectors get under an 8 GB budget.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from deeptarget.core.settings import Settings
from deeptarget.index.builder import CODECS, RERANK_FACTOR, IndexPolicy, recall_at_k
from deeptarget.index.synthetic import ClusteredVectors
from deeptarget.index.vectors import VectorIndex
from deeptarget.models.embedder import Embedder

K = 10


def views(image: Image.Image, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The photo itself, then mirrored and cropped views of it."""
    out = [np.asarray(image)]
    for i in range(1, count):
        view = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else image
        share = rng.uniform(0.8, 0.9)
        w, h = view.size
        cw, ch = int(w * share), int(h * share)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(np.asarray(view.crop((left, top, left + cw, top + ch))))
    return out


def real_features(args: argparse.Namespace, console: Console) -> tuple[np.ndarray, np.ndarray, str]:
    """(features, photo number of each), embedded once and cached."""
    weights = args.assets / "weights" / "mnv2_from_coral_tflite_torchvision.pth"
    settings = Settings(data_dir=args.data_dir, weights=str(weights), weights_normalization="inception", device="cpu")
    embedder = Embedder.from_settings(settings)
    cache = args.data_dir / f"food-views-{args.views}-{embedder.model_id.replace(':', '_')}.npz"
    if cache.exists():
        saved = np.load(cache)
        return saved["x"], saved["photo"], embedder.model_id
    photos = sorted((args.assets / "datasets" / "food").glob("*/*.jpg"))
    rng = np.random.default_rng(0)
    vectors, owners = [], []
    for number, path in enumerate(track(photos, description="embedding views", console=console)):
        with Image.open(path) as image:
            batch = views(image.convert("RGB"), args.views, rng)
        vectors.append(embedder(batch))
        owners += [number] * len(batch)
    x = np.concatenate(vectors).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, photo=np.array(owners))
    return x, np.array(owners), embedder.model_id


def codec_recalls(
    x: np.ndarray, queries: np.ndarray, policy: IndexPolicy
) -> tuple[int, dict[str, float], dict[str, float]]:
    """(nprobe, codec -> recall@10 against exact float search at that nprobe, the same after the query service's
    exact re-scoring of ``RERANK_FACTOR`` x 10 candidates from the float vectors)."""
    ids = np.arange(len(x), dtype=np.int64)
    exact = faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)[1]
    nlist = policy.nlist_for(len(x))
    recalls: dict[str, float] = {}
    rescored: dict[str, float] = {}
    nprobe = 0
    for codec in CODECS:
        index = VectorIndex.trained_ivf(x.shape[1], "bench", x, nlist, codec=codec)
        index.index.add_with_ids(x, ids)
        if codec == "Flat":  # the nprobe the float IVF needs for the target; the codecs are searched the same
            nprobe = 1
            while True:
                index.nprobe = nprobe
                found = index.search(queries, K)[1]
                if recall_at_k(found, exact, np.full(len(queries), -1), K) >= policy.target_recall or nprobe >= nlist:
                    break
                nprobe *= 2
        index.nprobe = nprobe
        recalls[codec] = recall_at_k(index.search(queries, K)[1], exact, np.full(len(queries), -1), K)
        candidates = index.search(queries, K * RERANK_FACTOR)[1]
        scores = np.einsum("qd,qcd->qc", queries, x[np.maximum(candidates, 0)])
        best = np.take_along_axis(candidates, np.argsort(-np.where(candidates >= 0, scores, -np.inf), 1), 1)[:, :K]
        rescored[codec] = recall_at_k(best, exact, np.full(len(queries), -1), K)
    return nprobe, recalls, rescored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "assets")
    parser.add_argument("--views", type=int, default=6, help="embeddings per photo (itself + augmented views)")
    parser.add_argument("--held-out", type=int, default=100, help="photos whose views are the queries")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/deeptarget-bench-codecs"))
    args = parser.parse_args()
    console = Console()
    started = time.perf_counter()
    x, photo, model_id = real_features(args, console)
    held_out = np.random.default_rng(1).permutation(photo.max() + 1)[: args.held_out]
    query_rows = np.isin(photo, held_out)
    console.print(f"{model_id}: {len(x):,} real features ({args.views} views of {photo.max() + 1} photos), "
                  f"{query_rows.sum()} queries from {args.held_out} held-out photos "
                  f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    policy = IndexPolicy()
    real_nprobe, real, real_rescored = codec_recalls(x[~query_rows], x[query_rows], policy)
    synthetic = ClusteredVectors(dim=x.shape[1], seed=0)
    n = int((~query_rows).sum())
    synthetic_queries = synthetic.sample(int(query_rows.sum()), stream=1)
    synthetic_nprobe, fake, fake_rescored = codec_recalls(synthetic.sample(n), synthetic_queries, policy)
    table = Table("codec", "bytes/vector", f"recall@10 real (nprobe {real_nprobe})", "real, re-scored",
                  f"synthetic (nprobe {synthetic_nprobe})", "synthetic, re-scored")  # fmt: skip
    for codec, per_dim in CODECS.items():
        table.add_row(codec, f"{x.shape[1] * per_dim:,.0f}", f"{real[codec]:.3f}", f"{real_rescored[codec]:.3f}",
                      f"{fake[codec]:.3f}", f"{fake_rescored[codec]:.3f}")  # fmt: skip
    console.print(table)
    chosen = IndexPolicy(memory_budget=8 * 2**30).codec_for(10_000_000, x.shape[1])
    console.print(f"10M x {x.shape[1]}-d in 8 GB: {chosen}")
    console.print(f"{chosen} alone: recall@10 {real[chosen]:.3f} on the real features; the query service re-scores "
                  f"its candidates exactly from the store's embeddings:")  # fmt: skip
    print(f"recall@10 = {real_rescored[chosen]:.3f}")


if __name__ == "__main__":
    main()
