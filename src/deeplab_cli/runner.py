"""The batch runner: per image, network -> upsampling -> softmax -> CRF -> argmax -> outputs.

Each image's failure is its own: it becomes a Result with the reason and the batch goes on. Outputs
are written atomically, so an image whose outputs all exist is complete and is skipped on a rerun.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from deeplab_cli.crf import CRFParams, dense_crf
from deeplab_cli.errors import InputError
from deeplab_cli.images import load_image, resize_for_network, resize_to
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


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def scores_to_probs(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h', w') float32 stride-8 logits -> (C, h, w) float32 softmax at the working size `size`."""
    return softmax(caffe_interp(logits, *size))


def refine(image: np.ndarray, probs: np.ndarray, crf: CRFParams | None,
           image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The CRF and the way back to the image's size, shared by `segment`, `crf` and `crf tune`.

    image (h, w, 3) uint8 BGR and probs (C, h, w) float32 at the working size. Returns probabilities
    (C, H, W) float32 (CRF marginals when `crf` is set) and labels (H, W) uint8 at `image_size`.
    """
    if crf is not None:
        # RGB as DeepLab's CRF binary read it: pydensecrf's lattice is not symmetric in the channels.
        probs = dense_crf(image[..., ::-1], probs, crf)
    if probs.shape[1:] != tuple(image_size):
        probs = resize_probs(probs, *image_size)
    return probs, labels_from_scores(probs)


def attempt(job: Job, settings: Settings, work: Callable[[dict[str, float]], None]) -> Result:
    """Run `work(timings)` for one job unless its outputs exist; any failure becomes the Result's error."""
    result = Result(job, "ok", output_paths(job, settings))
    if not settings.overwrite and all(p.is_file() for p in result.outputs):
        result.status = "skipped"
        return result
    try:
        work(result.timings)
    except InputError as e:
        result.status, result.error, result.outputs = "error", str(e), []
    except Exception as e:  # one odd file must not end a batch of thousands; it is reported, and exit is 1
        result.status, result.error, result.outputs = "error", f"{job.source}: {type(e).__name__}: {e}", []
    return result


def segment(jobs: Iterable[Job], session, settings: Settings) -> Iterator[Result]:
    """Process `jobs` one after another in this process, yielding one Result per job."""
    for job in jobs:
        yield attempt(job, settings, lambda timings: _segment_one(job, session, settings, timings))


def _segment_one(job: Job, session, settings: Settings, timings: dict[str, float]) -> None:
    with _timed(timings, "load"):
        image = load_image(job.source)
        small = resize_for_network(image, settings.max_size)
    with _timed(timings, "network"):
        pad = None if settings.pad_to is None else (settings.pad_to, settings.pad_to)
        logits = session.logits(small[None], pad)[0]
    finish(job, settings, image, small, logits, session.model_name, timings)


def finish(job: Job, settings: Settings, image: np.ndarray, small: np.ndarray, logits: np.ndarray,
           model: str, timings: dict[str, float]) -> None:
    """Everything after the network for one image: upsampling, softmax, CRF, argmax, outputs."""
    with _timed(timings, "upsample"):
        probs = scores_to_probs(logits, small.shape[:2])
    with _timed(timings, "crf"):
        probs, labels = refine(small, probs, settings.crf, image.shape[:2])
    with _timed(timings, "write"):
        write_outputs(job, settings, image=image, labels=labels, probs=probs, logits=logits,
                      work_size=small.shape[:2], model=model)


def crf_one(job: Job, logits_dir: Path, settings: Settings) -> Result:
    """`deeplab crf` for one image: its saved logits (LOGITS/<key>.logits.npz) through the same stages."""
    from deeplab_cli.outputs import read_logits

    def work(timings):
        with _timed(timings, "load"):
            image = load_image(job.source)
            saved = read_logits(logits_dir / (job.key + FORMAT_SUFFIXES["logits"]))
            if tuple(saved.image_size) != image.shape[:2]:
                raise InputError(f"{job.source}: image is {image.shape[0]}x{image.shape[1]} but its logits were "
                                 f"computed for {saved.image_size[0]}x{saved.image_size[1]}")
            small = resize_to(image, saved.work_size)
        finish(job, settings, image, small, saved.logits, saved.model, timings)

    return attempt(job, settings, work)


def parallel_map(function: Callable, items: Iterable, jobs: int) -> Iterator:
    """`map` over worker processes, results in completion order so each is reported as soon as it is done.

    Workers are spawned, not forked: a fork of a process holding onnxruntime's or OpenBLAS's threads can
    deadlock. With jobs == 1 everything runs in this process.
    """
    if jobs <= 1:
        yield from map(function, items)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        yield from pool.imap_unordered(function, items)


def write_outputs(job: Job, settings: Settings, *, image, labels, probs, logits, work_size, model) -> None:
    """Write each requested format for one image; every file appears complete or not at all."""
    from deeplab_cli import outputs

    palette = outputs.voc_palette()
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
            outputs.write_logits(path, outputs.SavedLogits(logits, tuple(work_size), image.shape[:2], model))
