"""The worker pool: an input that kills its worker is retried once, then reported, never retried forever."""

import os

from deeplab_cli.run import pool


def _dies_on_three(n):
    if n == 3:
        os._exit(1)  # as the OOM killer would end it: no exception, no cleanup
    return n * 10


def test_an_input_that_kills_its_worker_every_time_is_reported_not_retried_forever():
    results = list(pool.parallel_map(_dies_on_three, range(6), 2, lambda n: ("lost", n)))
    assert ("lost", 3) in results
    accounted = sorted(r[1] if isinstance(r, tuple) else r // 10 for r in results)
    assert accounted == list(range(6))  # each input exactly once, done or reported


def _dies_or_holds_on(n):
    """0 ends its worker at once; 1 holds its worker, which takes a second to end when terminated (as a
    writer closing its files would)."""
    import signal
    import time

    if n == 0:
        time.sleep(0.5)  # let the other worker start its task first
        os._exit(1)
    signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.0), os._exit(1)))
    time.sleep(60)


def test_no_worker_of_a_broken_pool_outlives_the_block():
    with pool.Workers(2, _dies_or_holds_on, lambda n: ("lost", n)) as workers:
        for n in (0, 1):
            workers.submit((n,))
        while not workers.broken_workers:  # the first death breaks the pool
            list(workers.results(block=True))
        broken = list(workers.broken_workers)
    assert len(broken) == 2
    assert not any(process.is_alive() for process in broken)  # the caller may sweep their temporaries now
