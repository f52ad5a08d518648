"""The fully connected CRF's mean field in plain numpy: a readable definition of what the engine
(`deeplab_cli.crf.meanfield`, pydensecrf2 1.1 with DeepLab's settings) computes, bit for bit, and slowly.

Every float32 operation is the engine's, in its order; numpy never promotes here (constants are
np.float32), and np.add.at adds in index order, i.e. pixel by pixel as pydensecrf's splat does.
A lattice's values are (M+1, C) float32 rows: row 0 stands for a missing neighbour and stays 0.
One thing is tied to the platform, as the engine's and pydensecrf's own expf is: `_expf` is glibc's
expf (2.27 and later) as x86-64 with FMA runs it; checked equal for every float32 in [-104, 0] (all
it is given). glibc's code without FMA differs on one of those: -63.09946 (0xC27C65D9, one ulp).
numpy's own exp would not do: its float32 exp differs from expf on 11% of those inputs, and its
float64 exp rounded to float32 on 97,052 of 1.12e9.
"""

import numpy as np

F32, F64 = np.float32, np.float64
_ZERO, _HALF, _ONE = F32(0), F32(0.5), F32(1)
_TINY = F32(np.finfo(np.float32).tiny)  # p is clipped here: -log p only where p underflowed


# ---------------------------------------------------------------- the permutohedral lattice


def gaussian_features(height, width, sxy):
    """(H*W, 2) float32 (x / sxy, y / sxy), pixels row-major: `addPairwiseGaussian`'s features."""
    xy = np.empty((height, width, 2), F32)
    xy[..., 0] = np.arange(width, dtype=F32) / F32(sxy)
    xy[..., 1] = (np.arange(height, dtype=F32) / F32(sxy))[:, None]
    return xy.reshape(-1, 2)


def bilateral_features(image, sxy, srgb):
    """(H*W, 5) float32 (x, y) / sxy, (r, g, b) / srgb of an (H, W, 3) uint8 RGB image."""
    xy = gaussian_features(*image.shape[:2], sxy)
    return np.concatenate([xy, image.reshape(-1, 3).astype(F32) / F32(srgb)], axis=1)


def _alpha(d):
    """pydensecrf's slice factor 1.0f / (1 + 2^-d)."""
    return _ONE / (_ONE + F32(2.0**-d))


