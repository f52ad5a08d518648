"""The kernel set's lattice kernels: the simplices of eight pixels at a time, one per vector lane, for
the CRF's two feature counts (2 and 5), and the hash table's slots prefetched while inserting and
looking up neighbours. `deeplab_cli.crf.lattice` holds their plain twins and builds the lattice.
"""

from __future__ import annotations

from deeplab_cli.crf.lattice import _vertex_steps
from deeplab_cli.crf.plain import (
    _HASH_A,
    _HASH_B,
    _LANE_TOPS,
    _rehash,
    insert_pixel,
    look_up_neighbours,
    neighbour_key,
    neighbour_steps,
)
from deeplab_cli.crf.plain import simplices as _simplices
from deeplab_cli.crf.simd.ir import broadcast, item_pointer, named_intrinsic, prefetch

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types

_BLOCK = 8  # pixels per `_simplex_block` call, one per vector lane


class _Lanes:
    """The IR of one `_simplex_block` call: its pixels k..k+7, one per lane, and lane-wise constants,
    loads, stores and selections over them."""

    def __init__(self, context, builder, k):
        self.context, self.builder, self.intp = context, builder, k.type
        self.floats = ir.VectorType(ir.FloatType(), _BLOCK)
        self.ints = ir.VectorType(ir.IntType(64), _BLOCK)
        self.pixels = [builder.add(k, ir.Constant(k.type, lane)) for lane in range(_BLOCK)]

    def fconst(self, value):
        """float32 lanes of `value`."""
        return broadcast(self.builder, ir.Constant(ir.FloatType(), float(value)), _BLOCK)

    def iconst(self, value):
        """int64 lanes of `value`, wrapped as two's complement."""
        return ir.Constant(self.ints, [int(value) & (1 << 64) - 1] * _BLOCK)

    def gather(self, array_t, array, column):
        """The lanes array[pixel, column] of the eight pixels."""
        builder = self.builder
        lanes = ir.Constant(self.floats, ir.Undefined)
        for lane, pixel in enumerate(self.pixels):
            value = builder.load(item_pointer(self.context, builder, array_t, array, [pixel, column]))
            lanes = builder.insert_element(lanes, value, ir.Constant(ir.IntType(32), lane))
        return lanes

    def spread(self, lanes, array_t, array, *index):
        """array[pixel, *index] = each pixel's lane of `lanes`."""
        builder = self.builder
        for lane, pixel in enumerate(self.pixels):
            value = builder.extract_element(lanes, ir.Constant(ir.IntType(32), lane))
            builder.store(value, item_pointer(self.context, builder, array_t, array,
                                              [pixel, *(ir.Constant(self.intp, i) for i in index)]))

    def ranked(self, rank, value_of, q, zero):
        """Per lane, value_of(i) of the coordinate i whose rank is q (`zero` where none is): the
        scalar code's indexing by rank, as selections."""
        chosen = zero
        for i in range(len(rank)):
            chosen = self.builder.select(self.builder.icmp_signed("==", rank[i], self.iconst(q)), value_of(i), chosen)
        return chosen


def _emit_elevated(lanes, d, scale_t, scale, features_t, features):
    """The pixels' features scaled and elevated onto the plane x0 + ... + xd = 0: d + 1 vectors."""
    builder = lanes.builder
    elevated = [None] * (d + 1)
    sm = lanes.fconst(0)
    for j in range(d, 0, -1):
        column = ir.Constant(lanes.intp, j - 1)
        s = broadcast(builder, builder.load(item_pointer(lanes.context, builder, scale_t, scale, [column])), _BLOCK)
        cf = builder.fmul(lanes.gather(features_t, features, column), s)
        elevated[j] = builder.fsub(sm, builder.fmul(lanes.fconst(j), cf))
        sm = builder.fadd(sm, cf)
    elevated[0] = sm
    return elevated


def _emit_remainder0(lanes, elevated, down, up):
    """The nearest remainder-0 point of the elevated pixels, rounding to nearest even, and the sum of
    its coordinates / (d + 1) (as float32 vectors)."""
    builder = lanes.builder
    rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes.floats, [lanes.floats]),
                                          "llvm.rint.v8f32")
    rem0, total = [], lanes.fconst(0)
    for e in elevated:
        v = builder.call(rint, [builder.fmul(lanes.fconst(down), e)])
        rem0.append(builder.fmul(v, lanes.fconst(up)))
        total = builder.fadd(total, v)
    return rem0, total


