"""The paper's CRF cross-validation on one image: a grid over the bilateral kernel, each setting scored by
its confusion matrix against the labels. `deeplab_cli.run.crf_tune` runs it over a labelled set."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from deeplab_cli.crf.params import DEFAULT_BACKEND, CRFParams
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
    from deeplab_cli.metrics import confusion_matrix
    from deeplab_cli.io.images import load_image, max_pixels_from_env, resize_to
    from deeplab_cli.io.outputs import read_index_png, read_logits
    from deeplab_cli.crf.backends import dense_crf_grid
    from deeplab_cli.model.upsample import labels_at_size, scores_to_probs

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
        labels = labels_at_size(q, *image.shape[:2])
        confusions[index] = confusion_matrix(truth, labels, num_classes)
    return confusions


def parts(settings: list[CRFParams], count: int) -> list[list[int]]:
    """The settings' indices in at most `count` parts of whole kernel-width groups (a part builds each
    of its lattices once), the groups dealt round-robin so that the parts cost alike."""
    groups: dict[tuple[float, float, float], list[int]] = {}
    for index, params in enumerate(settings):
        groups.setdefault((params.bi_xy_std, params.bi_rgb_std, params.pos_xy_std), []).append(index)
    members = list(groups.values())
    count = max(1, min(count, len(members)))
    return [[index for group in members[k::count] for index in group] for k in range(count)]
