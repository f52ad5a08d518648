"""Per-image stages and their records: decode -> network -> upsampling -> softmax -> CRF -> argmax -> outputs.

This module owns what happens to one image, whichever process runs it: the run's Settings, each image's
Result, the decoded image on its way to the network (Loaded), and the functions for each stage. The
pipeline (`pipeline`), the CPU lanes (`lanes`) and the Ray engine (`ray_cluster`) only decide where and
when these run.

Each image's failure is its own: it becomes a Result with the reason and the batch goes on. Outputs
are written atomically, so an image whose outputs all exist is complete and is skipped on a rerun.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from deeplab_cli import crf as crf_backends
from deeplab_cli.io import outputs
from deeplab_cli.crf import CRFParams
from deeplab_cli.errors import InputError, OutputError
from deeplab_cli.io.images import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIZE, header_size, load_image, network_size,
                                    resize_for_network, resize_to)
from deeplab_cli.io.inputs import Job
from deeplab_cli.io.scores import DEFAULT_GT_PROB
from deeplab_cli.model.upsample import labels_at_size, scores_to_probs

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
    max_size: int | None = DEFAULT_MAX_SIZE
    pad_to: int | None = None
    crf: CRFParams | None = CRFParams()
    alpha: float = 0.5
    overwrite: bool = False
    crf_backend: str = crf_backends.DEFAULT_BACKEND
    crf_threads: int = 1  # threads inside one image's CRF: the cores that no other image is using
    crf_device: str = "cpu"  # where the onnx CRF backend runs its graph (cpu, cuda, cuda:N)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are refused before decoding; None: no limit


@dataclass
class Result:
    job: Job
    status: str  # "ok", "skipped" or "error"
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    stops_batch: bool = False  # the error means no later output can be written either (disk full)


def output_paths(job: Job, settings: Settings) -> list[Path]:
    return [settings.out / (job.key + FORMAT_SUFFIXES[f]) for f in settings.formats]


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def apply_crf(image: np.ndarray, probs: np.ndarray, crf: CRFParams | None,
              backend: str = crf_backends.DEFAULT_BACKEND, threads: int = 1, device: str = "cpu") -> np.ndarray:
    """The CRF as `segment` and `crf` run it: image (h, w, 3) uint8 BGR and probs (C, h, w) float32 at the
    working size -> (C, h, w) float32 marginals (probs itself when `crf` is None)."""
    if crf is None:
        return probs
    # RGB as DeepLab's CRF binary read it: the permutohedral lattice is not symmetric in the channels.
    return crf_backends.dense_crf(image[..., ::-1], probs, crf, backend, threads, device)


def apply_crf_to_unary(image: np.ndarray, unary: np.ndarray, crf: CRFParams, backend: str = "numba",
                       threads: int = 1) -> np.ndarray:
    """`apply_crf` on given energies: image (h, w, 3) uint8 BGR, unary (C, h*w) float32 as pydensecrf's
    setUnaryEnergy takes it -> (C, h, w) float32 marginals."""
    return crf_backends.dense_crf_on_unary(np.ascontiguousarray(image[..., ::-1]), unary, crf, backend, threads)


def is_done(job: Job, settings: Settings) -> bool:
    """True when every requested output exists: written atomically, so they are complete (resume)."""
    return not settings.overwrite and all(p.is_file() for p in output_paths(job, settings))


def split_done(jobs: Iterable[Job], settings: Settings) -> tuple[list[Result], list[Job]]:
    """("skipped" Results for jobs whose outputs all exist, the jobs still to do)."""
    skipped, todo = [], []
    for job in jobs:
        if is_done(job, settings):
            skipped.append(Result(job, "skipped", output_paths(job, settings)))
        else:
            todo.append(job)
    return skipped, todo


def attempt(job: Job, settings: Settings, work: Callable[[dict[str, float]], None],
            timings: dict[str, float] | None = None) -> Result:
    """Run `work(timings)` for one job; any failure becomes the Result's error instead of ending the batch."""
    result = Result(job, "ok", output_paths(job, settings), timings=dict(timings or {}))
    try:
        work(result.timings)
    except Exception as e:  # one odd file must not end a batch of thousands; it is reported, and exit is 1
        result.status, result.error, result.outputs = "error", _message(job, e), []
        result.stops_batch = getattr(e, "stops_batch", False)
    return result


def _message(job: Job, error: Exception) -> str:
    """One line naming the file: our own errors already do; anything else gets its type and text."""
    ours = isinstance(error, (InputError, OutputError))
    text = str(error) if ours else f"{job.source}: {type(error).__name__}: {error}"
    return " ".join(text.split())


