"""Hashtag suggestion quality on real Instagram hashtags (HARRISON), deeptarget's ALS against baselines.

    .venv/bin/python bench/hashtags.py [--harrison ../shared/assets/datasets/harrison] [--hide one|half]

HARRISON (arXiv:1605.05054) holds 57,383 real posts' hashtags (no images here). Protocol: among posts with at least
two hashtags, a share (``--share``, 20%) has hashtags hidden (one, as in leave-one-tag-out, or half); each model
ranks hashtags for those posts from what is left, visible hashtags excluded. Models, in the same run:

- popularity: the most used hashtags;
- co-occurrence: hashtags that co-occur most with the visible ones;
- kNN vote: the 20 posts nearest by visible hashtags (cosine) vote with their hashtags, weighted by similarity;
- deeptarget ALS: ``HashtagModel.fit`` (the train task's code) on the visible matrix, scored with the post's factors
  (``HashtagModel.suggest`` with its own id, as for an indexed post).

Reported: precision@5, recall@5, recall@10 and MAP@10 (mean average precision of the hidden hashtags in the top 10).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from rich.console import Console
from rich.table import Table

from deeptarget.models.hashtags import HashtagModel

HARRISON = Path(__file__).resolve().parents[2] / "shared/assets/datasets/harrison"
Scorer = Callable[[list[int]], np.ndarray]  # post rows -> (len, vocabulary) scores


def load(path: Path) -> list[list[str]]:
    return [line.split() for line in (path / "tag_list.txt").read_text().splitlines()]


def split(posts: list[list[str]], share: float, hide: str, seed: int) -> tuple[list[list[str]], dict[int, set[str]]]:
    rng = np.random.default_rng(seed)
    visible, hidden = [], {}
    for row, tags in enumerate(posts):
        tags = sorted(set(tags))
        if len(tags) >= 2 and rng.random() < share:
            n_hidden = 1 if hide == "one" else len(tags) // 2
            chosen = set(rng.choice(tags, n_hidden, replace=False).tolist())
            hidden[row] = chosen
            tags = [t for t in tags if t not in chosen]
        visible.append(tags)
    return visible, hidden


def evaluate(scorer: Scorer, rows: list[int], hidden: dict[int, set[str]], matrix: sp.csr_matrix,
             vocabulary: list[str], batch: int = 512) -> dict[str, float]:  # fmt: skip
    p5 = r5 = r10 = ap = 0.0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        scores = scorer(chunk).astype(np.float64)
        for i, row in enumerate(chunk):
            scores[i, matrix[row].indices] = -np.inf  # never suggest what the post already has
        top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        for row, ranked in zip(chunk, top, strict=True):
            truth = hidden[row]
            hits = [vocabulary[c] in truth for c in ranked]
            p5 += sum(hits[:5]) / 5
            r5 += sum(hits[:5]) / len(truth)
            r10 += sum(hits) / len(truth)
            found, precisions = 0, 0.0
            for rank, hit in enumerate(hits, 1):
                if hit:
                    found += 1
                    precisions += found / rank
            ap += precisions / min(len(truth), 10)
    n = len(rows)
    return {"P@5": p5 / n, "R@5": r5 / n, "R@10": r10 / n, "MAP@10": ap / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--harrison", type=Path, default=HARRISON)
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--hide", choices=["one", "half"], default="one")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--regularization", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=20.0)
    parser.add_argument("--weightings", default="constant,bm25", help="ALS confidence weightings to compare")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console()

    posts = load(args.harrison)
    visible, hidden = split(posts, args.share, args.hide, args.seed)
    vocabulary = sorted({t for tags in posts for t in tags})
    column = {t: i for i, t in enumerate(vocabulary)}
    rows_, cols_ = zip(*[(r, column[t]) for r, tags in enumerate(visible) for t in tags], strict=True)
    matrix = sp.csr_matrix((np.ones(len(rows_), np.float32), (rows_, cols_)), shape=(len(posts), len(vocabulary)))
    held = sorted(hidden)
    console.print(f"HARRISON: {len(posts):,} posts, {len(vocabulary)} hashtags; {len(held):,} posts with "
                  f"{'one hashtag' if args.hide == 'one' else 'half their hashtags'} hidden")  # fmt: skip

    popularity = np.asarray(matrix.sum(axis=0)).ravel()
    cooccurrence = (matrix.T @ matrix).toarray()
    np.fill_diagonal(cooccurrence, 0)
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    normalised = sp.csr_matrix(sp.diags(1.0 / np.maximum(norms, 1e-9)) @ matrix)

    def knn_vote(chunk: list[int], k: int = 20) -> np.ndarray:
        similarity = (normalised[chunk] @ normalised.T).toarray()
        similarity[np.arange(len(chunk)), chunk] = -1  # not itself
        nearest = np.argpartition(-similarity, k, axis=1)[:, :k]
        weights = np.take_along_axis(similarity, nearest, axis=1).clip(min=0)
        votes = np.zeros((len(chunk), len(vocabulary)))
        for i in range(len(chunk)):
            votes[i] = weights[i] @ matrix[nearest[i]].toarray()
        return votes + 1e-6 * popularity  # ties (no neighbour shares a hashtag) fall back to popularity

    scorers: dict[str, Scorer] = {
        "popularity": lambda chunk: np.tile(popularity, (len(chunk), 1)),
        "co-occurrence": lambda chunk: np.asarray(matrix[chunk] @ cooccurrence),
        "kNN vote (20)": knn_vote,
    }
    ids = np.arange(len(posts), dtype=np.int64)
    for weighting in args.weightings.split(","):
        started = time.perf_counter()
        model = HashtagModel.fit(ids, visible, factors=args.factors, iterations=args.iterations,
                                 regularization=args.regularization, alpha=args.alpha, weighting=weighting)  # fmt: skip
        console.print(f"ALS ({weighting}) fitted in {time.perf_counter() - started:.1f} s")
        by_tag = np.array([model.hashtags.index(t) if t in model.hashtags else -1 for t in vocabulary])

        def als(chunk: list[int], model: HashtagModel = model, by_tag: np.ndarray = by_tag) -> np.ndarray:
            # own factors of each post, as suggest() uses for an indexed post; posts left with no hashtag have none
            scores = np.full((len(chunk), len(vocabulary)), -1e9)
            for i, row in enumerate(chunk):
                if len(model.factors_of(np.array([row]))):
                    ranked = dict(model.suggest(np.array([row]), n=len(model.hashtags)))
                    scores[i] = [ranked.get(vocabulary[c], -1e9) if c >= 0 else -1e9 for c in by_tag]
                else:
                    scores[i] = popularity
            return scores

        scorers[f"deeptarget ALS ({weighting}, {args.factors} factors)"] = als

    table = Table("model", "P@5", "R@5", "R@10", "MAP@10", title="hashtags for HARRISON posts, hidden hashtags")
    results = {}
    for name, scorer in scorers.items():
        started = time.perf_counter()
        results[name] = evaluate(scorer, held, hidden, matrix, vocabulary)
        metrics = results[name]
        table.add_row(name, *(f"{metrics[m]:.3f}" for m in ("P@5", "R@5", "R@10", "MAP@10")))
        console.print(f"  {name}: evaluated in {time.perf_counter() - started:.1f} s")
    console.print(table)
    best_baseline = max(v["MAP@10"] for k, v in results.items() if not k.startswith("deeptarget"))
    best_als = max(v["MAP@10"] for k, v in results.items() if k.startswith("deeptarget"))
    print(f"MAP@10 deeptarget ALS / best baseline = {best_als / best_baseline:.3f}")


if __name__ == "__main__":
    main()
