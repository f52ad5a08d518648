"""`deeplab segment --engine ray`: the local engine's stages (`stages`) as Ray Data operators on a Ray cluster.

    rows (source, key) --load_batch, CPU tasks--> pixels --NetworkStage, actor pool--> network outputs
        --crf_batch, CPU tasks--> outputs written, a small result row per image --> the driver

Each stage calls the local engine's own code (stages.load_job, stages.run_network, stages.finish_job), so the
outputs are byte for byte the local engine's. Failures stay per image: a stage turns an exception into
the row's `error` and passes it on; a row that arrives with an `error` passes every stage untouched.
Outputs are written atomically, so a rerun task overwrites nothing half-done. Ray Data's streaming
executor bounds the rows in flight, so memory stays flat however long the input list.

A worker that dies (killed, out of memory, a crash in native code, its node lost) is retried by Ray
Data, which restarts actors and reruns tasks without limit: right for a worker lost by bad luck, but
an image that kills its worker every time (a decoder that segfaults on it, one too large for memory)
would be retried forever. So each stage runs `bounded`: a small ledger actor (`AttemptLedger`) counts,
per stage and image, the attempts that began and never ended, that is the worker processes that died
while processing it. A block goes through its stage whole while none of its images has such a death;
otherwise one image at a time, so that the images that shared a block with the culprit come out, and
an image with MAX_ATTEMPTS deaths in a stage is passed on with stages.lost_result's reason instead of
being tried again. It is reported failed (exit 1; having no outputs, a rerun tries it again) and
every other image is written.

Why not Ray's own settings (Ray Data 2.60): `max_retries` (tasks) and `max_restarts`/`max_task_retries`
(actors) go through `map_batches(**ray_remote_args)`, deprecated and due to be removed in Ray 2.64;
they count per block, so the images batched with the culprit would fail with it, and once spent they
end the whole dataset unless `DataContext.max_errored_blocks` is set, which then drops whole blocks
(and any other error's too) for the driver to find and run again. `retried_map_errors` and
`max_map_retries` retry Python exceptions only, and `max_consecutive_actor_init_deaths` only counts
actors dying in their constructor. The ledger keeps Ray's defaults, loses no rows, needs nothing of
the driver, and costs two calls to a local actor per block and stage. It lives on the driver's node
and is restarted if lost (its counts then start again: still a bounded number of attempts).

Every node must see the inputs and the output folder at the same paths (a shared file system); the
model travels to the actors through Ray's object store. Needs `pip install 'deeplab-cli[ray]'`.

Composing your own pipeline (columns `source` and `key` in; `status` and `error` out); without
`bounded` and its ledger a stage is retried as Ray Data retries it, without limit:

    settings = stages.Settings(out=Path("/shared/masks"))
    attempts = {"attempts": ray_cluster.attempt_ledger()}
    ds = ray.data.from_items([{"source": "/shared/photos/a.jpg", "key": "a"}])
    ds = ds.map_batches(ray_cluster.bounded(ray_cluster.load_batch), fn_kwargs={"settings": settings, **attempts},
                        batch_size=1)
    ds = ds.map_batches(ray_cluster.bounded(ray_cluster.NetworkStage), fn_constructor_args=("/shared/model.onnx",
                        settings), fn_constructor_kwargs=attempts, compute=ray.data.ActorPoolStrategy(size=2),
                        batch_size=1)
    ds = ds.map_batches(ray_cluster.bounded(ray_cluster.crf_batch), fn_kwargs={"settings": settings, **attempts})
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from deeplab_cli.run import stages
from deeplab_cli.run import stop
from deeplab_cli.run.pipeline import batches_of_equal_size
from deeplab_cli.errors import RuntimeSetupError, UsageError
from deeplab_cli.io.inputs import Job
from deeplab_cli.model.runtime import open_session, parse_device

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
# An image whose worker process died this many times in a stage is reported failed, not tried again.
MAX_ATTEMPTS = 3


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays of any shapes; Ray Data stores it as a variable-shaped tensor column."""
    column = np.empty(len(arrays), object)
    for i, array in enumerate(arrays):  # assigning the list at once would broadcast equal shapes
        column[i] = array
    return column


def _job(batch: dict[str, np.ndarray], i: int) -> Job:
    return Job(Path(batch["source"][i]), str(batch["key"][i]))


