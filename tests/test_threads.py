"""deeplab_cli.crf.threads: aligned, reused scratch buffers and the pool that runs kernels on slices."""

import threading
import time

import numpy as np
import pytest

from deeplab_cli.crf import threads


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64])
def test_workspace_buffers_start_on_a_cache_line_and_are_reused(dtype):
    ws = threads.Workspace()
    for shape in [(3,), (1000, 24), (5, 7, 3), (250_000, 24)]:  # the last is malloc'd by mmap
        array = ws.take("a", shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
        assert array.ctypes.data % 64 == 0
        array[...] = 7
    smaller = ws.take("a", (10, 24), dtype)
    assert smaller.ctypes.data == array.ctypes.data  # the grown buffer, not a new one
    assert ws.take("b", (10, 24), dtype).ctypes.data != smaller.ctypes.data


def test_parallel_for_covers_the_range_once_even_while_the_pool_is_busy():
    seen = []
    lock = threading.Lock()

    def record(lo, hi):
        with lock:
            seen.extend(range(lo, hi))

    threads.parallel_for(record, 10_000, 2)
    assert sorted(seen) == list(range(10_000))
    # The pool's thread is busy: the calling thread does every slice itself and does not wait.
    seen.clear()
    release = threading.Event()
    busy = threads.start_beside(2, release.wait, 5.0)
    start = time.perf_counter()
    threads.parallel_for(record, 10_000, 2)
    assert time.perf_counter() - start < 2.0
    release.set()
    assert busy() is True
    assert sorted(seen) == list(range(10_000))
    assert threads.start_beside(1, sum, [1, 2])() == 3  # one thread: called at once
