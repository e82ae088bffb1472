"""Classification metrics on numpy arrays (shared by evaluation, output selection and scoring)."""
from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    return float((np.asarray(pred) == labels).mean()) if labels.size else float("nan")


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts: row = true class, column = predicted class."""
    idx = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(pred, dtype=np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes that occur in labels or predictions (scikit-learn's default)."""
    cm = confusion(pred, labels, num_classes).astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    if not present.any():
        return float("nan")
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1e-12), 0.0)
    return float(f1[present].mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum_b |B_b|/N |acc(B_b) - conf(B_b)| over equal-width bins ((b-1)/n, b/n]."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be [N, K] and labels [N], got {probs.shape} and {labels.shape}")
    if not labels.size:
        return float("nan")
    conf, pred = probs.max(1), probs.argmax(1)
    # inner edges i/n computed in Python (correctly rounded): 0.6 falls in (0.4, 0.6] for n = 5
    which = np.searchsorted(np.array([i / bins for i in range(1, bins)]), conf, side="left")
    gap = np.zeros(bins)
    np.add.at(gap, which, (pred == labels) - conf)
    return float(np.abs(gap).sum() / len(labels))


__all__ = ["accuracy", "confusion", "macro_f1", "expected_calibration_error"]
