"""pydensecrf's mean field for any list of pairwise terms in plain numpy: the readable definition that
`deeplab_cli.crf.general` (the engine behind `deeplab_cli.densecrf`) computes bit for bit, slowly.

It extends `deeplab_cli.crf.reference` (the lattice, splat, blur, slice and softmax, in their float32
order) from DeepLab's two Potts terms normalised after filtering to what pydensecrf2 1.1's
`DenseCRF::inference` allows: any number of terms over features of 1 to 6 dimensions, each with its
normalisation (`DenseKernel::filter`) and label compatibility (`LabelCompatibility::apply`).
"""

import numpy as np

from deeplab_cli.crf.reference import F32, F64, _alpha, blur, build_lattice, slice_values, softmax, splat

NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = 0, 1, 2, 3


def make_term(features, normalization, compat):
    """(lattice, pre, post, compat) of one term: the lattice (offsets, weights, neighbours) of (N, d)
    float32 features; the (N,) float32 norms multiplied before and after filtering, or None; compat as
    given (a float: Potts; (M,) float32: diagonal) or, for an (M, M) matrix, symmetrised."""
    offsets, weights, neighbours, _ = build_lattice(np.asarray(features, F32))
    lattice = (offsets, weights, neighbours)
    pre = post = None
    if normalization != NO_NORMALIZATION:
        # K 1, filtered as pydensecrf filters one row (seqCompute); the norm in double.
        total = filter_values(np.ones((len(offsets), 1), F32), lattice, True)[:, 0].astype(F64) + 1e-20
        norm = (1.0 / (np.sqrt(total) if normalization == NORMALIZE_SYMMETRIC else total)).astype(F32)
        pre = norm if normalization in (NORMALIZE_BEFORE, NORMALIZE_SYMMETRIC) else None
        post = norm if normalization in (NORMALIZE_AFTER, NORMALIZE_SYMMETRIC) else None
    if np.ndim(compat) == 2:
        m = np.asarray(compat, F32)
        compat = (m + m.T) * F32(0.5)  # MatrixCompatibility's 0.5 (m + m^T)
    return lattice, pre, post, compat


def filter_values(values, lattice, seq):
    """(N, C) float32 K values: splat, blur, slice (seqCompute's rounding if `seq`, else sseCompute's)."""
    offsets, weights, neighbours = lattice
    blurred = blur(splat(values, offsets, weights, neighbours.shape[1]), neighbours, seq)
    return slice_values(blurred, offsets, weights, _alpha(offsets.shape[1] - 1), seq)


def apply_compat(compat, y):
    """The compatibility applied to filtered (N, M) float32 y: Potts -w y, diagonal w_l y_l, matrix W y."""
    if np.ndim(compat) == 0:
        return -F32(compat) * y
    if np.ndim(compat) == 1:
        return np.asarray(compat, F32)[None, :] * y
    return gemm(compat, y)


def gemm(w, y):
    """(N, M) float32: pixel i's row is W y_i, summed as Eigen 3.3's product W Q sums on SSE (Q: M x N).

    In label order; except, when Eigen runs it as a GEMM (2M + N >= 20), in the rows after the last
    whole 4-row packet and the columns (pixels) of whole 4-column panels: there four partial sums by
    label mod 4 over the whole packets, added as (s0 + s1) + (s2 + s3), then the rest in order.
    """
    n, m = y.shape
    out = np.zeros((n, m), F32)
    for k in range(m):
        out = out + w[None, :, k] * y[:, k, None]
    whole, pixels = m // 4 * 4, n // 4 * 4
    if 2 * m + n >= 20 and whole < m and pixels:
        parts = []
        for j in range(4):
            s = np.zeros((pixels, m - whole), F32)
            for k in range(j, whole, 4):
                s = s + w[None, whole:, k] * y[:pixels, k, None]
            parts.append(s)
        s = (parts[0] + parts[1]) + (parts[2] + parts[3])
        for k in range(whole, m):
            s = s + w[None, whole:, k] * y[:pixels, k, None]
        out[:pixels, whole:] = s
    return out


def mean_field(neg_unary, terms, iterations, q=None):
    """Q, (N, M) float32, after `iterations` of DenseCRF::inference's loop over `terms` (`make_term`).

    neg_unary: (N, M) float32 -unary; q: the starting (N, M) Q, or None for softmax(-unary).
    """
    q = softmax(neg_unary) if q is None else q
    seq = neg_unary.shape[1] <= 2  # pydensecrf filters one or two labels with seqCompute
    for _ in range(iterations):
        tmp = neg_unary
        for lattice, pre, post, compat in terms:
            y = filter_values(q if pre is None else q * pre[:, None], lattice, seq)
            tmp = tmp - apply_compat(compat, y if post is None else y * post[:, None])
        q = softmax(tmp)
    return q
