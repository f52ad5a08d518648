"""How many workers and threads a run gets: the cores this process may use, shared without oversubscribing
them, and the workers that fit in the memory it may use.

Every number the CLI and the runners (`pipeline`, `lanes`) derive from the machine is decided here.
"""

from __future__ import annotations

import os
from dataclasses import replace

from deeplab_cli.io.images import header_size, network_size
from deeplab_cli.io.inputs import Job
from deeplab_cli.run.stages import Settings


def fit_in_memory(jobs: list[Job], workers: int, settings: Settings, session: bool = True) -> tuple[int, str | None]:
    """(workers that fit in the memory this process may use, a note when that is fewer than `workers`).

    Each worker is sized for the largest of the first 64 images (from their headers): a lane with its
    own network `session`, or a GPU run's CRF worker without one (memory.lane_bytes, measured). The
    memory is the cgroup limit a scheduler set (SLURM, Kubernetes, Docker), else what the machine has
    available."""
    from deeplab_cli.run import memory

    sizes = [size for size in (header_size(job.source) for job in jobs[:64]) if size]
    available = memory.available_memory()
    if not sizes or available is None or workers < 2:
        return workers, None
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    work = network_size(height, width, settings.max_size)
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
    On the CPU the workers are lanes (`segment_on_lanes`): by default one single-threaded lane per core.
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
