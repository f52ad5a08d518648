"""The batch runner: the pipelined path gives exactly the serial path's outputs, with bounded memory."""

import os
import time

import cv2
import numpy as np
import pytest

from conftest import natural_image, needs_cuda
from deeplab_cli import runner
from deeplab_cli.inputs import Job, collect
from deeplab_cli.runtime import open_session


@pytest.fixture(scope="module")
def session(onnx_model):
    return open_session(onnx_model, "cpu", spin=False)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for i, size in enumerate([(40, 52), (40, 52), (33, 47), (40, 52), (61, 30)]):
        cv2.imwrite(str(root / f"{i}.png"), natural_image(*size, seed=40 + i))
    (root / "5.png").write_text("not an image")
    return root


def run(folder, session, out, **options):
    settings = runner.Settings(out=out, formats=("index", "probs", "logits"))
    workers, batch = options.get("workers", 0), options.get("batch_size", 1)
    return {r.job.key: r for r in runner.segment(collect([str(folder)]), session, settings, workers, batch)}


def test_pipeline_writes_what_the_serial_path_writes(folder, session, tmp_path):
    serial = run(folder, session, tmp_path / "serial")
    piped = run(folder, session, tmp_path / "piped", workers=2)
    assert {k: r.status for k, r in serial.items()} == {k: r.status for k, r in piped.items()}
    assert piped["5"].status == "error" and "5.png" in piped["5"].error
    files = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "piped") for p in (tmp_path / "piped").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "piped" / name).read_bytes(), name
    assert {"load", "network", "upsample", "crf", "write"} <= set(piped["0"].timings)


def test_batches_of_equal_sizes(folder, session, tmp_path):
    single = run(folder, session, tmp_path / "one")
    batched = run(folder, session, tmp_path / "three", batch_size=3)
    assert {k: r.status for k, r in single.items()} == {k: r.status for k, r in batched.items()}
    for key in ("0", "1", "2", "3", "4"):
        a, b = (np.load(tmp_path / d / f"{key}.logits.npz")["logits"] for d in ("one", "three"))
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
        assert (cv2.imread(str(tmp_path / "one" / f"{key}.png")) == cv2.imread(str(tmp_path / "three" / f"{key}.png"))).mean() > 0.999


def test_batches_group_consecutive_equal_sizes():
    def item(h):
        return runner.Loaded(None, None, np.zeros((h, 5, 3), np.uint8), {})

    failure = runner.Result(None, "error")
    groups = list(runner.batches_of_equal_size(iter([item(4), item(4), item(4), failure, item(4), item(6), item(6)]), 2))
    shapes = [g if isinstance(g, runner.Result) else [i.small.shape[0] for i in g] for g in groups]
    assert shapes == [[4, 4], failure, [4, 4], [6, 6]]


def test_network_failure_costs_only_its_batch(folder, tmp_path):
    class Picky:
        model_name, outputs = "picky", ("logits",)

        def run(self, images, pad_to=None, outputs=("logits",)):
            if images.shape[1:3] == (33, 47):
                raise RuntimeError("out of memory\non this one")
            h, w = images.shape[1:3]
            for _ in range(3):  # Caffe's rounding up
                h, w = h // 2 + 1, w // 2 + 1
            return {"logits": np.zeros((len(images), 21, h, w), np.float32)}

    results = run(folder, Picky(), tmp_path / "m", workers=1)
    assert results["2"].status == "error"
    assert results["2"].error.endswith("2.png: RuntimeError: out of memory on this one")
    assert [k for k, r in results.items() if r.status == "ok"] == ["0", "1", "3", "4"]


def test_decoding_runs_a_bounded_distance_ahead(tmp_path, monkeypatch):
    for i in range(12):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), natural_image(9, 9, seed=i))
    loaded = []
    real_load = runner.load_image
    monkeypatch.setattr(runner, "load_image", lambda path: loaded.append(path) or real_load(path))
    stream = runner._prefetch(collect([str(tmp_path)]), runner.Settings(out=tmp_path / "o"), depth=2)
    for consumed in range(1, 13):
        next(stream)
        time.sleep(0.02)  # give the loader every chance to run ahead
        assert len(loaded) <= consumed + 2
    assert next(stream, None) is None


def test_completed_outputs_are_skipped_first(folder, session, tmp_path):
    run(folder, session, tmp_path / "m")
    again = list(runner.segment(collect([str(folder)]), session,
                                runner.Settings(out=tmp_path / "m", formats=("index", "probs", "logits")), 1))
    assert [r.status for r in again[:5]] == ["skipped"] * 5
    assert again[5].status == "error"


@pytest.fixture(scope="module")
def probs_session(probs_model):
    return open_session(probs_model, "cpu")


def test_a_graph_that_upsamples_itself_gives_the_same_masks(folder, session, probs_session, tmp_path):
    host = run(folder, session, tmp_path / "host")
    device = run(folder, probs_session, tmp_path / "device")
    assert {k: r.status for k, r in host.items()} == {k: r.status for k, r in device.items()}
    for key in ("0", "2", "4"):
        a, b = (cv2.imread(str(tmp_path / d / f"{key}.png"), cv2.IMREAD_UNCHANGED) for d in ("host", "device"))
        assert (a == b).mean() > 0.999


