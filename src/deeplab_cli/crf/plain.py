"""The CRF engine's kernels in plain numba: what `deeplab_cli.crf.simd` computes, bit for bit,
without hand-written IR, so that they compile on any numba that compiles ordinary Python.

Every float32 operation is the IR kernels' (and so pydensecrf's), in the same order: a multiply then
an add, never fused (numba emits no fused multiply-add without fastmath), the same polynomial exp
(`_pexp`), the same sums in the same order. They are simpler and slower: one pixel, lattice point or
row at a time, in loops that numba vectorises as it can. The scalar helpers here (`_pexp`, `_row_max`,
`_eigen_sum`, `_slice_seq`) serve the IR kernels too, where they handle what their vector blocks do
not, and so do the kernels that have no IR twin (the lattice's `csr` and `norm`, the unary's
`log_columns` and `pad_rows`).

The kernels take the IR kernels' arguments (`deeplab_cli.crf.meanfield.kernels` picks one set per
process), so some arguments that only steer the IR kernels' prefetching are not used here. Import
this module after `deeplab_cli.jit.configure_numba()`, which sets where numba caches what it compiles.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

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


# The lattice (`deeplab_cli.crf.lattice`): keys, hash table, neighbours, splat order and norm.

_HASH_A = np.int64(0x5851F42D4C957F2D)
_HASH_B = np.int64(0x2545F4914F6CDD1D)
_LOW32 = np.int64(0xFFFFFFFF)
_LANE_TOPS = np.int64(0x8000800080008000 - (1 << 64))  # the top bit of each 16-bit coordinate


@njit(cache=True, nogil=True, inline="always")
def _add_lanes(a, b):
    """a + b in each 16-bit lane of two int64 words, wrapping within the lane (no carries across)."""
    return ((a & ~_LANE_TOPS) + (b & ~_LANE_TOPS)) ^ ((a ^ b) & _LANE_TOPS)


@njit(cache=True, nogil=True)
def simplices(lo, hi, features, scale, steps, keys, weights):
    """Enclosing simplex of (padded) pixels lo..hi-1: packed vertex keys and barycentric weights.

    features: (N, d) float32 (pixels >= N are all-zero features); scale: (d,) float32; steps:
    `lattice._vertex_steps(d)`. keys: (n_pad, d+1, 3) int64 (two key words and their hash) and weights:
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
        _vertices(k, d, rem0, rank, ranked, bary, steps, keys, weights)


@njit(cache=True, nogil=True, inline="always")
def _vertices(k, d, rem0, rank, ranked, bary, steps, keys, weights):
    """`simplices`' last step for pixel k: the packed keys, hashes and weights of its d+1 vertices."""
    # Vertex r: rem0 plus the canonical simplex's row r, permuted by rank: coordinate i is
    # rem0[i] + r - (d+1 if rank[i] > d - r). So vertex 0 is rem0, and vertex r is vertex r-1
    # plus 1 in every coordinate but the one ranked d - r + 1, which gains 1 - (d+1): packed
    # 16-bit lanes, added lane-wise.
    d1 = d + 1
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
def csr(offsets, weights, m):
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
def norm(offsets, weights, neighbours, alpha):
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


# cephes logf: log x = log m + e log 2 for x = m 2^e, m in [sqrt(1/2), sqrt(2)), with a degree-9
# polynomial in m - 1 and log 2 split in two so that e log 2 adds no rounding.
_SQRT_HALF = np.float32(0.707106781186547524)
_LOG_P = tuple(np.float32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                       1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                       3.3333331174e-1))
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = _LOG_P
_LOG2_LOW = np.float32(-2.12194440e-4)
_LOG2_HIGH = np.float32(0.693359375)
_MANTISSA_UNIT = np.float32(2.0 ** -24)
_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


@njit(cache=True, nogil=True, inline="always")
def _log_span(source, lo, hi, out):
    """out[:hi - lo] = cephes logf of source[lo:hi]: a 1-D float32 array of normal values (>= tiny),
    NaN or inf. Exponent and mantissa come from the bits, exactly; the rest is float32 arithmetic,
    written with selects rather than branches so that the loop vectorises."""
    bits = source.view(np.int32)
    for i in range(lo, hi):
        b = bits[i]
        m = np.float32(b & 0x7FFFFF) * _MANTISSA_UNIT + _HALF  # in [0.5, 1), exact
        e = np.float32((b >> 23) - 126)
        small = m < _SQRT_HALF
        e = e - _ONE if small else e
        m = (m + m) - _ONE if small else m - _ONE
        z = m * m
        y = _L0 * m + _L1
        y = y * m + _L2
        y = y * m + _L3
        y = y * m + _L4
        y = y * m + _L5
        y = y * m + _L6
        y = y * m + _L7
        y = y * m + _L8
        y = y * m * z
        y = y + _LOG2_LOW * e
        y = y - _HALF * z
        x = source[i]
        out[i - lo] = (m + y) + _LOG2_HIGH * e if x <= _FLOAT32_MAX else x  # NaN and inf keep their value


@njit(cache=True, nogil=True)
def log_columns(lo, hi, values, out):
    """out[:, lo:hi] = `_log_span` of values[:, lo:hi], both (C, N) float32."""
    for c in range(values.shape[0]):
        _log_span(values[c], lo, hi, out[c, lo:hi])


@njit(cache=True, nogil=True)
def pad_rows(lo, hi, log_p, padded):
    """padded[lo:hi] (rows, W) = log_p[:, lo:hi] (C, N) transposed, padding lanes 0."""
    n_labels = log_p.shape[0]
    for start in range(lo, hi, CHUNK):
        stop = min(hi, start + CHUNK)
        padded[start:stop, n_labels:] = 0
        for c in range(n_labels):
            for i in range(start, stop):
                padded[i, c] = log_p[c, i]
