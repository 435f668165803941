"""``deeptarget train-head --finetune``: fine-tune the backbone end to end under a linear head.

- The head starts from the frozen-embedding logistic regression (linear probe, then fine-tune: the backbone is not
  pulled around by a random head in the first steps).
- The head sees L2-normalised features, exactly as in the workers, so the result is an ordinary ``LinearHead`` on
  the embeddings of the fine-tuned backbone.
- BatchNorm keeps its pretrained statistics (see ``keep_batchnorm_statistics``).
- Augmentation (random resized crops, flips, colour jitter, mixup), label smoothing, class-balanced loss, AdamW with
  a one-cycle schedule and discriminative learning rates (the input-side layers move least).
- A checkpoint after every epoch; an interrupted run started again with the same data and options resumes from it.
- Evaluated on the held-out split with the workers' single centre view and with test-time augmentation.
- Writes the backbone as a stock torchvision state dict (``weights = <that file>`` serves it) and the head as a new
  version whose ``model_id`` names that file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from deeptarget.core.settings import Settings
from deeptarget.models.embedder import Embedder
from deeptarget.models.heads import LinearHead, check_head_name, head_versions, publish_head
from deeptarget.reports.html import report_folder
from deeptarget.store.remote import publish_file
from deeptarget.store.versioned import atomic_write
from deeptarget.training.augment import ImageFiles, mixup, tta_views
from deeptarget.training.datasets import load_labelled
from deeptarget.training.linear import classification_metrics, fit_logistic
from deeptarget.training.report import Evaluation, stratified_sample, training_report
from deeptarget.training.train_head import TrainedHead, embed_splits

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3  # the head's peak learning rate
    # peak learning rates of the backbone's parameters in three parts, input side first, relative to ``lr``
    backbone_lr_factors: tuple[float, ...] = (0.01, 0.05, 0.25)
    weight_decay: float = 1e-4
    mixup_alpha: float = 0.2
    label_smoothing: float = 0.1
    seed: int = 0
    restart: bool = False  # ignore a checkpoint
    loader_workers: int | None = None  # None: cores - 1, at most 4

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        values = asdict(self)
        for key in ("restart", "loader_workers"):
            values.pop(key)
        return values


class HeadOnFeatures(torch.nn.Module):
    """backbone -> L2-normalised features -> linear head: the workers' embedding and head in one module."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(torch.nn.functional.normalize(self.backbone(x).float(), dim=1))
        return logits


def parameter_groups(model: HeadOnFeatures, options: FinetuneOptions) -> list[dict[str, Any]]:
    """Discriminative learning rates: the backbone's parameters, in definition order (input side first), split into
    ``len(backbone_lr_factors)`` parts; the head gets the full rate."""
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    parts = np.array_split(np.arange(len(params)), len(options.backbone_lr_factors))
    groups = [
        {"params": [params[i] for i in part], "lr": options.lr * factor}
        for part, factor in zip(parts, options.backbone_lr_factors, strict=True)
        if len(part)
    ]
    return [*groups, {"params": list(model.head.parameters()), "lr": options.lr}]