def load_batch(batch: dict[str, np.ndarray], settings: stages.Settings) -> dict[str, np.ndarray]:
    """Decode and fit to the network (a `map_batches` function, numpy format): adds columns `image`
    (H, W, 3) uint8 BGR, empty when it equals `small`; `small` (h, w, 3) uint8 BGR, what the network
    sees; `error` ("" or the reason) and `timings` (JSON)."""
    images, smalls, errors, timings = [], [], [], []
    for i in range(len(batch["key"])):
        if "error" in batch and batch["error"][i]:  # failed already (given up by `bounded`): passed on
            images.append(_EMPTY["image"])
            smalls.append(_EMPTY["small"])
            errors.append(batch["error"][i])
            timings.append(batch["timings"][i] if "timings" in batch else "{}")
            continue
        loaded = stages.load_job(_job(batch, i), settings)
        if isinstance(loaded, stages.Result):
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

    def __init__(self, model: str | os.PathLike | bytes, settings: stages.Settings, device: str = "auto",
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
                loaded.append(stages.Loaded(_job(batch, i), image, batch["small"][i], json.loads(timings[i])))
                row[loaded[-1].job.key] = i
        # Images of one size share a network call; sorting by size makes the groups as large as they can be.
        loaded.sort(key=lambda item: item.small.shape)
        for group in batches_of_equal_size(iter(loaded), len(loaded)):
            for item, net, failed in stages.run_network(group, self.session, self.settings):
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


def crf_batch(batch: dict[str, np.ndarray], settings: stages.Settings) -> dict[str, np.ndarray]:
    """Upsampling, softmax, CRF and the outputs, as the local engine does them (a `map_batches`
    function). Returns only small columns: `source`, `key`, `status` ("ok" or "error"), `error`,
    `timings` (JSON), `stops_batch` (the output device is full); the pixels stay behind."""
    statuses, errors, timings, stops = [], [], [], []
    for i in range(len(batch["key"])):
        if batch["error"][i]:
            statuses.append("error")
            errors.append(batch["error"][i])
            timings.append(batch["timings"][i])
            stops.append(False)
            continue
        small = batch["small"][i]
        image = batch["image"][i] if batch["image"][i].size else small
        net = {name: batch[name][i] for name in NET_OUTPUTS if batch[name][i].size}
        result = stages.finish_job(_job(batch, i), settings, image, small, net, str(batch["model"][i]),
                                   json.loads(batch["timings"][i]))
        statuses.append(result.status)
        errors.append(result.error or "")
        timings.append(json.dumps(result.timings))
        stops.append(result.stops_batch)
    return {"source": batch["source"], "key": batch["key"], "status": np.array(statuses, object),
            "error": np.array(errors, object), "timings": np.array(timings, object),
            "stops_batch": np.array(stops, bool)}


def to_result(row: dict, job: Job, settings: stages.Settings) -> stages.Result:
    """A row from `crf_batch` -> the local engine's Result for `job`."""
    ok = row["status"] == "ok"
    return stages.Result(job, row["status"], stages.output_paths(job, settings) if ok else [],
                         None if ok else row["error"], json.loads(row["timings"]), bool(row["stops_batch"]))


class AttemptLedger:
    """Per stage and image (key), the attempts that began and have not ended: while no attempt runs,
    the worker processes that died while processing that image. A Ray actor (`attempt_ledger`)."""

    def __init__(self):
        self.open: Counter = Counter()

    def begin(self, stage: str, keys: list[str], alone: bool = False) -> list[int]:
        """The open attempts of each key; an attempt of each begins when none has any (or `alone`)."""
        earlier = [self.open[stage, key] for key in keys]
        if alone or not any(earlier):
            self.open.update((stage, key) for key in keys)
        return earlier

    def end(self, stage: str, keys: list[str]) -> None:
        for key in keys:
            self.open[stage, key] -= 1
            if self.open[stage, key] <= 0:
                del self.open[stage, key]


def attempt_ledger():
    """A new AttemptLedger actor on this driver's node (elsewhere if that node cannot take it); restarted
    if lost. It ends when its last handle goes: keep the handle, or the Dataset using it, until the end."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                      scheduling_strategy=here)(AttemptLedger).remote()


def bounded(stage: Callable | type) -> Callable | type:
    """`stage` (a `map_batches` function or callable class) giving up on an image whose worker process died
    MAX_ATTEMPTS times while processing it: that image's row is passed on with stages.lost_result's reason.

    The result takes one more argument, `attempts`, an `attempt_ledger()` handle: a keyword of the
    function (`fn_kwargs`) or of the class's constructor (`fn_constructor_kwargs`). It keeps the
    stage's name, which is the operator's name in Ray Data and the ledger's name for the stage."""
    name = stage.__name__
    if isinstance(stage, type):
        class Bounded(stage):
            def __init__(self, *args, attempts, **kwargs):
                super().__init__(*args, **kwargs)
                self._attempts = attempts

            def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return _run_bounded(name, super().__call__, batch, self._attempts)

        Bounded.__name__ = name
        Bounded.__doc__ = stage.__doc__
        return Bounded

    @functools.wraps(stage)
    def run(batch: dict[str, np.ndarray], *args, attempts, **kwargs) -> dict[str, np.ndarray]:
        return _run_bounded(name, lambda rows: stage(rows, *args, **kwargs), batch, attempts)

    return run


def _run_bounded(stage: str, fn: Callable, batch: dict[str, np.ndarray], attempts) -> dict[str, np.ndarray]:
    """`fn(batch)`, with each attempt at an image entered in the ledger `attempts` under `stage`."""
    import ray

    keys = [str(key) for key in batch["key"]]
    deaths = ray.get(attempts.begin.remote(stage, keys))
    if not any(deaths):  # as nearly always: the block whole
        out = fn(batch)
        ray.get(attempts.end.remote(stage, keys))
        return out
    # A worker died on this block: one image at a time, so that only the one that kills its worker fails.
    parts = []
    for i, (key, died) in enumerate(zip(keys, deaths)):
        row = {column: values[i:i + 1] for column, values in batch.items()}
        if died >= MAX_ATTEMPTS:
            row["error"] = np.array([stages.lost_result(_job(row, 0)).error], object)
            parts.append(fn(row))  # the stage passes a failed row on without working on it
            continue
        ray.get(attempts.begin.remote(stage, [key], alone=True))
        parts.append(fn(row))
        ray.get(attempts.end.remote(stage, [key]))
    return {column: np.concatenate([part[column] for part in parts]) for column in parts[0]}


def pipeline(ds, model: str | os.PathLike | bytes, settings: stages.Settings, *, gpu: bool,
             actors: int, threads: int | None = None, batch_size: int = 1):
    """`ds` (columns `source`, `key`) -> the Dataset of `crf_batch` rows: load tasks, `actors` network
    actors (one GPU each with `gpu`, else `threads` or 1 CPUs and onnxruntime threads each), CRF tasks;
    each stage `bounded`, sharing a new ledger."""
    import ray

    attempts = {"attempts": attempt_ledger()}
    batches = {"batch_format": "numpy"}
    tasks = {"num_cpus": 1}
    if gpu:
        network = {"num_gpus": 1, "num_cpus": 1, "fn_constructor_args": (model, settings, "cuda", threads)}
    else:
        cores = threads or 1
        network = {"num_cpus": cores, "fn_constructor_args": (model, settings, "cpu", cores)}
    return (
        ds.map_batches(bounded(load_batch), fn_kwargs={"settings": settings, **attempts}, batch_size=batch_size,
                       **batches, **tasks)
        # Blocks of one network batch: an actor call returns its block only when done with all of it.
        .repartition(target_num_rows_per_block=batch_size)
        .map_batches(bounded(NetworkStage), batch_size=batch_size, fn_constructor_kwargs=attempts, **batches,
                     **network,
                     # Two calls queued per actor keep it busy without piling decoded images up.
                     compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2))
        .map_batches(bounded(crf_batch), fn_kwargs={"settings": settings, **attempts}, batch_size=None, **batches,
                     **tasks)
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
    # ray.init makes SIGTERM exit at once; the caller's handler (the CLI's graceful stop) is put back.
    on_sigterm = signal.getsignal(signal.SIGTERM)
    # Workers' and raylets' logs stay in the cluster's log files: stdout carries the CLI's results.
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, runtime_env=_ONE_THREAD)
    except ConnectionError as e:
        raise RuntimeSetupError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS'}: "
                                f"{' '.join(str(e).split())}") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        ray.shutdown()


