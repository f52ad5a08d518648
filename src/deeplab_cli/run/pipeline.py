"""The one-process and the GPU-style pipelined runner: `segment`.

This module owns the order of work in one process holding the network session: a thread decodes a
bounded distance ahead, images of equal working size are batched for the network, and either this
process finishes each image (workers == 0) or a pool of worker processes does the stages after the
network (upsampling, CRF, writing), with bounded queues so memory stays flat however many images.

When the CRF is a graph on the network's device (`--crf-backend onnx`, the default of `--device cuda`),
the decoding threads also build each image's lattices, a thread packs each batch's lattices while the
network runs, the CRF runs on the device, and the workers only write what comes back.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterable, Iterator

from deeplab_cli import crf as crf_backends
from deeplab_cli.run import stop
from deeplab_cli.io.inputs import Job
from deeplab_cli.run.pool import Workers
from deeplab_cli.run.scheduling import sharing_cores, usable_cores
from deeplab_cli.run.stages import (Loaded, Result, Settings, attempt, finish, finish_job, load_job, lost_result,
                                run_network, split_done, warm_backend)


def _prefetch(jobs: list[Job], settings: Settings, depth: int, threads: int = 1,
              lattices: bool = False) -> Iterator[Loaded | Result]:
    """Decode (and with `lattices` build the CRF's lattices) in `threads` background threads, at most
    `depth` images ahead, in order. OpenCV and the lattice builder release the GIL meanwhile."""
    with ThreadPoolExecutor(threads, thread_name_prefix="deeplab-load") as pool:
        ahead: deque = deque()
        for job in jobs:
            ahead.append(pool.submit(load_job, job, settings, lattices))
            if len(ahead) > depth:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _packed_ahead(batches: Iterator[list[Loaded] | Result], depth: int):
    """(batch, a callable giving its packed lattices), the packing done in threads `depth` batches ahead."""
    from deeplab_cli.crf.graph import pack

    with ThreadPoolExecutor(depth, thread_name_prefix="deeplab-pack") as pool:
        ahead: deque = deque()
        for batch in batches:
            future = None if isinstance(batch, Result) else pool.submit(pack, [item.lattices for item in batch])
            ahead.append((batch, future and future.result))
            if len(ahead) > depth:
                yield ahead.popleft()
        while ahead:
            yield ahead.popleft()


def device_crf(session, settings: Settings):
    """The CRF graph's session on the network's device when this run's CRF is the graph and the network's
    graph gives probabilities to keep there (the GPU graph); None otherwise."""
    if settings.crf is None or settings.crf_backend != "onnx" or "probs" not in session.outputs:
        return None
    from deeplab_cli.crf.graph import graph_session

    device = f"cuda:{session.device_id}" if session.provider == "CUDAExecutionProvider" else "cpu"
    return graph_session(device, settings.crf.iters)


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


def segment_pipelined(jobs: Iterable[Job], session, settings: Settings, workers: int = 0,
                      batch_size: int = 1) -> Iterator[Result]:
    """Segment `jobs`, yielding one Result per job as each completes.

    workers == 0: every stage in this process, one image after another. workers >= 1: a pipeline:
    a thread decodes ahead, this process runs the network (in batches of equal-sized images), and
    `workers` processes do upsampling, CRF and writing; queues between them are bounded, so memory
    stays flat however many images there are. With the CRF graph on the device (`device_crf`) the
    workers only write, and the decoding threads, one per core, build the lattices.
    """
    skipped, todo = split_done(jobs, settings)
    yield from skipped
    if not todo:
        return
    # The CRF may use the cores that no other image is using: all of them in one process.
    settings = sharing_cores(settings, min(workers, len(todo)))
    crf = device_crf(session, settings)
    threads = usable_cores() if crf else 1
    loaded = _prefetch(todo, settings, max(2 * batch_size, 2 * threads), threads, lattices=crf is not None)
    batches = batches_of_equal_size(loaded, batch_size)
    batches = _packed_ahead(batches, max(2, threads // 4)) if crf else ((batch, None) for batch in batches)
    # What comes back from a device CRF is finished: the workers must not run the CRF again.
    finishing = replace(settings, crf=None) if crf else settings
    if workers == 0:
        for batch, packed in batches:
            if stop.requested():
                return
            if isinstance(batch, Result):
                yield batch
                continue
            for item, net, failed in run_network(batch, session, settings, crf, packed):
                yield failed or attempt(item.job, finishing, lambda t: finish(
                    item.job, finishing, item.image, item.small, net, session.model_name, t), item.timings)
        return
    yield from _pipeline(batches, session, settings, finishing, workers, crf)


def _pipeline(batches, session, settings: Settings, finishing: Settings, workers: int, crf) -> Iterator[Result]:
    with Workers(workers, finish_job, lost_result, crf_backends.warm, (warm_backend(finishing),)) as pool:
        for batch, packed in batches:
            if stop.requested():
                break
            if isinstance(batch, Result):
                yield batch
                continue
            for item, net, failed in run_network(batch, session, settings, crf, packed):
                if failed:
                    yield failed
                    continue
                pool.submit((item.job, finishing, item.image, item.small, net, session.model_name, item.timings))
            # Two images per worker in flight keep every worker busy without piling up decoded images.
            yield from pool.results(block=pool.in_flight >= 2 * workers)
        while pool.in_flight:
            yield from pool.results(block=True)
