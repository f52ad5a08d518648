"""`deeplab crf tune`'s run: DeepLab's CRF cross-validation over a labelled set, on every core, ranked by
mean IoU (`deeplab_cli.crf.tune` scores one image)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from deeplab_cli.crf import warm
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.crf.tune import Sample, parts, sample_confusions
from deeplab_cli.errors import InputError
from deeplab_cli.io.inputs import Job
from deeplab_cli.metrics import Scores, scores
from deeplab_cli.run.pool import parallel_map


def samples_of(jobs: list[Job], logits_dir: Path, gt_dir: Path) -> list[Sample]:
    """Each image with its saved logits and its labels, paired by relative path."""
    return [Sample(job.source, logits_dir / f"{job.key}.logits.npz", gt_dir / f"{job.key}.png") for job in jobs]


@dataclass
class Table:
    """The settings ranked by mean IoU over the images scored, best first."""

    rows: list[tuple[Scores, CRFParams]]
    images: int
    failed: int

    @property
    def best(self) -> CRFParams:
        return self.rows[0][1]

    def to_json(self) -> dict:
        return {"images": self.images, "failed": self.failed, "best": self.best.to_dict(),
                "rows": [{**p.to_dict(), "miou": s.miou, "pixel_accuracy": s.pixel_accuracy} for s, p in self.rows]}

    def tsv(self) -> list[str]:
        """The table as tab-separated lines under a header, percentages to two decimals."""
        return ["bi_w\tbi_xy_std\tbi_rgb_std\tmIoU\tpixel_acc"] + [
            f"{p.bi_w:g}\t{p.bi_xy_std:g}\t{p.bi_rgb_std:g}\t{100 * s.miou:.2f}\t{100 * s.pixel_accuracy:.2f}"
            for s, p in self.rows]

    def write_best(self, path: Path) -> None:
        """The best setting as a JSON file for `--crf-params`, written atomically."""
        from deeplab_cli.io.outputs import atomic_write

        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.best.to_dict(), indent=2) + "\n"))


class GridSearch:
    """Iterate to score every sample (each step yields its error message or None); then `table()`."""

    def __init__(self, samples: list[Sample], settings: list[CRFParams], num_classes: int, backend: str,
                 jobs: int, cores: int) -> None:
        self.samples, self.settings, self.num_classes = samples, settings, num_classes
        self.backend, self.jobs, self.cores = backend, jobs, cores
        self.total = np.zeros((len(settings), num_classes, num_classes + 1), np.int64)
        self.failed = 0

    def __iter__(self) -> Iterator[str | None]:
        for _, confusions, error in score_samples(self.samples, self.settings, self.num_classes, self.backend,
                                                  self.jobs, self.cores):
            if error:
                self.failed += 1
            else:
                self.total += confusions
            yield error

    def table(self) -> Table:
        """The ranking; InputError when no image could be scored."""
        if self.failed == len(self.samples):
            raise InputError("no image could be scored")
        rows = sorted(((scores(c), p) for c, p in zip(self.total, self.settings)), key=lambda row: -row[0].miou)
        return Table(rows, len(self.samples) - self.failed, self.failed)


def score_samples(samples: list[Sample], settings: list[CRFParams], num_classes: int, backend: str,
                  jobs: int, cores: int) -> Iterator[tuple[Sample, np.ndarray | None, str | None]]:
    """(sample, (len(settings), num_classes, num_classes + 1) confusions or None, error or None) for every
    sample, each as soon as it is done, on `jobs` worker processes sharing `cores`.

    With several workers and fewer than four samples a worker, each sample's grid is cut into parts
    (`parts`) so that no worker idles while another finishes a whole image alone. A sample fails if
    any of its parts does.
    """
    cuts = parts(settings, -(-4 * jobs // max(1, len(samples))) if jobs > 1 else 1)
    tasks = [(sample, part) for sample in samples for part in cuts]
    lanes = max(1, min(jobs, len(tasks)))
    work = functools.partial(_score_part, settings=settings, num_classes=num_classes, backend=backend,
                             threads=max(1, cores // lanes))
    pending: dict[Sample, tuple[int, np.ndarray | None, str | None]] = {}  # parts left, confusions, error
    for (sample, part), scored, error in parallel_map(work, tasks, lanes, _lost_part, warm, (backend,)):
        left, confusions, first_error = pending.pop(sample, (len(cuts), None, None))
        first_error = first_error or error
        if first_error:
            confusions = None
        else:
            if confusions is None:
                confusions = np.empty((len(settings), num_classes, num_classes + 1), np.int64)
            confusions[part] = scored
        if left > 1:
            pending[sample] = (left - 1, confusions, first_error)
        else:
            yield sample, confusions, first_error


def _score_part(task: tuple[Sample, list[int]], settings: list[CRFParams], num_classes: int, backend: str,
                threads: int):
    """Worker entry point: (task, confusions of the part's settings or None, error message or None)."""
    sample, part = task
    try:
        return task, sample_confusions(sample, [settings[i] for i in part], num_classes, backend, threads), None
    except InputError as e:
        return task, None, str(e)
    except Exception as e:  # reported per sample, like every batch command
        return task, None, f"{sample.image}: {type(e).__name__}: {e}"


def _lost_part(task: tuple[Sample, list[int]]):
    """What `_score_part` would return for a task whose worker process kept dying."""
    return task, None, f"{task[0].image}: the worker process died while scoring it"