def _emit_ranks(lanes, elevated, rem0, total, up):
    """Each coordinate's rank in the residual elevated - rem0 (ties to the lower index), and rem0 moved
    back onto the plane where the ranks wrap: the ranks, and rem0 changed in place."""
    builder = lanes.builder
    d1 = len(elevated)
    residual = [builder.fsub(e, r) for e, r in zip(elevated, rem0)]
    base = builder.fptosi(total, lanes.ints)
    rank = []
    for i in range(d1):
        count = base
        for j in range(d1):
            if j < i:
                below = builder.not_(builder.fcmp_ordered("<", residual[j], residual[i]))
            elif j > i:
                below = builder.fcmp_ordered("<", residual[i], residual[j])
            else:
                continue
            count = builder.add(count, builder.zext(below, lanes.ints))
        low = builder.icmp_signed("<", count, lanes.iconst(0))
        high = builder.icmp_signed(">=", count, lanes.iconst(d1))
        shift = builder.select(low, lanes.fconst(up), builder.select(high, lanes.fconst(-up), lanes.fconst(0)))
        rank.append(builder.select(low, builder.add(count, lanes.iconst(d1)),
                                   builder.select(high, builder.sub(count, lanes.iconst(d1)), count)))
        rem0[i] = builder.fadd(rem0[i], shift)
    return rank


def _emit_barycentric(lanes, elevated, rem0, rank, down):
    """The d + 1 barycentric coordinates: slot p gets +v of the coordinate ranked d - p, -v of the one
    ranked d - p + 1."""
    builder, d = lanes.builder, len(elevated) - 1
    v = [builder.fmul(builder.fsub(e, r), lanes.fconst(down)) for e, r in zip(elevated, rem0)]
    plus = [lanes.ranked(rank, lambda i: v[i], d - p, lanes.fconst(0)) for p in range(d + 1)]
    minus = [lanes.ranked(rank, lambda i: v[i], d - p + 1, lanes.fconst(0)) for p in range(1, d + 2)]
    bary = [plus[0]] + [builder.fsub(a, b) for a, b in zip(plus[1:], minus)]
    bary[0] = builder.fadd(bary[0], builder.fadd(lanes.fconst(1), builder.fsub(lanes.fconst(0), minus[-1])))
    return bary


def _emit_add_lanes(lanes, a, b):
    """Keys a + b, each of a word's 16-bit coordinates added on its own (no carry between them)."""
    builder, tops = lanes.builder, lanes.iconst(_LANE_TOPS)
    low_bits = builder.add(builder.and_(a, builder.not_(tops)), builder.and_(b, builder.not_(tops)))
    return builder.xor(low_bits, builder.and_(builder.xor(a, b), tops))


def _emit_hash(lanes, lo, hi):
    """The hash of the keys (lo, hi), as `deeplab_cli.crf.lattice`'s."""
    builder, iconst = lanes.builder, lanes.iconst
    h = builder.xor(lo, builder.mul(hi, iconst(_HASH_B)))
    h = builder.mul(builder.xor(h, builder.ashr(h, iconst(32))), iconst(_HASH_A))
    h = builder.mul(builder.xor(h, builder.ashr(h, iconst(29))), iconst(_HASH_B))
    return builder.xor(h, builder.ashr(h, iconst(32)))


