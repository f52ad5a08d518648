"""`deeplab segment --engine ray`: the runner's stages as Ray Data operators on a Ray cluster.

    rows (source, key) --load_batch, CPU tasks--> pixels --NetworkStage, actor pool--> network outputs
        --crf_batch, CPU tasks--> outputs written, a small result row per image --> the driver

Each stage calls the local engine's own code (runner.load_job, runner.run_network, runner.finish_job), so the
outputs are byte for byte the local engine's. Failures stay per image: a stage turns an exception into
the row's `error` and passes it on. A worker that dies (killed, out of memory, its node lost) is
retried by Ray Data, which by default restarts actors and reruns tasks without limit; outputs are
written atomically, so a rerun task overwrites nothing half-done. Ray Data's streaming executor bounds
the rows in flight, so memory stays flat however long the input list.

Every node must see the inputs and the output folder at the same paths (a shared file system); the
model travels to the actors through Ray's object store. Needs `pip install 'deeplab-cli[ray]'`.

Composing your own pipeline (columns `source` and `key` in; `status` and `error` out):

    settings = runner.Settings(out=Path("/shared/masks"))
    ds = ray.data.from_items([{"source": "/shared/photos/a.jpg", "key": "a"}])
    ds = ds.map_batches(ray_engine.load_batch, fn_kwargs={"settings": settings}, batch_size=1)
    ds = ds.map_batches(ray_engine.NetworkStage, fn_constructor_args=("/shared/model.onnx", settings),
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=1)
    ds = ds.map_batches(ray_engine.crf_batch, fn_kwargs={"settings": settings})
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from deeplab_cli import runner
from deeplab_cli.errors import RuntimeSetupError, UsageError
from deeplab_cli.inputs import Job
from deeplab_cli.runtime import open_session, parse_device

NET_OUTPUTS = ("logits", "probs", "labels")
# Placeholders for arrays a row does not carry: Arrow columns need a value in every row.
_EMPTY = {
    "image": np.zeros((0, 0, 3), np.uint8),
    "small": np.zeros((0, 0, 3), np.uint8),
    "logits": np.zeros((0, 0, 0), np.float32),
    "probs": np.zeros((0, 0, 0), np.float32),
    "labels": np.zeros((0, 0), np.uint8),
}
# CPU stages do one image at a time on one core: BLAS threads of their own would only fight the others.
_ONE_THREAD = {"env_vars": {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
# Input blocks made by the driver cost ~2 ms each, so a long list gets several network batches per block.
_MAX_INPUT_BLOCKS = 10_000


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays of any shapes; Ray Data stores it as a variable-shaped tensor column."""
    column = np.empty(len(arrays), object)
    for i, array in enumerate(arrays):  # assigning the list at once would broadcast equal shapes
        column[i] = array
    return column


def _job(batch: dict[str, np.ndarray], i: int) -> Job:
    return Job(Path(batch["source"][i]), str(batch["key"][i]))


def load_batch(batch: dict[str, np.ndarray], settings: runner.Settings) -> dict[str, np.ndarray]:
    """Decode and fit to the network (a `map_batches` function, numpy format): adds columns `image`
    (H, W, 3) uint8 BGR, empty when it equals `small`; `small` (h, w, 3) uint8 BGR, what the network
    sees; `error` ("" or the reason) and `timings` (JSON)."""
    images, smalls, errors, timings = [], [], [], []
    for i in range(len(batch["key"])):
        loaded = runner.load_job(_job(batch, i), settings)
        if isinstance(loaded, runner.Result):
            images.append(_EMPTY["image"])
            smalls.append(_EMPTY["small"])
            errors.append(loaded.error)
        else:
            # Most photos need no resizing: then one copy of the pixels travels, not two.
            images.append(_EMPTY["image"] if loaded.small is loaded.image else loaded.image)
            smalls.append(loaded.small)
            errors.append("")
        timings.append(json.dumps(loaded.timings))
    return {**batch, "image": _objects(images), "small": _objects(smalls),
            "error": np.array(errors, object), "timings": np.array(timings, object)}


