"""`deeplab models quantize`: an int8 graph calibrated on the user's own images (their domain), then how
far its labels agree with float32's after the CRF, on images of the same folder that it was not
calibrated on."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from deeplab_cli.errors import InputError, UsageError
from deeplab_cli.io.inputs import Job, collect
from deeplab_cli.model import registry

HELD_OUT = 8  # images measured after calibration, at most
LOW_AGREEMENT = 0.96  # below this mean share of equal labels, the user is warned


@dataclass
class QuantizeReport:
    path: Path  # the int8 graph
    calibrated: int  # images calibrated on
    agreement: dict[str, float] = field(default_factory=dict)  # held-out image -> share of labels equal to fp32's
    problems: list[str] = field(default_factory=list)  # images that could not be read, one line each

    @property
    def mean(self) -> float | None:
        return float(np.mean(list(self.agreement.values()))) if self.agreement else None

    @property
    def low(self) -> bool:
        return self.mean is not None and self.mean < LOW_AGREEMENT


def quantize_model(info: registry.ModelInfo, folder: Path, count: int,
                   progress: Callable | None = None) -> QuantizeReport:
    """Calibrate `info`'s int8 graph on the first `count` readable images of `folder` (sorted by path,
    sub-folders included) and measure it on up to HELD_OUT of the next ones. Raises UsageError when the
    folder holds no readable image."""
    from deeplab_cli.model.quantize import new_calibration, quantize_graph
    from deeplab_cli.model.weights import sha256_file

    jobs = collect([str(folder)], recursive=True)
    if not jobs:
        raise UsageError(f"--calibrate {folder}: no images in it to calibrate on")
    loaded, problems = _load(jobs, count + HELD_OUT)
    if not loaded:
        raise UsageError(f"--calibrate {folder}: none of its {len(jobs)} images could be read ({problems[0]})")
    fp32 = registry.ensure(info, progress=progress)
    calibrating, held = loaded[:count], loaded[count:]
    record = registry.read_source(info)
    calibration = new_calibration(
        [{"file": _name(job), "sha256": sha256_file(job.source)} for job, _ in calibrating],
        record.sha256 if record else "", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    out = registry.int8_path(info)
    quantize_graph(fp32, out, [image for _, image in calibrating], calibration)
    report = QuantizeReport(out, len(calibrating), problems=problems)
    report.agreement = _agreement(fp32, out, held, info)
    return report


def _name(job: Job) -> str:
    return job.key + job.source.suffix  # its path in the folder


def _load(jobs: list[Job], wanted: int) -> tuple[list[tuple[Job, np.ndarray]], list[str]]:
    """Up to `wanted` images at the size the network sees them, and a line for each unreadable one."""
    from deeplab_cli.io.images import DEFAULT_MAX_SIZE, load_image, max_pixels_from_env, resize_for_network

    loaded, problems = [], []
    for job in jobs:
        if len(loaded) == wanted:
            break
        try:
            image = load_image(job.source, max_pixels_from_env())
            loaded.append((job, resize_for_network(image, DEFAULT_MAX_SIZE)))
        except InputError as e:
            problems.append(str(e))
    return loaded, problems


def _agreement(fp32: Path, int8: Path, held: list[tuple[Job, np.ndarray]], info: registry.ModelInfo) -> dict[str, float]:
    """Per held-out image, the share of its pixels labelled as float32 labels them, both after the CRF."""
    from deeplab_cli.crf import params
    from deeplab_cli.model.runtime import open_session
    from deeplab_cli.model.upsample import scores_to_probs
    from deeplab_cli.run.scheduling import usable_cores
    from deeplab_cli.run.stages import apply_crf

    cores = usable_cores()
    reference, quantized = (open_session(path, "cpu", cores) for path in (fp32, int8))
    crf = params.merge(info.crf)

    def labels(session, image: np.ndarray) -> np.ndarray:
        probs = scores_to_probs(session.run(image[None])["logits"][0], image.shape[:2])
        return apply_crf(image, probs, crf, threads=cores).argmax(0)

    return {_name(job): float((labels(reference, image) == labels(quantized, image)).mean()) for job, image in held}
