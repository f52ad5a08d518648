"""CPU lanes: `segment_on_lanes`, each lane a process taking whole images through every stage.

This module owns the lane processes: each opens a network session of its own once (`_lane_session`, set
by the pool's initializer) and runs `lane_job` on the images it is given. On the CPU this overlaps the
stages better than the pipeline (`pipeline.segment_pipelined`): see `segment_on_lanes`.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, Iterator

from deeplab_cli import crf as crf_backends
from deeplab_cli.io.inputs import Job
from deeplab_cli.run.pool import parallel_map
from deeplab_cli.run.scheduling import sharing_cores
from deeplab_cli.run.stages import (Result, Settings, finish_job, load_job, lost_result, run_network, split_done,
                                warm_backend)


def segment_on_lanes(jobs: Iterable[Job], model_path: str | os.PathLike, settings: Settings, lanes: int,
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
                            (os.fspath(model_path), threads, warm_backend(settings)))


_lane_session = None  # one per lane process, opened by its pool's initializer


def _open_lane_session(model_path: str, threads: int, crf_backend: str | None) -> None:
    global _lane_session
    from deeplab_cli.model.runtime import open_session

    _lane_session = open_session(model_path, "cpu", threads)
    crf_backends.warm(crf_backend)


def lane_job(job: Job, settings: Settings) -> Result:
    """One image through every stage, in a lane process."""
    loaded = load_job(job, settings)
    if isinstance(loaded, Result):
        return loaded
    item, net, failed = run_network([loaded], _lane_session, settings)[0]
    return failed or finish_job(job, settings, item.image, item.small, net, _lane_session.model_name, item.timings)
