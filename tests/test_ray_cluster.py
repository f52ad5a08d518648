"""The Ray engine on a real two-node local cluster: the local engine's outputs, byte for byte; a
worker killed mid-run costs nothing; an image that kills its worker every time fails alone."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
import pytest

ray = pytest.importorskip("ray")
# Ray Data copies its own context through deprecated setters; nothing here sets them.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

import deeplab_cli  # noqa: E402
from deeplab_cli.run import pipeline
from deeplab_cli.run import ray_cluster
from deeplab_cli.run import stages  # noqa: E402
from deeplab_cli.crf import CRFParams  # noqa: E402
from deeplab_cli.errors import RuntimeSetupError, UsageError  # noqa: E402
from deeplab_cli.io.inputs import collect  # noqa: E402
from deeplab_cli.model.runtime import open_session  # noqa: E402
from deeplab_cli.synthetic import natural_image  # noqa: E402

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter's Ray
# Both nodes and this process agree: no token auth, no usage reporting.
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


def start_node(nodes: list[subprocess.Popen], args: list[str], temp: Path, env: dict) -> None:
    """`ray start --block` for one node, added to `nodes` (so that teardown stops it); returns once it is up."""
    log = temp.with_suffix(".log")
    command = [*RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--num-gpus", "0",
               "--temp-dir", str(temp), "--dashboard-agent-listen-port", str(free_port()), *args]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    nodes.append(process)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    """A head node (2 CPUs) and a second node (1 CPU) on 127.0.0.1; every Ray process ends at teardown."""
    # Ray's logs and sockets go here; not under tmp_path, whose depth would push the socket paths
    # (~85 bytes below it) past the 107 bytes a Unix socket name may have.
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    src = str(Path(deeplab_cli.__file__).parents[1])  # workers import this checkout's deeplab_cli
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once, not after 30 s of draining
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = []
    try:
        start_node(nodes, ["--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
                           "--dashboard-port", str(free_port())], root / "head", env)
        start_node(nodes, ["--address", address, "--num-cpus", "1"], root / "node", env)
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
        shutil.rmtree(root, ignore_errors=True)


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


def local(jobs, onnx_model, settings) -> dict[str, stages.Result]:
    session = open_session(onnx_model, "cpu", spin=False)
    return {r.job.key: r for r in pipeline.segment_pipelined(jobs, session, settings)}


@pytest.mark.parametrize("graph,crf,formats", [
    ("logits", CRFParams(), ("index", "overlay", "probs", "logits")),
    ("probs", None, ("index",)),  # labels for the images seen whole, probabilities for the downscaled one
])
def test_stages_compose_into_the_local_engine_outputs(folder, onnx_model, probs_model, tmp_path, graph, crf, formats):
    """The stages are plain functions of numpy batches: chained by hand they write what pipeline.segment_pipelined writes."""
    model = onnx_model if graph == "logits" else probs_model
    jobs = collect([str(folder)])
    settings = stages.Settings(out=tmp_path / "stages", formats=formats, crf=crf, max_size=56)
    batch = {"source": np.array([str(job.source) for job in jobs], object),
             "key": np.array([job.key for job in jobs], object)}
    batch = ray_cluster.load_batch(batch, settings)
    assert batch["image"][3].shape == (60, 30, 3) and batch["small"][3].shape == (56, 28, 3)
    assert batch["image"][0].size == 0  # not resized: the pixels travel once, as `small`
    batch = ray_cluster.NetworkStage(model, settings, "cpu")(batch)
    if graph == "probs":
        assert batch["labels"][0].shape == (40, 52) and batch["probs"][0].size == 0
        assert batch["probs"][3].shape == (21, 56, 28) and batch["labels"][3].size == 0
    rows = ray_cluster.crf_batch(batch, settings)
    assert set(rows) == {"source", "key", "status", "error", "timings", "stops_batch"}
    statuses = dict(zip(rows["key"], rows["status"]))
    expected = local(jobs, model, stages.Settings(out=tmp_path / "local", formats=formats, crf=crf, max_size=56))
    assert statuses == {key: r.status for key, r in expected.items()}
    assert outputs(tmp_path / "stages") == outputs(tmp_path / "local")


def test_placement_defaults_and_device_checks():
    assert ray_cluster.placement("auto", {"CPU": 8.0}) == (False, 4, 1)
    assert ray_cluster.placement("auto", {"CPU": 8.0}, threads=2, batch_size=3) == (False, 2, 3)
    assert ray_cluster.placement("auto", {"CPU": 64.0, "GPU": 4.0}) == (True, 4, 8)
    assert ray_cluster.placement("cpu", {"CPU": 64.0, "GPU": 4.0}, network_actors=5) == (False, 5, 1)
    with pytest.raises(RuntimeSetupError, match="no GPUs"):
        ray_cluster.placement("cuda", {"CPU": 8.0})
    with pytest.raises(UsageError, match="use --device cuda"):
        ray_cluster.placement("cuda:1", {"CPU": 8.0, "GPU": 2.0})


@pytest.mark.slow
def test_two_node_cluster_writes_what_the_local_engine_writes(cluster, folder, onnx_model, tmp_path):
    jobs = collect([str(folder)])
    formats = ("index", "overlay", "probs", "logits")
    settings = stages.Settings(out=tmp_path / "ray", formats=formats, max_size=56)
    results = list(ray_cluster.segment_on_ray(jobs, onnx_model, settings, address=cluster, batch_size=2))
    expected = local(jobs, onnx_model, stages.Settings(out=tmp_path / "local", formats=formats, max_size=56))

    assert len(results) == len(jobs) and not ray.is_initialized()  # it disconnected when done
    by_key = {r.job.key: r for r in results}
    assert {k: r.status for k, r in by_key.items()} == {k: r.status for k, r in expected.items()}
    assert by_key["bad"].error == expected["bad"].error and "bad.png" in by_key["bad"].error
    assert {k: r.outputs for k, r in by_key.items()} == {
        k: [settings.out / p.relative_to(tmp_path / "local") for p in r.outputs] for k, r in expected.items()}
    assert {"load", "network", "upsample", "crf", "write"} <= set(by_key["0"].timings)
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")

    again = list(ray_cluster.segment_on_ray(jobs, onnx_model, settings, address=cluster))
    assert sorted(r.status for r in again) == ["error"] + ["skipped"] * 5


@pytest.mark.slow
def test_workers_killed_mid_run_lose_nothing(cluster, tmp_path, onnx_model):
    """SIGKILL, once each, a worker running a CRF task and the network actor: Ray reruns the task and
    restarts the actor, and every image still comes out as the local engine makes it."""
    root = tmp_path / "img"
    root.mkdir()
    for i in range(6):
        cv2.imwrite(str(root / f"{i}.png"), natural_image(120, 160, seed=80 + i))
    jobs = collect([str(root)])
    # Enough mean-field iterations that each image's CRF task runs for most of a second: a window to kill it in.
    crf = CRFParams(iters=40)
    settings = stages.Settings(out=tmp_path / "ray", crf=crf)
    # Process titles while a worker runs that stage (Ray sets them; an idle worker is "ray::IDLE").
    targets = {b"ray::MapBatches(crf_batch)": None, b"ray::MapWorker(MapBatches(NetworkStage))": None}
    done = threading.Event()

    def kill_each_once():
        while not done.is_set() and None in targets.values():
            for entry in filter(str.isdigit, os.listdir("/proc")):
                try:
                    title = Path("/proc", entry, "cmdline").read_bytes().split(b"\0")[0]
                except OSError:
                    continue
                title = title.removesuffix(b".submit")  # the actor idle or running a batch, not starting
                if targets.get(title, 0) is None:
                    os.kill(int(entry), signal.SIGKILL)
                    targets[title] = int(entry)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_each_once)
    killer.start()
    try:
        results = list(ray_cluster.segment_on_ray(jobs, onnx_model, settings, address=cluster))
    finally:
        done.set()
        killer.join()

    assert None not in targets.values(), f"not seen running: {targets}"
    assert sorted(r.job.key for r in results) == [str(i) for i in range(6)]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    local(jobs, onnx_model, stages.Settings(out=tmp_path / "local", crf=crf))
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")


@pytest.mark.slow
def test_a_model_the_actors_cannot_load_ends_the_run_with_the_reason(cluster, folder, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    settings = stages.Settings(out=tmp_path / "out")
    with pytest.raises(RuntimeSetupError, match="network actors cannot start.*cannot load the model"):
        list(ray_cluster.segment_on_ray(collect([str(folder)]), broken, settings, address=cluster))
    assert not ray.is_initialized()


@pytest.mark.slow
def test_cli_engine_ray_keeps_stdout_for_results(cluster, folder, onnx_model, tmp_path):
    import json

    from click.testing import CliRunner

    from deeplab_cli.cli import cli

    result = CliRunner(env=ENV).invoke(cli, ["segment", str(folder), "--out", str(tmp_path / "m"), "-m", str(onnx_model),
                                             "--engine", "ray", "--address", cluster, "--json", "--no-crf"])
    assert result.exit_code == 1  # the bad file
    records = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but results on stdout
    assert sorted(r["status"] for r in records) == ["error"] + ["ok"] * 5
    assert all(r["provider"] == "ray" for r in records)
    assert (tmp_path / "m/classes.json").is_file()
    assert CliRunner().invoke(cli, ["segment", str(folder), "--out", str(tmp_path / "m"), "-m", str(onnx_model),
                                    "--engine", "ray", "-j", "2"]).exit_code == 2


@pytest.mark.slow
def test_an_input_that_kills_its_worker_every_time_is_reported_not_retried_forever(cluster, folder, onnx_model,
                                                                                    tmp_path, monkeypatch):
    """Three images kill the worker process working on them, every time, as a crash in native code or
    the OOM killer would: one in the load tasks, one in the network actor, one in the CRF tasks. Each is
    tried MAX_ATTEMPTS times and reported with the reason, the image sharing its block still comes out,
    every other output is the local engine's, stdout carries only results, and the exit code is 1."""
    import json
    from collections import defaultdict

    from click.testing import CliRunner

    from deeplab_cli.cli import cli

    # Named to sort just before "0.png", "3.png", "4.png", so that each shares a block with that image
    # (blocks of batch_size = 2 rows in path order), and of its size, so that they share network calls.
    poison = {"load": "0-dies-in-load", "network": "3-dies-in-network", "crf": "4-dies-in-crf"}
    for i, (key, size) in enumerate(zip(poison.values(), [(40, 52), (60, 30), (45, 36)])):
        cv2.imwrite(str(folder / f"{key}.png"), natural_image(*size, seed=90 + i))
    deaths = str(tmp_path / "deaths")  # "key rows" per death, written by the dying worker (same machine)
    limit = ray_cluster.MAX_ATTEMPTS

    # The poisoned stages are the real ones behind a check. Defined here, so that Ray ships them by
    # value (the workers cannot import this module); the pipeline picks them up by name.
    def die_on(batch, key):
        """Kill this process if `batch` holds `key` to work on (a row with an error is only passed on)."""
        errors = batch["error"] if "error" in batch else [""] * len(batch["key"])
        if any(k == key and not e for k, e in zip(batch["key"], errors)):
            with open(deaths, "a") as log:
                log.write(f"{key} {len(batch['key'])}\n")
            with open(deaths) as log:
                if log.read().split().count(key) > 2 * limit:  # the run would never end: fail it instead
                    raise RuntimeError(f"{key} retried without bound")
            os.kill(os.getpid(), signal.SIGKILL)

    load_batch, network_stage, crf_batch = ray_cluster.load_batch, ray_cluster.NetworkStage, ray_cluster.crf_batch

    def poisoned_load(batch, settings):
        die_on(batch, poison["load"])
        return load_batch(batch, settings)

    class NetworkStage(network_stage):
        def __call__(self, batch):
            die_on(batch, poison["network"])
            return super().__call__(batch)

    def poisoned_crf(batch, settings):
        die_on(batch, poison["crf"])
        return crf_batch(batch, settings)

    poisoned_load.__name__, poisoned_crf.__name__ = "load_batch", "crf_batch"  # Ray Data's operator names
    monkeypatch.setattr(ray_cluster, "load_batch", poisoned_load)
    monkeypatch.setattr(ray_cluster, "NetworkStage", NetworkStage)
    monkeypatch.setattr(ray_cluster, "crf_batch", poisoned_crf)

    out = tmp_path / "ray"
    result = CliRunner(env=ENV).invoke(cli, ["segment", str(folder), "--out", str(out), "-m", str(onnx_model),
                                             "--engine", "ray", "--address", cluster, "--json", "--no-crf",
                                             "--batch-size", "2"])
    monkeypatch.undo()

    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # ended, no traceback
    died = defaultdict(list)  # key -> rows of the block of each death
    for line in Path(deaths).read_text().splitlines():
        key, rows = line.split()
        died[key].append(int(rows))
    # First with the image sharing its block, then alone; then never again.
    assert died == {key: [2] + [1] * (limit - 1) for key in poison.values()}
    records = {Path(r["input"]).stem: r for r in map(json.loads, result.stdout.splitlines())}  # results only
    assert sorted(records) == sorted(p.stem for p in folder.iterdir())
    for key in poison.values():
        assert records[key]["status"] == "error" and records[key]["outputs"] == []
        assert records[key]["error"] == (f"{folder / key}.png: the worker process died while processing it "
                                         "(out of memory?)")
    assert records["bad"]["status"] == "error" and "bad.png" in records["bad"]["error"]
    assert {k: r["status"] for k, r in records.items() if k != "bad" and k not in poison.values()} == {
        str(i): "ok" for i in range(5)}
    jobs = [job for job in collect([str(folder)]) if job.key not in poison.values()]
    local(jobs, onnx_model, stages.Settings(out=tmp_path / "local", crf=None))
    assert {k: v for k, v in outputs(out).items() if k != "classes.json"} == outputs(tmp_path / "local")


