"""How many workers and threads: the cores shared without oversubscribing them."""

import pytest

from deeplab_cli.run import scheduling
from deeplab_cli.run import stages


@pytest.mark.parametrize("cores,gpu,threads,jobs,expected", [
    (2, False, None, None, (1, 2)),  # a single-threaded lane per core
    (16, False, None, None, (1, 16)),
    (1, False, None, None, (1, 0)),
    (8, False, 2, None, (2, 4)),  # what the user fixes, the other fills the cores around
    (8, False, None, 2, (4, 2)),
    (8, False, None, 0, (8, 0)),
    (16, True, None, None, (1, 16)),  # with a GPU every core runs the CRF
])
def test_thread_budget(cores, gpu, threads, jobs, expected):
    assert scheduling.thread_budget(cores, gpu, threads, jobs) == expected


def test_default_budget_never_oversubscribes():
    for cores in range(1, 129):
        threads, workers = scheduling.thread_budget(cores, False)
        assert threads * max(workers, 1) <= cores and threads >= 1


def test_the_crf_gets_the_cores_no_other_image_is_using(monkeypatch, tmp_path):
    monkeypatch.setattr(scheduling, "usable_cores", lambda: 8)
    settings = stages.Settings(out=tmp_path)
    assert scheduling.sharing_cores(settings, 0).crf_threads == 8  # one process, one image at a time
    assert scheduling.sharing_cores(settings, 2).crf_threads == 4  # `deeplab crf` on two files
    assert scheduling.sharing_cores(settings, 8).crf_threads == 1
    assert scheduling.sharing_cores(settings, 16).crf_threads == 1
