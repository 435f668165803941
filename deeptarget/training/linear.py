"""A linear head on frozen embeddings: multinomial logistic regression with class-balanced weights and L2, fitted
full-batch with L-BFGS (torch, already a dependency), and the metrics reported for it."""

from __future__ import annotations

import numpy as np
import torch


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, n_classes: int, l2: float = 1e-3, iterations: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """(weight (classes, dim), bias (classes,)). Each class weighs the same in the loss, however many images it has."""
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    counts = torch.bincount(y, minlength=n_classes).clamp(min=1).float()
    class_weight = counts.sum() / (n_classes * counts)
    linear = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weight)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(linear(x), y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear.weight.detach().numpy().copy(), linear.bias.detach().numpy().copy()


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
