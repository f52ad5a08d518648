"""The paper's CRF cross-validation: a grid over the bilateral kernel, scored by mean IoU on labelled images."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from deeplab_cli.crf import DEFAULT_BACKEND, CRFParams
from deeplab_cli.errors import InputError

def parse_values(text: str) -> tuple[float, ...]:
    """'5:10:1' (start:stop:step, stop included), '4,5,6' or '4' -> the values. ValueError if malformed."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(np.floor((stop - start) / step + 1e-9)) + 1
            return tuple(round(start + i * step, 10) for i in range(count))
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not START:STOP:STEP or a comma-separated list of numbers") from None


def grid(base: CRFParams, ranges: dict[str, tuple[float, ...]]) -> list[CRFParams]:
    """Every combination of `ranges` (CRFParams field -> values), the other fields from `base`."""
    names = list(ranges)
    return [replace(base, **dict(zip(names, values))) for values in itertools.product(*(ranges[n] for n in names))]


@dataclass(frozen=True)
class Sample:
    image: Path
    logits: Path
    truth: Path


def sample_confusions(sample: Sample, settings: list[CRFParams], num_classes: int,
                      backend: str = DEFAULT_BACKEND, threads: int = 1) -> np.ndarray:
    """(len(settings), num_classes, num_classes + 1) confusion matrices of one image under each setting.

    The image, logits and softmax are prepared once, and each lattice once per kernel widths (the
    CRFs come in the backend's order, grouped by widths); each setting then runs the same CRF and
    resize as `deeplab crf`, so a setting's score here is what applying it gives.
    """
    from deeplab_cli.evaluate import confusion_matrix
    from deeplab_cli.images import load_image, max_pixels_from_env, resize_to
    from deeplab_cli.outputs import read_index_png, read_logits
    from deeplab_cli.crf import dense_crf_grid
    from deeplab_cli.stages import scores_to_probs
    from deeplab_cli.upsample import labels_at_size

    image = load_image(sample.image, max_pixels_from_env())
    saved = read_logits(sample.logits)
    truth = read_index_png(sample.truth)
    if truth.shape != image.shape[:2]:
        raise InputError(f"{sample.truth}: ground truth is {truth.shape[0]}x{truth.shape[1]}, "
                         f"image is {image.shape[0]}x{image.shape[1]}")
    small = resize_to(image, saved.work_size)
    probs = scores_to_probs(saved.logits, saved.work_size)
    # RGB, as stages.refine gives the CRF.
    confusions = np.empty((len(settings), num_classes, num_classes + 1), np.int64)
    for index, q in dense_crf_grid(small[..., ::-1], probs, settings, backend, threads):
        # Q comes pixel-major (class fastest); labels_at_size, reading it class by class, takes 2.8 ms
        # a setting at 160x120 from that, 1.5 with the class-major copy (the same labels).
        labels = labels_at_size(np.ascontiguousarray(q), *image.shape[:2])
        confusions[index] = confusion_matrix(truth, labels, num_classes)
    return confusions


def score_sample(sample: Sample, settings: list[CRFParams], num_classes: int, backend: str = DEFAULT_BACKEND,
                 threads: int = 1):
    """Worker entry point: (sample, confusions or None, error message or None)."""
    try:
        return sample, sample_confusions(sample, settings, num_classes, backend, threads), None
    except InputError as e:
        return sample, None, str(e)
    except Exception as e:  # reported per sample, like every batch command
        return sample, None, f"{sample.image}: {type(e).__name__}: {e}"


def lost_sample(sample: Sample):
    """What `score_sample` would return for a sample whose worker process kept dying."""
    return sample, None, f"{sample.image}: the worker process died while scoring it"
