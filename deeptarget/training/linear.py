"""A linear head on frozen embeddings: multinomial logistic regression with class-balanced weights and L2, fitted
full-batch with L-BFGS (torch, already a dependency), its learning curve, and the metrics reported for it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold


@dataclass(frozen=True)
class LogisticFit:
    weight: np.ndarray  # (classes, dim)
    bias: np.ndarray  # (classes,)
    # one row per loss evaluation of L-BFGS: train loss and accuracy, and the held-out ones when given
    history: list[dict[str, float]] = field(default_factory=list)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(np.ascontiguousarray(features, np.float32)) @ torch.from_numpy(self.weight).T
        return torch.softmax(logits + torch.from_numpy(self.bias), dim=1).numpy()


def fit_logistic(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    l2: float = 1e-3,
    iterations: int = 200,
    held_out: tuple[np.ndarray, np.ndarray] | None = None,
) -> LogisticFit:
    """Each class weighs the same in the loss, however many images it has. ``held_out`` is only watched (for the
    learning curve), never fitted to."""
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    counts = torch.bincount(y, minlength=n_classes).clamp(min=1).float()
    class_weight = counts.sum() / (n_classes * counts)
    linear = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weight)
    watched = None
    if held_out is not None and len(held_out[1]):
        watched = (torch.from_numpy(np.ascontiguousarray(held_out[0], np.float32)), torch.from_numpy(held_out[1]))
    history: list[dict[str, float]] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = linear(x)
        loss: torch.Tensor = loss_fn(logits, y) + l2 * linear.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        row = {
            "evaluation": float(len(history) + 1),
            "train_loss": float(loss.detach()),
            "train_accuracy": float((logits.argmax(1) == y).float().mean()),
        }
        if watched is not None:
            with torch.no_grad():
                held_logits = linear(watched[0])
                row["held_out_loss"] = float(torch.nn.functional.cross_entropy(held_logits, watched[1]))
                row["held_out_accuracy"] = float((held_logits.argmax(1) == watched[1]).float().mean())
        history.append(row)
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]  # unannotated in torch
    return LogisticFit(linear.weight.detach().numpy().copy(), linear.bias.detach().numpy().copy(), history)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, object]:
    """top-1, top-5, macro-F1 and per-class precision / recall."""
    predicted = probabilities.argmax(axis=1)
    top5 = np.argsort(-probabilities, axis=1)[:, : min(5, probabilities.shape[1])]
    per_class = {}
    f1s = []
    for i, name in enumerate(classes):
        tp = int(((predicted == i) & (labels == i)).sum())
        precision = tp / max(1, int((predicted == i).sum()))
        recall = tp / max(1, int((labels == i).sum()))
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        per_class[name] = {"precision": round(precision, 4), "recall": round(recall, 4)}
    return {
        "top1": float((predicted == labels).mean()),
        "top5": float((top5 == labels[:, None]).any(axis=1).mean()),
        "macro_f1": float(np.mean(f1s)),
        "per_class": per_class,
    }


SCORES = {"top1": "top-1", "top5": "top-5", "macro_f1": "macro-F1"}  # summary scores and their labels


def fold_statistics(folds: list[dict[str, object]]) -> dict[str, tuple[float, float]]:
    """score -> (mean, standard deviation) over the folds of ``cross_validate``."""
    scores = {k: np.array([score(f, k) for f in folds]) for k in SCORES}
    return {k: (float(values.mean()), float(values.std())) for k, values in scores.items()}


def score(metrics: Mapping[str, object], name: str) -> float:
    """One number of ``classification_metrics``'s (``top1``...); TypeError for anything else, such as ``per_class``."""
    value = metrics[name]
    if not isinstance(value, int | float):
        raise TypeError(f"{name} is not a score: {value!r:.40}")
    return float(value)


def cross_validate(
    features: np.ndarray, labels: np.ndarray, classes: list[str], folds: int, l2: float = 1e-3, seed: int = 0
) -> list[dict[str, object]]:
    """Stratified K-fold: one metrics dict per fold, each from a head fitted on the other K-1 folds."""
    smallest = int(np.bincount(labels, minlength=len(classes)).min())
    if folds < 2 or folds > smallest:
        raise ValueError(f"--folds must be between 2 and the smallest class's size ({smallest}), not {folds}")
    results = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (train, test) in enumerate(splitter.split(features, labels), start=1):
        fit = fit_logistic(features[train], labels[train], len(classes), l2=l2)
        metrics = classification_metrics(fit.probabilities(features[test]), labels[test], classes)
        results.append({"fold": fold, "images": len(test), **metrics})
    return results
