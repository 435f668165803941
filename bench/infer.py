"""Inference throughput: the model forward alone (the limit) against the full infer pipeline from JPEG bytes.

    .venv/bin/python bench/infer.py [--images 256] [--batch 32] [--weights none|imagenet|PATH] [--normalization ...]

Both run in this process on the same sandbox JPEGs: (a) forward on pre-decoded, pre-resized uint8 batches;
(b) ``InferencePipeline`` from the blob store (read, decode with DCT scaling, Haar face detection, resize, forward,
heads). Prints images/s for both and ``efficiency = b / a`` as the last line.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track

from deeptarget.blobs import BlobStore
from deeptarget.config import Settings
from deeptarget.models.decode import decode_image
from deeptarget.sandbox import SandboxNetwork
from deeptarget.schema import Post, PostRef
from deeptarget.workers.pipeline import InferencePipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--normalization", default="imagenet")
    parser.add_argument("--face-policy", default="tag", choices=["tag", "require", "off"])
    parser.add_argument("--face-detector", default="haar", choices=["haar", "yunet"])
    parser.add_argument("--face-model", help="YuNet .onnx file (--face-detector yunet)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timed passes")
    args = parser.parse_args()
    console = Console()

    network = SandboxNetwork(seed=99, n_posts=args.images, corrupt_share=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp), backbone=args.backbone, weights=args.weights,
            weights_normalization=args.normalization, micro_batch=args.batch, face_policy=args.face_policy,
            face_detector=args.face_detector, face_model_path=args.face_model,
        )  # fmt: skip
        blobs = BlobStore(settings.blob_dir)
        refs = [
            PostRef(post=Post(id=m.id), blob=blobs.put(m.image_bytes()))
            for m in track(network.media, description="rendering sandbox JPEGs", console=console)
        ]
        pipeline = InferencePipeline(settings, blobs)
        embedder = pipeline.embedder
        console.print(
            f"{embedder.model_id} on {embedder.device}, {torch.get_num_threads()} threads, "
            f"{len(refs)} images, micro-batch {args.batch}, faces: {args.face_policy} ({args.face_detector})"
        )

        decoded = [
            decode_image(
                blobs.get(r.blob or ""), max_pixels=settings.max_image_pixels, long_side=settings.decode_long_side
            )
            for r in refs
        ]
        tensors = np.stack([embedder.preprocess(image) for image in decoded])
        embedder.embed_preprocessed(tensors[: args.batch])  # warm-up

        forward = best_of(args.repeats, lambda: embedder.embed_preprocessed(tensors))
        batches = [refs[i : i + args.batch] for i in range(0, len(refs), args.batch)]
        full = best_of(args.repeats, lambda: [pipeline(batch) for batch in batches])
        forward_rate, full_rate = len(refs) / forward, len(refs) / full
        console.print(f"(a) model forward only     {forward_rate:8.1f} images/s  ({1000 / forward_rate:.1f} ms/image)")
        console.print(f"(b) full infer from JPEGs  {full_rate:8.1f} images/s  ({1000 / full_rate:.1f} ms/image)")
        print(f"efficiency = {full_rate / forward_rate:.3f}")


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


if __name__ == "__main__":
    main()
