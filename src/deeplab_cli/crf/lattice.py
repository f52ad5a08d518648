"""Permutohedral lattices (Adams et al. 2010) built exactly as Krähenbühl's densecrf builds them.

`build_lattice` reproduces `Permutohedral::init` of pydensecrf2 1.1 (its SSE path, as compiled for
x86-64): the same float32 elevation, rounding, rank sort and barycentric weights, the same lattice
points numbered in the same order (first appearance while scanning pixels, vertex by vertex, with the
pixel count padded to a multiple of four by all-zero features, whose points pydensecrf creates too),
and the same blur neighbours. A key is pydensecrf's d 16-bit coordinates (wrapping as its `short`
does) packed into two int64 words, so features have at most six dimensions. The compiled steps run
in the kernel set given (`deeplab_cli.crf.plain` or its SIMD twin `deeplab_cli.crf.simd`).

The result is plain numpy arrays (`Lattice`), so other implementations (ONNX, GPU) can consume them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import numpy as np

from deeplab_cli.crf.threads import parallel_for, start_beside, workspace

MAX_DIMS = 6  # key: coordinates 0-3 in one int64, 4-5 in 32 bits of another (the rest: point index)


@dataclass(frozen=True)
class Lattice:
    """A permutohedral lattice over N pixels with d-dimensional features and M lattice points.

    Arrays are read-only. Lattice point indices are pydensecrf's (insertion order); -1 = none.

    offsets: (N, d+1) int32, the lattice point of each pixel's simplex vertex, in remainder order.
    weights: (N, d+1) float32, the barycentric weight of each vertex.
    neighbours: (d+1, M, 2) int32, the two neighbours of each point along each blur axis (-1 = none).
    norm: (N,) float32, the NORMALIZE_AFTER factor 1 / (K·1 + 1e-20) of each pixel.

    The splat as a gather (`csr_start`, `csr_pixel`, `csr_weight`) is built when first asked for:
    one thread splatting in pixel order needs none of it.
    """

    offsets: np.ndarray
    weights: np.ndarray
    neighbours: np.ndarray
    norm: np.ndarray
    csr: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(repr=False, compare=False)

    @property
    def csr_start(self) -> np.ndarray:
        """(M+1,) int32: point p's splat inputs are entries csr_start[p]:csr_start[p+1] of
        `csr_pixel` and `csr_weight`."""
        return self.csr()[0]

    @property
    def csr_pixel(self) -> np.ndarray:
        """(N*(d+1),) int32, the pixels of each point's entries, ascending (pydensecrf's summation
        order): a gather over these equals pydensecrf's scatter."""
        return self.csr()[1]

    @property
    def csr_weight(self) -> np.ndarray:
        """(N*(d+1),) float32, the weights of each point's entries."""
        return self.csr()[2]

    @property
    def dims(self) -> int:
        """d, the feature dimension."""
        return self.offsets.shape[1] - 1

    @property
    def n_points(self) -> int:
        """M, the number of lattice points."""
        return self.neighbours.shape[1]

    @property
    def alpha(self) -> np.float32:
        """pydensecrf's slice factor 1 / (1 + 2^-d), as float32."""
        return _alpha(self.dims)


def gaussian_features(height: int, width: int, sxy: float | tuple[float, float]) -> np.ndarray:
    """(H*W, 2) float32 features (x / sx, y / sy) of `addPairwiseGaussian`, pixels row-major.

    sxy: one std for both axes, or (sx, sy); rounded to float32 as pydensecrf's float arguments are.
    """
    sx, sy = np.broadcast_to(np.asarray(sxy, np.float32), (2,))
    features = np.empty((height, width, 2), np.float32)
    features[..., 0] = np.arange(width, dtype=np.float32) / sx
    features[..., 1] = (np.arange(height, dtype=np.float32) / sy)[:, None]
    return features.reshape(-1, 2)


def bilateral_features(image_rgb: np.ndarray, sxy: float | tuple[float, float],
                       srgb: float | tuple[float, float, float]) -> np.ndarray:
    """(H*W, 5) float32 features (x, y, r, g, b scaled by 1/sxy, 1/srgb) of `addPairwiseBilateral`.

    image_rgb: (H, W, 3) uint8; the channel order matters to the lattice, pass RGB as DeepLab did.
    sxy: as `gaussian_features`; srgb: one std for the three channels, or (sr, sg, sb).
    """
    height, width = image_rgb.shape[:2]
    features = np.empty((height, width, 5), np.float32)
    features[..., :2] = gaussian_features(height, width, sxy).reshape(height, width, 2)
    np.divide(image_rgb, np.asarray(srgb, np.float32), out=features[..., 2:], dtype=np.float32)
    return features.reshape(-1, 5)