@needs_cuda
def test_cuda_batches_give_the_cpu_masks(folder, session, probs_model, tmp_path):
    """The GPU path as `segment --device cuda` runs it: batches of equal sizes, CRF worker processes."""
    host = run(folder, session, tmp_path / "host")
    device = run(folder, open_session(probs_model, "cuda"), tmp_path / "device", workers=2, batch_size=3)
    assert {k: r.status for k, r in host.items()} == {k: r.status for k, r in device.items()}
    for key in ("0", "1", "2", "3", "4"):
        a, b = (cv2.imread(str(tmp_path / d / f"{key}.png"), cv2.IMREAD_UNCHANGED) for d in ("host", "device"))
        assert (a == b).mean() >= 0.995  # cuDNN's kernels, not MLAS's: the bound used against the reference


@pytest.mark.parametrize("crf,formats,max_size,expected", [
    (None, ("index",), None, ("labels",)),
    (None, ("index",), 20, ("probs",)),  # scaled down: probabilities are needed to come back up
    (None, ("index", "logits"), None, ("logits", "labels")),
    (runner.CRFParams(), ("index",), None, ("probs",)),
])
def test_only_what_is_needed_comes_back(folder, probs_session, session, tmp_path, crf, formats, max_size, expected):
    settings = runner.Settings(out=tmp_path, formats=formats, crf=crf, max_size=max_size)
    item = runner.load_job(collect([str(folder / "0.png")])[0], settings)
    assert runner._wanted(probs_session, settings, [item]) == expected
    assert runner._wanted(session, settings, [item]) == ("logits",)


class ZeroNet:
    """A network stand-in that costs nothing, so a long run exercises only the runner's own bookkeeping."""

    model_name, outputs = "zero", ("logits",)

    def run(self, images, pad_to=None, outputs=("logits",)):
        h, w = images.shape[1:3]
        for _ in range(3):
            h, w = h // 2 + 1, w // 2 + 1
        return {"logits": np.zeros((len(images), 21, h, w), np.float32)}


@pytest.mark.parametrize("workers", [0, 1])
def test_memory_stays_flat_over_long_runs(tmp_path, workers):
    import tracemalloc

    image = tmp_path / "one.png"
    cv2.imwrite(str(image), natural_image(120, 160, seed=1))
    peaks = []
    for count in (30, 120):
        jobs = [Job(image, f"n{count}/{i:04d}") for i in range(count)]
        settings = runner.Settings(out=tmp_path / "out", crf=None)
        tracemalloc.start()
        statuses = {r.status for r in runner.segment(jobs, ZeroNet(), settings, workers)}
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert statuses == {"ok"}
    assert peaks[1] < 1.5 * peaks[0], peaks  # four times the images, not four times the memory


def test_a_killed_worker_costs_nothing(tmp_path, session):
    import signal
    from pathlib import Path

    from test_cli import children_of

    src = tmp_path / "img"
    src.mkdir()
    for i in range(6):
        cv2.imwrite(str(src / f"{i}.png"), natural_image(150, 200, seed=60 + i))
    settings = runner.Settings(out=tmp_path / "out")
    results, killed = [], []
    for result in runner.segment(collect([str(src)]), session, settings, workers=1):
        if not results:  # the first image is done and others are in flight: kill the worker
            for pid in children_of(os.getpid()):
                if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        results.append(result)
    assert len(killed) == 1
    assert sorted(r.job.key for r in results) == [str(i) for i in range(6)]
    assert {r.status for r in results} == {"ok"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i}.png" for i in range(6)]


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
    assert runner.thread_budget(cores, gpu, threads, jobs) == expected


def test_default_budget_never_oversubscribes():
    for cores in range(1, 129):
        threads, workers = runner.thread_budget(cores, False)
        assert threads * max(workers, 1) <= cores and threads >= 1


def test_lanes_write_what_the_serial_path_writes(folder, session, onnx_model, tmp_path):
    serial = run(folder, session, tmp_path / "serial")
    settings = runner.Settings(out=tmp_path / "lanes", formats=("index", "probs", "logits"))
    lanes = {r.job.key: r for r in runner.segment_lanes(collect([str(folder)]), onnx_model, settings, 2)}
    assert {k: r.status for k, r in serial.items()} == {k: r.status for k, r in lanes.items()}
    for path in (tmp_path / "serial").rglob("*.*"):
        assert path.read_bytes() == (tmp_path / "lanes" / path.name).read_bytes(), path.name
    again = list(runner.segment_lanes(collect([str(folder)]), onnx_model, settings, 2))
    assert sorted(r.status for r in again) == ["error"] + ["skipped"] * 5


def _dies_on_three(n):
    if n == 3:
        os._exit(1)  # as the OOM killer would end it: no exception, no cleanup
    return n * 10


def test_an_input_that_kills_its_worker_every_time_is_reported_not_retried_forever():
    results = list(runner.parallel_map(_dies_on_three, range(6), 2, lambda n: ("lost", n)))
    assert ("lost", 3) in results
    accounted = sorted(r[1] if isinstance(r, tuple) else r // 10 for r in results)
    assert accounted == list(range(6))  # each input exactly once, done or reported


def test_the_crf_gets_the_cores_no_other_image_is_using(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "usable_cores", lambda: 8)
    settings = runner.Settings(out=tmp_path)
    assert runner.sharing_cores(settings, 0).crf_threads == 8  # one process, one image at a time
    assert runner.sharing_cores(settings, 2).crf_threads == 4  # `deeplab crf` on two files
    assert runner.sharing_cores(settings, 8).crf_threads == 1
    assert runner.sharing_cores(settings, 16).crf_threads == 1