class Checkpoint:
    """The run's state after each epoch, written atomically; only resumed when the run's fingerprint matches."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            LOG.warning("%s is from a different run (data or options changed): starting over", self.path)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda handle: torch.save({**state, "fingerprint": self.fingerprint}, handle))


def finetune(
    settings: Settings, data_dir: Path, name: str, options: FinetuneOptions | None = None, publish: bool = False
) -> TrainedHead:
    check_head_name(name)  # before any work: it names the head's, the checkpoint's and the report's folders
    options = options or FinetuneOptions()
    data = load_labelled(data_dir)
    embedder = Embedder.from_settings(settings)
    n_classes = len(data.classes)

    # the linear probe: its head is where fine-tuning starts, and its score the bar fine-tuning has to clear
    splits = embed_splits(settings, embedder, data)
    train_items, test_items, train_y, test_y = splits.train, splits.test, splits.train_y, splits.test_y
    probe = fit_logistic(splits.train_x, train_y, n_classes)
    probe_metrics = classification_metrics(probe.probabilities(splits.test_x), test_y, data.classes)

    device = embedder.device
    head = torch.nn.Linear(embedder.dim, n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(probe.weight))
        head.bias.copy_(torch.from_numpy(probe.bias))
    model = HeadOnFeatures(embedder.model, head).to(device)
    groups = parameter_groups(model, options)
    optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
    workers = options.loader_workers if options.loader_workers is not None else min(4, (os.cpu_count() or 2) - 1)
    loader_args: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",  # lets the non-blocking copies to the GPU overlap the compute
    }
    dataset = ImageFiles(train_items, embedder.image_size, True, settings.max_image_pixels, settings.decode_long_side)
    held_out = ImageFiles(test_items, embedder.image_size, False, settings.max_image_pixels, settings.decode_long_side)
    drop_last = len(dataset) >= options.batch_size  # a last, tiny batch gives mixup and the gradient little
    batches = len(dataset) // options.batch_size if drop_last else 1
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=options.epochs * batches, pct_start=0.25
    )
    counts = np.bincount(train_y, minlength=n_classes).clip(min=1)
    class_weight = torch.tensor(counts.sum() / (n_classes * counts), dtype=torch.float32, device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weight, label_smoothing=options.label_smoothing)

    files_digest = hashlib.sha256("\n".join(f"{p}:{y}" for p, y in data.train).encode()).hexdigest()[:16]
    fingerprint = {**options.fingerprint(), "model_id": embedder.model_id, "classes": data.classes,
                   "train": files_digest}  # fmt: skip
    checkpoint = Checkpoint(settings.finetune_dir / name / "checkpoint.pt", fingerprint)
    state = None if options.restart else checkpoint.load()
    history: list[dict[str, float]] = []
    first_epoch = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        first_epoch = int(state["epoch"]) + 1
        LOG.info("resuming %s from its checkpoint after epoch %d of %d", name, first_epoch - 1, options.epochs)

    autocast = _autocast(embedder)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        epochs_bar = progress.add_task("fine-tuning", total=options.epochs, completed=first_epoch - 1)
        for epoch in range(first_epoch, options.epochs + 1):
            torch.manual_seed(options.seed + epoch)  # each epoch's shuffling, crops and mixup, also after a resume
            shuffle = torch.Generator().manual_seed(options.seed + epoch)
            loader = torch.utils.data.DataLoader(
                dataset, options.batch_size, shuffle=True, drop_last=drop_last, generator=shuffle, **loader_args
            )
            batch_bar = progress.add_task(f"epoch {epoch}/{options.epochs}", total=batches)
            model.train()
            keep_batchnorm_statistics(model)
            losses = []
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                mixed, labels_a, labels_b, weight = mixup(
                    embedder.normalize(images), labels, options.mixup_alpha, shuffle
                )
                with autocast:
                    logits = model(mixed)
                loss = weight * loss_fn(logits, labels_a) + (1 - weight) * loss_fn(logits, labels_b)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                progress.update(
                    batch_bar, advance=1, description=f"epoch {epoch}/{options.epochs} loss {losses[-1]:.3f}"
                )
            progress.remove_task(batch_bar)
            probabilities, _ = predict(model, embedder, held_out, options.batch_size, loader_args, tta=False)
            history.append({
                "epoch": float(epoch),
                "train_loss": float(np.mean(losses)),
                "held_out_loss": _cross_entropy(probabilities, test_y),
                "held_out_accuracy": float((probabilities.argmax(1) == test_y).mean()),
            })  # fmt: skip
            progress.console.log(
                f"epoch {epoch}: train loss {history[-1]['train_loss']:.3f}, held-out accuracy "
                f"{history[-1]['held_out_accuracy']:.3f}"
            )
            checkpoint.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "history": history})  # fmt: skip
            progress.advance(epochs_bar)

    probabilities, tta = predict(model, embedder, held_out, options.batch_size, loader_args, tta=True)
    metrics = classification_metrics(probabilities, test_y, data.classes)
    tta_metrics = classification_metrics(tta, test_y, data.classes)
    metrics |= {f"{k}_tta": v for k, v in tta_metrics.items() if k != "per_class"}
    metrics |= {f"{k}_linear_probe": v for k, v in probe_metrics.items() if k != "per_class"}

    version = head_versions(settings.heads_dir, name).next_version()
    weights_path = save_backbone(embedder, model.backbone, settings.finetune_dir / name / f"v{version}-backbone.pth")
    served = Embedder(
        settings.backbone, str(weights_path), settings.weights_normalization, settings.image_size, "cpu", 1
    )  # checks the file loads as the workers will load it, and names it
    trained_head = LinearHead(
        name, version, data.classes,
        model.head.weight.detach().float().cpu().numpy(), model.head.bias.detach().float().cpu().numpy(),
        served.model_id, {k: float(v) for k, v in metrics.items() if isinstance(v, float)},
    )  # fmt: skip
    trained_head.save(settings.heads_dir)
    checkpoint.path.unlink(missing_ok=True)  # the run is done: the next one starts afresh
    if publish:
        publish_head(settings.heads_dir, name, version)
    notes = [
        f"linear probe top-1 {probe_metrics['top1']:.3f} -> fine-tuned {metrics['top1']:.3f} "
        f"({metrics['top1_tta']:.3f} with test-time augmentation)",
        f"fine-tuned backbone: {weights_path}. Workers use this head once they embed with it: set "
        f"DEEPTARGET_WEIGHTS={weights_path} (normalization {settings.weights_normalization}) and restart them; "
        "posts embedded before keep their old embeddings",
    ]
    trained = TrainedHead(trained_head, metrics, len(train_y), len(test_y), splits.skipped)
    trained.notes = notes
    evaluation = Evaluation(
        data.classes, test_y, tta, [p for p, _ in test_items], metrics,
        history=history, history_x="epoch", history_x_label="epoch",
    )  # fmt: skip
    vectors = served.embed_tensors(torch.stack([held_out[i][0] for i in range(len(held_out))]))
    sample = stratified_sample(test_y)
    summary = [
        f"Fine-tuned {settings.backbone} from {embedder.model_id} on {data_dir}: {len(train_y)} training images, "
        f"{len(test_y)} held out, {options.epochs} epochs, options {options.fingerprint()}.",
        *notes,
        "Held-out predictions below use test-time augmentation; the map shows the fine-tuned embeddings of the "
        "held-out images. The training loss is taken on augmented, mixed-up images with label smoothing, so it sits "
        "above the held-out loss.",
    ]
    page = training_report(f"fine-tuned head {name} v{version}", evaluation, vectors[sample], test_y[sample], summary)
    trained.report_path = page.write(report_folder(settings.reports_dir, f"head-{name}-v{version}"))
    return trained


@torch.inference_mode()
def predict(
    model: HeadOnFeatures,
    embedder: Embedder,
    dataset: ImageFiles,
    batch_size: int,
    loader_args: dict[str, Any],
    tta: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities from the centre view, probabilities averaged over the test-time views or the same again)."""
    model.eval()
    single, averaged = [], []
    autocast = _autocast(embedder)
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size, shuffle=False, **loader_args):
        images = images.to(embedder.device, non_blocking=True)
        views = tta_views(images) if tta else [images]
        with autocast:
            probs = [torch.softmax(model(embedder.normalize(v)).float(), dim=1) for v in views]
        single.append(probs[0].cpu().numpy())
        averaged.append(torch.stack(probs).mean(0).cpu().numpy())
    return np.concatenate(single), np.concatenate(averaged)


def keep_batchnorm_statistics(model: torch.nn.Module) -> None:
    """BatchNorm layers normalise with their pretrained statistics while fine-tuning (their scale and shift still
    learn). Batch statistics of small, augmented batches are noisy, and weights with BatchNorm folded into the
    convolutions (mean 0, variance 1, as in the shared TFLite-converted MobileNetV2) are wrecked by them: one epoch in
    train mode took the food set from 0.77 to chance."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def save_backbone(embedder: Embedder, backbone: torch.nn.Module, path: Path) -> Path:
    """A stock torchvision state dict (the ImageNet classifier's tensors included, unused) that ``weights`` loads."""
    state = embedder.backbone.build().state_dict()
    state.update({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: torch.save(state, handle))
    publish_file(path)  # other hosts' workers fetch it from the bucket (with object_store_url set)
    return path


def _autocast(embedder: Embedder) -> torch.autocast:
    dtype = embedder.dtype
    return torch.autocast(embedder.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1)).mean())
