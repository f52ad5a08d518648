"""The CRF engine's threads and scratch memory: a shared thread pool that runs numba `nogil` kernels
on slices of an image, and per-thread buffers reused from one image to the next."""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np


class Workspace:
    """Named scratch buffers that grow to the largest size asked for and are then reused, so
    large arrays are not allocated (and page-faulted in) again for every image."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """An uninitialised C-contiguous array of this shape, a view of the named buffer, starting
        on a cache line (`_LINE`)."""
        size = math.prod(shape)
        key = (name, np.dtype(dtype))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[key] = _line_aligned(size, np.dtype(dtype))
        return buffer[:size].reshape(shape)


# malloc gives large blocks 16 bytes past a page boundary. Rows of 24 floats (96 bytes) there put every
# other 32-byte vector across two cache lines; from a line's start, none (measured 3.5% faster per image).
_LINE = 64


def _line_aligned(size: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised (size,) array of dtype whose data starts on a `_LINE`-byte boundary."""
    raw = np.empty(size * dtype.itemsize + _LINE, np.uint8)
    skip = -raw.ctypes.data % _LINE
    return raw[skip:skip + size * dtype.itemsize].view(dtype)


_local = threading.local()


def workspace() -> Workspace:
    """This thread's workspace (concurrent calls from several threads never share buffers)."""
    if not hasattr(_local, "workspace"):
        _local.workspace = Workspace()
    return _local.workspace


_PIECES_PER_THREAD = 4  # slices of a parallel_for per thread (see there)
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _pool_of(threads: int) -> ThreadPoolExecutor:
    """The shared pool, with at least threads - 1 threads (the caller is the other one)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool_size < threads - 1:  # a bigger pool; the old one's threads exit once it is unused
            _pool, _pool_size = ThreadPoolExecutor(threads - 1, thread_name_prefix="deeplab-crf"), threads - 1
        return _pool


def start_beside(threads: int, function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start function(*args) on a pool thread when threads > 1, else call it now; returns a function
    that waits for and returns its result. The function should spend its time in code that releases
    the GIL (numba `nogil` kernels, numpy) and must not use the pool itself. A parallel_for started
    next runs on the calling thread alone until the pool thread is free, then on both."""
    if threads <= 1:
        result = function(*args)
        return lambda: result
    return _pool_of(threads).submit(function, *args).result


def parallel_for(kernel: Callable[..., None], n: int, threads: int, *args: Any) -> None:
    """kernel(lo, hi, *args) over contiguous slices of range(n) on `threads` threads, the calling
    thread one of them. Kernels are numba `nogil` functions, so the slices run at the same time;
    their results must not depend on how range(n) is sliced."""
    threads = max(1, min(threads, n // 1024))
    if threads == 1:
        kernel(0, n, *args)
        return
    pool = _pool_of(threads)
    # A few slices per thread, taken in turn from a shared cursor: a thread slowed down by another
    # process's load takes fewer, instead of holding every other thread at the end of the loop.
    pieces = _PIECES_PER_THREAD * threads
    bounds = [n * t // pieces for t in range(pieces + 1)]
    cursor = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        while (t := next(cursor)) < pieces:
            kernel(bounds[t], bounds[t + 1], *args)

    futures = [pool.submit(work) for _ in range(threads - 1)]
    work()
    for future in futures:
        if not future.cancel():  # one still queued behind other work would find nothing left to do
            future.result()
