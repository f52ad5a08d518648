"""The worker pool with retries: spawned processes that survive a worker's death.

This module owns running a function over many inputs in other processes: `Workers` (the pool, with one
retry of a dying worker's tasks and the stop rules), `parallel_map` on top of it, and the start of each
worker (watching its parent, ignoring SIGINT). What the workers do is the caller's: stages, lanes, CRF.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Iterator

from deeplab_cli.run import stop


class Workers:
    """Spawned processes running `function`. A worker that dies (the kernel's OOM killer, a crash in
    native code) breaks the whole pool: its tasks are given once more to a fresh pool, and a task whose
    second pool breaks too becomes `lost(first argument)`, so one bad input cannot end the run.

    Workers ignore SIGINT (a terminal signals the whole process group): the parent decides, through
    `stop`, what happens to their work. Once a stop is asked for, tasks of a broken pool are dropped
    (left for a rerun), not retried: a scheduler that sends SIGTERM to every process (SLURM, systemd)
    ends the workers too. Leaving the block on an exception (`stop.Abandoned`, a closed generator)
    kills them at once instead of waiting for their tasks. Once the block is left, no worker of any of
    its pools is alive: a temporary file a killed worker was writing is unlocked, for the caller to sweep."""

    def __init__(self, workers: int, function: Callable, lost: Callable,
                 initializer: Callable | None = None, initargs: tuple = ()):
        self.workers, self.function, self.lost, self.tasks = workers, function, lost, {}
        self.initializer, self.initargs = initializer, initargs
        # Each worker does one task at a time on one core: BLAS threads of its own would only fight the rest.
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, "1")
        self.pool = self._new_pool()
        self.broken_workers: list = []  # processes of replaced pools, which their pool's own thread ends

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
        # A broken pool ends its workers in a thread of its own: a worker killed by the same SIGTERM as
        # its sibling may still hold its temporary's lock for a moment. Wait until none does.
        for process in self.broken_workers:
            process.kill()
            process.join()

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
            self.broken_workers += list(broken._processes.values())
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
    with Workers(jobs, function, lost, initializer, initargs) as pool:
        for item in items:
            if stop.requested():
                break
            pool.submit((item,))
            yield from pool.results(block=pool.in_flight >= 2 * jobs)
        while pool.in_flight:
            yield from pool.results(block=True)


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
