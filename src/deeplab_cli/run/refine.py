"""The CRF stage alone: images and their scores (the logits a `segment --format logits` run saved, or any
model's probabilities or label maps) -> refined outputs."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from deeplab_cli.errors import UsageError
from deeplab_cli.io.images import DEFAULT_MAX_PIXELS
from deeplab_cli.io.inputs import Job
from deeplab_cli.model import runtime
from deeplab_cli.run import scheduling
from deeplab_cli.run.segment import Run, prepare_out


@dataclass(frozen=True)
class RefineRequest:
    """What `deeplab crf` asks for (None: decided here)."""

    out: Path
    scores_dir: Path
    scores: str = "logits"  # what scores_dir holds: "logits", "probs" or "labels" (deeplab_cli.io.scores)
    classes: int = 21
    gt_prob: float | None = None  # labels: the probability each label is given [io.scores.DEFAULT_GT_PROB]
    ignore_label: int | None = None  # labels: the label of pixels whose class is unknown
    workers: int | None = None
    device: str = "cpu"  # where the onnx backend runs its graph
    formats: tuple[str, ...] = ("index",)
    alpha: float = 0.5
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    crf_backend: str | None = None
    crf_file: Path | None = None
    crf_overrides: Mapping[str, Any] = field(default_factory=dict)


def refine_images(jobs: list[Job], request: RefineRequest) -> Run:
    """Start the CRF over `jobs`, each paired with its scores in `scores_dir` by relative path, on one process
    per core (or `request.workers`). Raises UsageError or RuntimeSetupError before any work."""
    from deeplab_cli.crf import check_backend, params, warm
    from deeplab_cli.crf.graph import build_graph
    from deeplab_cli.io.outputs import VOC_CLASSES
    from deeplab_cli.io.scores import DEFAULT_GT_PROB
    from deeplab_cli.run.pool import parallel_map
    from deeplab_cli.run.stages import Scores, Settings, crf_one, lost_result

    try:
        gpu = runtime.parse_device(request.device)[0] == "cuda"
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    backend = request.crf_backend or ("onnx" if gpu and request.scores != "labels" else "numba")
    _check_scores(request, backend)
    check_backend(backend)
    if backend == "onnx":  # the device works, or why not
        runtime.start_session(build_graph(0).SerializeToString(), request.device, what="the CRF graph")
    lanes = min(request.workers or scheduling.usable_cores(), max(1, len(jobs)))
    settings = scheduling.sharing_cores(Settings(
        out=request.out, formats=request.formats, crf=params.merge({}, request.crf_file, request.crf_overrides),
        alpha=request.alpha, overwrite=request.overwrite, crf_backend=backend, max_pixels=request.max_pixels,
        crf_device=request.device), lanes)
    prepare_out(request.out, VOC_CLASSES if request.classes == len(VOC_CLASSES) else
                [str(k) for k in range(request.classes)])
    scores = Scores(request.scores_dir, request.scores, request.classes,
                    DEFAULT_GT_PROB if request.gt_prob is None else request.gt_prob, request.ignore_label)
    work = functools.partial(crf_one, scores=scores, settings=settings)
    return Run(parallel_map(work, jobs, lanes, lost_result, warm, (backend,)), len(jobs), "cpu", request.out)


def _check_scores(request: RefineRequest, backend: str) -> None:
    """UsageError for what the scores cannot give: logits from probabilities or labels, a label map on the
    graph backend (it takes probabilities, not energies)."""
    if request.scores != "logits" and "logits" in request.formats:
        raise UsageError(f"--format logits: --scores {request.scores} has no logits to write")
    if request.scores == "labels" and backend == "onnx":
        raise UsageError("--scores labels: --crf-backend onnx takes probabilities; use numba or pydensecrf")
    if request.scores != "labels" and (request.ignore_label is not None or request.gt_prob is not None):
        raise UsageError("--gt-prob and --ignore-label are for --scores labels")
