"""The one-process and the GPU-style pipelined runner: `segment`.

This module owns the order of work in one process holding the network session: a thread decodes a
bounded distance ahead, images of equal working size are batched for the network, and either this
process finishes each image (workers == 0) or a pool of worker processes does the stages after the
network (upsampling, CRF, writing), with bounded queues so memory stays flat however many images.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

from deeplab_cli import crf as crf_backends
from deeplab_cli import stop
from deeplab_cli.inputs import Job
from deeplab_cli.pool import Workers
from deeplab_cli.scheduling import sharing_cores
from deeplab_cli.stages import (Loaded, Result, Settings, attempt, finish, finish_job, load_job, lost_result,
                                run_network, split_done, warm_backend)


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
    with Workers(workers, finish_job, lost_result, crf_backends.warm, (warm_backend(settings),)) as pool:
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
