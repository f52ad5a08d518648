"""The CRF engine's kernels in plain numba: what `deeplab_cli.meanfield_ir` computes, bit for bit,
without hand-written IR, so that they compile on any numba that compiles ordinary Python.

Every float32 operation is the IR kernels' (and so pydensecrf's), in the same order: a multiply then
an add, never fused (numba emits no fused multiply-add without fastmath), the same polynomial exp
(`_pexp`), the same sums in the same order. They are simpler and slower: one pixel, lattice point or
row at a time, in loops that numba vectorises as it can. The lattice's plain kernels are
`deeplab_cli.lattice`'s; the scalar helpers here (`_pexp`, `_row_max`, `_eigen_sum`, `_slice_seq`)
serve the IR kernels too, where they handle what their vector blocks do not.

The kernels take the IR kernels' arguments (`deeplab_cli.engine` picks one set per process), so
some arguments that only steer the IR kernels' prefetching are not used here.
"""

from __future__ import annotations

import math

# deeplab_cli.lattice configures numba before it is imported; its plain kernels are this set's.
from deeplab_cli.lattice import _simplices as simplices, insert, neighbours  # noqa: F401

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

LANES = 8  # rows are padded to a multiple of this many floats (the IR kernels' vector width)
CHUNK = 256  # pixels per step of the IR kernels' pass: their rows (24 KB at 24 floats) stay in L1