def build_lattice(features: np.ndarray, threads: int = 1, kernels: ModuleType | None = None) -> Lattice:
    """The lattice of (N, d) float32 features (1 <= d <= 6), as pydensecrf's `Permutohedral::init`,
    with its NORMALIZE_AFTER norm (pydensecrf's `seqCompute` of a vector of ones).

    threads: threads for the parallel steps; the result does not depend on it.
    kernels: the compiled kernel set to run (`deeplab_cli.crf.meanfield.kernels()`); None: the plain set.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, d = features.shape
    if not 1 <= d <= MAX_DIMS or n < 1:
        raise ValueError(f"features must be (N >= 1, 1..{MAX_DIMS}), got {features.shape}")
    n_pad = -(-n // 4) * 4  # pydensecrf elevates 4 pixels at a time, zero-filling the last packet
    code = kernels or _plain()
    ws = workspace()
    keys = ws.take("lattice_keys", (n_pad, d + 1, 3), np.int64)
    weights = np.empty((n_pad, d + 1), np.float32)
    parallel_for(code.simplices, n_pad, threads, features, _scale_factors(d), _vertex_steps(d), keys, weights)
    offsets = np.empty((n_pad, d + 1), np.int32)
    point_keys = ws.take("lattice_point_keys", (n_pad * (d + 1), 2), np.int64)
    table = ws.take("lattice_table", (_pow2(n_pad), 2), np.int64)  # grows if half full
    m, table = code.insert(keys, offsets, point_keys, table)
    point_keys = point_keys[:m]
    offsets, weights = offsets[:n], weights[:n]
    for array in (offsets, weights):
        array.flags.writeable = False
    if threads > 1:  # built meanwhile: the threads' splat gathers
        csr = start_beside(threads, _read_only_csr, code, offsets, weights, m)
    else:
        csr = functools.cache(functools.partial(_read_only_csr, code, offsets, weights, m))
    neighbours = np.empty((d + 1, m, 2), np.int32)
    parallel_for(code.neighbours, m, threads, point_keys, table, neighbours)
    norm = code.norm(offsets, weights, neighbours, _alpha(d))
    for array in (neighbours, norm):
        array.flags.writeable = False
    return Lattice(offsets, weights, neighbours, norm, csr)


def _read_only_csr(code: ModuleType, offsets: np.ndarray, weights: np.ndarray,
                   m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel set's `csr` arrays, read-only."""
    arrays = code.csr(offsets, weights, m)
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _pow2(n: int) -> int:
    """The smallest power of two >= max(n, 16)."""
    return 1 << max(4, (n - 1).bit_length())


def _alpha(d: int) -> np.float32:
    """1.0f / (1 + powf(2, -d)), pydensecrf's slice factor."""
    return np.float32(1) / (np.float32(1) + np.float32(2.0**-d))


def _scale_factors(d: int) -> np.ndarray:
    """(d,) float32 diagonal of the elevation matrix, rounded as pydensecrf rounds it (via double)."""
    inv_std_dev = float(np.float32(np.sqrt(2.0 / 3.0) * (d + 1)))
    return np.array([1.0 / np.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)], np.float32)


def _vertex_steps(d: int) -> np.ndarray:
    """(d+1, 2) int64: row i is the packed key step from one simplex vertex to the next when coordinate
    i is the one that wraps (i = d: none of the key's d coordinates does), 16-bit lanes as in the keys."""
    steps = np.zeros((d + 1, 2), np.uint64)
    for i in range(d + 1):
        for j in range(d):
            steps[i, j // 4] |= np.uint64(((-d if j == i else 1) & 0xFFFF) << (16 * (j % 4)))
    return steps.view(np.int64)


def _plain() -> ModuleType:
    """The plain kernel set, numba configured first."""
    from deeplab_cli import jit

    jit.configure_numba()
    from deeplab_cli.crf import plain

    return plain
