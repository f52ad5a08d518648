"""The worker pool: an input that kills its worker is retried once, then reported, never retried forever."""

import os

from deeplab_cli import pool


def _dies_on_three(n):
    if n == 3:
        os._exit(1)  # as the OOM killer would end it: no exception, no cleanup
    return n * 10


def test_an_input_that_kills_its_worker_every_time_is_reported_not_retried_forever():
    results = list(pool.parallel_map(_dies_on_three, range(6), 2, lambda n: ("lost", n)))
    assert ("lost", 3) in results
    accounted = sorted(r[1] if isinstance(r, tuple) else r // 10 for r in results)
    assert accounted == list(range(6))  # each input exactly once, done or reported