def check_memory(job: Job, settings: Settings) -> None:
    """Refuse, before decoding, an image whose stages would need more memory than this process has left
    (its header gives the size): it fails alone instead of bringing in the OOM killer for the batch."""
    from deeplab_cli.run import memory

    size = header_size(job.source)
    available = memory.available_memory() if size else None
    if available is None:
        return
    width, height = size
    # This process already holds its session (and its CRF code): only the image's own share is new.
    work = network_size(height, width, settings.max_size)
    needed = memory.image_bytes((height, width), work, settings.crf is not None)
    if needed > available:
        raise InputError(f"{job.source}: too large for the memory left ({width}x{height} needs about "
                         f"{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available)")


@dataclass
class Loaded:
    """One decoded image on its way to the network."""

    job: Job
    image: np.ndarray  # (H, W, 3) uint8 BGR as decoded
    small: np.ndarray  # (h, w, 3) uint8 BGR, what the network sees
    timings: dict[str, float]
    lattices: tuple | None = None  # the CRF's (Gaussian, bilateral) lattices of `small`, for a CRF graph


def load_job(job: Job, settings: Settings, lattices: bool = False) -> Loaded | Result:
    """Decode and fit an image to the network, and with `lattices` build its CRF lattices; an unreadable
    one becomes its error Result."""
    loaded = []

    def work(timings):
        with _timed(timings, "load"):
            check_memory(job, settings)
            image = load_image(job.source, settings.max_pixels)
            loaded.append(Loaded(job, image, resize_for_network(image, settings.max_size), timings))
        if lattices:
            from deeplab_cli.crf import meanfield

            with _timed(timings, "lattice"):
                kernels = meanfield.prepare(loaded[0].small[..., ::-1], settings.crf)  # RGB, as apply_crf
                loaded[0].lattices = (kernels.gaussian, kernels.bilateral)

    result = attempt(job, settings, work)
    return loaded[0] if result.status == "ok" else result


def _wanted(session, settings: Settings, batch: list[Loaded]) -> tuple[str, ...]:
    """The outputs to fetch: stride-8 logits for a CPU graph (its workers upsample); from a graph with the
    upsampling inside, only what this batch needs, since every byte crosses back from the device."""
    if "probs" not in session.outputs:
        return ("logits",)
    resized = any(item.image.shape != item.small.shape for item in batch)
    finished = "probs" if settings.crf is not None or "probs" in settings.formats or resized else "labels"
    return ("logits", finished) if "logits" in settings.formats else (finished,)


def run_network(batch: list[Loaded], session, settings: Settings, crf=None,
                packed: Callable[[], dict] | None = None) -> list[tuple[Loaded, dict | None, Result | None]]:
    """Run one batch: (item, its outputs, None), or (item, None, error Result) for every item if it fails.

    With `crf` (a `graph.GraphCRF` on the session's device) the CRF runs there too, on the batch's
    lattices (`packed()` gives the graph's inputs): see `_network_and_crf`.
    """
    pad = None if settings.pad_to is None else (settings.pad_to, settings.pad_to)
    images = batch[0].small[None] if len(batch) == 1 else np.stack([item.small for item in batch])
    times: dict[str, float] = {}
    try:
        if crf is None:
            with _timed(times, "network"):
                out = session.run(images, pad, _wanted(session, settings, batch))
        else:
            out = _network_and_crf(images, pad, session, settings, batch, crf, packed, times)
        error = None
    except Exception as e:  # e.g. onnxruntime running out of memory on one huge image
        out, error = None, e
    rows = []
    for i, item in enumerate(batch):
        item.timings.update({stage: seconds / len(batch) for stage, seconds in times.items()})
        if error is None:
            rows.append((item, {name: value[i] for name, value in out.items()}, None))
        else:
            rows.append((item, None, Result(item.job, "error", [], _message(item.job, error), item.timings)))
    return rows


def _network_and_crf(images: np.ndarray, pad, session, settings: Settings, batch: list[Loaded], crf,
                     packed: Callable[[], dict], times: dict[str, float]) -> dict[str, np.ndarray]:
    """The network, then the CRF graph on its probabilities where they were computed (a GPU's memory):
    only what the outputs need crosses back, `labels` (N, h, w) uint8, or the marginals as `probs`
    (N, C, h, w) where an image was resized (its labels come from them at full size) or -f probs asks."""
    fetch = ("logits",) if "logits" in settings.formats else ()
    with _timed(times, "network"):
        probs, out = session.run_keeping(images, pad, "probs", fetch)
    resized = any(item.image.shape != item.small.shape for item in batch)
    wanted = "marginals" if resized or "probs" in settings.formats else "labels"
    inputs = packed()  # packed in a host thread while the network ran
    with _timed(times, "crf"):
        result = crf.run(probs, inputs, settings.crf.pos_w, settings.crf.bi_w, (wanted,))[wanted]
    if wanted == "marginals":
        out["probs"] = result.transpose(0, 3, 1, 2)  # (N, C, h, w) views of the graph's pixel-major rows
    else:
        out["labels"] = result
    return out