def test_sigterm_stops_a_ray_run_with_143_and_a_rerun_resumes(cluster, onnx_model, tmp_path):
    # ray.init puts in a SIGTERM handler that exits at once: the CLI's graceful stop must survive it.
    photos = tmp_path / "img"
    photos.mkdir()
    for i in range(12):
        cv2.imwrite(str(photos / f"{i}.png"), natural_image(96, 128, seed=80 + i))
    out = tmp_path / "m"
    src = str(Path(deeplab_cli.__file__).parents[1])
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "deeplab_cli", "segment", str(photos), "--out", str(out), "-m", str(onnx_model),
               "--engine", "ray", "--address", cluster, "--batch-size", "1"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert child.stdout.readline(), child.stderr.read().decode()[-2000:]
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    err = err.decode()
    assert child.returncode == 143, err[-2000:]
    assert "stopped (SIGTERM)" in err and "Traceback" not in err
    done = [p for p in out.rglob("*.png")]
    assert 1 <= len(done) < 12
    assert all(np.array(Image.open(p)).shape == (96, 128) for p in done)
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(list(out.rglob("*.png"))) == 12


def test_ray_runs_the_int8_graph_as_the_local_engine_does(cluster, quantized_home, tmp_path, monkeypatch):
    import json

    from deeplab_cli.io.outputs import read_index_png
    from test_quantize import masks, segment

    monkeypatch.setenv("DEEPLAB_HOME", str(quantized_home[0] / "home"))
    photos = quantized_home[0] / "photos"
    ray = segment(photos, tmp_path / "ray", "--precision", "int8", "--engine", "ray", "--address", cluster)
    assert ray.exit_code == 0, ray.output
    assert all(json.loads(line)["model"] == "largefov-voc12" for line in ray.stdout.splitlines())
    assert segment(photos, tmp_path / "local", "--precision", "int8", "-j", "0").exit_code == 0
    local = masks(tmp_path / "local")
    assert local.keys() == masks(tmp_path / "ray").keys() and len(local) == 5
    assert all((read_index_png(tmp_path / "ray" / name) == mask).all() for name, mask in local.items())