# Eigen 3.3.9's pexp<Packet4f> constants (cephes), as float32.
_EXP_HI = np.float32(88.3762626647950)
_EXP_LO = np.float32(-88.3762626647949)
_LOG2EF = np.float32(1.44269504088896341)
_EXP_C1 = np.float32(0.693359375)
_EXP_C2 = np.float32(-2.12194440e-4)
_EXP_P = tuple(np.float32(p) for p in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                       4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_P0, _P1, _P2, _P3, _P4, _P5 = _EXP_P
_ONE = np.float32(1)
_HALF = np.float32(0.5)
_ZERO = np.float32(0)


# 2^e for e = -127..128 (all that `_pexp`'s clamped argument gives) as Eigen's pldexp builds it: the
# float32 with bits (e + 127) << 23, so e = -127 gives 0 (not the subnormal 2^-127), e = 128 infinity.
_POW2 = (np.arange(256, dtype=np.int32) << 23).view(np.float32)


@njit(cache=True, nogil=True, inline="always")
def _pexp(x0):
    """Eigen's SSE2 `pexp<Packet4f>` on one lane: the same float32 operations, no FMA."""
    x = x0 if x0 < _EXP_HI else _EXP_HI  # _mm_min_ps
    x = x if x > _EXP_LO else _EXP_LO  # _mm_max_ps
    fx = x * _LOG2EF + _HALF
    tmp = np.float32(np.int32(fx))  # floor through truncation, as without SSE4.1
    fx = tmp - (_ONE if tmp > fx else _ZERO)
    x = x - fx * _EXP_C1
    x = x - fx * _EXP_C2
    z = x * x
    y = _P0 * x + _P1
    y = y * x + _P2
    y = y * x + _P3
    y = y * x + _P4
    y = y * x + _P5
    y = y * z + x
    y = y + _ONE
    y = y * _POW2[np.int32(fx) + 127]  # 2^fx, as a float32 built from its bits
    return y if y > x0 else x0


@njit(cache=True, nogil=True, inline="always")
def _row_max(rows, r, n_labels):
    """max(rows[r, :n_labels]) through 8 running maxima (exact in any order; vectorises)."""
    if n_labels < 8:
        m = rows[r, 0]
        for k in range(1, n_labels):
            m = max(m, rows[r, k])
        return m
    m0, m1, m2, m3 = rows[r, 0], rows[r, 1], rows[r, 2], rows[r, 3]
    m4, m5, m6, m7 = rows[r, 4], rows[r, 5], rows[r, 6], rows[r, 7]
    whole = n_labels // 8 * 8
    for b in range(8, whole, 8):
        m0, m1 = max(m0, rows[r, b]), max(m1, rows[r, b + 1])
        m2, m3 = max(m2, rows[r, b + 2]), max(m3, rows[r, b + 3])
        m4, m5 = max(m4, rows[r, b + 4]), max(m5, rows[r, b + 5])
        m6, m7 = max(m6, rows[r, b + 6]), max(m7, rows[r, b + 7])
    for k in range(whole, n_labels):
        m0 = max(m0, rows[r, k])
    return max(max(max(m0, m4), max(m2, m6)), max(max(m1, m5), max(m3, m7)))


@njit(cache=True, nogil=True, inline="always")
def _eigen_sum(rows, r, n_labels):
    """Sum of rows[r, :n_labels] in Eigen 3.3's order for a 16-byte aligned VectorXf on SSE: two
    packet accumulators over pairs of 4-float packets, an odd packet, (a0 + a2) + (a1 + a3), then
    the labels after the last full packet one by one."""
    full = n_labels // 4 * 4
    if full == 0:
        s = rows[r, 0]
        for k in range(1, n_labels):
            s += rows[r, k]
        return s
    a0, a1, a2, a3 = rows[r, 0], rows[r, 1], rows[r, 2], rows[r, 3]
    if full > 4:
        b0, b1, b2, b3 = rows[r, 4], rows[r, 5], rows[r, 6], rows[r, 7]
        paired = n_labels // 8 * 8
        for k in range(8, paired, 8):
            a0, a1, a2, a3 = a0 + rows[r, k], a1 + rows[r, k + 1], a2 + rows[r, k + 2], a3 + rows[r, k + 3]
            b0, b1, b2, b3 = b0 + rows[r, k + 4], b1 + rows[r, k + 5], b2 + rows[r, k + 6], b3 + rows[r, k + 7]
        a0, a1, a2, a3 = a0 + b0, a1 + b1, a2 + b2, a3 + b3
        if full > paired:
            k = paired
            a0, a1, a2, a3 = a0 + rows[r, k], a1 + rows[r, k + 1], a2 + rows[r, k + 2], a3 + rows[r, k + 3]
    s = (a0 + a2) + (a1 + a3)
    for k in range(full, n_labels):
        s += rows[r, k]
    return s


@njit(cache=True, nogil=True, inline="always")
def _slice_seq(acc, values, offsets, weights, i, alpha):
    """acc[0] (W,) = pixel i's slice as seqCompute computes it (one or two labels): the sum over its
    vertices, in order, of (w * v) * alpha."""
    width = acc.shape[1]
    for k in range(width):
        acc[0, k] = 0
    for j in range(offsets.shape[1]):
        o = offsets[i, j] + 1
        w = weights[i, j]
        for k in range(width):
            acc[0, k] += w * values[o, k] * alpha


@njit(cache=True, nogil=True)
def mean_field_pass(lo, hi, rows, rows_flat, neg_unary, out, final, pairwise, seq,
                    g_offsets, g_weights, g_norm, g_blurred, g_alpha, g_compat, g_splat,
                    b_offsets, b_weights, b_norm, b_blurred, b_alpha, b_compat, b_splat):
    """Q of pixels lo..hi-1: softmax(-unary - sum over kernels of compat * (slice * norm)).

    rows: (N, W) float32 Q (W = label count padded to LANES), or a (CHUNK, W) scratch when the
    pass splats; rows_flat: not used; neg_unary: (N, W) float32 log p, padding 0; out: (N, C)
    float32, written as well when `final`. Without `pairwise`, Q = softmax(-unary), the initial Q.
    seq: one or two labels, sliced as pydensecrf's seqCompute. Per kernel (g: Gaussian, b:
    bilateral): the lattice's offsets (N, d+1) int32, weights (N, d+1) float32 and norm (N,)
    float32, the blurred (M+1, W) float32 lattice to slice, the slice factor alpha, compat =
    -weight (Potts: the messages are subtracted as DenseCRF::inference does) and the (M+1, W)
    lattice to splat Q onto, pixel by pixel (pydensecrf's order), or a 0-row array for none.
    """
    n_labels = out.shape[1]
    width = rows.shape[1]
    g_acc = np.empty((1, width), np.float32)
    b_acc = np.empty((1, width), np.float32)
    for i in range(lo, hi):
        r = i if len(rows) == len(neg_unary) else 0  # Q's row, or a scratch row splatted at once
        if pairwise:
            if seq:
                _slice_seq(g_acc, g_blurred, g_offsets, g_weights, i, g_alpha)
                _slice_seq(b_acc, b_blurred, b_offsets, b_weights, i, b_alpha)
            else:
                _slice(g_acc, g_blurred, g_offsets, g_weights, i, g_alpha)
                _slice(b_acc, b_blurred, b_offsets, b_weights, i, b_alpha)
            g_norm_i = g_norm[i]
            b_norm_i = b_norm[i]
            for k in range(width):  # DenseCRF's messages, subtracted in its order
                message = neg_unary[i, k] - g_compat * (g_acc[0, k] * g_norm_i)
                rows[r, k] = message - b_compat * (b_acc[0, k] * b_norm_i)
        else:
            for k in range(width):
                rows[r, k] = neg_unary[i, k]
        _softmax(rows, r, n_labels)
        if final:
            for k in range(n_labels):
                out[i, k] = rows[r, k]
        elif len(g_splat):
            _scatter(g_splat, g_offsets, g_weights, i, rows, r)
            _scatter(b_splat, b_offsets, b_weights, i, rows, r)


@njit(cache=True, nogil=True, inline="always")
def _slice(acc, values, offsets, weights, i, alpha):
    """acc[0] (W,) = pixel i's slice as sseCompute computes it (three or more labels): the sum over
    its vertices, in order, of (w * alpha) * v."""
    width = acc.shape[1]
    for k in range(width):
        acc[0, k] = 0
    for j in range(offsets.shape[1]):
        o = offsets[i, j] + 1
        w = weights[i, j] * alpha
        for k in range(width):
            acc[0, k] += w * values[o, k]


@njit(cache=True, nogil=True, inline="always")
def _softmax(rows, r, n_labels):
    """rows[r] = Eigen's expAndNormalize of rows[r, :n_labels], padding 0: subtract the max, `_pexp`
    on the labels before the last full 4-float packet, expf (math.exp of a float32) on the rest,
    divide by the sum taken in Eigen's order (`_eigen_sum`)."""
    full = n_labels // 4 * 4
    m = _row_max(rows, r, n_labels)
    for k in range(full):
        rows[r, k] = _pexp(rows[r, k] - m)
    for k in range(full, n_labels):
        rows[r, k] = math.exp(rows[r, k] - m)
    for k in range(n_labels, rows.shape[1]):
        rows[r, k] = 0
    s = _eigen_sum(rows, r, n_labels)
    for k in range(rows.shape[1]):
        rows[r, k] = rows[r, k] / s


@njit(cache=True, nogil=True, inline="always")
def _scatter(values, offsets, weights, i, rows, r):
    """values[offsets[i, j] + 1] += weights[i, j] * rows[r] for pixel i's vertices j, in order:
    pydensecrf's splat of one pixel. values: (M+1, W) float32."""
    for j in range(offsets.shape[1]):
        o = offsets[i, j] + 1
        w = weights[i, j]
        for k in range(values.shape[1]):
            values[o, k] += w * rows[r, k]


@njit(cache=True, nogil=True)
def gather_pair(lo, hi, q, split, g_start, g_pixel, g_weight, g_values, b_start, b_pixel, b_weight, b_values,
                ahead):
    """`_gather` of points lo..hi-1 of two lattices numbered one after the other: the first `split`
    are the first lattice's (g), the rest the second's (b). ahead: not used."""
    if lo < split:
        _gather(lo, min(hi, split), q, g_start, g_pixel, g_weight, g_values)
    if hi > split:
        _gather(max(lo, split) - split, hi - split, q, b_start, b_pixel, b_weight, b_values)


@njit(cache=True, nogil=True, inline="always")
def _gather(lo, hi, q, csr_start, csr_pixel, csr_weight, values):
    """values[p+1] = sum over point p's pixels, ascending, of w * Q[pixel], for points lo..hi-1, from
    0: pydensecrf's splat, summed in its order. q: (N, W) float32; values: (M+1, W) float32;
    csr_*: the lattice's splat as a gather (`Lattice.csr_start` etc.)."""
    for p in range(lo, hi):
        for k in range(values.shape[1]):
            values[p + 1, k] = 0
        for e in range(csr_start[p], csr_start[p + 1]):
            pixel = csr_pixel[e]
            w = csr_weight[e]
            for k in range(values.shape[1]):
                values[p + 1, k] += w * q[pixel, k]


@njit(cache=True, nogil=True)
def blur_pair(lo, hi, axis, split, g_values, g_blurred, g_neighbours, b_values, b_blurred, b_neighbours, seq,
              g_ahead, b_ahead):
    """`_blur` along `axis` of points lo..hi-1 of two lattices numbered one after the other: the
    first `split` are the first lattice's (g), the rest the second's (b). g_ahead, b_ahead: not used."""
    if lo < split:
        _blur(lo, min(hi, split), axis, g_values, g_blurred, g_neighbours, seq)
    if hi > split:
        _blur(max(lo, split) - split, hi - split, axis, b_values, b_blurred, b_neighbours, seq)


@njit(cache=True, nogil=True, inline="always")
def _blur(lo, hi, axis, values, blurred, adjacent, seq):
    """blurred = v + 0.5 * (v[n1] + v[n2]) along one axis for points lo..hi-1, in float32
    (sseCompute) or with seqCompute's double 0.5. values, blurred: (M+1, W) float32, row 0 zero;
    adjacent: the lattice's neighbours, (d+1, M, 2) int32, -1 for none (row 0)."""
    for p in range(lo, hi):
        n1 = adjacent[axis, p, 0] + 1
        n2 = adjacent[axis, p, 1] + 1
        if seq:
            for k in range(values.shape[1]):
                blurred[p + 1, k] = np.float32(np.float64(values[p + 1, k])
                                               + 0.5 * np.float64(values[n1, k] + values[n2, k]))
        else:
            for k in range(values.shape[1]):  # _HALF, not 0.5: a float64 operand would compute in double
                blurred[p + 1, k] = values[p + 1, k] + _HALF * (values[n1, k] + values[n2, k])
