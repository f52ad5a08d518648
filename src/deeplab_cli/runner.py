"""The batch runner: per image, network -> upsampling -> softmax -> CRF -> argmax -> outputs.

Each image's failure is its own: it becomes a Result with the reason and the batch goes on. Outputs
are written atomically, so an image whose outputs all exist is complete and is skipped on a rerun.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from deeplab_cli import stop
from deeplab_cli import crf as crf_backends
from deeplab_cli.crf import CRFParams
from deeplab_cli.errors import InputError, OutputError
from deeplab_cli.images import DEFAULT_MAX_PIXELS, header_size, load_image, resize_for_network, resize_to
from deeplab_cli.inputs import Job
from deeplab_cli.upsample import caffe_interp, labels_at_size, prob_chunks, softmax

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
    crf_backend: str = crf_backends.DEFAULT_BACKEND
    crf_threads: int = 1  # threads inside one image's CRF: the cores that no other image is using
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


def scores_to_probs(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h', w') float32 stride-8 logits -> (C, h, w) float32 softmax at the working size `size`."""
    return softmax(caffe_interp(logits, *size))


def refine(image: np.ndarray, probs: np.ndarray, crf: CRFParams | None, image_size: tuple[int, int],
           backend: str = crf_backends.DEFAULT_BACKEND, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The CRF and the way back to the image's size, shared by `segment` and `crf`.

    image (h, w, 3) uint8 BGR and probs (C, h, w) float32 at the working size. Returns probabilities
    (C, h, w) float32 at the working size (CRF marginals when `crf` is set) and labels (H, W) uint8 at
    `image_size`: bilinear probabilities then argmax, computed in bands of rows, so that a 400 MP scan
    never needs its (C, H, W) map.
    """
    if crf is not None:
        # RGB as DeepLab's CRF binary read it: the permutohedral lattice is not symmetric in the channels.
        probs = crf_backends.dense_crf(image[..., ::-1], probs, crf, backend, threads)
    return probs, labels_at_size(probs, *image_size)


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


def _work_size(size: tuple[int, int], settings: Settings) -> tuple[int, int]:
    """(h, w) the network sees for an image whose header says (width, height)."""
    width, height = size
    scale = min(1.0, (settings.max_size or max(size)) / max(size))
    return max(1, round(height * scale)), max(1, round(width * scale))


def check_memory(job: Job, settings: Settings) -> None:
    """Refuse, before decoding, an image whose stages would need more memory than this process has left
    (its header gives the size): it fails alone instead of bringing in the OOM killer for the batch."""
    from deeplab_cli import memory

    size = header_size(job.source)
    available = memory.available_memory()
    if size is None or available is None:
        return
    width, height = size
    # This process already holds its session (and its CRF code): only the image's own share is new.
    needed = memory.image_bytes((height, width), _work_size(size, settings), settings.crf is not None)
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


def load_job(job: Job, settings: Settings) -> Loaded | Result:
    """Decode and fit an image to the network; an unreadable one becomes its error Result."""
    loaded = []

    def work(timings):
        with _timed(timings, "load"):
            check_memory(job, settings)
            image = load_image(job.source, settings.max_pixels)
            loaded.append(Loaded(job, image, resize_for_network(image, settings.max_size), timings))

    result = attempt(job, settings, work)
    return loaded[0] if loaded else result


def _prefetch(jobs: list[Job], settings: Settings, depth: int) -> Iterator[Loaded | Result]:
    """Decode in a background thread, at most `depth` images ahead (OpenCV releases the GIL meanwhile)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="deeplab-load") as pool:
        ahead: deque = deque()
        for job in jobs:
            ahead.append(pool.submit(load_job, job, settings))
            if len(ahead) > depth:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def batches_of_equal_size(items: Iterator[Loaded | Result], size: int) -> Iterator[list[Loaded] | Result]:
    """Group consecutive images of equal working size, up to `size` a batch; failures pass straight on."""
    batch: list[Loaded] = []
    for item in items:
        if isinstance(item, Result):
            yield item
            continue
        if batch and (len(batch) == size or batch[0].small.shape != item.small.shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _wanted(session, settings: Settings, batch: list[Loaded]) -> tuple[str, ...]:
    """The outputs to fetch: stride-8 logits for a CPU graph (its workers upsample); from a graph with the
    upsampling inside, only what this batch needs, since every byte crosses back from the device."""
    if "probs" not in session.outputs:
        return ("logits",)
    resized = any(item.image.shape != item.small.shape for item in batch)
    finished = "probs" if settings.crf is not None or "probs" in settings.formats or resized else "labels"
    return ("logits", finished) if "logits" in settings.formats else (finished,)


def run_network(batch: list[Loaded], session, settings: Settings) -> list[tuple[Loaded, dict | None, Result | None]]:
    """Run one batch: (item, its outputs, None), or (item, None, error Result) for every item if it fails."""
    pad = None if settings.pad_to is None else (settings.pad_to, settings.pad_to)
    images = batch[0].small[None] if len(batch) == 1 else np.stack([item.small for item in batch])
    start = time.perf_counter()
    try:
        out, error = session.run(images, pad, _wanted(session, settings, batch)), None
    except Exception as e:  # e.g. onnxruntime running out of memory on one huge image
        out, error = None, e
    seconds = (time.perf_counter() - start) / len(batch)
    rows = []
    for i, item in enumerate(batch):
        item.timings["network"] = seconds
        if error is None:
            rows.append((item, {name: value[i] for name, value in out.items()}, None))
        else:
            rows.append((item, None, Result(item.job, "error", [], _message(item.job, error), item.timings)))
    return rows


def segment(jobs: Iterable[Job], session, settings: Settings, workers: int = 0,
            batch_size: int = 1) -> Iterator[Result]:
    """Segment `jobs`, yielding one Result per job as each completes.

    workers == 0: every stage in this process, one image after another. workers >= 1: a pipeline:
    a thread decodes ahead, this process runs the network (in batches of equal-sized images), and
    `workers` processes do upsampling, CRF and writing; queues between them are bounded, so memory
    stays flat however many images there are.
    """
    skipped, todo = split_done(jobs, settings)
    yield from skipped
    if not todo:
        return
    # The CRF may use the cores that no other image is using: all of them in one process.
    settings = sharing_cores(settings, min(workers, len(todo)))
    loaded = _prefetch(todo, settings, depth=2 * max(1, batch_size))
    if workers == 0:
        for batch in batches_of_equal_size(loaded, batch_size):
            if stop.requested():
                return
            if isinstance(batch, Result):
                yield batch
                continue
            for item, net, failed in run_network(batch, session, settings):
                yield failed or attempt(item.job, settings, lambda t: finish(
                    item.job, settings, item.image, item.small, net, session.model_name, t), item.timings)
        return
    yield from _pipeline(batches_of_equal_size(loaded, batch_size), session, settings, workers)


def _pipeline(batches, session, settings: Settings, workers: int) -> Iterator[Result]:
    with _Workers(workers, finish_job, lost_result, crf_backends.warm, (_warm_backend(settings),)) as pool:
        for batch in batches:
            if stop.requested():
                break
            if isinstance(batch, Result):
                yield batch
                continue
            for item, net, failed in run_network(batch, session, settings):
                if failed:
                    yield failed
                    continue
                pool.submit((item.job, settings, item.image, item.small, net, session.model_name, item.timings))
            # Two images per worker in flight keep every worker busy without piling up decoded images.
            yield from pool.results(block=pool.in_flight >= 2 * workers)
        while pool.in_flight:
            yield from pool.results(block=True)


def lost_result(job: Job) -> Result:
    """The Result of an image whose worker process kept dying while processing it."""
    return Result(job, "error", [], f"{job.source}: the worker process died while processing it (out of memory?)")


class _Workers:
    """Spawned processes running `function`. A worker that dies (the kernel's OOM killer, a crash in
    native code) breaks the whole pool: its tasks are given once more to a fresh pool, and a task whose
    second pool breaks too becomes `lost(first argument)`, so one bad input cannot end the run.

    Workers ignore SIGINT (a terminal signals the whole process group): the parent decides, through
    `stop`, what happens to their work. Once a stop is asked for, tasks of a broken pool are dropped
    (left for a rerun), not retried: a scheduler that sends SIGTERM to every process (SLURM, systemd)
    ends the workers too. Leaving the block on an exception (`stop.Abandoned`, a closed generator)
    kills them at once instead of waiting for their tasks."""

    def __init__(self, workers: int, function: Callable, lost: Callable,
                 initializer: Callable | None = None, initargs: tuple = ()):
        self.workers, self.function, self.lost, self.tasks = workers, function, lost, {}
        self.initializer, self.initargs = initializer, initargs
        # Each worker does one task at a time on one core: BLAS threads of its own would only fight the rest.
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, "1")
        self.pool = self._new_pool()

    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(os.getpid(), self.initializer, self.initargs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            for process in list(self.pool._processes.values()):  # no public way to end a busy worker
                process.kill()
        self.pool.shutdown(cancel_futures=exc[0] is not None)

    def cancel_queued(self) -> None:
        """Drop the tasks no worker has taken yet (on a stop): they are left for a rerun."""
        for future in list(self.tasks):
            if future.cancel():
                del self.tasks[future]

    @property
    def in_flight(self) -> int:
        return len(self.tasks)

    def submit(self, args: tuple, tries: int = 0) -> None:
        from concurrent.futures.process import BrokenProcessPool

        try:
            future = self.pool.submit(self.function, *args)
        except BrokenProcessPool:  # broke since the last look: its own tasks are retried as they come back
            self._replace(self.pool)
            future = self.pool.submit(self.function, *args)
        self.tasks[future] = (args, tries, self.pool)

    def _replace(self, broken) -> None:
        if self.pool is broken:  # once per breakage, however many of its tasks report it
            broken.shutdown(wait=False)
            self.pool = self._new_pool()

    def results(self, block: bool) -> Iterator:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        if stop.requested():
            self.cancel_queued()
        done, _ = wait(list(self.tasks), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            args, tries, pool = self.tasks.pop(future)
            if not isinstance(future.exception(), BrokenProcessPool):
                yield future.result()
                continue
            self._replace(pool)
            if stop.requested():
                continue  # stopping: the image is left for a rerun, not retried or reported lost
            if tries:
                yield self.lost(args[0])
            else:
                self.submit(args, 1)


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
        with _timed(timings, "upsample"):
            probs = net["probs"] if "probs" in net else scores_to_probs(net["logits"], small.shape[:2])
        with _timed(timings, "crf"):
            probs, labels = refine(small, probs, settings.crf, image.shape[:2], settings.crf_backend,
                                   settings.crf_threads)
    with _timed(timings, "write"):
        write_outputs(job, settings, image=image, labels=labels, probs=probs, logits=net.get("logits"),
                      work_size=small.shape[:2], model=model)


def crf_one(job: Job, logits_dir: Path, settings: Settings) -> Result:
    """`deeplab crf` for one image: its saved logits (LOGITS/<key>.logits.npz) through the same stages."""
    from deeplab_cli.outputs import read_logits

    if is_done(job, settings):
        return Result(job, "skipped", output_paths(job, settings))

    def work(timings):
        with _timed(timings, "load"):
            check_memory(job, settings)
            image = load_image(job.source, settings.max_pixels)
            saved = read_logits(logits_dir / (job.key + FORMAT_SUFFIXES["logits"]))
            if tuple(saved.image_size) != image.shape[:2]:
                raise InputError(f"{job.source}: image is {image.shape[0]}x{image.shape[1]} but its logits were "
                                 f"computed for {saved.image_size[0]}x{saved.image_size[1]}")
            small = resize_to(image, saved.work_size)
        finish(job, settings, image, small, {"logits": saved.logits}, saved.model, timings)

    return attempt(job, settings, work)


def _start_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    """Worker initializer: exit when the parent is gone (a killed `deeplab`, by SIGKILL or a scheduler's
    time limit, runs no cleanup, and its workers would otherwise wait for tasks forever), then `initializer`."""
    import signal
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="deeplab-parent-watch").start()
    # Ctrl-C reaches the whole process group: the parent alone decides what becomes of the work. SIGTERM
    # keeps its default: the pool itself stops broken workers with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer:
        initializer(*initargs)


def fit_in_memory(jobs: list[Job], workers: int, settings: Settings, session: bool = True) -> tuple[int, str | None]:
    """(workers that fit in the memory this process may use, a note when that is fewer than `workers`).

    Each worker is sized for the largest of the first 64 images (from their headers): a lane with its
    own network `session`, or a GPU run's CRF worker without one (memory.lane_bytes, measured). The
    memory is the cgroup limit a scheduler set (SLURM, Kubernetes, Docker), else what the machine has
    available."""
    from deeplab_cli import memory

    sizes = [size for size in (header_size(job.source) for job in jobs[:64]) if size]
    available = memory.available_memory()
    if not sizes or available is None or workers < 2:
        return workers, None
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    work = _work_size((width, height), settings)
    each = memory.lane_bytes((height, width), work, settings.crf is not None) - (0 if session else memory.SESSION_BYTES)
    fitting = memory.lanes_for(available, each, workers)
    if fitting == workers:
        return workers, None
    return fitting, (f"{fitting} worker{'s' * (fitting > 1)} instead of {workers}: {available / 2**30:.1f} GiB of "
                     f"memory available, about {each / 2**30:.1f} GiB each for {width}x{height} images")


def sharing_cores(settings: Settings, images_at_once: int) -> Settings:
    """`settings` with the CRF given its share of the cores when `images_at_once` images run side by side
    (0: one process, one image at a time); a run of fewer images than cores leaves none idle."""
    return replace(settings, crf_threads=max(1, usable_cores() // max(1, images_at_once)))


def usable_cores() -> int:
    """Cores this process may run on (a batch scheduler's CPU set, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_budget(cores: int, gpu: bool, threads: int | None = None, workers: int | None = None) -> tuple[int, int]:
    """(onnxruntime threads, worker processes) that share `cores` without oversubscribing them.

    With a GPU the network runs in this process (one driving thread) and every core runs a CRF worker.
    On the CPU the workers are lanes (`segment_lanes`): by default one single-threaded lane per core.
    workers == 0 means everything in this one process, with onnxruntime on every core.
    """
    if gpu:
        return threads or 1, cores if workers is None else workers
    if workers == 0 or (workers is None and cores < 2):
        return threads or cores, 0
    if workers is None:
        threads = threads or 1
        return threads, max(1, cores // threads)
    return threads or max(1, cores // workers), workers


def parallel_map(function: Callable, items: Iterable, jobs: int, lost: Callable,
                 initializer: Callable | None = None, initargs: tuple = ()) -> Iterator:
    """`map` over `jobs` worker processes, results in completion order so each is reported as soon as it
    is done, at most two items per worker in flight. An item whose worker dies twice gives `lost(item)`.

    Workers are spawned, not forked: a fork of a process holding onnxruntime's or OpenBLAS's threads can
    deadlock. With jobs == 1 everything runs in this process.
    """
    if jobs <= 1:
        if initializer:
            initializer(*initargs)
        for item in items:
            if stop.requested():
                return
            yield function(item)
        return
    with _Workers(jobs, function, lost, initializer, initargs) as pool:
        for item in items:
            if stop.requested():
                break
            pool.submit((item,))
            yield from pool.results(block=pool.in_flight >= 2 * jobs)
        while pool.in_flight:
            yield from pool.results(block=True)


def segment_lanes(jobs: Iterable[Job], model_path: str | os.PathLike, settings: Settings, lanes: int,
                  threads: int = 1) -> Iterator[Result]:
    """Segment on the CPU with `lanes` processes, each taking whole images through every stage with a
    session of its own (`threads` onnxruntime threads).

    On the CPU this overlaps the stages better than a pipeline: while one lane runs its CRF (one core)
    another runs the network, every thread stays busy, and no thread team waits at a barrier for a
    thread that a CRF worker displaced (BENCHMARKS.md has the measurements).
    """
    skipped, todo = split_done(jobs, settings)
    yield from skipped
    if not todo:
        return
    lanes = min(lanes, len(todo))
    work = functools.partial(lane_job, settings=sharing_cores(settings, lanes))
    yield from parallel_map(work, todo, lanes, lost_result, _open_lane_session,
                            (os.fspath(model_path), threads, _warm_backend(settings)))


_lane_session = None  # one per lane process, opened by its pool's initializer


def _warm_backend(settings: Settings) -> str | None:
    """The CRF backend a worker should load before its first image (None: the run has no CRF)."""
    return settings.crf_backend if settings.crf is not None else None


def _open_lane_session(model_path: str, threads: int, crf_backend: str | None) -> None:
    global _lane_session
    from deeplab_cli.runtime import open_session

    _lane_session = open_session(model_path, "cpu", threads)
    crf_backends.warm(crf_backend)


def lane_job(job: Job, settings: Settings) -> Result:
    """One image through every stage, in a lane process."""
    loaded = load_job(job, settings)
    if isinstance(loaded, Result):
        return loaded
    item, net, failed = run_network([loaded], _lane_session, settings)[0]
    return failed or finish_job(job, settings, item.image, item.small, net, _lane_session.model_name, item.timings)


# Errors of the output device, not of one file: every later write would fail the same way.
_DEVICE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def write_outputs(job: Job, settings: Settings, *, image, labels, probs, logits, work_size, model) -> None:
    """Write each requested format for one image; every file appears complete or not at all.
    Raises OutputError naming the file that could not be written."""
    from deeplab_cli import outputs

    palette = outputs.voc_palette()
    writers = {
        "index": lambda path: outputs.write_index_png(path, labels, palette),
        "color": lambda path: outputs.write_png(path, outputs.colorize(labels, palette)),
        "overlay": lambda path: outputs.write_png(path, outputs.overlay(image, labels, palette, settings.alpha)),
        # At the image's size, streamed class by class: the full map is never held.
        "probs": lambda path: outputs.write_npz_streamed(path, "probs", (len(probs), *labels.shape), np.float16,
                                                         prob_chunks(probs, *labels.shape)),
        "logits": lambda path: outputs.write_logits(
            path, outputs.SavedLogits(logits, tuple(work_size), image.shape[:2], model)),
    }
    for fmt, path in zip(settings.formats, output_paths(job, settings)):
        try:
            writers[fmt](path)
        except OSError as e:
            raise OutputError(f"{path}: cannot write ({e.strerror or e})",
                              stops_batch=e.errno in _DEVICE_ERRORS) from None
