"""Stopping a batch as schedulers and terminals do: SIGTERM or Ctrl-C part-way, then a rerun."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import children_of
from deeplab_cli.run import stop
from deeplab_cli.synthetic import natural_image

SRC = str(Path(__file__).resolve().parents[1] / "src")
COUNT, SIZE = 8, (160, 200)

# The CLI with the network's session reported as running on CUDA: the GPU path's pipeline (network in
# this process, CRF workers beside it) on the CPU provider, which is all this test needs of a GPU.
FAKE_GPU = """
import sys
from deeplab_cli import cli
from deeplab_cli.model import runtime

real = runtime.open_session
def open_session(*args, **kwargs):
    session = real(*args, **kwargs)
    session.provider = "CUDAExecutionProvider"
    return session
runtime.open_session = open_session
sys.argv[0] = "deeplab"
cli.main()
"""


@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "img"
    src.mkdir()
    for i in range(COUNT):
        cv2.imwrite(str(src / f"{i}.png"), natural_image(*SIZE, seed=60 + i))
    return src


def command(photos, out, *extra, gpu=False):
    start = [sys.executable, "-c", FAKE_GPU] if gpu else [sys.executable, "-m", "deeplab_cli"]
    return [*start, "segment", str(photos), "--out", str(out), "-f", "index", "-f", "probs",
            "--device", "cpu", "--threads", "1", *extra]


def environment():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def interrupt(cmd, signum, after_results=1, group=False):
    """Run `cmd`, send `signum` once `after_results` results are out (to every process of the run with
    `group`, as SLURM does); (exit code, stderr, seconds to exit, worker pids still alive a moment later)."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(),
                             start_new_session=group)
    for _ in range(after_results):
        assert child.stdout.readline(), child.stderr.read().decode()
    workers = children_of(child.pid)
    sent = time.monotonic()
    if group:
        os.killpg(child.pid, signum)
    else:
        child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    seconds = time.monotonic() - sent
    alive = workers
    deadline = time.monotonic() + 5  # a worker whose parent died notices within a second
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()]
    return child.returncode, err.decode(), seconds, alive


def assert_only_complete_files(out):
    everything = [p for p in out.rglob("*") if p.is_file()]
    assert not [p.name for p in everything if p.name.startswith(".")], "temporaries left behind"
    for path in everything:
        if path.name.endswith(".probs.npz"):
            with np.load(path) as npz:
                assert npz["probs"].shape == (21, *SIZE)
        elif path.suffix == ".png":
            assert np.array(Image.open(path)).shape == SIZE
    return {p.name for p in everything}


def assert_rerun_completes(cmd, out):
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=environment())
    assert rerun.returncode == 0, rerun.stderr
    assert "skipped (already done)" in rerun.stderr
    assert assert_only_complete_files(out) == {f"{i}{s}" for i in range(COUNT) for s in (".png", ".probs.npz")} | {
        "classes.json"}


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-lanes", "gpu-pipeline"])
def test_sigterm_finishes_what_is_in_flight_exits_143_and_a_rerun_resumes(photos, onnx_model, tmp_path, gpu):
    out = tmp_path / "m"
    # Batches of 2 on the "GPU": with one batch of all 8, every image could be in flight before the signal.
    cmd = command(photos, out, "-m", onnx_model, "-j", "2", "--grace", "60", *(["--batch-size", "2"] if gpu else []),
                  gpu=gpu)
    code, err, _, alive = interrupt(cmd, signal.SIGTERM)
    assert code == 143, err
    assert "Traceback" not in err
    assert "stopped (SIGTERM)" in err and "run the same command again to resume" in err
    assert not alive, "workers outlived the command"
    done = assert_only_complete_files(out)
    # In-flight images were let finish (a long grace), and no new ones were started.
    finished = len([n for n in done if n.endswith(".probs.npz")])
    assert 1 <= finished < COUNT
    assert f"{finished} done, 0 skipped (already done), 0 failed" in err
    assert_rerun_completes(cmd, out)


def test_ctrl_c_with_no_grace_drops_work_in_flight_exits_130_and_leaves_no_temporaries(photos, onnx_model, tmp_path):
    out = tmp_path / "m"
    cmd = command(photos, out, "-m", onnx_model, "-j", "2", "--grace", "0")
    code, err, seconds, alive = interrupt(cmd, signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err and "stopped (SIGINT)" in err
    assert seconds < 10  # abandoned at once: no CRF was waited for
    assert not alive
    assert_only_complete_files(out)
    assert_rerun_completes(cmd, out)


def test_sigterm_to_every_process_of_the_run_still_exits_143_with_complete_files(photos, onnx_model, tmp_path):
    out = tmp_path / "m"
    cmd = command(photos, out, "-m", onnx_model, "-j", "2", "--grace", "60")
    code, err, seconds, alive = interrupt(cmd, signal.SIGTERM, group=True)
    assert code == 143, err
    assert "Traceback" not in err and "stopped (SIGTERM)" in err
    assert seconds < 30 and not alive
    assert_only_complete_files(out)
    assert_rerun_completes(cmd, out)


def test_one_process_run_stops_between_images(photos, onnx_model, tmp_path):
    out = tmp_path / "m"
    cmd = command(photos, out, "-m", onnx_model, "-j", "0", "--grace", "60")
    code, err, _, _ = interrupt(cmd, signal.SIGTERM)
    assert code == 143, err
    done = assert_only_complete_files(out)
    assert 1 <= len([n for n in done if n.endswith(".probs.npz")]) < COUNT
    assert_rerun_completes(cmd, out)


def test_a_second_signal_abandons_at_once():
    with stop.graceful(grace=60):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.exit_code() == 143
        with pytest.raises(stop.Abandoned):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was


def test_the_grace_period_ends_a_wait_in_the_main_thread():
    with stop.graceful(grace=0.2):
        os.kill(os.getpid(), signal.SIGINT)
        start = time.monotonic()
        with pytest.raises(stop.Abandoned):
            time.sleep(30)  # as the worker pool waits on its workers
        assert time.monotonic() - start < 5
        assert stop.exit_code() == 130


def test_a_reason_other_than_a_signal_exits_as_a_failure():
    with stop.graceful(grace=1):
        stop.request("the output cannot take more")
        assert stop.requested() and stop.reason() == "the output cannot take more"
        assert stop.exit_code() is None
    with stop.graceful(grace=1):
        assert not stop.requested()  # each batch starts afresh
