"""`deeplab eval`'s run: predicted index PNGs against ground truth, one confusion matrix for the whole set."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from deeplab_cli.errors import InputError
from deeplab_cli.io.outputs import VOC_CLASSES, read_index_png
from deeplab_cli.metrics import confusion_matrix, scores


def image_ids(gt_dir: Path, listed: Iterable[str] | None = None) -> list[str]:
    """The ids to evaluate: the listed ones (VOC's val.txt lines, `.png` optional), else every PNG in gt_dir."""
    if listed is not None:
        return [line.strip().removesuffix(".png") for line in listed if line.strip()]
    return sorted(p.relative_to(gt_dir).with_suffix("").as_posix() for p in gt_dir.rglob("*.png")
                  if not p.name.startswith("."))


class Evaluation:
    """Iterate to score every id (each step yields an InputError's message or None); then `result()`."""

    def __init__(self, pred_dir: Path, gt_dir: Path, ids: list[str], num_classes: int) -> None:
        self.pred_dir, self.gt_dir, self.ids, self.num_classes = pred_dir, gt_dir, ids, num_classes
        self.total = np.zeros((num_classes, num_classes + 1), np.int64)
        self.problems: list[str] = []

    def __iter__(self) -> Iterator[str | None]:
        for name in self.ids:
            try:
                truth, pred = read_index_png(self.gt_dir / f"{name}.png"), read_index_png(self.pred_dir / f"{name}.png")
                if truth.shape != pred.shape:
                    raise InputError(f"{self.pred_dir / name}.png: prediction is {pred.shape[0]}x{pred.shape[1]}, "
                                     f"ground truth is {truth.shape[0]}x{truth.shape[1]}")
            except InputError as e:
                self.problems.append(str(e))
                yield str(e)
                continue
            self.total += confusion_matrix(truth, pred, self.num_classes)
            yield None

    def result(self) -> dict:
        """mIoU, per-class IoU (None where a class never occurs) and pixel accuracy, as `--json` prints them.
        Raises InputError when no image could be evaluated."""
        if len(self.problems) == len(self.ids):
            raise InputError(f"no image could be evaluated ({len(self.ids)} listed)")
        result = scores(self.total)
        names = VOC_CLASSES if self.num_classes == len(VOC_CLASSES) else [str(i) for i in range(self.num_classes)]
        per_class = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, result.per_class)}
        return {"miou": result.miou, "per_class": per_class, "pixel_accuracy": result.pixel_accuracy,
                "images": len(self.ids) - len(self.problems), "problems": self.problems}
