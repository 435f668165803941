"""Inference throughput: the models alone (the limit) against the full infer task from JPEG bytes to stored results.

    .venv/bin/python bench/infer.py [--images 256] [--backbones mobilenet_v2,resnet50] [--face-detector auto|yunet|...]
                                    [--face-model PATH.onnx] [--weights none|imagenet|PATH] [--device auto|cpu|cuda]

Per backbone, in one process on the same sandbox JPEGs:
(a) the limit: the embedding forward on pre-decoded, pre-resized uint8 batches at the best of several batch sizes,
    plus, when faces are on, the face detector alone on the pre-decoded images (it is a model too, and on a CPU it
    competes with the embedding for the same cores);
(b) the ``infer`` task's work from the blob store to the metadata store: read, decode with DCT scaling, face filter,
    resize, forward, heads, ``MetadataStore.record_results``.
Prints images/s for both and ``efficiency = b / a`` as the last line (for the first backbone, the default one).
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
from rich.table import Table

from deeptarget.core.records import Post, PostRef
from deeptarget.core.settings import Settings
from deeptarget.models.decode import decode_image
from deeptarget.sandbox import SandboxNetwork
from deeptarget.store.blobs import BlobStore
from deeptarget.store.metadata import MetadataStore
from deeptarget.workers.pipeline import InferencePipeline

SHARED_YUNET = Path(__file__).resolve().parents[2] / "shared/assets/weights/face/yunet_s_640_640.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbones", default="mobilenet_v2")
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="tried for (a); the best one is the limit")
    parser.add_argument("--task-batch", type=int, default=64, help="posts per infer task for (b)")
    parser.add_argument("--micro-batch", type=int, default=0, help="images per forward in (b); 0 = the default")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--normalization", default="imagenet")
    parser.add_argument("--face-policy", default="tag", choices=["tag", "require", "off"])
    parser.add_argument("--face-detector", default="auto", choices=["auto", "haar", "yunet", "mtcnn"])
    parser.add_argument(
        "--face-model", type=Path, default=SHARED_YUNET if SHARED_YUNET.is_file() else None, help="YuNet .onnx file"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--jpeg-decoder", default="auto", choices=["auto", "pil", "torchvision"])
    parser.add_argument("--repeats", type=int, default=3, help="best of N timed passes")
    args = parser.parse_args()
    console = Console()

    network = SandboxNetwork(seed=99, n_posts=args.images, corrupt_share=0.0)
    table = Table("backbone", "device", "decoder", "faces", "(a) limit img/s", "(b) full img/s", "efficiency")
    efficiencies = []
    with tempfile.TemporaryDirectory() as tmp:
        blobs = BlobStore(Path(tmp) / "blobs")
        refs = [
            PostRef(post=Post(id=m.id, hashtags=list(m.hashtags)), blob=blobs.put(m.image_bytes()))
            for m in track(network.media, description="rendering sandbox JPEGs", console=console)
        ]
        for backbone in args.backbones.split(","):
            settings = Settings(
                data_dir=Path(tmp) / backbone, backbone=backbone, weights=args.weights,
                weights_normalization=args.normalization, micro_batch=args.micro_batch, face_policy=args.face_policy,
                face_detector=args.face_detector, face_model_path=args.face_model, device=args.device,
                jpeg_decoder=args.jpeg_decoder,
            )  # fmt: skip
            limit, full, pipeline = measure(settings, blobs, refs, args, console)
            detector = pipeline.face_filter.detector
            faces = "off" if detector is None else f"{args.face_policy} ({detector.name})"
            efficiency = full / limit
            efficiencies.append(efficiency)
            decoder = "torchvision" if pipeline.device_decode else "pil"
            table.add_row(
                backbone, str(pipeline.embedder.device), decoder, faces, f"{limit:.1f}", f"{full:.1f}",
                f"{efficiency:.3f}",
            )  # fmt: skip
    console.print(table)
    print(f"efficiency = {efficiencies[0]:.3f}")


def measure(
    settings: Settings, blobs: BlobStore, refs: list[PostRef], args: argparse.Namespace, console: Console
) -> tuple[float, float, InferencePipeline]:
    """(limit images/s, full images/s, the pipeline)."""
    pipeline = InferencePipeline(settings, blobs)
    embedder = pipeline.embedder
    console.print(f"[bold]{embedder.model_id}[/] on {embedder.device}, {torch.get_num_threads()} threads")
    decoded = [
        decode_image(blobs.get(r.blob or ""), max_pixels=settings.max_image_pixels, long_side=settings.decode_long_side)
        for r in refs
    ]
    tensors = np.stack([embedder.preprocess(image) for image in decoded])

    forward_s = {}
    for size in (int(v) for v in args.batch_sizes.split(",")):
        embedder.micro_batch = size
        embedder.embed_preprocessed(tensors[:size])  # warm-up
        forward_s[size] = best_of(args.repeats, lambda: embedder.embed_preprocessed(tensors))
        console.print(f"  forward at batch {size:3d}: {len(refs) / forward_s[size]:7.1f} images/s")
    best = min(forward_s, key=forward_s.__getitem__)
    embedder.micro_batch = pipeline.micro_batch
    faces_s = 0.0
    if pipeline.face_filter.detector is not None:
        faces_s = best_of(args.repeats, lambda: pipeline.face_filter.filter_batch(decoded))
        console.print(f"  face detector alone: {len(refs) / faces_s:7.1f} images/s")
    limit_s = forward_s[best] + faces_s

    store = MetadataStore(settings.metadata_database)
    batches = [refs[i : i + args.task_batch] for i in range(0, len(refs), args.task_batch)]

    def infer_all() -> None:
        for batch in batches:
            results = pipeline(batch)
            store.record_results(results)

    pipeline(batches[0][: pipeline.micro_batch])  # warm-up
    full_s = best_of(args.repeats, infer_all)
    console.print(f"  (a) limit {len(refs) / limit_s:7.1f} images/s   (b) full {len(refs) / full_s:7.1f} images/s")
    return len(refs) / limit_s, len(refs) / full_s, pipeline


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


if __name__ == "__main__":
    main()
