"""Fully connected CRF (Krähenbühl & Koltun 2011) with DeepLab-LargeFOV's settings: its parameters, and
the backends that compute it.

Energy: unary -log p plus two Potts pairwise terms, a Gaussian on position (w2, sigma_gamma) and a
bilateral on position and colour (w1, sigma_alpha, sigma_beta), solved by mean field.

Backends, bit-identical to each other (tests/test_meanfield.py):
- `numba` (default): the project's engine (`deeplab_cli.meanfield`), compiled on first use and cached;
  it can spend several threads on one image, and reuses lattices across settings (`dense_crf_grid`).
- `pydensecrf`: Krähenbühl's C++ through pydensecrf2, the reference (`pip install 'deeplab-cli[pydensecrf]'`,
  which compiles it; it does not build on Python 3.13 and later).

and one that agrees with them to rounding (tests/test_crf_graph.py):
- `onnx`: the same lattices, the iterations as an ONNX graph on an onnxruntime provider, the GPU's
  included (`deeplab_cli.crf_graph`); the default of `segment --device cuda`.
"""

import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from deeplab_cli.errors import RuntimeSetupError

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


def check_backend(backend: str) -> None:
    """Fail before any work when `backend` cannot run here: RuntimeSetupError saying what to install.

    For `numba`, chooses the engine's kernels here (compiled, or loaded from numba's cache), so that
    the workers started afterwards inherit the choice (deeplab_cli.engine).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "numba":
        from deeplab_cli import engine

        engine.kernels()
    if backend == "pydensecrf":
        try:
            import pydensecrf.densecrf  # noqa: F401
        except ImportError:
            raise RuntimeSetupError("--crf-backend pydensecrf needs pydensecrf: pip install 'deeplab-cli[pydensecrf]' "
                                    "(it compiles from source, with a C++ compiler, on Python 3.12 and older)") from None
    if backend == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise RuntimeSetupError("--crf-backend onnx needs onnxruntime: pip install 'deeplab-cli[cpu]' "
                                    "(or 'deeplab-cli[gpu]' for CUDA)") from None


def warm(backend: str | None = DEFAULT_BACKEND) -> None:
    """Compile or load the backend once per process (worker initialisers), so no image pays for it;
    None: nothing to warm (a run without the CRF)."""
    if backend == "numba":
        from deeplab_cli import meanfield

        meanfield.warm()
    elif backend == "onnx":
        from deeplab_cli import crf_graph

        crf_graph.warm()


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams(),
              backend: str = DEFAULT_BACKEND, threads: int = 1, device: str = "cpu") -> np.ndarray:
    """Mean-field marginals of the fully connected CRF.

    image: (H, W, 3) uint8 RGB, as DeepLab's CRF binary read it (PPM files). The colour distance
        ignores channel order, but the permutohedral lattice does not: BGR input moved Q by up to
        0.38 and flipped 0.05% of labels on a synthetic 375x500 test image.
    probs: (C, H, W) float32 softmax probabilities.
    threads: threads the numba backend may use on this one image (the result does not depend on it).
    device: where the onnx backend runs its graph (cpu, cuda, cuda:N); the other backends ignore it.
    Returns (C, H, W) float32 marginals Q, each pixel summing to 1, as a view of pixel-major memory
    (class index fastest).

    Unary -log p (p clipped to the smallest normal float32); Potts compatibility (compat = weight),
    DIAG_KERNEL, NORMALIZE_AFTER as DeepLab's CRF binary did, not pydensecrf's NORMALIZE_SYMMETRIC.
    With params.iters == 0 the result is softmax(-unary), i.e. probs itself (renormalised).
    Raises ValueError on shape or dtype mismatch, or an unknown backend.
    """
    _check_inputs(image, probs)
    if backend == "pydensecrf":
        return _pydensecrf(image, probs, params)
    probs = probs.astype(np.float32, copy=False)
    if backend == "onnx":
        from deeplab_cli import crf_graph

        return crf_graph.dense_crf(image, probs, params, device, threads)
    if backend != "numba":
        raise ValueError(f"unknown CRF backend {backend!r} (known: {', '.join(BACKENDS)})")
    from deeplab_cli import meanfield

    return meanfield.dense_crf(image, probs, params, threads)


def dense_crf_grid(image: np.ndarray, probs: np.ndarray, settings: Sequence[CRFParams],
                   backend: str = DEFAULT_BACKEND, threads: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(index, `dense_crf` under settings[index]) for every setting, in an order of the backend's
    choosing. The lattices depend only on the image and the kernel widths (sigma_alpha, sigma_beta,
    sigma_gamma), so the numba backend takes the settings grouped by widths, whatever their order,
    and builds the lattices once per group, not once per setting: the paper's 288-setting grid needs
    48. The other backends compute each setting alone, in order."""
    _check_inputs(image, probs)
    if backend != "numba":
        for index, params in enumerate(settings):
            yield index, dense_crf(image, probs, params, backend, threads)
        return
    from deeplab_cli import meanfield

    yield from meanfield.grid(image, probs.astype(np.float32, copy=False), settings, threads)


def _check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    if probs.shape[0] < 1:
        raise ValueError("probs must have at least one class")


def _pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """The reference: pydensecrf with DeepLab's settings. The result views pydensecrf's own buffer."""
    import pydensecrf.densecrf as dcrf

    n_labels, height, width = probs.shape
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
    """(C, H, W) probabilities -> (C, H*W) C-contiguous float32 -log max(p, tiny), the engine's numbers."""
    from deeplab_cli.meanfield import log_probs

    unary = log_probs(probs)
    np.negative(unary, out=unary)
    return unary