def _emit_vertices(lanes, rem0, rank, bary, steps, keys_t, keys, weights_t, weights):
    """keys[pixel, r] = (lo, hi, hash) of vertex r and weights[pixel, r] = bary[r]: vertex 0 is rem0;
    vertex r adds the step of the coordinate ranked d - r + 1."""
    builder, iconst, d = lanes.builder, lanes.iconst, len(rem0) - 1
    words = [iconst(0), iconst(0)]
    for i in range(d):
        c = builder.and_(builder.fptosi(rem0[i], lanes.ints), iconst(0xFFFF))
        words[i // 4] = builder.or_(words[i // 4], builder.shl(c, iconst(16 * (i % 4))))
    for r in range(d + 1):
        if r > 0:
            words = [_emit_add_lanes(lanes, word, lanes.ranked(rank, lambda i: iconst(steps[i, w]), d - r + 1,
                                                               iconst(0)))
                     for w, word in enumerate(words)]
        lo, hi = words
        for w, word in enumerate((lo, hi, _emit_hash(lanes, lo, hi))):
            lanes.spread(word, keys_t, keys, r, w)
        lanes.spread(bary[r], weights_t, weights, r)


def _simplex_block(d):
    """Intrinsic (k, features, scale, keys, weights): `_simplices` of pixels k..k+7 (all < N) for d
    features, one pixel per lane of 8-wide vectors: the same float32 and integer operations in the
    same order. Where the scalar code indexes by rank (barycentric slots, the coordinate that wraps
    between vertices), each candidate is selected instead: exactly one matches, and selection does
    no arithmetic. A slot's + and - (bary[p] += v, bary[p + 1] -= v) give a - b in either order."""
    down, up = np.float32(1) / np.float32(d + 1), np.float32(d + 1)
    steps = _vertex_steps(d)

    def simplex_block(typingctx, k, features, scale, keys, weights):
        def codegen(context, builder, signature, args):
            k, features, scale, keys, weights = args
            features_t, scale_t, keys_t, weights_t = signature.args[1:]
            lanes = _Lanes(context, builder, k)
            elevated = _emit_elevated(lanes, d, scale_t, scale, features_t, features)
            rem0, total = _emit_remainder0(lanes, elevated, down, up)
            rank = _emit_ranks(lanes, elevated, rem0, total, up)
            bary = _emit_barycentric(lanes, elevated, rem0, rank, down)
            _emit_vertices(lanes, rem0, rank, bary, steps, keys_t, keys, weights_t, weights)
            return context.get_dummy_value()

        return types.void(types.intp, features, scale, keys, weights), codegen

    return named_intrinsic(simplex_block, f"simplex_block_{d}")


_simplex_block2 = _simplex_block(2)  # the Gaussian kernel's (x, y)
_simplex_block5 = _simplex_block(5)  # the bilateral kernel's (x, y, r, g, b)


@njit(cache=True, nogil=True)
def simplices(lo, hi, features, scale, steps, keys, weights):
    """`_simplices` of pixels lo..hi-1, eight pixels at a time where d is 2 or 5, as the CRF's kernels
    have (at 500x375: 14.4 -> 2.9 ms for 5, 10.6 -> 1.0 ms for 2, measured)."""
    n, d = features.shape
    k = lo
    if d == 2 or d == 5:
        while k + _BLOCK <= min(hi, n):
            if d == 2:
                _simplex_block2(k, features, scale, keys, weights)
            else:
                _simplex_block5(k, features, scale, keys, weights)
            k += _BLOCK
    _simplices(k, hi, features, scale, steps, keys, weights)


_INSERT_AHEAD = 8  # pixels between the prefetch of a pixel's hash slots and their lookup


@njit(cache=True, nogil=True)
def insert(keys, offsets, point_keys, table):
    """`plain.insert`, the hash slots of the pixel _INSERT_AHEAD on prefetched: the table is larger
    than L2 and the slots are random, so a later pixel's are fetched meanwhile."""
    n_pad, d1 = keys.shape[:2]
    table[:] = 0
    filled = 0
    for k in range(n_pad):
        ahead = min(k + _INSERT_AHEAD, n_pad - 1)
        for r in range(d1):
            prefetch(table, keys[ahead, r, 2] & (len(table) - 1), 0)
        filled = insert_pixel(k, keys, offsets, point_keys, table, filled)
        if 2 * filled >= len(table):
            table = _rehash(point_keys, filled, 2 * len(table))
    return filled, table


@njit(cache=True, nogil=True)
def neighbours(lo, hi, point_keys, table, out):
    """`plain.neighbours`, each point's 2(d+1) table entries prefetched before any is read, so the
    misses overlap."""
    steps = neighbour_steps(out.shape[0] - 1)
    keys = np.empty((len(steps), 3), np.int64)  # lo, hi, home slot of each neighbour
    for p in range(lo, hi):
        for t in range(len(steps)):
            neighbour_key(p, t, point_keys, steps, table, keys)
            prefetch(table, keys[t, 2], 0)
        look_up_neighbours(p, keys, table, out)
