"""pydensecrf's mean field for any list of pairwise terms, bit for bit: the engine behind
`deeplab_cli.densecrf` where the terms are not DeepLab's two (`deeplab_cli.crf.meanfield` runs those).

A term is a permutohedral lattice over its features (`deeplab_cli.crf.lattice`, pydensecrf's own
lattice), a normalisation and a label compatibility, as pydensecrf's `PairwisePotential` holds them.
One iteration is `DenseCRF::inference`'s: tmp = -unary; for each term in the order added,
tmp -= compat(filter(Q)); Q = expAndNormalize(tmp). `filter` is `DenseKernel::filter`: Q times the
pixel's norm before the lattice (NORMALIZE_BEFORE, NORMALIZE_SYMMETRIC), splat, blur and slice as
`Permutohedral::sseCompute` (or `seqCompute` for one or two labels), times the norm after
(NORMALIZE_AFTER, NORMALIZE_SYMMETRIC); NO_NORMALIZATION multiplies by nothing. The norm comes from
the lattice filtering a vector of ones (K 1, through seqCompute): 1 / (K 1 + 1e-20) (before, after:
the lattice's own `norm`) or 1 / sqrt(K 1 + 1e-20) (symmetric), in double. The compatibilities are pydensecrf's: Potts
(-w Q), diagonal (w_l Q_l) and a matrix (W Q with W = (M + M^T) / 2, summed in the order of Eigen
3.3's matrix product, `_gemm_row`).

Every float32 operation is pydensecrf's, in its order; the softmax is the engine's (`plain._softmax`,
Eigen's expAndNormalize). Rows are label-minor, padded to a multiple of `plain.LANES` floats with zeros.
Steps run on `threads` threads (`threads.parallel_for`): the splat is a gather over the lattice's
pixel-ordered CSR, which sums in pydensecrf's order, so results never depend on the thread count.

Import after `deeplab_cli.jit.configure_numba()` (numba caches the kernels where the CLI does).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

import numpy as np
from numba import njit

from deeplab_cli.crf.lattice import Lattice, build_lattice
from deeplab_cli.crf.plain import LANES, _blur, _slice, _slice_seq, _softmax
from deeplab_cli.crf.threads import parallel_for

# pydensecrf's NormalizationType values.
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = 0, 1, 2, 3
# Eigen evaluates W Q coefficient by coefficient below this size (rows + rows + columns), else as a GEMM.
_GEMM_THRESHOLD = 20


@dataclass(frozen=True)
class Term:
    """One pairwise term, ready to filter.

    lattice: the term's permutohedral lattice over N pixels.
    pre, post: (N,) float32 norms multiplied before and after the lattice, or (0,) for none.
    diag: (W,) float32 per-label factors (Potts: -w for every label; diagonal: w_l), padding 0;
        ignored when `matrix` is given.
    matrix: (M, M) float32 symmetrised compatibility matrix, or (0, 0) for none.
    """

    lattice: Lattice
    pre: np.ndarray
    post: np.ndarray
    diag: np.ndarray
    matrix: np.ndarray


def row_width(n_labels: int) -> int:
    """Floats per pixel row: n_labels padded to a multiple of `plain.LANES`."""
    return -(-n_labels // LANES) * LANES


def make_term(features: np.ndarray, normalization: int, compat: float | np.ndarray, n_labels: int,
              threads: int = 1, kernels: ModuleType | None = None) -> Term:
    """A `Term` over (N, d) float32 features, 1 <= d <= `lattice.MAX_DIMS`.

    normalization: NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER or NORMALIZE_SYMMETRIC.
    compat: a float (Potts weight w, rounded to float32), an (M,) float32 diagonal or an (M, M)
    float32 matrix (symmetrised here as pydensecrf's MatrixCompatibility does).
    kernels: the kernel set that builds the lattice (`meanfield.compiled()`); None: the plain set.
    """
    lattice = build_lattice(features, threads, kernels)
    none = np.zeros(0, np.float32)
    pre = post = none
    if normalization != NO_NORMALIZATION:
        norm = lattice.norm  # 1 / (K 1 + 1e-20), in double
        if normalization == NORMALIZE_SYMMETRIC:
            ones = filter_values(np.ones((lattice.offsets.shape[0], 1), np.float32), lattice, True, threads)
            norm = (1.0 / np.sqrt(ones[:, 0].astype(np.float64) + 1e-20)).astype(np.float32)
        pre = norm if normalization in (NORMALIZE_BEFORE, NORMALIZE_SYMMETRIC) else none
        post = norm if normalization in (NORMALIZE_AFTER, NORMALIZE_SYMMETRIC) else none
    diag = np.zeros(row_width(n_labels), np.float32)
    matrix = np.zeros((0, 0), np.float32)
    compat_array = np.asarray(compat)
    if compat_array.ndim == 0:
        diag[:n_labels] = -np.float32(compat)  # PottsCompatibility: -w Q
    elif compat_array.ndim == 1:
        diag[:n_labels] = compat_array
    else:
        m = compat_array.astype(np.float32)
        matrix = np.ascontiguousarray((m + m.T) * np.float32(0.5))
    return Term(lattice, pre, post, diag, matrix)


def filter_values(values: np.ndarray, lattice: Lattice, seq: bool, threads: int = 1) -> np.ndarray:
    """K values: splat, blur and slice of (N, C) float32 `values` on `lattice`, as `seqCompute`
    (if `seq`) or `sseCompute`. Returns (N, C) float32."""
    blurred = _splat_and_blur(values, np.zeros(0, np.float32), lattice, seq, threads)
    out = np.empty_like(values)
    parallel_for(slice_rows, len(values), threads, blurred, lattice.offsets, lattice.weights, lattice.alpha,
                 seq, out)
    return out


def mean_field(neg_unary: np.ndarray, n_labels: int, terms: Sequence[Term], iterations: int,
               q: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """Q after `iterations` mean-field iterations, (N, W) float32 rows (labels first, padding 0).

    neg_unary: (N, W) float32 rows of -unary (n_labels labels, padding 0). q: the (N, W) starting Q,
    padding 0 (`stepInference`'s; from the second iteration on, its buffer is reused), or None for
    expAndNormalize(-unary) (`inference`'s). With no iteration, returns the start.
    """
    n = len(neg_unary)
    seq = n_labels <= 2  # pydensecrf filters one or two labels with seqCompute, more with sseCompute
    tmp = np.empty_like(neg_unary)
    if q is None:
        q = np.empty_like(neg_unary)
        parallel_for(softmax_rows, n, threads, neg_unary, q, n_labels)
    for _ in range(iterations):
        blurred = [_splat_and_blur(q, term.pre, term.lattice, seq, threads) for term in terms]
        if not terms:
            parallel_for(softmax_rows, n, threads, neg_unary, tmp, n_labels)
        for k, (term, values) in enumerate(zip(terms, blurred)):
            lattice = term.lattice
            parallel_for(messages, n, threads, values, lattice.offsets, lattice.weights, lattice.alpha, seq,
                         term.post, term.diag, term.matrix, neg_unary if k == 0 else tmp, tmp, n_labels,
                         k == len(terms) - 1)
        q, tmp = tmp, q
    return q


def pairwise(q: np.ndarray, n_labels: int, term: Term, threads: int = 1) -> np.ndarray:
    """The term's message compat(filter(Q)) (`PairwisePotential::apply`) of (N, W) rows q, as (N, W)
    float32 rows: `messages` from a zero source, negated (exact)."""
    values = _splat_and_blur(q, term.pre, term.lattice, n_labels <= 2, threads)
    out = np.empty_like(q)
    lattice = term.lattice
    parallel_for(messages, len(q), threads, values, lattice.offsets, lattice.weights, lattice.alpha, n_labels <= 2,
                 term.post, term.diag, term.matrix, np.zeros_like(q), out, n_labels, False)
    return -out


def eigen_sum(values: np.ndarray) -> np.float32:
    """The float32 sum of 1-D float32 `values` in the order of Eigen 3.3's vectorised (SSE) sum of an
    array: two 4-float accumulators over pairs of packets, an odd packet, (a0 + a2) + (a1 + a3), then
    the values after the last whole packet one by one (cumsum adds in order)."""
    n = len(values)
    whole, paired = n // 4 * 4, n // 8 * 8
    if whole == 0:
        return np.cumsum(values, dtype=np.float32)[-1] if n else np.float32(0)
    a = values[:4]
    if whole > 4:
        pairs = values[:paired].reshape(-1, 2, 4)
        a = np.cumsum(pairs[:, 0], axis=0, dtype=np.float32)[-1] + np.cumsum(pairs[:, 1], axis=0, dtype=np.float32)[-1]
        if whole > paired:
            a = a + values[paired:whole]
    total = (a[0] + a[2]) + (a[1] + a[3])
    for value in values[whole:]:
        total = total + value
    return np.float32(total)


def _splat_and_blur(q: np.ndarray, pre: np.ndarray, lattice: Lattice, seq: bool, threads: int) -> np.ndarray:
    """The (M+1, W) float32 lattice values of (N, W) rows q (times `pre` per pixel if given), splatted
    and blurred along every axis; row 0, the missing neighbour, 0."""
    m = lattice.n_points
    values = np.empty((m + 1, q.shape[1]), np.float32)
    blurred = np.empty_like(values)
    values[0] = blurred[0] = 0
    parallel_for(gather, m, threads, q, pre, lattice.csr_start, lattice.csr_pixel, lattice.csr_weight, values)
    for axis in range(lattice.dims + 1):
        parallel_for(blur, m, threads, axis, values, blurred, lattice.neighbours, seq)
        values, blurred = blurred, values
    return values


@njit(cache=True, nogil=True)
def gather(lo, hi, q, pre, csr_start, csr_pixel, csr_weight, values):
    """values[p+1] = sum over point p's pixels, ascending, of w * x[pixel] for points lo..hi-1, from 0:
    pydensecrf's splat, in its order. x = q, or q * pre[pixel] (pydensecrf's `in * norm` before the
    lattice) when pre has N entries. q: (N, W) float32; pre: (N,) or (0,) float32; csr_*: the
    lattice's splat as a gather; values: (M+1, W) float32."""
    scaled = len(pre) > 0
    width = values.shape[1]
    for p in range(lo, hi):
        for k in range(width):
            values[p + 1, k] = 0
        for e in range(csr_start[p], csr_start[p + 1]):
            pixel = csr_pixel[e]
            w = csr_weight[e]
            if scaled:
                s = pre[pixel]
                for k in range(width):
                    values[p + 1, k] += w * (q[pixel, k] * s)
            else:
                for k in range(width):
                    values[p + 1, k] += w * q[pixel, k]


@njit(cache=True, nogil=True)
def blur(lo, hi, axis, values, blurred, neighbours, seq):
    """`plain._blur` of points lo..hi-1 along `axis`: seqCompute's or sseCompute's blur step."""
    _blur(lo, hi, axis, values, blurred, neighbours, seq)


@njit(cache=True, nogil=True)
def slice_rows(lo, hi, values, offsets, weights, alpha, seq, out):
    """out[i] = pixel i's slice of blurred `values` (M+1, C), for pixels lo..hi-1; out: (N, C) float32."""
    acc = np.empty((1, out.shape[1]), np.float32)
    for i in range(lo, hi):
        if seq:
            _slice_seq(acc, values, offsets, weights, i, alpha)
        else:
            _slice(acc, values, offsets, weights, i, alpha)
        for k in range(out.shape[1]):
            out[i, k] = acc[0, k]


@njit(cache=True, nogil=True)
def messages(lo, hi, values, offsets, weights, alpha, seq, post, diag, matrix, source, target, n_labels, final):
    """target[i] = source[i] - compat(slice_i * post[i]) for pixels lo..hi-1, then, if `final`,
    expAndNormalize of it: one term's `tmp1 -= tmp2` of DenseCRF::inference, in its float32 order.

    values: the term's blurred (M+1, W) lattice; offsets, weights, alpha: its lattice's; seq: one or two
    labels (seqCompute's slice); post: (N,) or (0,) float32 norm after the lattice; diag: (W,) per-label
    factors, used when matrix is (0, 0); matrix: (M, M) compatibility; source, target: (N, W) rows
    (may be the same array).
    """
    width = source.shape[1]
    acc = np.empty((1, width), np.float32)
    y = np.empty(width, np.float32)
    gemm = 2 * n_labels + len(source) >= _GEMM_THRESHOLD
    whole_labels = n_labels // 4 * 4
    whole_pixels = len(source) // 4 * 4
    for i in range(lo, hi):
        if seq:
            _slice_seq(acc, values, offsets, weights, i, alpha)
        else:
            _slice(acc, values, offsets, weights, i, alpha)
        if len(post):
            s = post[i]
            for k in range(width):
                y[k] = acc[0, k] * s
        else:
            for k in range(width):
                y[k] = acc[0, k]
        if len(matrix):
            for label in range(n_labels):
                split = gemm and label >= whole_labels and i < whole_pixels
                target[i, label] = source[i, label] - _gemm_row(matrix, label, y, n_labels, split)
            for k in range(n_labels, width):
                target[i, k] = 0
        else:
            for k in range(width):
                target[i, k] = source[i, k] - diag[k] * y[k]
        if final:
            _softmax(target, i, n_labels)


@njit(cache=True, nogil=True, inline="always")
def _gemm_row(matrix, label, y, n_labels, split):
    """Row `label` of matrix (M, M) times y[:M], summed as Eigen 3.3's GEMM sums it on SSE: in label
    order; or, with `split` (a row after the last whole 4-row packet, in a whole 4-column panel of Q),
    in four partial sums by label mod 4 over the whole packets, (s0 + s1) + (s2 + s3), then the rest."""
    if not split:
        s = np.float32(0)
        for k in range(n_labels):
            s += matrix[label, k] * y[k]
        return s
    s0 = s1 = s2 = s3 = np.float32(0)
    whole = n_labels // 4 * 4
    for k in range(0, whole, 4):
        s0 += matrix[label, k] * y[k]
        s1 += matrix[label, k + 1] * y[k + 1]
        s2 += matrix[label, k + 2] * y[k + 2]
        s3 += matrix[label, k + 3] * y[k + 3]
    s = (s0 + s1) + (s2 + s3)
    for k in range(whole, n_labels):
        s += matrix[label, k] * y[k]
    return s


@njit(cache=True, nogil=True)
def softmax_rows(lo, hi, source, target, n_labels):
    """target[i] = expAndNormalize(source[i, :n_labels]), padding 0, for rows lo..hi-1 (W floats each)."""
    for i in range(lo, hi):
        for k in range(source.shape[1]):
            target[i, k] = source[i, k]
        _softmax(target, i, n_labels)
