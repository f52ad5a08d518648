"""The pipeline: the pipelined path gives exactly the serial path's outputs, with bounded memory."""

import os
import time

import cv2
import numpy as np
import pytest

from conftest import needs_cuda
from deeplab_cli.run import pipeline
from deeplab_cli.run import stages
from deeplab_cli.io.inputs import Job, collect
from deeplab_cli.model.runtime import open_session
from deeplab_cli.synthetic import natural_image


def run(folder, session, out, **options):
    settings = stages.Settings(out=out, formats=("index", "probs", "logits"),
                               crf_backend=options.get("crf_backend", "numba"))
    workers, batch = options.get("workers", 0), options.get("batch_size", 1)
    return {r.job.key: r for r in pipeline.segment_pipelined(collect([str(folder)]), session, settings, workers, batch)}


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
        return stages.Loaded(None, None, np.zeros((h, 5, 3), np.uint8), {})

    failure = stages.Result(None, "error")
    groups = list(pipeline.batches_of_equal_size(iter([item(4), item(4), item(4), failure, item(4), item(6), item(6)]), 2))
    shapes = [g if isinstance(g, stages.Result) else [i.small.shape[0] for i in g] for g in groups]
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
    real_load = stages.load_image
    monkeypatch.setattr(stages, "load_image", lambda path: loaded.append(path) or real_load(path))
    stream = pipeline._prefetch(collect([str(tmp_path)]), stages.Settings(out=tmp_path / "o"), depth=2)
    for consumed in range(1, 13):
        next(stream)
        time.sleep(0.02)  # give the loader every chance to run ahead
        assert len(loaded) <= consumed + 2
    assert next(stream, None) is None


def test_completed_outputs_are_skipped_first(folder, session, tmp_path):
    run(folder, session, tmp_path / "m")
    again = list(pipeline.segment_pipelined(collect([str(folder)]), session,
                                stages.Settings(out=tmp_path / "m", formats=("index", "probs", "logits")), 1))
    assert [r.status for r in again[:5]] == ["skipped"] * 5
    assert again[5].status == "error"


def test_a_graph_that_upsamples_itself_gives_the_same_masks(folder, session, probs_session, tmp_path):
    host = run(folder, session, tmp_path / "host")
    device = run(folder, probs_session, tmp_path / "device")
    assert {k: r.status for k, r in host.items()} == {k: r.status for k, r in device.items()}
    for key in ("0", "2", "4"):
        a, b = (cv2.imread(str(tmp_path / d / f"{key}.png"), cv2.IMREAD_UNCHANGED) for d in ("host", "device"))
        assert (a == b).mean() > 0.999


@needs_cuda
@pytest.mark.parametrize("backend", ["onnx", "numba"])
def test_cuda_batches_give_the_cpu_masks(folder, session, probs_model, tmp_path, backend):
    """The GPU path as `segment --device cuda` runs it: batches of equal sizes, the CRF on the GPU (onnx, the
    default there) or in CPU worker processes."""
    host = run(folder, session, tmp_path / "host")
    device = run(folder, open_session(probs_model, "cuda"), tmp_path / "device", workers=2, batch_size=3,
                 crf_backend=backend)
    assert {k: r.status for k, r in host.items()} == {k: r.status for k, r in device.items()}
    for key in ("0", "1", "2", "3", "4"):
        a, b = (cv2.imread(str(tmp_path / d / f"{key}.png"), cv2.IMREAD_UNCHANGED) for d in ("host", "device"))
        assert (a == b).mean() >= 0.995  # cuDNN's kernels, not MLAS's: the bound used against the reference


class ZeroNet:
    """A network stand-in that costs nothing, so a long run exercises only the pipeline's own bookkeeping."""

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
        settings = stages.Settings(out=tmp_path / "out", crf=None)
        tracemalloc.start()
        statuses = {r.status for r in pipeline.segment_pipelined(jobs, ZeroNet(), settings, workers)}
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
    settings = stages.Settings(out=tmp_path / "out")
    results, killed = [], []
    for result in pipeline.segment_pipelined(collect([str(src)]), session, settings, workers=1):
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


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("formats", [("index",), ("index", "probs", "logits")])
def test_the_crf_graph_where_the_network_ran_gives_the_engines_results(folder, probs_session, tmp_path, workers,
                                                                         formats):
    """`segment --device cuda`'s path, on the CPU provider: probabilities kept where the network computed them,
    lattices built by the decoding threads and packed per batch, only labels (or marginals) brought back."""
    results = {}
    for backend in ("numba", "onnx"):
        settings = stages.Settings(out=tmp_path / backend, formats=formats, crf_backend=backend)
        results[backend] = {r.job.key: r for r in pipeline.segment_pipelined(collect([str(folder)]), probs_session, settings,
                                                                   workers, batch_size=3)}
    assert {k: r.status for k, r in results["numba"].items()} == {k: r.status for k, r in results["onnx"].items()}
    assert results["onnx"]["5"].status == "error" and "5.png" in results["onnx"]["5"].error
    assert {"lattice", "network", "crf"} <= set(results["onnx"]["0"].timings)
    for key in ("0", "1", "2", "3", "4"):
        a, b = (cv2.imread(str(tmp_path / d / f"{key}.png"), cv2.IMREAD_UNCHANGED) for d in ("numba", "onnx"))
        assert (a == b).mean() >= 0.999
        if "probs" in formats:
            p, q = (np.load(tmp_path / d / f"{key}.probs.npz")["probs"] for d in ("numba", "onnx"))
            assert p.shape == q.shape and np.abs(p - q).max() <= 1e-3


def test_a_stop_during_the_crf_graph_path_leaves_complete_files_and_a_rerun_completes(folder, probs_session,
                                                                                       tmp_path, monkeypatch):
    from deeplab_cli.run import stop

    settings = stages.Settings(out=tmp_path / "m", formats=("index", "probs"), crf_backend="onnx")
    monkeypatch.setattr(stop, "_state", stop._State())
    first = []
    for result in pipeline.segment_pipelined(collect([str(folder)]), probs_session, settings, 1, batch_size=1):
        first.append(result)
        stop.request("test")  # after the first result: images in flight finish, no new ones start
    assert 1 <= sum(r.status == "ok" for r in first) < 5
    written = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert all(name.endswith((".png", ".probs.npz")) for name in written), written  # no temporaries
    for name in written:
        if name.endswith(".npz"):
            assert np.load(tmp_path / "m" / name)["probs"].shape[0] == 21
    monkeypatch.setattr(stop, "_state", stop._State())
    again = {r.job.key: r.status for r in pipeline.segment_pipelined(collect([str(folder)]), probs_session, settings, 1, 1)}
    done_before = {r.job.key for r in first if r.status == "ok"}
    assert {k for k, s in again.items() if s == "skipped"} == done_before
    assert {k for k, s in again.items() if s in ("ok", "skipped")} == {"0", "1", "2", "3", "4"}
