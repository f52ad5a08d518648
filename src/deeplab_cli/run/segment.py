"""The one entry of a segmentation run: which engine, how many workers and threads, and the results.

`segment_images` checks the model, the device and the output folder before any work, then picks:
- the GPU pipeline (`pipeline.segment_pipelined`) when the network runs on a GPU;
- CPU lanes (`lanes.segment_on_lanes`), one process per core taking whole images, by default on the CPU;
- everything in this process with `workers=0`;
- a Ray cluster (`ray_cluster.segment_on_ray`) with `engine="ray"`.
It returns a `Run`, which the caller drives: results as they come, a graceful stop on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections import Counter
from typing import Any, Callable, Generator, Mapping

from deeplab_cli.errors import UsageError
from deeplab_cli.io.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIZE
from deeplab_cli.io.inputs import Job
from deeplab_cli.model import runtime
from deeplab_cli.model.quantize import slow_int8_note
from deeplab_cli.run import lanes, pipeline, scheduling, stop
from deeplab_cli.run.stages import Result, Settings


@dataclass(frozen=True)
class SegmentRequest:
    """What `deeplab segment` asks for, as its options give it (None: decided here)."""

    out: Path
    model: str | None = None  # a registry name, a path to an .onnx file, or None: registry.ensure_default
    device: str = "auto"
    threads: int | None = None  # onnxruntime threads per worker
    workers: int | None = None  # processes; 0: everything in this process
    batch_size: int | None = None
    max_size: int | None = DEFAULT_MAX_SIZE
    pad_to: int | None = None
    precision: str = "fp32"  # or "fp16" (GPUs), "int8" (CPUs, a graph `deeplab models quantize` made)
    engine: str = "local"  # or "ray"
    address: str | None = None
    formats: tuple[str, ...] = ("index",)
    alpha: float = 0.5
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    crf: bool = True
    crf_backend: str | None = None
    crf_file: Path | None = None
    crf_overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """A started run: `drive` it to get one Result per job."""

    results: Generator[Result, None, None]
    total: int
    provider: str  # where the network runs: an onnxruntime provider, or "ray"
    folder: Path  # the output folder, where images dropped by a stop leave temporaries
    notes: list[str] = field(default_factory=list)  # lines for the user: the device chosen, fewer workers
    ray_driver: bool = False  # Ray's driver prints to stdout while the results are iterated
    model: str = ""  # the registry name, or the .onnx file, that runs
    warnings: list[str] = field(default_factory=list)  # lines shown even with -q: the default model replaced

    def drive(self, grace: float, on_result: Callable[[Result], None]) -> Counter:
        """Call on_result for each result as it comes; return the count of each status.

        SIGTERM and Ctrl-C stop the batch gracefully (`stop`), as does a result that says the output
        cannot take more. Images dropped in flight (workers killed, by us or by a scheduler signalling
        them all) leave temporaries in `folder`, swept here; `stop.requested()` tells afterwards."""
        counts = Counter({"ok": 0, "skipped": 0, "error": 0})
        with stop.graceful(grace):
            try:
                for result in self.results:
                    counts[result.status] += 1
                    on_result(result)
                    if result.stops_batch:
                        stop.request("the output cannot take more")
            except stop.Abandoned:
                pass  # what was in flight is dropped: the counts say how much is left
            finally:
                self.results.close()  # ends the workers now
        if stop.requested():
            from deeplab_cli.io.outputs import sweep_temporaries

            sweep_temporaries(self.folder)
        return counts


def segment_images(jobs: list[Job], request: SegmentRequest, progress: Callable | None = None) -> Run:
    """Start segmenting `jobs` as `request` says. Raises UsageError, ModelError or RuntimeSetupError
    before any work when the options, the model, the device or the output folder cannot be used.

    progress(received, total): download progress of a registry model fetched on first use.
    """
    from deeplab_cli.crf import check_backend, params

    try:
        # On a Ray cluster only an explicit cuda says the actors have GPUs: this machine cannot tell.
        gpu = runtime.parse_device(request.device)[0] == "cuda" if request.engine == "ray" \
            else runtime.wants_cuda(request.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    if request.engine == "ray" and request.workers is not None:
        raise UsageError("--jobs: Ray schedules the CRF tasks itself; leave --jobs out")
    model, model_path, crf_defaults, warning = resolve_model(request.model, gpu, request.precision, progress)
    crf = params.merge(crf_defaults, request.crf_file, request.crf_overrides) if request.crf else None
    if request.crf and request.crf_backend:
        check_backend(request.crf_backend)
    settings = Settings(out=request.out, formats=request.formats, max_size=request.max_size, pad_to=request.pad_to,
                        crf=crf, alpha=request.alpha, overwrite=request.overwrite,
                        crf_backend=request.crf_backend or "numba", max_pixels=request.max_pixels)
    run = _on_ray(jobs, request, model_path, settings) if request.engine == "ray" else \
        _here(jobs, request, model_path, settings)
    if request.precision == "int8" and (note := slow_int8_note()):
        run.notes.append(note)
    return replace(run, model=model, warnings=[warning] if warning else [])


def _on_ray(jobs: list[Job], request: SegmentRequest, model_path: Path, settings: Settings) -> Run:
    """The run on a Ray cluster; its CRF tasks run on CPU workers."""
    from deeplab_cli.run import ray_cluster

    prepare_out(request.out, runtime.open_session(model_path, "cpu", 1).classes)  # checks the model before Ray
    results = ray_cluster.segment_on_ray(jobs, model_path, settings, device=request.device, threads=request.threads,
                                         batch_size=request.batch_size, address=request.address)
    return Run(results, len(jobs), "ray", request.out, ray_driver=True)


def _here(jobs: list[Job], request: SegmentRequest, model_path: Path, settings: Settings) -> Run:
    """The run on this machine: the GPU pipeline, CPU lanes, or this one process."""
    # This session checks the model and the device before any work, and tells where the network runs.
    session = runtime.open_session(model_path, request.device, request.threads or 1, spin=False)
    provider = session.provider
    gpu = provider != "CPUExecutionProvider"
    threads, workers = scheduling.thread_budget(scheduling.usable_cores(), gpu, request.threads, request.workers)
    notes = [f"running on {provider}"] if request.device == "auto" else []
    if gpu:  # the CRF graph where the network runs, by default; `pipeline` keeps the probabilities there
        backend = request.crf_backend or ("onnx" if "probs" in session.outputs else "numba")
        settings = replace(settings, crf_backend=backend, crf_device=request.device)
    if request.workers is None:  # the default: as many workers as cores, and as memory allows
        workers, note = scheduling.fit_in_memory(jobs, workers, settings, session=not gpu)
        notes += [note] if note else []
    prepare_out(request.out, session.classes)
    if gpu:
        results = pipeline.segment_pipelined(jobs, session, settings, workers, request.batch_size or 8)
    elif workers == 0:
        results = pipeline.segment_pipelined(jobs, runtime.open_session(model_path, request.device, threads),
                                             settings)
    else:
        results = lanes.segment_on_lanes(jobs, model_path, settings, workers, threads)
    return Run(results, len(jobs), provider, request.out, notes)


def resolve_model(model: str | None, gpu: bool = False, precision: str = "fp32",
                  progress: Callable | None = None) -> tuple[str, Path, dict, str | None]:
    """A model name from the registry (pulled when missing), a path to an .onnx file, or None for the default
    -> (what runs, its path, its CRF defaults, a line saying why the default was replaced, or None). For a
    GPU the registry's graph with the upsampling inside is used (converted on first use); for int8 the
    graph `deeplab models quantize` made."""
    from deeplab_cli.model import registry

    if precision == "int8" and gpu:
        raise UsageError("--precision int8: int8 graphs are for CPUs; on CUDA use --precision fp16, "
                         "or --device cpu for int8")
    if model is not None and (model.endswith(".onnx") or os.sep in model):
        if precision != "fp32":
            raise UsageError(f"--precision {precision}: for registry models; {model} runs as it was exported")
        return model, Path(model), {}, None
    if precision == "int8":  # made from the cached float32 graph: nothing to fetch
        info, warning = (registry.get_model(model), None) if model else registry.default_quantized()
        return info.name, registry.quantized(info), info.crf, warning
    if model is None:
        info, path, warning = registry.ensure_default(precision == "fp16", gpu, progress=progress)
        return info.name, path, info.crf, warning
    info = registry.get_model(model)
    return model, registry.ensure(info, precision == "fp16", gpu, progress=progress), info.crf, None


def prepare_out(out: Path, classes) -> None:
    """Create the output folder with its classes.json, or raise UsageError before any work, with the reason."""
    from deeplab_cli.io.outputs import sweep_temporaries, voc_palette, write_classes_json

    try:
        write_classes_json(out / "classes.json", classes, voc_palette())
        sweep_temporaries(out)  # what a killed run left; other shards' live files are locked, and stay
    except OSError as e:
        raise UsageError(f"{out}: cannot write to the output folder ({e.strerror or e})") from None
