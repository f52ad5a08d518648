"""The backends that compute the fully connected CRF (Krähenbühl & Koltun 2011), behind one call.

Energy: unary -log p plus two Potts pairwise terms, a Gaussian on position (w2, sigma_gamma) and a
bilateral on position and colour (w1, sigma_alpha, sigma_beta), solved by mean field.

Backends, bit-identical to each other (tests/test_meanfield.py):
- `numba` (default): the project's engine (`deeplab_cli.crf.meanfield`), compiled on first use and cached;
  it can spend several threads on one image, and reuses lattices across settings (`dense_crf_grid`).
- `pydensecrf`: Krähenbühl's C++ through pydensecrf2, the reference (`pip install 'deeplab-cli[pydensecrf]'`,
  which compiles it; it does not build on Python 3.13 and later).

and one that agrees with them to rounding (tests/test_graph.py):
- `onnx`: the same lattices, the iterations as an ONNX graph on an onnxruntime provider, the GPU's
  included (`deeplab_cli.crf.graph`); the default of `segment --device cuda`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from deeplab_cli.crf.params import BACKENDS, DEFAULT_BACKEND, CRFParams, check_inputs
from deeplab_cli.errors import RuntimeSetupError


def check_backend(backend: str) -> None:
    """Fail before any work when `backend` cannot run here: RuntimeSetupError saying what to install.

    For `numba`, chooses the engine's kernels here (compiled, or loaded from numba's cache), so that
    the workers started afterwards inherit the choice (`deeplab_cli.crf.meanfield.compiled`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "numba":
        from deeplab_cli.crf import meanfield

        meanfield.compiled()
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
        from deeplab_cli.crf import meanfield

        meanfield.warm()
    elif backend == "onnx":
        from deeplab_cli.crf import graph

        graph.warm()


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
    check_inputs(image, probs)
    if backend == "pydensecrf":
        # pydensecrf copies the unary into its own matrix, so this temporary is freed right after.
        return _pydensecrf(image, _unary(probs), params)
    probs = probs.astype(np.float32, copy=False)
    if backend == "onnx":
        from deeplab_cli.crf import graph

        return graph.dense_crf(image, probs, params, device, threads)
    if backend != "numba":
        raise ValueError(f"unknown CRF backend {backend!r} (known: {', '.join(BACKENDS)})")
    from deeplab_cli.crf import meanfield

    return meanfield.dense_crf(image, probs, params, threads)


def dense_crf_grid(image: np.ndarray, probs: np.ndarray, settings: Sequence[CRFParams],
                   backend: str = DEFAULT_BACKEND, threads: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(index, `dense_crf` under settings[index]) for every setting, in an order of the backend's
    choosing. The lattices depend only on the image and the kernel widths (sigma_alpha, sigma_beta,
    sigma_gamma), so the numba backend takes the settings grouped by widths, whatever their order,
    and builds the lattices once per group, not once per setting: the paper's 288-setting grid needs
    48. The other backends compute each setting alone, in order."""
    check_inputs(image, probs)
    if backend != "numba":
        for index, params in enumerate(settings):
            yield index, dense_crf(image, probs, params, backend, threads)
        return
    from deeplab_cli.crf import meanfield

    yield from meanfield.grid(image, probs.astype(np.float32, copy=False), settings, threads)


def dense_crf_on_unary(image: np.ndarray, unary: np.ndarray, params: CRFParams = CRFParams(),
                       backend: str = DEFAULT_BACKEND, threads: int = 1) -> np.ndarray:
    """`dense_crf` on given energies instead of probabilities: unary (C, H*W) float32, as pydensecrf's
    `setUnaryEnergy` takes it (-log p for probabilities p), used as it is. The numba and pydensecrf
    backends only: the onnx graph takes probabilities. Returns (C, H, W) float32 marginals."""
    n_labels = len(unary)
    if image.ndim != 3 or image.shape[2] != 3 or unary.shape != (n_labels, image.shape[0] * image.shape[1]):
        raise ValueError(f"unary must be (C, H*W) for an (H, W, 3) image, got {unary.shape} for {image.shape}")
    if backend == "pydensecrf":
        return _pydensecrf(image, np.ascontiguousarray(unary, np.float32), params)
    if backend != "numba":
        raise ValueError(f"the {backend!r} CRF backend takes probabilities, not energies: use numba or pydensecrf")
    from deeplab_cli.crf import meanfield

    neg_unary = np.negative(unary, dtype=np.float32).reshape(n_labels, *image.shape[:2])
    return meanfield.mean_field(meanfield.prepare(image, params, threads), neg_unary, params, threads,
                                unary_given=True)


def _pydensecrf(image: np.ndarray, unary: np.ndarray, params: CRFParams) -> np.ndarray:
    """The reference: pydensecrf with DeepLab's settings on a (C, H*W) float32 unary. The result views
    pydensecrf's own buffer."""
    import pydensecrf.densecrf as dcrf

    height, width = image.shape[:2]
    n_labels = len(unary)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary)
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
    from deeplab_cli.crf.meanfield import log_probs

    unary = log_probs(probs)
    np.negative(unary, out=unary)
    return unary
