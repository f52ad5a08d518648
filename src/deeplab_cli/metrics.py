"""PASCAL VOC's metric: one confusion matrix over the whole set, then per-class IoU and their mean."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VOID = 255


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) uint8 ground truth and prediction -> (num_classes, num_classes + 1) int64 counts.

    Rows are true classes, columns predicted ones; the last column counts predictions outside
    [0, num_classes), which are wrong wherever they fall. Pixels whose truth is VOID (255), or any
    other id outside the classes, are ignored.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth is {gt.shape} but prediction is {pred.shape}")
    valid = gt < num_classes
    predicted = np.minimum(pred[valid].astype(np.int64), num_classes)
    flat = gt[valid].astype(np.int64) * (num_classes + 1) + predicted
    return np.bincount(flat, minlength=num_classes * (num_classes + 1)).reshape(num_classes, num_classes + 1)


@dataclass(frozen=True)
class Scores:
    miou: float  # mean over classes that occur in the truth or the predictions
    per_class: np.ndarray  # (num_classes,) float64 IoU, NaN where a class occurs nowhere
    pixel_accuracy: float


def scores(confusion: np.ndarray) -> Scores:
    """IoU_c = TP / (TP + FP + FN) from a summed confusion matrix (not a mean of per-image IoUs)."""
    num_classes = confusion.shape[0]
    true_positive = np.diag(confusion[:, :num_classes]).astype(np.float64)
    union = confusion.sum(1) + confusion[:, :num_classes].sum(0) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    total = confusion.sum()
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return Scores(miou, iou, float(true_positive.sum() / total) if total else float("nan"))
