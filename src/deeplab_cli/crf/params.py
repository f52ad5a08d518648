"""The CRF's settings and the checks on its inputs: what every backend shares.

`CRFParams` holds DeepLab-LargeFOV's values by default; `merge` layers a model's defaults, a JSON
settings file (as `deeplab crf tune` writes) and explicit overrides.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from deeplab_cli.errors import UsageError

BACKENDS = ("numba", "pydensecrf", "onnx")
DEFAULT_BACKEND = "numba"

# -log of the smallest normal float32: caps the unary only where p itself has underflowed, so the
# unary is DeepLab's -log p everywhere else (pydensecrf.utils clips at 1e-5, which would cap it at 11.5).
MIN_PROB = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class CRFParams:
    """Mean-field CRF settings; the defaults are the values DeepLab used for LargeFOV on VOC12."""

    bi_w: float = 4.0  # w1, bilateral (appearance) kernel weight
    bi_xy_std: float = 121.0  # sigma_alpha, bilateral position std in pixels
    bi_rgb_std: float = 5.0  # sigma_beta, bilateral colour std in intensity levels
    pos_w: float = 3.0  # w2, Gaussian (smoothness) kernel weight
    pos_xy_std: float = 3.0  # sigma_gamma, Gaussian position std in pixels
    iters: int = 10  # mean-field iterations; 0 returns the input probabilities

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "iters":
                if isinstance(value, bool) or not isinstance(value, Integral):
                    raise ValueError(f"CRF parameter 'iters' must be an integer, got {value!r}")
                value = int(value)
            else:
                if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                    raise ValueError(
                        f"CRF parameter {field.name!r} must be a finite number, got {value!r}"
                    )
                value = float(value)
            if value < 0:
                raise ValueError(f"CRF parameter {field.name!r} must be >= 0, got {value!r}")
            # A zero std would divide the kernel's features by zero.
            if field.name.endswith("_std") and value == 0:
                raise ValueError(f"CRF parameter {field.name!r} must be > 0, got {value!r}")
            object.__setattr__(self, field.name, value)  # normalise 4 -> 4.0, np.int64 -> int

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict of all parameters, JSON-serialisable."""
        return asdict(self)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> "CRFParams":
        """Parameters from a (JSON) mapping; missing keys keep DeepLab's defaults.

        Raises ValueError naming the key for unknown keys, wrong types or out-of-range values.
        """
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown CRF parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**mapping)


def merge(base: Mapping[str, Any], params_file: Path | None = None,
          overrides: Mapping[str, Any] | None = None) -> CRFParams:
    """CRFParams from `base` (a model's defaults), then the JSON object in `params_file`, then the
    `overrides` that are not None.

    Raises UsageError naming the file and the reason for an unreadable or invalid settings file or value.
    """
    settings = dict(base)
    where = f"--crf-params {params_file}" if params_file is not None else "CRF settings"
    if params_file is not None:
        try:
            loaded = json.loads(Path(params_file).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{where}: {e}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{where}: expected a JSON object of CRF settings")
        settings.update(loaded)
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return CRFParams.from_dict(settings)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    """Raise ValueError unless image is (H, W, 3) uint8 and probs (C >= 1, H, W)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    if probs.shape[0] < 1:
        raise ValueError("probs must have at least one class")