class NetworkStage:
    """The network on one onnxruntime session (a callable class for `map_batches`, so it runs in an
    actor pool and the model loads once per actor). Adds columns `logits`, `probs`, `labels` (what the
    graph gives for each image; empty where it gives nothing) and `model`; a batch that fails sets
    `error` for its images.

    `model`: the .onnx file's path, readable on every node, or its bytes. On a GPU actor use device
    "cuda": Ray shows each actor only the GPU it was given.
    """

    def __init__(self, model: str | os.PathLike | bytes, settings: runner.Settings, device: str = "auto",
                 threads: int | None = None):
        if isinstance(model, bytes):
            with tempfile.TemporaryDirectory(prefix="deeplab-") as folder:
                path = Path(folder, "model.onnx")
                path.write_bytes(model)
                self.session = open_session(path, device, threads)
        else:
            self.session = open_session(model, device, threads)
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        errors = list(batch["error"])
        outputs = {name: [_EMPTY[name]] * n for name in NET_OUTPUTS}
        timings = list(batch["timings"])
        loaded, row = [], {}
        for i in range(n):
            if not errors[i]:
                image = batch["image"][i] if batch["image"][i].size else batch["small"][i]
                loaded.append(runner.Loaded(_job(batch, i), image, batch["small"][i], json.loads(timings[i])))
                row[loaded[-1].job.key] = i
        # Images of one size share a network call; sorting by size makes the groups as large as they can be.
        loaded.sort(key=lambda item: item.small.shape)
        for group in runner.batches_of_equal_size(iter(loaded), len(loaded)):
            for item, net, failed in runner.run_network(group, self.session, self.settings):
                i = row[item.job.key]
                timings[i] = json.dumps(item.timings)
                if failed:
                    errors[i] = failed.error
                    continue
                for name, value in net.items():
                    outputs[name][i] = value
        return {**batch, **{name: _objects(column) for name, column in outputs.items()},
                "model": np.array([self.session.model_name] * n, object),
                "error": np.array(errors, object), "timings": np.array(timings, object)}


def crf_batch(batch: dict[str, np.ndarray], settings: runner.Settings) -> dict[str, np.ndarray]:
    """Upsampling, softmax, CRF and the outputs, as the local engine does them (a `map_batches`
    function). Returns only small columns: `source`, `key`, `status` ("ok" or "error"), `error`,
    `timings` (JSON); the pixels stay behind."""
    statuses, errors, timings = [], [], []
    for i in range(len(batch["key"])):
        if batch["error"][i]:
            statuses.append("error")
            errors.append(batch["error"][i])
            timings.append(batch["timings"][i])
            continue
        small = batch["small"][i]
        image = batch["image"][i] if batch["image"][i].size else small
        net = {name: batch[name][i] for name in NET_OUTPUTS if batch[name][i].size}
        result = runner.finish_job(_job(batch, i), settings, image, small, net, str(batch["model"][i]),
                                   json.loads(batch["timings"][i]))
        statuses.append(result.status)
        errors.append(result.error or "")
        timings.append(json.dumps(result.timings))
    return {"source": batch["source"], "key": batch["key"], "status": np.array(statuses, object),
            "error": np.array(errors, object), "timings": np.array(timings, object)}


def to_result(row: dict, job: Job, settings: runner.Settings) -> runner.Result:
    """A row from `crf_batch` -> the runner's Result for `job`."""
    ok = row["status"] == "ok"
    return runner.Result(job, row["status"], runner.output_paths(job, settings) if ok else [],
                         None if ok else row["error"], json.loads(row["timings"]))


def pipeline(ds, model: str | os.PathLike | bytes, settings: runner.Settings, *, gpu: bool,
             actors: int, threads: int | None = None, batch_size: int = 1):
    """`ds` (columns `source`, `key`) -> the Dataset of `crf_batch` rows: load tasks, `actors` network
    actors (one GPU each with `gpu`, else `threads` or 1 CPUs and onnxruntime threads each), CRF tasks."""
    import ray

    batches = {"batch_format": "numpy"}
    tasks = {"num_cpus": 1}
    if gpu:
        network = {"num_gpus": 1, "num_cpus": 1, "fn_constructor_args": (model, settings, "cuda", threads)}
    else:
        cores = threads or 1
        network = {"num_cpus": cores, "fn_constructor_args": (model, settings, "cpu", cores)}
    return (
        ds.map_batches(load_batch, fn_kwargs={"settings": settings}, batch_size=batch_size, **batches, **tasks)
        # Blocks of one network batch: an actor call returns its block only when done with all of it.
        .repartition(target_num_rows_per_block=batch_size)
        .map_batches(NetworkStage, batch_size=batch_size, **batches, **network,
                     # Two calls queued per actor keep it busy without piling decoded images up.
                     compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2))
        .map_batches(crf_batch, fn_kwargs={"settings": settings}, batch_size=None, **batches, **tasks)
    )


