"""The batch runner: per image, network -> upsampling -> softmax -> CRF -> argmax -> outputs.

Each image's failure is its own: it becomes a Result with the reason and the batch goes on. Outputs
are written atomically, so an image whose outputs all exist is complete and is skipped on a rerun.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from deeplab_cli.crf import CRFParams, dense_crf
from deeplab_cli.errors import InputError
from deeplab_cli.images import load_image, resize_for_network
from deeplab_cli.inputs import Job
from deeplab_cli.upsample import caffe_interp, labels_from_scores, resize_probs, softmax

FORMAT_SUFFIXES = {
    "index": ".png",
    "color": ".color.png",
    "overlay": ".overlay.png",
    "probs": ".probs.npz",
    "logits": ".logits.npz",
}


@dataclass(frozen=True)
class Settings:
    out: Path
    formats: tuple[str, ...] = ("index",)
    max_size: int | None = 513
    pad_to: int | None = None
    crf: CRFParams | None = CRFParams()
    alpha: float = 0.5
    overwrite: bool = False


@dataclass
class Result:
    job: Job
    status: str  # "ok", "skipped" or "error"
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def output_paths(job: Job, settings: Settings) -> list[Path]:
    return [settings.out / (job.key + FORMAT_SUFFIXES[f]) for f in settings.formats]


def refine(image: np.ndarray, logits: np.ndarray, crf: CRFParams | None,
           size: tuple[int, int], timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The stages after the network, shared by `segment` and `crf` so both give the same masks.

    image (H, W, 3) uint8 BGR at the network's working size `size` = (h, w); logits (C, h', w') float32
    at stride 8. Returns probabilities (C, h, w) float32 (CRF marginals when `crf` is set, else the
    softmax) and labels (h, w) uint8.
    """
    clock = time.perf_counter()
    probs = softmax(caffe_interp(logits, *size))
    timings["upsample"] = time.perf_counter() - clock
    if crf is not None:
        clock = time.perf_counter()
        # RGB as DeepLab's CRF binary read it: pydensecrf's lattice is not symmetric in the channels.
        probs = dense_crf(image[..., ::-1], probs, crf)
        timings["crf"] = time.perf_counter() - clock
    return probs, labels_from_scores(probs)


def to_original_size(probs: np.ndarray, labels: np.ndarray, height: int, width: int):
    """Bring working-size results back to the image: probabilities bilinearly, labels from them."""
    if probs.shape[1:] == (height, width):
        return probs, labels
    probs = resize_probs(probs, height, width)
    return probs, labels_from_scores(probs)


def segment(jobs: Iterable[Job], session, settings: Settings) -> Iterator[Result]:
    """Process `jobs` one after another, yielding one Result per job."""
    from deeplab_cli.outputs import voc_palette

    palette = voc_palette()
    for job in jobs:
        result = Result(job, "ok", output_paths(job, settings))
        if not settings.overwrite and all(p.is_file() for p in result.outputs):
            result.status = "skipped"
            yield result
            continue
        try:
            _segment_one(job, session, settings, palette, result.timings)
        except InputError as e:
            result.status, result.error, result.outputs = "error", str(e), []
        except Exception as e:  # one odd file must not end a batch of thousands; it is reported, and exit is 1
            result.status, result.error, result.outputs = "error", f"{job.source}: {type(e).__name__}: {e}", []
        yield result


def _segment_one(job: Job, session, settings: Settings, palette: np.ndarray, timings: dict[str, float]) -> None:
    clock = time.perf_counter()
    image = load_image(job.source)
    small = resize_for_network(image, settings.max_size)
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    pad = None if settings.pad_to is None else (settings.pad_to, settings.pad_to)
    logits = session.logits(small[None], pad)[0]
    timings["network"] = time.perf_counter() - clock

    probs, labels = refine(small, logits, settings.crf, small.shape[:2], timings)
    probs, labels = to_original_size(probs, labels, *image.shape[:2])

    clock = time.perf_counter()
    write_outputs(job, settings, image=image, labels=labels, probs=probs, logits=logits,
                  work_size=small.shape[:2], palette=palette, model=session.model_name)
    timings["write"] = time.perf_counter() - clock


def write_outputs(job: Job, settings: Settings, *, image, labels, probs, logits, work_size, palette, model) -> None:
    """Write each requested format for one image; every file appears complete or not at all."""
    from deeplab_cli import outputs

    for fmt, path in zip(settings.formats, output_paths(job, settings)):
        if fmt == "index":
            outputs.write_index_png(path, labels, palette)
        elif fmt == "color":
            outputs.write_png(path, outputs.colorize(labels, palette))
        elif fmt == "overlay":
            outputs.write_png(path, outputs.overlay(image, labels, palette, settings.alpha))
        elif fmt == "probs":
            outputs.write_npz(path, probs=probs.astype(np.float16))
        elif fmt == "logits":
            # Enough for `deeplab crf` to finish the job later without the network.
            outputs.write_npz(path, logits=logits, work_size=np.array(work_size, np.int64),
                              image_size=np.array(image.shape[:2], np.int64), model=np.array(model))