def segment_on_ray(jobs: list[Job], model_path: Path, settings: stages.Settings, *, device: str = "auto",
                   threads: int | None = None, batch_size: int | None = None, address: str | None = None,
                   network_actors: int | None = None) -> Iterator[stages.Result]:
    """Same inputs, outputs and Result objects as pipeline.segment_pipelined, run on a Ray cluster
    (ray.init(address)).

    Yields "skipped" Results for complete outputs first, then one Result per job in completion order.
    Actors, threads and batch size as `placement` decides them.
    """
    try:
        import ray
    except ImportError:
        raise RuntimeSetupError("--engine ray needs Ray: pip install 'deeplab-cli[ray]'") from None

    _device_kind(device)  # a bad --device fails before any work
    skipped, remaining = stages.split_done(jobs, settings)
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
                if stop.requested():  # SIGTERM, Ctrl-C, a full disk: leaving shuts Ray down, cancelling the rest
                    break
        except ray.exceptions.ActorDiedError as e:
            # Ray Data restarts actors that die; one that fails to start (the model does not load, a node
            # has no CUDA) ends the run. Ray keeps only its traceback, whose last line is the reason.
            reason = e.error_msg.strip().splitlines()[-1]
            raise RuntimeSetupError(f"the network actors cannot start on the Ray cluster: {reason}") from None
