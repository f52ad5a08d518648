"""Permutohedral lattices (Adams et al. 2010) built exactly as Krähenbühl's densecrf builds them.

`build_lattice` reproduces `Permutohedral::init` of pydensecrf2 1.1 (its SSE path, as compiled for
x86-64): the same float32 elevation, rounding, rank sort and barycentric weights, the same lattice
points numbered in the same order (first appearance while scanning pixels, vertex by vertex, with the
pixel count padded to a multiple of four by all-zero features, whose points pydensecrf creates too),
and the same blur neighbours. A key is pydensecrf's d 16-bit coordinates (wrapping as its `short`
does) packed into two int64 words, so features have at most six dimensions. The steps that have
faster twins in hand-written IR (`deeplab_cli.meanfield_ir`) run the kernels `deeplab_cli.engine`
chooses; the plain ones are here.

The result is plain numpy arrays (`Lattice`), so other implementations (ONNX, GPU) can consume them.
Importing this module applies the project's numba settings (`deeplab_cli.jit`): its cache folder and
LLVM's SLP vectoriser, unless the user has set NUMBA_CACHE_DIR / NUMBA_SLP_VECTORIZE.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from deeplab_cli.jit import configure_numba

configure_numba()

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from deeplab_cli import engine  # noqa: E402

MAX_DIMS = 6  # key: coordinates 0-3 in one int64, 4-5 in 32 bits of another (the rest: point index)
_HASH_A = np.int64(0x5851F42D4C957F2D)
_HASH_B = np.int64(0x2545F4914F6CDD1D)
_LOW32 = np.int64(0xFFFFFFFF)
_LANE_TOPS = np.int64(0x8000800080008000 - (1 << 64))  # the top bit of each 16-bit coordinate


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


def gaussian_features(height: int, width: int, sxy: float) -> np.ndarray:
    """(H*W, 2) float32 features (x / sxy, y / sxy) of `addPairwiseGaussian`, pixels row-major."""
    s = np.float32(sxy)
    features = np.empty((height, width, 2), np.float32)
    features[..., 0] = np.arange(width, dtype=np.float32) / s
    features[..., 1] = (np.arange(height, dtype=np.float32) / s)[:, None]
    return features.reshape(-1, 2)


def bilateral_features(image_rgb: np.ndarray, sxy: float, srgb: float) -> np.ndarray:
    """(H*W, 5) float32 features (x, y, r, g, b scaled by 1/sxy, 1/srgb) of `addPairwiseBilateral`.

    image_rgb: (H, W, 3) uint8; the channel order matters to the lattice, pass RGB as DeepLab did.
    """
    height, width = image_rgb.shape[:2]
    features = np.empty((height, width, 5), np.float32)
    features[..., :2] = gaussian_features(height, width, sxy).reshape(height, width, 2)
    np.divide(image_rgb, np.float32(srgb), out=features[..., 2:], dtype=np.float32)
    return features.reshape(-1, 5)


def build_lattice(features: np.ndarray, threads: int = 1) -> Lattice:
    """The lattice of (N, d) float32 features (1 <= d <= 6), as pydensecrf's `Permutohedral::init`,
    with its NORMALIZE_AFTER norm (pydensecrf's `seqCompute` of a vector of ones).

    threads: threads for the parallel steps; the result does not depend on it.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, d = features.shape
    if not 1 <= d <= MAX_DIMS or n < 1:
        raise ValueError(f"features must be (N >= 1, 1..{MAX_DIMS}), got {features.shape}")
    n_pad = -(-n // 4) * 4  # pydensecrf elevates 4 pixels at a time, zero-filling the last packet
    code = engine.kernels()
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
        csr = start_beside(threads, _read_only_csr, offsets, weights, m)
    else:
        csr = functools.cache(functools.partial(_read_only_csr, offsets, weights, m))
    neighbours = np.empty((d + 1, m, 2), np.int32)
    parallel_for(code.neighbours, m, threads, point_keys, table, neighbours)
    norm = _norm(offsets, weights, neighbours, _alpha(d))
    for array in (neighbours, norm):
        array.flags.writeable = False
    return Lattice(offsets, weights, neighbours, norm, csr)


def _read_only_csr(offsets: np.ndarray, weights: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_csr`'s arrays, read-only."""
    arrays = _csr(offsets, weights, m)
    for array in arrays:
        array.flags.writeable = False
    return arrays


class Workspace:
    """Named scratch buffers that grow to the largest size asked for and are then reused, so
    large arrays are not allocated (and page-faulted in) again for every image."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """An uninitialised C-contiguous array of this shape, a view of the named buffer, starting
        on a cache line (`_LINE`)."""
        size = math.prod(shape)
        key = (name, np.dtype(dtype))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[key] = _line_aligned(size, np.dtype(dtype))
        return buffer[:size].reshape(shape)


# malloc gives large blocks 16 bytes past a page boundary. Rows of 24 floats (96 bytes) there put every
# other 32-byte vector across two cache lines; from a line's start, none (measured 3.5% faster per image).
_LINE = 64


def _line_aligned(size: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised (size,) array of dtype whose data starts on a `_LINE`-byte boundary."""
    raw = np.empty(size * dtype.itemsize + _LINE, np.uint8)
    skip = -raw.ctypes.data % _LINE
    return raw[skip:skip + size * dtype.itemsize].view(dtype)


_local = threading.local()


def workspace() -> Workspace:
    """This thread's workspace (concurrent calls from several threads never share buffers)."""
    if not hasattr(_local, "workspace"):
        _local.workspace = Workspace()
    return _local.workspace


_PIECES_PER_THREAD = 4  # slices of a parallel_for per thread (see there)
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _pool_of(threads: int) -> ThreadPoolExecutor:
    """The shared pool, with at least threads - 1 threads (the caller is the other one)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool_size < threads - 1:  # a bigger pool; the old one's threads exit once it is unused
            _pool, _pool_size = ThreadPoolExecutor(threads - 1, thread_name_prefix="deeplab-crf"), threads - 1
        return _pool


def start_beside(threads: int, function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start function(*args) on a pool thread when threads > 1, else call it now; returns a function
    that waits for and returns its result. The function should spend its time in code that releases
    the GIL (numba `nogil` kernels, numpy) and must not use the pool itself. A parallel_for started
    next runs on the calling thread alone until the pool thread is free, then on both."""
    if threads <= 1:
        result = function(*args)
        return lambda: result
    return _pool_of(threads).submit(function, *args).result


def parallel_for(kernel: Callable[..., None], n: int, threads: int, *args: Any) -> None:
    """kernel(lo, hi, *args) over contiguous slices of range(n) on `threads` threads, the calling
    thread one of them. Kernels are numba `nogil` functions, so the slices run at the same time;
    their results must not depend on how range(n) is sliced."""
    threads = max(1, min(threads, n // 1024))
    if threads == 1:
        kernel(0, n, *args)
        return
    pool = _pool_of(threads)
    # A few slices per thread, taken in turn from a shared cursor: a thread slowed down by another
    # process's load takes fewer, instead of holding every other thread at the end of the loop.
    pieces = _PIECES_PER_THREAD * threads
    bounds = [n * t // pieces for t in range(pieces + 1)]
    cursor = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        while (t := next(cursor)) < pieces:
            kernel(bounds[t], bounds[t + 1], *args)

    futures = [pool.submit(work) for _ in range(threads - 1)]
    work()
    for future in futures:
        if not future.cancel():  # one still queued behind other work would find nothing left to do
            future.result()


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


@njit(cache=True, nogil=True, inline="always")
def _add_lanes(a, b):
    """a + b in each 16-bit lane of two int64 words, wrapping within the lane (no carries across)."""
    return ((a & ~_LANE_TOPS) + (b & ~_LANE_TOPS)) ^ ((a ^ b) & _LANE_TOPS)


def _vertex_steps(d: int) -> np.ndarray:
    """(d+1, 2) int64: row i is the packed key step from one simplex vertex to the next when coordinate
    i is the one that wraps (i = d: none of the key's d coordinates does), 16-bit lanes as in the keys."""
    steps = np.zeros((d + 1, 2), np.uint64)
    for i in range(d + 1):
        for j in range(d):
            steps[i, j // 4] |= np.uint64(((-d if j == i else 1) & 0xFFFF) << (16 * (j % 4)))
    return steps.view(np.int64)


@njit(cache=True, nogil=True)
def _simplices(lo, hi, features, scale, steps, keys, weights):
    """Enclosing simplex of (padded) pixels lo..hi-1: packed vertex keys and barycentric weights.

    features: (N, d) float32 (pixels >= N are all-zero features); scale: (d,) float32; steps:
    `_vertex_steps(d)`. keys: (n_pad, d+1, 3) int64 (two key words and their hash) and weights:
    (n_pad, d+1) float32 out, vertex r = remainder r.
    Every float32 operation is pydensecrf's, in its order (no fused multiply-add).
    """
    n, d = features.shape
    d1 = d + 1
    down = np.float32(1) / np.float32(d1)
    up = np.float32(d1)
    elevated = np.empty(d1, np.float32)
    rem0 = np.empty(d1, np.float32)
    residual = np.empty(d1, np.float32)
    rank = np.empty(d1, np.int64)
    ranked = np.empty(d1, np.int64)  # the coordinate of each rank
    bary = np.empty(d1 + 1, np.float32)
    for k in range(lo, hi):
        # Elevate onto the plane x0 + ... + xd = 0 (y = E f).
        sm = np.float32(0)
        for j in range(d, 0, -1):
            cf = (features[k, j - 1] if k < n else np.float32(0)) * scale[j - 1]
            elevated[j] = sm - np.float32(j) * cf
            sm += cf
        elevated[0] = sm
        # Nearest remainder-0 point: round to nearest even, as _mm_cvtps_epi32 does.
        total = np.float32(0)
        for i in range(d1):
            v = np.float32(np.rint(down * elevated[i]))
            rem0[i] = v * up
            total += v
        # Rank of each coordinate's residual: pydensecrf compares each pair i < j once and counts
        # the comparison for i if res_i < res_j, else for j. Counted per coordinate here, in
        # registers and branch-free (the comparisons are unpredictable). Then move the point back
        # onto the plane. (The ranks are small integers: pydensecrf's float ranks, exactly.)
        for i in range(d1):
            residual[i] = elevated[i] - rem0[i]
        for i in range(d1):
            count = 0
            for j in range(i):
                count += not residual[j] < residual[i]
            for j in range(i + 1, d1):
                count += residual[i] < residual[j]
            rank[i] = count + np.int64(total)
            shift = np.float32(0)
            if rank[i] < 0:
                shift = up
                rank[i] += d1
            elif rank[i] >= d1:
                shift = -up
                rank[i] -= d1
            rem0[i] += shift
        # Barycentric coordinates.
        for i in range(d1 + 1):
            bary[i] = 0
        for i in range(d1):
            v = (elevated[i] - rem0[i]) * down
            p = d - rank[i]
            bary[p] += v
            bary[p + 1] -= v
        bary[0] += np.float32(1) + bary[d1]
        # Vertex r: rem0 plus the canonical simplex's row r, permuted by rank: coordinate i is
        # rem0[i] + r - (d+1 if rank[i] > d - r). So vertex 0 is rem0, and vertex r is vertex r-1
        # plus 1 in every coordinate but the one ranked d - r + 1, which gains 1 - (d+1): packed
        # 16-bit lanes, added lane-wise.
        lo_word = np.int64(0)
        hi_word = np.int64(0)
        for i in range(d):
            c = np.int64(rem0[i]) & 0xFFFF
            if i < 4:
                lo_word |= c << (16 * i)
            else:
                hi_word |= c << (16 * (i - 4))
        for i in range(d1):
            ranked[rank[i]] = i
        for r in range(d1):
            if r > 0:
                i = ranked[d - r + 1]
                lo_word = _add_lanes(lo_word, steps[i, 0])
                hi_word = _add_lanes(hi_word, steps[i, 1])
            keys[k, r, 0] = lo_word
            keys[k, r, 1] = hi_word
            keys[k, r, 2] = _hash(lo_word, hi_word)
            weights[k, r] = bary[r]


@njit(cache=True, nogil=True, inline="always")
def _hash(lo, hi):
    """Hash of key (lo, hi); its low bits are the home slot in a table of power-of-two length."""
    h = lo ^ (hi * _HASH_B)
    h = (h ^ (h >> 32)) * _HASH_A  # xor-shift-multiply rounds: every key bit reaches the low bits
    h = (h ^ (h >> 29)) * _HASH_B
    return h ^ (h >> 32)


@njit(cache=True, nogil=True, inline="always")
def _home(table, lo, hi):
    """Home slot of key (lo, hi) in a table of power-of-two length."""
    return _hash(lo, hi) & (len(table) - 1)


@njit(cache=True, nogil=True, inline="always")
def _probe(table, s, lo, hi):
    """From slot s on, the slot of key (lo, hi) or the empty slot where it would go (linear probing).

    table: (capacity, 2) int64; an entry is (lo, hi | (point + 1) << 32), 0 in the second word when
    empty, so one probe reads one 16-byte entry.
    """
    while table[s, 1] != 0 and (table[s, 0] != lo or (table[s, 1] & _LOW32) != hi):
        s = (s + 1) & (len(table) - 1)
    return s


@njit(cache=True, nogil=True, inline="always")
def _find(table, lo, hi):
    """Slot of key (lo, hi), or of the empty slot where it would go."""
    return _probe(table, _home(table, lo, hi), lo, hi)


@njit(cache=True, nogil=True)
def insert(keys, offsets, point_keys, table):
    """Number the vertex keys by first appearance (pydensecrf's hash-table insertion order).

    keys: (n_pad, d+1, 3) int64 (lo, hi, hash). Fills offsets (n_pad, d+1) int32 and point_keys
    (>= M, 2) int64; returns M and the table (reallocated at twice the size whenever it gets half
    full).
    """
    table[:] = 0
    filled = 0
    for k in range(keys.shape[0]):
        filled = insert_pixel(k, keys, offsets, point_keys, table, filled)
        if 2 * filled >= len(table):
            table = _rehash(point_keys, filled, 2 * len(table))
    return filled, table


@njit(cache=True, nogil=True, inline="always")
def insert_pixel(k, keys, offsets, point_keys, table, filled):
    """`insert`'s step for pixel k, `filled` points numbered so far; returns the new count. The table
    grows between pixels: less than half full before, it keeps empty slots after d+1 <= 7 more points
    (it has at least 16)."""
    for r in range(keys.shape[1]):
        lo = keys[k, r, 0]
        hi = keys[k, r, 1]
        # Neighbouring pixels often share vertices: reuse the last pixel's without hashing.
        if k > 0 and lo == keys[k - 1, r, 0] and hi == keys[k - 1, r, 1]:
            offsets[k, r] = offsets[k - 1, r]
            continue
        s = _probe(table, keys[k, r, 2] & (len(table) - 1), lo, hi)
        if table[s, 1] != 0:
            offsets[k, r] = (table[s, 1] >> 32) - 1
            continue
        table[s, 0] = lo
        table[s, 1] = hi | ((filled + 1) << 32)
        point_keys[filled, 0] = lo
        point_keys[filled, 1] = hi
        offsets[k, r] = filled
        filled += 1
    return filled


@njit(cache=True, nogil=True)
def _rehash(point_keys, filled, capacity):
    """A table of `capacity` entries holding points 0..filled-1."""
    table = np.zeros((capacity, 2), np.int64)
    for e in range(filled):
        lo = point_keys[e, 0]
        hi = point_keys[e, 1]
        s = _find(table, lo, hi)
        table[s, 0] = lo
        table[s, 1] = hi | ((e + 1) << 32)
    return table


@njit(cache=True, nogil=True)
def neighbours(lo, hi, point_keys, table, out):
    """Blur neighbours of points lo..hi-1 into out (d+1, M, 2) int32 (-1 where absent): along axis
    j < d, key - 1 everywhere but + d at j, and key + 1 everywhere but - d at j; along axis d,
    key - 1 and key + 1 (pydensecrf's n1 and n2, in 16-bit arithmetic)."""
    steps = neighbour_steps(out.shape[0] - 1)
    keys = np.empty((len(steps), 3), np.int64)  # lo, hi, home slot of each neighbour
    for p in range(lo, hi):
        for t in range(len(steps)):
            neighbour_key(p, t, point_keys, steps, table, keys)
        look_up_neighbours(p, keys, table, out)


@njit(cache=True, nogil=True, inline="always")
def neighbour_steps(d):
    """(2(d+1), 2) int64: the packed key steps from a point to its neighbours, axis j's two at rows
    2j and 2j+1 (each neighbour is the key plus a fixed step per coordinate, added lane-wise)."""
    steps = np.zeros((2 * (d + 1), 2), np.int64)
    for t in range(2 * (d + 1)):
        j, side = t // 2, t % 2
        for i in range(d):
            step = (d if side == 0 else -d) if i == j else (-1 if side == 0 else 1)
            steps[t, i // 4] |= (step & 0xFFFF) << (16 * (i % 4))
    return steps


@njit(cache=True, nogil=True, inline="always")
def neighbour_key(p, t, point_keys, steps, table, keys):
    """keys[t] = the lo word, hi word and home slot of point p's neighbour t (`neighbour_steps`)."""
    lo_word = _add_lanes(point_keys[p, 0], steps[t, 0])
    hi_word = _add_lanes(point_keys[p, 1], steps[t, 1])
    keys[t, 0] = lo_word
    keys[t, 1] = hi_word
    keys[t, 2] = _home(table, lo_word, hi_word)


@njit(cache=True, nogil=True, inline="always")
def look_up_neighbours(p, keys, table, out):
    """out[:, p] = the points of point p's neighbour `keys` (`neighbour_key`), -1 where absent."""
    for t in range(len(keys)):
        entry = table[_probe(table, keys[t, 2], keys[t, 0], keys[t, 1]), 1]
        out[t // 2, p, t % 2] = (entry >> 32) - 1  # -1 for an empty slot


@njit(cache=True, nogil=True)
def _csr(offsets, weights, m):
    """Invert pixel -> vertices into point -> (pixel, weight) lists, pixels ascending.

    offsets: (N, d+1) int32; weights: (N, d+1) float32. Returns (M+1,) int32 starts,
    (N*(d+1),) int32 pixels and (N*(d+1),) float32 weights.
    """
    n, d1 = offsets.shape
    start = np.zeros(m + 1, np.int32)
    for k in range(n):
        for r in range(d1):
            start[offsets[k, r] + 1] += 1
    for p in range(m):
        start[p + 1] += start[p]
    cursor = start[:m].copy()
    pixel = np.empty(n * d1, np.int32)
    weight = np.empty(n * d1, np.float32)
    for k in range(n):
        for r in range(d1):
            p = offsets[k, r]
            e = cursor[p]
            pixel[e] = k
            weight[e] = weights[k, r]
            cursor[p] = e + 1
    return start, pixel, weight


@njit(cache=True, nogil=True)
def _norm(offsets, weights, neighbours, alpha):
    """NORMALIZE_AFTER norm: pydensecrf's `seqCompute` of ones, then 1 / (x + 1e-20) via double.

    Returns (N,) float32. The splat adds w * 1.0f in pixel order, as pydensecrf; seqCompute blurs
    with the double 0.5 and slices as (w * v) * alpha.
    """
    n, d1 = offsets.shape
    m = neighbours.shape[1]
    values = np.zeros(m + 1, np.float32)  # row 0 is the missing neighbour, always 0
    blurred = np.zeros(m + 1, np.float32)
    for k in range(n):
        for r in range(d1):
            values[offsets[k, r] + 1] += weights[k, r]
    for j in range(d1):
        for p in range(m):
            s = values[neighbours[j, p, 0] + 1] + values[neighbours[j, p, 1] + 1]
            blurred[p + 1] = np.float32(np.float64(values[p + 1]) + 0.5 * np.float64(s))
        values, blurred = blurred, values
    norm = np.empty(n, np.float32)
    for k in range(n):
        acc = np.float32(0)
        for r in range(d1):
            acc += weights[k, r] * values[offsets[k, r] + 1] * alpha
        norm[k] = np.float32(1.0 / (np.float64(acc) + 1e-20))
    return norm