def _device_kind(device: str) -> str:
    kind, _ = parse_device(device)
    if ":" in device:
        raise UsageError(f"--device {device}: Ray gives each network actor a GPU of its own; use --device cuda")
    return kind


def placement(device: str, resources: dict[str, float], threads: int | None = None,
              network_actors: int | None = None, batch_size: int | None = None) -> tuple[bool, int, int]:
    """(network on GPUs, actor count, batch size) for `device` on a cluster with `resources`
    (ray.cluster_resources()). Defaults: an actor per GPU and batches of 8 with GPUs; on CPUs, half the
    cores for the network (`threads` each) and half for decoding and the CRF, as the local engine."""
    kind = _device_kind(device)
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if kind == "cuda" and not gpus:
        raise RuntimeSetupError(f"--device {device}: the Ray cluster has no GPUs")
    if kind == "cuda" or (kind == "auto" and gpus > 0):
        return True, network_actors or gpus, batch_size or 8
    return False, network_actors or max(1, cpus // (2 * (threads or 1))), batch_size or 1


@contextmanager
def _connected(address: str | None):
    """Connected to the cluster at `address` (None: RAY_ADDRESS, a running local cluster, or a new one);
    an existing connection of the caller's is used as it is and left open."""
    import ray

    if ray.is_initialized():
        yield
        return
    # Workers' and raylets' logs stay in the cluster's log files: stdout carries the CLI's results.
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, runtime_env=_ONE_THREAD)
    except ConnectionError as e:
        raise RuntimeSetupError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS'}: "
                                f"{' '.join(str(e).split())}") from None
    try:
        yield
    finally:
        ray.shutdown()


def segment(jobs: list[Job], model_path: Path, settings: runner.Settings, *, device: str = "auto",
            threads: int | None = None, batch_size: int | None = None, address: str | None = None,
            network_actors: int | None = None) -> Iterator[runner.Result]:
    """Same inputs, outputs and Result objects as runner.segment, run on a Ray cluster (ray.init(address)).

    Yields "skipped" Results for complete outputs first, then one Result per job in completion order.
    Actors, threads and batch size as `placement` decides them.
    """
    try:
        import ray
    except ImportError:
        raise RuntimeSetupError("--engine ray needs Ray: pip install 'deeplab-cli[ray]'") from None

    _device_kind(device)  # a bad --device fails before any work
    skipped, remaining = runner.split_done(jobs, settings)
    yield from skipped
    if not remaining:
        return
    todo = {job.key: job for job in remaining}
    try:
        model = Path(model_path).read_bytes()
    except OSError as e:
        raise RuntimeSetupError(f"{model_path}: cannot read the model ({e.strerror or e})") from None
    with _connected(address):
        gpu, actors, batch_size = placement(device, ray.cluster_resources(), threads, network_actors, batch_size)
        rows = [{"source": str(job.source), "key": key} for key, job in todo.items()]
        blocks = min(_MAX_INPUT_BLOCKS, math.ceil(len(rows) / batch_size))
        ds = pipeline(ray.data.from_items(rows, override_num_blocks=blocks), model, settings, gpu=gpu,
                      actors=actors, threads=threads, batch_size=batch_size)
        # The CLI reports progress itself.
        ds.context.enable_progress_bars = ds.context.print_on_execution_start = False
        try:
            for row in ds.iter_rows():
                yield to_result(row, todo[row["key"]], settings)
        except ray.exceptions.ActorDiedError as e:
            # Ray Data restarts actors that die; one that fails to start (the model does not load, a node
            # has no CUDA) ends the run. Ray keeps only its traceback, whose last line is the reason.
            reason = e.error_msg.strip().splitlines()[-1]
            raise RuntimeSetupError(f"the network actors cannot start on the Ray cluster: {reason}") from None