def lost_result(job: Job) -> Result:
    """The Result of an image whose worker process kept dying while processing it."""
    return Result(job, "error", [], f"{job.source}: the worker process died while processing it (out of memory?)")


def warm_backend(settings: Settings) -> str | None:
    """The CRF backend a worker should load before its first image (None: the run has no CRF)."""
    return settings.crf_backend if settings.crf is not None else None


def finish_job(job: Job, settings: Settings, image: np.ndarray, small: np.ndarray, net: dict[str, np.ndarray],
               model: str, timings: dict[str, float]) -> Result:
    """A CRF worker's task: `finish` for one image, its failure reported in the Result."""
    return attempt(job, settings, lambda t: finish(job, settings, image, small, net, model, t), timings)


def finish(job: Job, settings: Settings, image: np.ndarray, small: np.ndarray, net: dict[str, np.ndarray],
           model: str, timings: dict[str, float]) -> None:
    """Everything after the network for one image: upsampling, softmax, CRF, argmax, outputs.

    image (H, W, 3) and small (h, w, 3) uint8 BGR; `net` holds one image's network outputs: `logits`
    (C, h', w') float32, and from a graph that upsamples itself, `probs` (C, h, w) or `labels` (h, w).
    """
    probs, labels = None, net.get("labels")
    if labels is None:
        if "unary" in net:  # a label map's energies (`deeplab crf --scores labels`)
            with _timed(timings, "crf"):
                probs = apply_crf_to_unary(small, net["unary"], settings.crf, settings.crf_backend,
                                           settings.crf_threads)
        else:
            with _timed(timings, "upsample"):
                probs = net["probs"] if "probs" in net else scores_to_probs(net["logits"], small.shape[:2])
            with _timed(timings, "crf"):
                probs = apply_crf(small, probs, settings.crf, settings.crf_backend, settings.crf_threads,
                                  settings.crf_device)
        with _timed(timings, "full size"):
            # Bilinear probabilities then argmax in bands of rows: a 400 MP scan never needs its (C, H, W) map.
            labels = labels_at_size(probs, *image.shape[:2])
    with _timed(timings, "write"):
        outputs.write_outputs(zip(settings.formats, output_paths(job, settings)), image=image, labels=labels,
                              probs=probs, logits=net.get("logits"), work_size=small.shape[:2], model=model,
                              alpha=settings.alpha)


@dataclass(frozen=True)
class Scores:
    """Where `deeplab crf` finds each image's scores, and how it reads them (`deeplab_cli.io.scores`)."""

    folder: Path
    kind: str = "logits"  # or "probs", "labels"
    classes: int = 21
    gt_prob: float = DEFAULT_GT_PROB  # labels: the probability each label is given
    ignore: int | None = None  # labels: the label of pixels whose class is unknown


def crf_one(job: Job, scores: Scores, settings: Settings) -> Result:
    """`deeplab crf` for one image: its scores (SCORES/<key>.<suffix>) through the same stages as segment's."""
    if is_done(job, settings):
        return Result(job, "skipped", output_paths(job, settings))

    def work(timings):
        with _timed(timings, "load"):
            check_memory(job, settings)
            image = load_image(job.source, settings.max_pixels)
            small, net, model = read_scores(job, scores, image)
        finish(job, settings, image, small, net, model, timings)

    return attempt(job, settings, work)


def read_scores(job: Job, scores: Scores, image: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """(the working image, what `finish` takes of the scores, the model that made them) for one image:
    saved logits at their working size; probabilities brought to the image's size (bilinear, OpenCV's
    INTER_LINEAR geometry: `resize_probs`); a label map as pydensecrf's unary_from_labels makes it."""
    from deeplab_cli.io import scores as files
    from deeplab_cli.model.upsample import resize_probs

    path = files.scores_path(scores.folder, job.key, scores.kind)
    if scores.kind == "logits":
        saved = outputs.read_logits(path)
        if tuple(saved.image_size) != image.shape[:2]:
            raise InputError(f"{job.source}: image is {image.shape[0]}x{image.shape[1]} but its logits were "
                             f"computed for {saved.image_size[0]}x{saved.image_size[1]}")
        return resize_to(image, saved.work_size), {"logits": saved.logits}, saved.model
    if scores.kind == "probs":
        return image, {"probs": resize_probs(files.read_probs(path, scores.classes), *image.shape[:2])}, ""
    labels = files.read_labels(path, scores.classes, scores.ignore, image.shape[:2])
    return image, {"unary": files.labels_unary(labels, scores.classes, scores.gt_prob, scores.ignore)}, ""
