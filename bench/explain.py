"""The deletion check of deeptarget's explanations: hiding the pixels a heat map ranks highest must lower the predicted
class's probability more than hiding as many pixels at random.

    .venv/bin/python bench/explain.py [--assets ../shared/assets] [--fraction 0.2] [--draws 3] [--fill mean|blur]
                                      [--occlusion-images 100] [--images N] [--out DIR]

Model: MobileNetV2 with the shared ImageNet weights (inputs scaled to [-1, 1]) and a linear head fitted on the
Food-101 subset's train split with train-head's own pieces (frozen embeddings, class-balanced logistic regression).
For each held-out image, with its predicted class c and the head's probability p of c:

- p_top: the ``--fraction`` of the model's input pixels (224 x 224, the centre crop) that the heat map of c ranks
  highest are filled, and the image is classified again;
- p_rand: as many pixels chosen uniformly at random are filled (the mean over ``--draws`` draws);
- p_blob: the top ``--fraction`` of a random smooth map (uniform noise at the heat map's own 7 x 7 resolution,
  upsampled the same way) are filled: a random baseline shaped like Grad-CAM's regions, a harder one than pixels.

Fill (``--fill``): ``mean``, the image's own mean colour (a constant, as in the deletion metric of RISE, Petsiuk et al.
2018), or ``blur``, a Gaussian blur of the image with sigma = 224/16 (as in Fong & Vedaldi 2017's perturbations).

Reported per method and baseline: the mean drops p - p_top and p - p_rand, their ratio (with a 95% bootstrap
interval over images), the mean paired difference (drop_top - drop_rand) with its 95% t interval, the share of
images where the heat map's mask hurt more and a two-sided sign test. Methods: captum's LayerGradCam on all held-out
images; captum's Occlusion (49 windows an image) against Grad-CAM on every k-th image (``--occlusion-images``: 0
none, 500 all of the subset's held-out images). Deletion
curves (mean probability of c against the share of pixels filled) and examples go in an HTML report (``--out``).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from scipy import stats

from deeptarget.core.settings import Settings
from deeptarget.models.decode import decode_image
from deeptarget.models.embedder import Embedder
from deeptarget.models.explain import Explainer
from deeptarget.models.heads import LinearHead
from deeptarget.models.overlay import overlay
from deeptarget.reports.html import Report, new_figure
from deeptarget.training.datasets import load_labelled
from deeptarget.training.linear import fit_logistic
from deeptarget.training.train_head import embed_splits

ASSETS = Path(__file__).resolve().parents[2] / "shared/assets"
CURVE_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
BATCH = 32
GRID = 7  # Grad-CAM's resolution on MobileNetV2 at 224 px (stride 32)


@dataclass
class Deletion:
    """Per image: p, and p after each mask at the main fraction; deletion curves (fraction -> mean p)."""

    name: str
    p: np.ndarray
    p_top: np.ndarray
    p_rand: np.ndarray
    p_blob: np.ndarray
    curve_top: dict[float, float]
    curve_rand: dict[float, float]
    curve_blob: dict[float, float]


def top_share(maps: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """(n, s, s) scores -> (n, s, s) bool: each map's ``fraction`` of highest-scoring pixels (ties broken at
    random)."""
    n, height, width = maps.shape
    count = round(fraction * height * width)
    flat = maps.reshape(n, -1).astype(np.float64) + rng.random((n, height * width)) * 1e-9
    chosen = np.zeros_like(flat, dtype=bool)
    if count:
        order = np.argpartition(-flat, count - 1, axis=1)[:, :count]
        np.put_along_axis(chosen, order, True, axis=1)
    return chosen.reshape(n, height, width)


def blob_maps(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    coarse = torch.from_numpy(rng.random((n, 1, GRID, GRID)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, (size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def fills(images: np.ndarray, how: str) -> np.ndarray:
    if how == "mean":
        return np.broadcast_to(images.mean(axis=(1, 2), keepdims=True).round().astype(np.uint8), images.shape)
    sigma = images.shape[1] / 16
    return np.stack([cv2.GaussianBlur(image, (0, 0), sigma) for image in images])


def masked(images: np.ndarray, chosen: np.ndarray, fill: np.ndarray) -> np.ndarray:
    return np.where(chosen[..., None], fill, images)


class Classifier:
    """(n, s, s, 3) uint8 -> the head's probability of each image's class ``targets``, in batches."""

    def __init__(self, embedder: Embedder, head: LinearHead) -> None:
        self.embedder, self.head = embedder, head

    def __call__(self, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), BATCH):
            probabilities = self.head(self.embedder.embed_preprocessed(images[start : start + BATCH]))
            out.append(probabilities[np.arange(len(probabilities)), targets[start : start + BATCH]])
        return np.concatenate(out)


def deletion(name: str, images: np.ndarray, maps: np.ndarray, targets: np.ndarray, p: np.ndarray,
             classify: Classifier, args: argparse.Namespace, progress: Progress) -> Deletion:  # fmt: skip
    """The deletion check of ``maps`` on ``images`` (predicted classes ``targets``, probabilities ``p``)."""
    rng = np.random.default_rng(args.seed)
    fill = fills(images, args.fill)
    size = images.shape[1]
    fractions = sorted({args.fraction, *(CURVE_FRACTIONS if args.curves else ())} - {0.0})
    task = progress.add_task(f"deletion: {name}", total=len(fractions) * (1 + 2 * args.draws))
    results: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for fraction in fractions:
        draws = args.draws if fraction == args.fraction else 1
        top = classify(masked(images, top_share(maps, fraction, rng), fill), targets)
        progress.advance(task)
        rand = np.zeros_like(p)
        blob = np.zeros_like(p)
        for _ in range(draws):
            rand += classify(masked(images, top_share(rng.random(maps.shape), fraction, rng), fill), targets) / draws
            progress.advance(task)
            blob += classify(masked(images, top_share(blob_maps(len(images), size, rng), fraction, rng), fill),
                             targets) / draws  # fmt: skip
            progress.advance(task)
        progress.advance(task, 2 * (args.draws - draws))
        results[fraction] = (top, rand, blob)
    top, rand, blob = results[args.fraction]

    def curve(which: int) -> dict[float, float]:
        return {0.0: float(p.mean()), **{f: float(r[which].mean()) for f, r in results.items()}}

    return Deletion(name, p, top, rand, blob, curve(0), curve(1), curve(2))


def paired(drop_top: np.ndarray, drop_base: np.ndarray, seed: int) -> dict[str, float]:
    """Means, ratio with a bootstrap interval, the paired difference with a t interval, wins and a sign test."""
    n = len(drop_top)
    difference = drop_top - drop_base
    half = stats.t.ppf(0.975, n - 1) * difference.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan
    rng = np.random.default_rng(seed)
    resample = rng.integers(0, n, (2000, n))
    ratios = drop_top[resample].mean(axis=1) / np.maximum(drop_base[resample].mean(axis=1), 1e-12)
    wins, losses = int((difference > 0).sum()), int((difference < 0).sum())
    sign_p = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return {
        "drop_top": float(drop_top.mean()),
        "drop_base": float(drop_base.mean()),
        "ratio": float(drop_top.mean() / max(drop_base.mean(), 1e-12)),
        "ratio_low": float(np.percentile(ratios, 2.5)),
        "ratio_high": float(np.percentile(ratios, 97.5)),
        "difference": float(difference.mean()),
        "difference_low": float(difference.mean() - half),
        "difference_high": float(difference.mean() + half),
        "wins": wins / n,
        "sign_p": float(sign_p),
    }


def rows_of(result: Deletion, seed: int) -> list[list[object]]:
    drop_top = result.p - result.p_top
    rows = []
    for baseline, p_base in (("random pixels", result.p_rand), ("random 7x7 blobs", result.p_blob)):
        s = paired(drop_top, result.p - p_base, seed)
        rows.append([
            result.name, baseline, len(result.p), f"{result.p.mean():.3f}", f"{s['drop_top']:.3f}",
            f"{s['drop_base']:.3f}", f"{s['ratio']:.2f} [{s['ratio_low']:.2f}, {s['ratio_high']:.2f}]",
            f"{s['difference']:+.3f} [{s['difference_low']:+.3f}, {s['difference_high']:+.3f}]",
            f"{s['wins']:.0%}", f"{s['sign_p']:.1e}",
        ])  # fmt: skip
    return rows


HEADER = ["method", "baseline", "images", "mean p", "drop: heat map", "drop: baseline", "ratio [95% CI]",
          "paired difference [95% CI]", "heat map hurts more", "sign test p"]  # fmt: skip


def curves_figure(results: list[Deletion], fraction: float) -> Figure:
    figure = new_figure(7, 4.5)
    axes = figure.subplots()
    for result, style in zip(results, ("-", "--", ":"), strict=False):
        xs = sorted(result.curve_top)
        axes.plot(xs, [result.curve_top[x] for x in xs], style, marker="o", label=f"{result.name}: heat map top")
        axes.plot(xs, [result.curve_blob[x] for x in xs], style, marker="s", label=f"{result.name}: random blobs")
        axes.plot(xs, [result.curve_rand[x] for x in xs], style, marker="^", label=f"{result.name}: random pixels")
    axes.axvline(fraction, color="grey", alpha=0.4)
    axes.set_xlabel("share of pixels filled")
    axes.set_ylabel("mean probability of the predicted class")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def examples_figure(images: np.ndarray, maps: dict[str, np.ndarray], fraction: float, fill_how: str,
                    count: int = 6) -> Figure:  # fmt: skip
    """Held-out images, each method's heat map over them, and the last method's top ``fraction`` and as many
    random pixels filled."""
    rng = np.random.default_rng(0)
    picked = np.linspace(0, len(images) - 1, count).astype(int)
    figure = new_figure(2.3 * (len(maps) + 3), 2.3 * count)
    grid = figure.subplots(count, len(maps) + 3, squeeze=False)
    fill = fills(images[picked], fill_how)
    last = list(maps.values())[-1][picked]
    top = masked(images[picked], top_share(last, fraction, rng), fill)
    rand = masked(images[picked], top_share(rng.random(last.shape), fraction, rng), fill)
    for row, i in enumerate(picked):
        cells = [("image", images[i]), *((name, overlay(images[i], m[i])) for name, m in maps.items()),
                 (f"{list(maps)[-1]}: top {fraction:.0%} filled", top[row]),
                 (f"random {fraction:.0%} filled", rand[row])]  # fmt: skip
        for col, (title, pixels) in enumerate(cells):
            grid[row, col].imshow(pixels)
            grid[row, col].set_title(title, fontsize=8)
            grid[row, col].axis("off")
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=ASSETS)
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the pixels filled")
    parser.add_argument("--draws", type=int, default=3, help="random masks averaged per image")
    parser.add_argument("--fill", choices=["mean", "blur"], default="mean")
    parser.add_argument("--images", type=int, default=0, help="at most this many held-out images (0: all)")
    parser.add_argument("--occlusion-images", type=int, default=100, help="images for the occlusion comparison")
    parser.add_argument("--no-curves", dest="curves", action="store_false", help="only the main fraction")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/deeptarget-bench-explain"),
                        help="embedding cache")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("data/reports/bench-explain"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    started = time.perf_counter()

    weights = args.assets / "weights" / "mnv2_from_coral_tflite_torchvision.pth"
    settings = Settings(data_dir=args.data_dir, weights=str(weights), weights_normalization="inception",
                        device="cpu")  # fmt: skip
    data = load_labelled(args.assets / "datasets" / "food")
    embedder = Embedder.from_settings(settings)
    splits = embed_splits(settings, embedder, data)
    fit = fit_logistic(splits.train_x, splits.train_y, len(data.classes), l2=1e-3)
    head = LinearHead("food-bench", 1, data.classes, fit.weight, fit.bias, embedder.model_id, {})
    accuracy = float((head(splits.test_x).argmax(1) == splits.test_y).mean())
    console.print(f"{embedder.model_id}: head fitted on {len(splits.train)} images, top-1 {accuracy:.3f} on "
                  f"{len(splits.test)} held out ({time.perf_counter() - started:.0f} s)")  # fmt: skip

    test = splits.test[: args.images or None]
    images = np.stack([
        embedder.preprocess(decode_image(path.read_bytes(), max_pixels=settings.max_image_pixels,
                                         long_side=settings.decode_long_side))
        for path, _ in test
    ])  # fmt: skip
    classify = Classifier(embedder, head)
    probabilities = np.concatenate([head(embedder.embed_preprocessed(images[s : s + BATCH]))
                                    for s in range(0, len(images), BATCH)])  # fmt: skip
    targets = probabilities.argmax(axis=1)
    p = probabilities[np.arange(len(images)), targets]
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    timings: dict[str, float] = {}
    with Progress(*columns, console=console, transient=True) as progress:
        gradcam = Explainer(embedder, head, "gradcam")
        task = progress.add_task("Grad-CAM", total=len(images))
        clock = time.perf_counter()
        maps = []
        for start in range(0, len(images), BATCH):
            maps.append(gradcam.heatmaps(batch[start : start + BATCH], targets[start : start + BATCH].tolist()))
            progress.advance(task, len(maps[-1]))
        gradcam_maps = np.concatenate(maps)
        timings["gradcam"] = (time.perf_counter() - clock) / len(images)
        results = [deletion("Grad-CAM", images, gradcam_maps, targets, p, classify, args, progress)]

        comparison: list[Deletion] = []
        if args.occlusion_images:
            every = max(1, len(images) // args.occlusion_images)
            subset = np.arange(0, len(images), every)[: args.occlusion_images]
            occlusion = Explainer(embedder, head, "occlusion")
            task = progress.add_task("Occlusion", total=len(subset))
            clock = time.perf_counter()
            maps = []
            for start in range(0, len(subset), 8):
                chosen = subset[start : start + 8]
                maps.append(occlusion.heatmaps(batch[chosen], targets[chosen].tolist()))
                progress.advance(task, len(chosen))
            occlusion_maps = np.concatenate(maps)
            timings["occlusion"] = (time.perf_counter() - clock) / len(subset)
            if len(subset) == len(images):  # every image: Grad-CAM's run above is the comparison's
                comparison.append(deletion("Occlusion", images, occlusion_maps, targets, p, classify, args, progress))
            else:
                for name, method_maps in (("Grad-CAM", gradcam_maps[subset]), ("Occlusion", occlusion_maps)):
                    comparison.append(deletion(f"{name} (subset)", images[subset], method_maps, targets[subset],
                                               p[subset], classify, args, progress))  # fmt: skip

    elapsed = time.perf_counter() - started
    table = Table(*HEADER, title=f"deletion check: {args.fraction:.0%} of the pixels filled ({args.fill})")
    rows = [row for result in [*results, *comparison] for row in rows_of(result, args.seed)]
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)
    for result in [*results, *comparison]:
        curve = "  ".join(f"{f:.0%}: {result.curve_top[f]:.3f}/{result.curve_blob[f]:.3f}/{result.curve_rand[f]:.3f}"
                          for f in sorted(result.curve_top))  # fmt: skip
        console.print(f"{result.name} curve (heat map / blobs / pixels): {curve}")
    console.print("seconds per image: " + ", ".join(f"{k} {v:.3f}" for k, v in timings.items())
                  + f"; whole run {elapsed:.0f} s on {args.threads} threads")  # fmt: skip

    report = Report("Explanations: the deletion check")
    report.text(f"{embedder.model_id}, a linear head fitted on {len(splits.train)} Food-101 images (top-1 "
                f"{accuracy:.3f} on {len(splits.test)} held out). Each held-out image's predicted class; "
                f"{args.fraction:.0%} of the 224 x 224 input's pixels filled with the {args.fill} "
                f"({'image mean colour' if args.fill == 'mean' else 'Gaussian blur'}); random baselines averaged "
                f"over {args.draws} draws. Whole run: {elapsed:.0f} s.")  # fmt: skip
    report.table(HEADER, rows)
    if args.curves:
        report.figure("deletion_curves", curves_figure([*results, *comparison], args.fraction),
                      "mean probability of the predicted class as more pixels are filled (lower is better for "
                      "the heat map)")  # fmt: skip
    shown = {"Grad-CAM": gradcam_maps}
    if args.occlusion_images and len(occlusion_maps) == len(images):
        shown["Occlusion"] = occlusion_maps
    report.figure("examples", examples_figure(images, shown, args.fraction, args.fill),
                  "held-out images, their heat maps, and the two masks")  # fmt: skip
    path = report.write(args.out)
    console.print(f"report: {path}")


if __name__ == "__main__":
    main()
