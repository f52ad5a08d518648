"""The Ray engine on a real two-node local cluster: the local engine's outputs, byte for byte, and a
CRF worker killed mid-run costs nothing."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ray = pytest.importorskip("ray")

import deeplab_cli  # noqa: E402
from conftest import natural_image  # noqa: E402
from deeplab_cli import ray_engine, runner  # noqa: E402
from deeplab_cli.crf import CRFParams  # noqa: E402
from deeplab_cli.errors import RuntimeSetupError, UsageError  # noqa: E402
from deeplab_cli.inputs import collect  # noqa: E402
from deeplab_cli.runtime import open_session  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
# Both nodes and this process agree: no token auth, no usage reporting, and workers import this checkout.
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pids: set[int]) -> set[int]:
    """`pids` and every process below them (Ray workers run in process groups of their own)."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, grew = set(pids), True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def start_node(args: list[str], temp: Path, env: dict) -> subprocess.Popen:
    """`ray start --block` for one node; returns once the node is up."""
    log = temp.with_suffix(".log")
    process = subprocess.Popen([RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                                "--num-gpus", "0", "--temp-dir", str(temp),
                                "--dashboard-agent-listen-port", str(free_port()), *args],
                               stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return process


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node (2 CPUs) and a second node (1 CPU) on 127.0.0.1; every Ray process ends at teardown."""
    # Ray's socket paths (under --temp-dir) must stay within the 107 bytes of a Unix socket name.
    root = tmp_path_factory.mktemp("ray")
    src = str(Path(deeplab_cli.__file__).parents[1])
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once, not after 30 s of draining
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = [start_node(["--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
                         "--dashboard-port", str(free_port())], root / "head", env)]
    try:
        nodes.append(start_node(["--address", address, "--num-cpus", "1"], root / "node", env))
        with pytest.MonkeyPatch.context() as patch:
            for name, value in ENV.items():
                patch.setenv(name, value)
            yield address
    finally:
        processes = descendants({node.pid for node in nodes})
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)  # the node drains and stops its own processes
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for pid in processes:  # whatever did not stop by itself
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def folder(tmp_path):
    """Small images of a few sizes (two equal ones share a network batch, one is downscaled) and a bad file."""
    root = tmp_path / "img"
    root.mkdir()
    for i, size in enumerate([(40, 52), (40, 52), (33, 47), (60, 30), (45, 36)]):
        cv2.imwrite(str(root / f"{i}.png"), natural_image(*size, seed=60 + i))
    (root / "bad.png").write_text("not an image")
    return root


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def local(jobs, onnx_model, settings) -> dict[str, runner.Result]:
    session = open_session(onnx_model, "cpu", spin=False)
    return {r.job.key: r for r in runner.segment(jobs, session, settings)}


def test_stages_compose_into_the_local_engine_outputs(folder, onnx_model, tmp_path):
    """The stages are plain functions of numpy batches: chained by hand they write what runner writes."""
    jobs = collect([str(folder)])
    settings = runner.Settings(out=tmp_path / "stages", formats=("index", "overlay", "probs", "logits"), max_size=56)
    batch = {"source": np.array([str(job.source) for job in jobs], object),
             "key": np.array([job.key for job in jobs], object)}
    batch = ray_engine.load_batch(batch, settings)
    assert batch["image"][3].shape == (60, 30, 3) and batch["small"][3].shape == (56, 28, 3)
    assert batch["image"][0].size == 0  # not resized: the pixels travel once, as `small`
    batch = ray_engine.NetworkStage(onnx_model, settings, "cpu")(batch)
    rows = ray_engine.crf_batch(batch, settings)
    assert set(rows) == {"source", "key", "status", "error", "timings"}
    statuses = dict(zip(rows["key"], rows["status"]))
    expected = local(jobs, onnx_model, runner.Settings(out=tmp_path / "local", formats=settings.formats, max_size=56))
    assert statuses == {key: r.status for key, r in expected.items()}
    assert outputs(tmp_path / "stages") == outputs(tmp_path / "local")


def test_placement_defaults_and_device_checks():
    assert ray_engine.placement("auto", {"CPU": 8.0}) == (False, 4, 1)
    assert ray_engine.placement("auto", {"CPU": 8.0}, threads=2, batch_size=3) == (False, 2, 3)
    assert ray_engine.placement("auto", {"CPU": 64.0, "GPU": 4.0}) == (True, 4, 8)
    assert ray_engine.placement("cpu", {"CPU": 64.0, "GPU": 4.0}, network_actors=5) == (False, 5, 1)
    with pytest.raises(RuntimeSetupError, match="no GPUs"):
        ray_engine.placement("cuda", {"CPU": 8.0})
    with pytest.raises(UsageError, match="use --device cuda"):
        ray_engine.placement("cuda:1", {"CPU": 8.0, "GPU": 2.0})


@pytest.mark.slow
def test_two_node_cluster_writes_what_the_local_engine_writes(cluster, folder, onnx_model, tmp_path):
    jobs = collect([str(folder)])
    formats = ("index", "overlay", "probs", "logits")
    settings = runner.Settings(out=tmp_path / "ray", formats=formats, max_size=56)
    results = list(ray_engine.segment(jobs, onnx_model, settings, address=cluster, batch_size=2))
    expected = local(jobs, onnx_model, runner.Settings(out=tmp_path / "local", formats=formats, max_size=56))

    assert len(results) == len(jobs) and not ray.is_initialized()  # it disconnected when done
    by_key = {r.job.key: r for r in results}
    assert {k: r.status for k, r in by_key.items()} == {k: r.status for k, r in expected.items()}
    assert by_key["bad"].error == expected["bad"].error and "bad.png" in by_key["bad"].error
    assert {k: r.outputs for k, r in by_key.items()} == {
        k: [settings.out / p.relative_to(tmp_path / "local") for p in r.outputs] for k, r in expected.items()}
    assert {"load", "network", "upsample", "crf", "write"} <= set(by_key["0"].timings)
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")

    again = list(ray_engine.segment(jobs, onnx_model, settings, address=cluster))
    assert sorted(r.status for r in again) == ["error"] + ["skipped"] * 5


@pytest.mark.slow
def test_a_crf_worker_killed_mid_run_loses_nothing(cluster, tmp_path, onnx_model):
    root = tmp_path / "img"
    root.mkdir()
    for i in range(8):
        cv2.imwrite(str(root / f"{i}.png"), natural_image(44, 56, seed=80 + i))
    jobs = collect([str(root)])
    # Enough mean-field iterations that each image's CRF task runs for about a second: a window to kill it in.
    crf = CRFParams(iters=300)
    settings = runner.Settings(out=tmp_path / "ray", crf=crf)
    killed, done = [], threading.Event()

    def kill_one_crf_worker():
        while not done.is_set() and not killed:
            for entry in os.listdir("/proc"):
                try:
                    title = Path("/proc", entry, "cmdline").read_bytes()
                except OSError:
                    continue
                if title.startswith(b"ray::MapBatches(crf_batch)"):  # the title while it runs that task
                    os.kill(int(entry), signal.SIGKILL)
                    killed.append(int(entry))
                    break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_crf_worker)
    killer.start()
    try:
        results = list(ray_engine.segment(jobs, onnx_model, settings, address=cluster))
    finally:
        done.set()
        killer.join()

    assert killed, "no CRF task was seen running"
    assert sorted(r.job.key for r in results) == [str(i) for i in range(8)]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    local(jobs, onnx_model, runner.Settings(out=tmp_path / "local", crf=crf))
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
