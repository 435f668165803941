"""Face filter quality and cost per detector and detection size, through deeptarget's own FaceFilter.

    .venv/bin/python bench/faces.py --assets ../shared/assets [--long-sides 320,448,640] [--detectors haar,yunet]

Positives: the CMU+MIT test scenes that hold at least one annotated face; negatives: the non-face scenes. Food
photos (every 5th) are reported apart as false alarms, like the face study's "photos of people" filter must avoid.
The positives are greyscale scans, so everything is converted to greyscale (``--colour`` keeps colour) to take the
colour cue away. Image level: an image is flagged when the detector finds any face at or above ``--min-confidence``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from deeptarget.models.faces import FaceFilter, build_face_detector


@dataclass(frozen=True)
class Item:
    path: Path
    group: str  # faces | non_face | food
    image: np.ndarray


def load_items(assets: Path, colour: bool) -> list[Item]:
    root = assets / "datasets" / "cmu_mit_faces"
    with_faces = {line.split()[0] for line in (root / "ground_truth_bboxes.txt").read_text().splitlines() if line}
    paths = [(p, "faces") for p in sorted((root / "test_scenes").iterdir()) if p.name in with_faces]
    paths += [(p, "non_face") for p in sorted((root / "non_face_scenes").iterdir()) if p.suffix.lower() == ".jpg"]
    paths += [(p, "food") for p in sorted((assets / "datasets" / "food").glob("*/*.jpg"))[::5]]
    items = []
    for path, group in paths:
        with Image.open(path) as opened:
            rgb = opened.convert("RGB") if colour else opened.convert("L").convert("RGB")
            items.append(Item(path, group, np.asarray(rgb)))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=Path("../shared/assets"))
    parser.add_argument("--detectors", default="haar,yunet")
    parser.add_argument("--long-sides", default="320,448,640")
    parser.add_argument("--min-confidence", type=float, default=0.8, help="applies to yunet and mtcnn; haar: 0")
    parser.add_argument("--colour", action="store_true")
    args = parser.parse_args()
    console = Console()
    items = load_items(args.assets, args.colour)
    counts = {g: sum(i.group == g for i in items) for g in ("faces", "non_face", "food")}
    console.print(f"{counts} images, {'colour' if args.colour else 'greyscale'}")

    table = Table("detector", "long side", "precision", "recall", "food flagged", "ms/image")
    yunet_file = args.assets / "weights" / "face" / "yunet_s_640_640.onnx"
    for kind in args.detectors.split(","):
        detector = build_face_detector(kind, min_size=12, model_path=yunet_file)
        for long_side in (int(v) for v in args.long_sides.split(",")):
            confidence = 0.0 if kind == "haar" else args.min_confidence
            face_filter = FaceFilter(detector, "tag", confidence, long_side)
            flagged = {g: 0 for g in counts}
            started = time.perf_counter()
            for item in items:
                faces, _ = face_filter(item.image)
                flagged[item.group] += faces.count > 0
            ms = 1000 * (time.perf_counter() - started) / len(items)
            true_pos, false_pos = flagged["faces"], flagged["non_face"]
            precision = true_pos / max(1, true_pos + false_pos)
            recall = true_pos / counts["faces"]
            table.add_row(
                kind, str(long_side), f"{precision:.3f}", f"{recall:.3f}", f"{flagged['food']}/{counts['food']}",
                f"{ms:.1f}",
            )  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()