def _simplices(features):
    """Enclosing simplex of each pixel, pixels padded to a multiple of 4 with zero features (pydensecrf
    elevates 4 at a time and inserts the padding's vertices too). features: (N, d) float32.
    Returns keys (N4, d+1, d) int16 (vertex r's d coordinates, wrapping as pydensecrf's short)
    and barycentric weights (N4, d+1) float32."""
    n, d = features.shape
    f = np.zeros((-(-n // 4) * 4, d), F32)
    f[:n] = features
    rows, d1 = np.arange(len(f)), d + 1
    down, up = _ONE / F32(d1), F32(d1)
    inv_std = float(F32(np.sqrt(2.0 / 3.0) * d1))  # the elevation's diagonal, rounded via double
    scale = np.array([1.0 / np.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], F32)
    # Elevate onto the plane x0 + ... + xd = 0, from the last coordinate down.
    elevated, sm = np.empty((len(f), d1), F32), np.zeros(len(f), F32)
    for j in range(d, 0, -1):
        cf = f[:, j - 1] * scale[j - 1]
        elevated[:, j] = sm - F32(j) * cf
        sm = sm + cf
    elevated[:, 0] = sm
    # Nearest remainder-0 point (round half to even, as _mm_cvtps_epi32), and the sum of its steps.
    v = np.rint(down * elevated)
    rem0, total = v * up, np.zeros(len(f), F32)
    for i in range(d1):
        total = total + v[:, i]
    # Rank of each residual: each pair i < j compared once, counted for i if res_i < res_j, else j.
    res = elevated - rem0
    rank = np.zeros((len(f), d1), np.int64)
    for i in range(d1):
        for j in range(i):
            rank[:, i] += ~(res[:, j] < res[:, i])
        for j in range(i + 1, d1):
            rank[:, i] += res[:, i] < res[:, j]
    rank += total.astype(np.int64)[:, None]
    # Move back onto the plane where the rank left 0..d (adding 0 where not: -0 becomes +0, as there).
    rem0 = rem0 + np.where(rank < 0, up, np.where(rank >= d1, -up, _ZERO))
    rank = np.where(rank < 0, rank + d1, np.where(rank >= d1, rank - d1, rank))
    bary = np.zeros((len(f), d1 + 1), F32)
    for i in range(d1):  # barycentric coordinates, accumulated coordinate by coordinate
        b = (elevated[:, i] - rem0[:, i]) * down
        bary[rows, d - rank[:, i]] += b
        bary[rows, d - rank[:, i] + 1] -= b
    bary[:, 0] += _ONE + bary[:, d1]
    # Vertex r: rem0 + r in each coordinate, less d+1 in those ranked above d - r.
    r = np.arange(d1)[None, :, None]
    keys = rem0[:, None, :d].astype(np.int64) + r - d1 * (rank[:, None, :d] > d - r)
    return keys.astype(np.int16), bary[:, :d1]


def build_lattice(features):
    """pydensecrf's `Permutohedral::init` of (N, d) float32 features, and its NORMALIZE_AFTER norm.

    Returns (the engine's `deeplab_cli.crf.lattice.Lattice` arrays):
    offsets (N, d+1) int32, each vertex's lattice point, points numbered by first appearance
        (pixels in order, vertices in order: pydensecrf's hash-table insertion order);
    weights (N, d+1) float32, barycentric; neighbours (d+1, M, 2) int32, each point's two blur
        neighbours along each axis, -1 where absent; norm (N,) float32.
    """
    n, d = features.shape
    keys, weights = _simplices(np.asarray(features, F32))
    flat = keys.reshape(-1, d)
    unique, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # the distinct keys, by first appearance
    number = np.empty(len(order), np.int32)
    number[order] = np.arange(len(order), dtype=np.int32)
    offsets = number[inverse.reshape(-1)].reshape(keys.shape[:2])
    points = unique[order]  # (M, d) int16
    # Axis j < d: key - 1 in every coordinate but + d at j, and key + 1 but - d at j; axis d: -1, +1.
    steps = np.empty((d + 1, 2, d), np.int64)
    steps[:, 0], steps[:, 1] = -1, 1
    steps[np.arange(d), 0, np.arange(d)], steps[np.arange(d), 1, np.arange(d)] = d, -d
    wanted = (points[None, None].astype(np.int64) + steps[:, :, None]).astype(np.int16)
    # Look the neighbours up: numbered together with the points, a neighbour's number is a point's or none.
    _, ids = np.unique(np.concatenate([points, wanted.reshape(-1, d)]), axis=0, return_inverse=True)
    ids = ids.reshape(-1)
    point_of = np.full(ids.max() + 1, -1, np.int32)
    point_of[ids[:len(points)]] = np.arange(len(points), dtype=np.int32)
    neighbours = point_of[ids[len(points):]].reshape(d + 1, 2, -1).transpose(0, 2, 1)
    offsets, weights = offsets[:n], weights[:n]
    return offsets, weights, np.ascontiguousarray(neighbours), _norm(offsets, weights, neighbours)


def _norm(offsets, weights, neighbours):
    """NORMALIZE_AFTER: 1 / (K 1 + 1e-20) per pixel, K 1 filtered as pydensecrf's seqCompute filters a
    vector of ones (splat of w * 1.0f, blur and slice of one label), the division in double. (N,) float32."""
    ones = np.ones((len(offsets), 1), F32)
    filtered = slice_values(blur(splat(ones, offsets, weights, neighbours.shape[1]), neighbours, True),
                            offsets, weights, _alpha(offsets.shape[1] - 1), True)
    return (1.0 / (filtered[:, 0].astype(F64) + 1e-20)).astype(F32)


def splat(q, offsets, weights, m):
    """(M+1, C) float32 lattice values: each pixel's w * q (float32) added to its vertices' points,
    pixel by pixel, vertex by vertex. q: (N, C) float32; offsets, weights: (N, d+1); m: points."""
    values = np.zeros((m + 1, q.shape[1]), F32)
    np.add.at(values, offsets.reshape(-1) + 1, (weights[:, :, None] * q[:, None, :]).reshape(-1, q.shape[1]))
    return values


def blur(values, neighbours, seq):
    """values (M+1, C) float32 blurred along axes 0..d: v + 0.5 (v[n1] + v[n2]), in float32
    (sseCompute, three or more labels) or, if `seq`, with seqCompute's double 0.5 then rounded."""
    for axis in neighbours:
        pair = values[axis[:, 0] + 1] + values[axis[:, 1] + 1]
        out = np.zeros_like(values)
        if seq:
            out[1:] = (values[1:].astype(F64) + 0.5 * pair.astype(F64)).astype(F32)
        else:
            out[1:] = values[1:] + _HALF * pair
        values = out
    return values


def slice_values(values, offsets, weights, alpha, seq):
    """(N, C) float32 slice of blurred (M+1, C) values: per pixel the sum over its vertices, in order,
    of (w * alpha) * v (sseCompute) or, if `seq` (one or two labels), (w * v) * alpha."""
    acc = np.zeros((len(offsets), values.shape[1]), F32)
    for j in range(offsets.shape[1]):
        v, w = values[offsets[:, j] + 1], weights[:, j, None]
        acc = acc + ((w * v) * alpha if seq else (w * alpha) * v)
    return acc


# ---------------------------------------------------------------- unary and softmax


def log_probs(probs):
    """(C, H, W) float32 -> (N, C) float32 log max(p, tiny) = -unary, by cephes logf (Eigen's plog) in
    float32, as `deeplab_cli.crf.meanfield.log_probs`: log m + e log 2 for p = m 2^e, m in [sqrt 1/2, sqrt 2)."""
    p = np.maximum(probs.reshape(probs.shape[0], -1).T, _TINY)
    bits = p.view(np.int32)
    m = (bits & 0x7FFFFF).astype(F32) * F32(2.0**-24) + _HALF  # mantissa in [0.5, 1)
    e = ((bits >> 23) - 126).astype(F32)
    small = m < F32(0.707106781186547524)
    e, m = np.where(small, e - _ONE, e), np.where(small, (m + m) - _ONE, m - _ONE)
    z = m * m
    y = F32(7.0376836292e-2) * m + F32(-1.1514610310e-1)
    for c in (1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1,
              -2.4999993993e-1, 3.3333331174e-1):
        y = y * m + F32(c)
    y = y * m * z + F32(-2.12194440e-4) * e  # log 2 in two parts: e log 2 adds no rounding
    y = y - _HALF * z
    return np.where(p <= np.finfo(F32).max, (m + y) + F32(0.693359375) * e, p)  # NaN, inf stay


_POW2 = (np.arange(256, dtype=np.int32) << 23).view(F32)  # 2^(i-127) from its bits: 2^-127 -> 0


def _pexp(x0):
    """Eigen 3.3.9's SSE2 pexp<Packet4f> (cephes) on float32, lane by lane, no FMA."""
    x = np.where(x0 < F32(88.3762626647950), x0, F32(88.3762626647950))
    x = np.where(x > F32(-88.3762626647949), x, F32(-88.3762626647949))
    fx = x * F32(1.44269504088896341) + _HALF
    tmp = fx.astype(np.int32).astype(F32)  # floor by truncation, as without SSE4.1
    fx = tmp - np.where(tmp > fx, _ONE, _ZERO)
    x = x - fx * F32(0.693359375)
    x = x - fx * F32(-2.12194440e-4)
    z = x * x
    y = F32(1.9875691500e-4) * x + F32(1.3981999507e-3)
    for c in (8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = y * x + F32(c)
    y = (y * z + x) + _ONE
    y = y * _POW2[fx.astype(np.int32) + 127]
    return np.where(y > x0, y, x0)


# glibc's expf: x * 32/ln2 = k + r, e^x = 2^(k/32) 2^(r/32), a table entry (the bits of 2^(i/32)
# less i << 47, to which k << 47 adds the exponent) times a cubic in r, in double.
_EXP2F_TABLE = np.array([int(h, 16) for h in """
    3ff0000000000000 3fefd9b0d3158574 3fefb5586cf9890f 3fef9301d0125b51 3fef72b83c7d517b 3fef54873168b9aa
    3fef387a6e756238 3fef1e9df51fdee1 3fef06fe0a31b715 3feef1a7373aa9cb 3feedea64c123422 3feece086061892d
    3feebfdad5362a27 3feeb42b569d4f82 3feeab07dd485429 3feea47eb03a5585 3feea09e667f3bcd 3fee9f75e8ec5f74
    3feea11473eb0187 3feea589994cce13 3feeace5422aa0db 3feeb737b0cdc5e5 3feec49182a3f090 3feed503b23e255d
    3feee89f995ad3ad 3feeff76f2fb5e47 3fef199bdd85529c 3fef3720dcef9069 3fef5818dcfba487 3fef7c97337b9b5f
    3fefa4afa2a490da 3fefd0765b6e4540""".split()], np.uint64)
_INV_LN2_32 = float.fromhex("0x1.71547652b82fep+0") * 32
_INV_HIGH = float.fromhex("0x1.7154765p+5")  # its top 29 bits: times a float32, exact
_INV_LOW = _INV_LN2_32 - _INV_HIGH  # the other 24 bits: times a float32, exact too
_SHIFT = float.fromhex("0x1.8p+52")
_C0, _C1, _C2 = (float.fromhex(h) / 32**p for h, p in
                 (("0x1.c6af84b912394p-5", 3), ("0x1.ebfce50fac4f3p-3", 2), ("0x1.62e42ff0c52d6p-1", 1)))
_UNDERFLOW = F32(float.fromhex("-0x1.9fe368p6"))  # below: expf is 0


def _expf(x):
    """glibc's expf of float32 x <= 0, FMA build: r = fma(32/ln2, x, -k), which two exact products and
    an exact difference give here with a single rounding."""
    xd = x.astype(F64)
    kd = _INV_LN2_32 * xd + _SHIFT  # rounds to an integer k (+ shift), which its low bits hold
    ki = kd.view(np.uint64)
    kd = kd - _SHIFT
    with np.errstate(invalid="ignore"):  # x = -inf: NaN here, 0 below
        r = (_INV_HIGH * xd - kd) + _INV_LOW * xd
    s = (_EXP2F_TABLE[ki % np.uint64(32)] + (ki << np.uint64(47))).view(F64)  # 2^(k/32)
    y = ((_C0 * r + _C1) * (r * r) + (_C2 * r + 1.0)) * s
    return np.where(x < _UNDERFLOW, _ZERO, y.astype(F32))


def _eigen_sum(e):
    """(N,) float32 row sums of (N, C) e in Eigen 3.3's order for a VectorXf on SSE: two 4-float
    accumulators over pairs of packets, an odd packet, (a0 + a2) + (a1 + a3), then the rest one by one."""
    n = e.shape[1]
    full = n // 4 * 4
    if full == 0:  # no packet: label by label
        s, full = e[:, 0], 1
    else:
        a = e[:, 0:4]
        if full > 4:
            b, paired = e[:, 4:8], n // 8 * 8
            for k in range(8, paired, 8):
                a, b = a + e[:, k:k + 4], b + e[:, k + 4:k + 8]
            a = a + b
            if full > paired:
                a = a + e[:, paired:paired + 4]
        s = (a[:, 0] + a[:, 2]) + (a[:, 1] + a[:, 3])
    for k in range(full, n):
        s = s + e[:, k]
    return s


def softmax(x):
    """pydensecrf's expAndNormalize of (N, C) float32 rows: subtract the row's max, Eigen's pexp on the
    labels before the last full 4-float packet, glibc's expf on the rest, divide by `_eigen_sum`."""
    full = x.shape[1] // 4 * 4
    x = x - x.max(axis=1, keepdims=True)
    e = np.concatenate([_pexp(x[:, :full]), _expf(x[:, full:])], axis=1)
    return e / _eigen_sum(e)[:, None]


# ---------------------------------------------------------------- mean field


def dense_crf(image, probs, params=None):
    """Mean-field marginals Q, (C, H, W) float32, as `deeplab_cli.crf.dense_crf` (bit for bit).

    image: (H, W, 3) uint8 RGB; probs: (C, H, W) float32; params: `CRFParams` (None: DeepLab's).
    Unary -log max(p, tiny); Potts Gaussian (pos_w, pos_xy_std) and bilateral (bi_w, bi_xy_std,
    bi_rgb_std) kernels, NORMALIZE_AFTER; params.iters iterations (0: softmax(log p), i.e. p).
    """
    if params is None:
        from deeplab_cli.crf.params import CRFParams

        params = CRFParams()
    n_labels, height, width = probs.shape
    if image.shape != (height, width, 3) or image.dtype != np.uint8 or probs.dtype != np.float32:
        raise ValueError(f"need (H, W, 3) uint8 and (C, H, W) float32, got {image.shape} {image.dtype}, "
                         f"{probs.shape} {probs.dtype}")
    log_p = log_probs(probs)  # (N, C), -unary
    q = softmax(log_p)
    kernels = []  # (lattice, Potts compat = -weight: DenseCRF::inference subtracts the messages)
    if params.iters > 0:
        kernels = [(build_lattice(gaussian_features(height, width, params.pos_xy_std)), F32(-params.pos_w)),
                   (build_lattice(bilateral_features(image, params.bi_xy_std, params.bi_rgb_std)),
                    F32(-params.bi_w))]
    seq = n_labels <= 2  # pydensecrf filters one or two labels with seqCompute, more with sseCompute
    for _ in range(int(params.iters)):
        message = log_p
        for (offsets, weights, neighbours, norm), compat in kernels:
            blurred = blur(splat(q, offsets, weights, neighbours.shape[1]), neighbours, seq)
            sliced = slice_values(blurred, offsets, weights, _alpha(offsets.shape[1] - 1), seq)
            message = message - compat * (sliced * norm[:, None])
        q = softmax(message)
    return q.T.reshape(n_labels, height, width)
