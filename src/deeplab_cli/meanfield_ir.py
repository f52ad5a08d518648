"""The CRF engine's kernels with hand-written LLVM IR (`numba.extending.intrinsic`, llvmlite), the
fast set: `deeplab_cli.meanfield_plain` computes the same bits in plain numba, and is used where these
do not compile (`deeplab_cli.engine`).

Lattice: the simplices of eight pixels at a time, one per vector lane, for the CRF's two feature counts
(2 and 5), and the hash table's slots prefetched while inserting and looking up neighbours.

Mean field: label-minor rows padded to a multiple of 8 floats, handled as whole 8-float vectors by
small LLVM intrinsics (no FMA: a multiply, then an add, as SSE2 does; no alias checks or remainder
loops per row). Rows of 24 floats (17-24 labels, VOC's 21) are handled three vectors at a time: one
read of a vertex's offset and weight per slice, and the max, Eigen-order sum and division of the
softmax in registers. Long chains of dependent operations (pexp's polynomial) are emitted for several
rows at once, interleaved: one row's chain alone fills the CPU's schedulers with operations that wait.
"""

from __future__ import annotations

import math

# deeplab_cli.lattice configures numba before it is imported.
from deeplab_cli.lattice import (
    _HASH_A,
    _HASH_B,
    _LANE_TOPS,
    _rehash,
    _simplices,
    _vertex_steps,
    insert_pixel,
    look_up_neighbours,
    neighbour_key,
    neighbour_steps,
)
from deeplab_cli.meanfield_plain import (
    _EXP_C1,
    _EXP_C2,
    _EXP_HI,
    _EXP_LO,
    _HALF,
    _LOG2EF,
    _ONE,
    _P0,
    _P1,
    _P2,
    _P3,
    _P4,
    _P5,
    _ZERO,
    CHUNK,
    LANES,
    _eigen_sum,
    _pexp,
    _row_max,
    _slice_seq,
)

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit  # noqa: E402
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

_WIDE = 3 * LANES  # rows of 17-24 labels (VOC's 21), handled three vectors at a time
_AHEAD = 16  # points (entries) between the blur's (gather's) prefetch of a row and its use


def item_pointer(context, builder, array_type, array, indices):
    """LLVM pointer to array[indices] (for intrinsics; no wraparound)."""
    view = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer2(context, builder, view.data, cgutils.unpack_tuple(builder, view.shape),
                                     cgutils.unpack_tuple(builder, view.strides), array_type.layout, indices,
                                     wraparound=False)


def named_intrinsic(typer, name):
    """intrinsic(typer) under its own name (factories make several intrinsics of one typer)."""
    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


def broadcast(builder, value, lanes):
    """LLVM IR: a vector of `lanes` copies of the scalar `value` (of any type)."""
    vector = ir.VectorType(value.type, lanes)
    first = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def emit_prefetch(builder, pointer):
    """LLVM IR: hint the CPU to fetch the cache line at `pointer`, to be read."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    hint = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
    builder.call(hint, [builder.bitcast(pointer, i8p), i32(0), i32(3), i32(1)])


@intrinsic
def prefetch(typingctx, array, row, col):
    """Hint the CPU to fetch the cache line of array[row, col] (2-D) into cache (`llvm.prefetch`)."""

    def codegen(context, builder, signature, args):
        emit_prefetch(builder, item_pointer(context, builder, signature.args[0], args[0], args[1:3]))
        return context.get_dummy_value()

    return types.void(array, types.intp, types.intp), codegen


# The lattice

_BLOCK = 8  # pixels per `_simplex_block` call, one per vector lane


def _simplex_block(d):
    """Intrinsic (k, features, scale, keys, weights): `_simplices` of pixels k..k+7 (all < N) for d
    features, one pixel per lane of 8-wide vectors: the same float32 and integer operations in the
    same order. Where the scalar code indexes by rank (barycentric slots, the coordinate that wraps
    between vertices), each candidate is selected instead: exactly one matches, and selection does
    no arithmetic. A slot's + and - (bary[p] += v, bary[p + 1] -= v) give a - b in either order."""
    d1 = d + 1
    down, up = np.float32(1) / np.float32(d1), np.float32(d1)
    steps = _vertex_steps(d)

    def simplex_block(typingctx, k, features, scale, keys, weights):
        def codegen(context, builder, signature, args):
            k, features, scale, keys, weights = args
            features_t, scale_t, keys_t, weights_t = signature.args[1:]
            f32 = ir.FloatType()
            floats, ints = ir.VectorType(f32, _BLOCK), ir.VectorType(ir.IntType(64), _BLOCK)
            pixels = [builder.add(k, ir.Constant(k.type, lane)) for lane in range(_BLOCK)]

            def fconst(value):
                return broadcast(builder, ir.Constant(f32, float(value)), _BLOCK)

            def iconst(value):  # int64 lanes of `value`, wrapped as two's complement
                return ir.Constant(ints, [int(value) & (1 << 64) - 1] * _BLOCK)

            def gather(array_t, array, column):
                vector = ir.Constant(floats, ir.Undefined)
                for lane, pixel in enumerate(pixels):
                    value = builder.load(item_pointer(context, builder, array_t, array, [pixel, column]))
                    vector = builder.insert_element(vector, value, ir.Constant(ir.IntType(32), lane))
                return vector

            def spread(vector, array_t, array, *index):
                for lane, pixel in enumerate(pixels):
                    value = builder.extract_element(vector, ir.Constant(ir.IntType(32), lane))
                    builder.store(value, item_pointer(context, builder, array_t, array,
                                                      [pixel, *(ir.Constant(k.type, i) for i in index)]))

            # Elevate onto the plane x0 + ... + xd = 0.
            elevated = [None] * d1
            sm = fconst(0)
            for j in range(d, 0, -1):
                column = ir.Constant(k.type, j - 1)
                s = broadcast(builder, builder.load(item_pointer(context, builder, scale_t, scale, [column])), _BLOCK)
                cf = builder.fmul(gather(features_t, features, column), s)
                elevated[j] = builder.fsub(sm, builder.fmul(fconst(j), cf))
                sm = builder.fadd(sm, cf)
            elevated[0] = sm
            # Nearest remainder-0 point, rounding to nearest even.
            rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(floats, [floats]),
                                                  "llvm.rint.v8f32")
            rem0, total = [], fconst(0)
            for e in elevated:
                v = builder.call(rint, [builder.fmul(fconst(down), e)])
                rem0.append(builder.fmul(v, fconst(up)))
                total = builder.fadd(total, v)
            # Ranks, and the point moved back onto the plane.
            residual = [builder.fsub(e, r) for e, r in zip(elevated, rem0)]
            base = builder.fptosi(total, ints)
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
                    count = builder.add(count, builder.zext(below, ints))
                low = builder.icmp_signed("<", count, iconst(0))
                high = builder.icmp_signed(">=", count, iconst(d1))
                shift = builder.select(low, fconst(up), builder.select(high, fconst(-up), fconst(0)))
                rank.append(builder.select(low, builder.add(count, iconst(d1)),
                                           builder.select(high, builder.sub(count, iconst(d1)), count)))
                rem0[i] = builder.fadd(rem0[i], shift)
            # Barycentric coordinates: slot p gets +v of the coordinate ranked d - p, -v of the one
            # ranked d - p + 1.
            v = [builder.fmul(builder.fsub(e, r), fconst(down)) for e, r in zip(elevated, rem0)]

            def ranked(value_of, q, zero):
                chosen = zero
                for i in range(d1):
                    chosen = builder.select(builder.icmp_signed("==", rank[i], iconst(q)), value_of(i), chosen)
                return chosen

            plus = [ranked(lambda i: v[i], d - p, fconst(0)) for p in range(d1)]
            minus = [ranked(lambda i: v[i], d - p + 1, fconst(0)) for p in range(1, d1 + 1)]
            bary = [plus[0]] + [builder.fsub(a, b) for a, b in zip(plus[1:], minus)]
            bary[0] = builder.fadd(bary[0], builder.fadd(fconst(1), builder.fsub(fconst(0), minus[-1])))
            # Vertex keys: vertex 0 is rem0; vertex r adds the step of the coordinate ranked d - r + 1.
            tops = iconst(_LANE_TOPS)

            def add_lanes(a, b):
                low_bits = builder.add(builder.and_(a, builder.not_(tops)), builder.and_(b, builder.not_(tops)))
                return builder.xor(low_bits, builder.and_(builder.xor(a, b), tops))

            words = [iconst(0), iconst(0)]
            for i in range(d):
                c = builder.and_(builder.fptosi(rem0[i], ints), iconst(0xFFFF))
                words[i // 4] = builder.or_(words[i // 4], builder.shl(c, iconst(16 * (i % 4))))
            for r in range(d1):
                if r > 0:
                    words = [add_lanes(word, ranked(lambda i: iconst(steps[i, w]), d - r + 1, iconst(0)))
                             for w, word in enumerate(words)]
                lo, hi = words
                h = builder.xor(lo, builder.mul(hi, iconst(_HASH_B)))
                h = builder.mul(builder.xor(h, builder.ashr(h, iconst(32))), iconst(_HASH_A))
                h = builder.mul(builder.xor(h, builder.ashr(h, iconst(29))), iconst(_HASH_B))
                h = builder.xor(h, builder.ashr(h, iconst(32)))
                for w, word in enumerate((lo, hi, h)):
                    spread(word, keys_t, keys, r, w)
                spread(bary[r], weights_t, weights, r)
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
    """`lattice.insert`, the hash slots of the pixel _INSERT_AHEAD on prefetched: the table is larger
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
    """`lattice.neighbours`, each point's 2(d+1) table entries prefetched before any is read, so the
    misses overlap."""
    steps = neighbour_steps(out.shape[0] - 1)
    keys = np.empty((len(steps), 3), np.int64)  # lo, hi, home slot of each neighbour
    for p in range(lo, hi):
        for t in range(len(steps)):
            neighbour_key(p, t, point_keys, steps, table, keys)
            prefetch(table, keys[t, 2], 0)
        look_up_neighbours(p, keys, table, out)


# The mean field


def _vector(lanes):
    """LLVM's <lanes x float>."""
    return ir.VectorType(ir.FloatType(), lanes)


def _block_pointer(context, builder, array_type, array, row, col, lanes):
    """LLVM pointer to the `lanes` floats array[row, col:col + lanes] of a 2-D float32 array."""
    view = context.make_array(array_type)(context, builder, array)
    pointer = cgutils.get_item_pointer2(
        context, builder, view.data, cgutils.unpack_tuple(builder, view.shape),
        cgutils.unpack_tuple(builder, view.strides), array_type.layout, [row, col], wraparound=False)
    return builder.bitcast(pointer, _vector(lanes).as_pointer())


def _scatter_block(lanes, blocks):
    """Intrinsic: values[offsets[i, j] + 1, col:col+n] += weights[i, j] * rows[r, col:col+n] for each
    of pixel i's vertices j in order (pydensecrf's splat; n = blocks * lanes), a float32 multiply then
    add (no FMA) on `blocks` vectors of `lanes` floats. rows[r] is loaded once for all vertices: as
    numba arrays, values and rows may alias, so a loop over the vertices would reload it after every
    store (the splat took 19% longer so, measured)."""

    def scatter_block(typingctx, values, offsets, weights, i, rows, r, col):
        def codegen(context, builder, signature, args):
            values_t, offsets_t, weights_t, _, rows_t = signature.args[:5]
            values, offsets, weights, i, rows, r, col = args
            columns = [builder.add(col, ir.Constant(col.type, b * lanes)) for b in range(blocks)]
            source = [builder.load(_block_pointer(context, builder, rows_t, rows, r, at, lanes), align=4)
                      for at in columns]
            with cgutils.for_range(builder, cgutils.unpack_tuple(
                    builder, context.make_array(offsets_t)(context, builder, offsets).shape)[1]) as loop:
                o = builder.load(item_pointer(context, builder, offsets_t, offsets, [i, loop.index]))
                weight = broadcast(builder, builder.load(item_pointer(context, builder, weights_t, weights,
                                                                       [i, loop.index])), lanes)
                row = builder.add(builder.sext(o, i.type), ir.Constant(i.type, 1))
                for at, value in zip(columns, source):
                    pointer = _block_pointer(context, builder, values_t, values, row, at, lanes)
                    product = builder.fmul(weight, value)
                    builder.store(builder.fadd(builder.load(pointer, align=4), product), pointer, align=4)
            return context.get_dummy_value()

        return types.void(values, offsets, weights, types.intp, rows, types.intp, types.intp), codegen

    return named_intrinsic(scatter_block, f"scatter_block_{blocks}x{lanes}")


def _emit_slice(context, builder, values_t, values, offsets_t, offsets, weights_t, weights, i, col, alpha, lanes,
                blocks):
    """LLVM IR: the `blocks` vectors of `lanes` floats sum over pixel i's vertices j, in order, of
    (weights[i, j] * alpha) * values[offsets[i, j] + 1, col:col + blocks * lanes] (sseCompute's slice),
    each vertex's offset and weight read once, the sums in registers."""
    totals = [cgutils.alloca_once_value(builder, ir.Constant(_vector(lanes), None)) for _ in range(blocks)]
    columns = [builder.add(col, ir.Constant(col.type, b * lanes)) for b in range(blocks)]
    with cgutils.for_range(builder, cgutils.unpack_tuple(
            builder, context.make_array(offsets_t)(context, builder, offsets).shape)[1]) as loop:
        o = builder.load(item_pointer(context, builder, offsets_t, offsets, [i, loop.index]))
        w = builder.load(item_pointer(context, builder, weights_t, weights, [i, loop.index]))
        row = builder.add(builder.sext(o, i.type), ir.Constant(i.type, 1))
        weight = broadcast(builder, builder.fmul(w, alpha), lanes)
        for at, total in zip(columns, totals):
            v = builder.load(_block_pointer(context, builder, values_t, values, row, at, lanes), align=4)
            builder.store(builder.fadd(builder.load(total), builder.fmul(weight, v)), total)
    return [builder.load(total) for total in totals]


def _emit_messages(context, builder, unary_t, neg_unary, i, col, lanes, g, g_compat, g_norm, b, b_compat, b_norm):
    """LLVM IR: the vectors (neg_unary[i, c] - g_compat * (g[c] * g_norm)) - b_compat * (b[c] * b_norm)
    for the columns of the vectors g and b (each kernel's slice, `lanes` floats a vector, from col on):
    DenseCRF's messages, subtracted in its order."""
    g_compat, g_norm, b_compat, b_norm = (broadcast(builder, x, lanes) for x in (g_compat, g_norm, b_compat, b_norm))
    values = []
    for k, (g_k, b_k) in enumerate(zip(g, b)):
        at = builder.add(col, ir.Constant(col.type, k * lanes))
        unary = builder.load(_block_pointer(context, builder, unary_t, neg_unary, i, at, lanes), align=4)
        value = builder.fsub(unary, builder.fmul(g_compat, builder.fmul(g_k, g_norm)))
        values.append(builder.fsub(value, builder.fmul(b_compat, builder.fmul(b_k, b_norm))))
    return values


def _store_blocks(context, builder, rows_t, rows, r, col, values):
    """LLVM IR: rows[r, col:] = the vectors `values`, one after the other."""
    at = col
    for value in values:
        builder.store(value, _block_pointer(context, builder, rows_t, rows, r, at, value.type.count), align=4)
        at = builder.add(at, ir.Constant(col.type, value.type.count))


def _message_block(lanes, blocks, minus_max=False):
    """Intrinsic: both kernels' slices of pixel i (`_emit_slice`) and their messages (`_emit_messages`)
    for columns col..col+n (n = blocks * lanes), in registers, into rows[r]. With `minus_max` (rows of
    24 floats, col 0), less their maximum over the first n_labels (`_emit_minus_max24`): the softmax's
    first step without a store and reload of the row; n_labels is not used otherwise."""

    def message_block(typingctx, rows, r, neg_unary, i, col, g_values, g_offsets, g_weights, g_alpha, g_compat,
                      g_norm, b_values, b_offsets, b_weights, b_alpha, b_compat, b_norm, n_labels):
        def codegen(context, builder, signature, args):
            rows_t, _, unary_t = signature.args[:3]
            rows, r, neg_unary, i, col = args[:5]
            kernels = []
            for first in (5, 11):
                values, offsets, weights, alpha, compat, norm = args[first:first + 6]
                values_t, offsets_t, weights_t = signature.args[first:first + 3]
                sliced = _emit_slice(context, builder, values_t, values, offsets_t, offsets, weights_t, weights,
                                     i, col, alpha, lanes, blocks)
                kernels += [sliced, compat, norm]
            messages = _emit_messages(context, builder, unary_t, neg_unary, i, col, lanes, *kernels)
            if minus_max:
                messages = _emit_minus_max24(builder, messages, args[17])
            _store_blocks(context, builder, rows_t, rows, r, col, messages)
            return context.get_dummy_value()

        kernel = (types.float32, types.float32, types.float32)
        return types.void(rows, types.intp, neg_unary, types.intp, types.intp, g_values, g_offsets, g_weights,
                          *kernel, b_values, b_offsets, b_weights, *kernel, types.intp), codegen

    return named_intrinsic(message_block, f"message_block_{blocks}x{lanes}{'_minus_max' * minus_max}")


def _half(builder, vector, high):
    """The low or high half of an LLVM vector."""
    lanes = vector.type.count // 2
    mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), list(range(high * lanes, (high + 1) * lanes)))
    return builder.shuffle_vector(vector, ir.Constant(vector.type, ir.Undefined), mask)


def _lane(builder, vector, k):
    """Lane k of an LLVM vector."""
    return builder.extract_element(vector, ir.Constant(ir.IntType(32), k))


def _row24(context, builder, rows_type, rows, r):
    """Pointers to the three 8-float blocks of rows[r] (a row of 24 floats)."""
    return [_block_pointer(context, builder, rows_type, rows, r, context.get_constant(types.intp, col), LANES)
            for col in (0, LANES, 2 * LANES)]


def _emit_max(builder, a, b):
    """LLVM IR: a where a > b, else b (SSE's maxps: b where either is NaN)."""
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


def _emit_label_lanes24(builder, n_labels):
    """LLVM IR: which lanes of a 24-float row's third 8-float vector (labels 16-23) are labels."""
    lane_labels = ir.Constant(ir.VectorType(ir.IntType(64), LANES), list(range(2 * LANES, 3 * LANES)))
    return builder.icmp_signed("<", lane_labels, broadcast(builder, n_labels, LANES))


def _emit_minus_max24(builder, row, n_labels):
    """LLVM IR: the three 8-float vectors `row` less their maximum over the first n_labels lanes,
    17 <= n_labels <= 24 (the maximum is exact in any order; the padding lanes are rewritten later)."""
    v0, v1, v2 = row
    lowest = broadcast(builder, ir.Constant(ir.FloatType(), -math.inf), LANES)
    v2_labels = builder.select(_emit_label_lanes24(builder, n_labels), v2, lowest)

    def vmax(a, b):
        return _emit_max(builder, a, b)

    m = vmax(vmax(v0, v1), v2_labels)
    m = vmax(_half(builder, m, 0), _half(builder, m, 1))
    m = vmax(_half(builder, m, 0), _half(builder, m, 1))
    m = vmax(_lane(builder, m, 0), _lane(builder, m, 1))
    m = broadcast(builder, m, LANES)
    return [builder.fsub(v, m) for v in row]


@intrinsic
def _subtract_max24(typingctx, rows, r, n_labels):
    """rows[r] = `_emit_minus_max24` of rows[r], a row of 24 floats."""

    def codegen(context, builder, signature, args):
        rows, r, n_labels = args
        pointers = _row24(context, builder, signature.args[0], rows, r)
        row = _emit_minus_max24(builder, [builder.load(p, align=4) for p in pointers], n_labels)
        for pointer, v in zip(pointers, row):
            builder.store(v, pointer, align=4)
        return context.get_dummy_value()

    return types.void(rows, types.intp, types.intp), codegen


def _emit_pexp(builder, xs):
    """LLVM IR: `_pexp` on each lane of each float vector in xs, the same float32 operations, emitted
    step by step across the vectors: each is a chain of 25 dependent operations, and interleaved
    chains keep the CPU's floating-point schedulers busy (row by row they filled with waiting ones)."""
    lanes = xs[0].type.count
    i32s = ir.VectorType(ir.IntType(32), lanes)

    def constant(value):
        return broadcast(builder, ir.Constant(ir.FloatType(), float(value)), lanes)

    def each(step, *operands):
        return [step(*vectors) for vectors in zip(*operands)]

    def below(a, b):
        return builder.select(builder.fcmp_ordered("<", a, b), a, b)

    def above(a, b):
        return _emit_max(builder, a, b)

    hi, lo, one, zero = constant(_EXP_HI), constant(_EXP_LO), constant(_ONE), constant(_ZERO)
    x = each(lambda v: above(below(v, hi), lo), xs)
    fx = each(lambda v: builder.fadd(builder.fmul(v, constant(_LOG2EF)), constant(_HALF)), x)
    tmp = each(lambda v: builder.sitofp(builder.fptosi(v, i32s), v.type), fx)
    fx = each(lambda t, f: builder.fsub(t, builder.select(builder.fcmp_ordered(">", t, f), one, zero)), tmp, fx)
    for c in (_EXP_C1, _EXP_C2):
        x = each(lambda v, f: builder.fsub(v, builder.fmul(f, constant(c))), x, fx)
    z = each(lambda v: builder.fmul(v, v), x)
    y = each(lambda v: builder.fadd(builder.fmul(constant(_P0), v), constant(_P1)), x)
    for p in (_P2, _P3, _P4, _P5):
        y = each(lambda u, v: builder.fadd(builder.fmul(u, v), constant(p)), y, x)
    y = each(lambda u, w, v: builder.fadd(builder.fadd(builder.fmul(u, w), v), one), y, z, x)
    bias, shift = ir.Constant(i32s, [127] * lanes), ir.Constant(i32s, [23] * lanes)
    y = each(lambda u, f: builder.fmul(u, builder.bitcast(
        builder.shl(builder.add(builder.fptosi(f, i32s), bias), shift), u.type)), y, fx)
    return each(lambda u, v: above(u, v), y, xs)


def _softmax_rows24(count):
    """Intrinsic: for rows r..r+count-1 of 24 floats (less their maximum), pexp of labels 0-19
    (`_emit_pexp`, all rows' vectors interleaved) and tails[r, :n_labels - 20] (expf of the labels
    after them), divided by their sum in Eigen 3.3's SSE order, into the rows (padding 0), for
    20 <= n_labels <= 23, all in registers:
    a = x[0:4] + x[8:12], b = x[4:8] + x[12:16] (8-float v0 + v1), a += b, a += x[16:20],
    (a0 + a2) + (a1 + a3), then x[20:n_labels] one by one (`_eigen_sum`)."""

    def softmax_rows24(typingctx, rows, r, tails, n_labels):
        def codegen(context, builder, signature, args):
            rows, r, tails, n_labels = args
            at = [builder.add(r, ir.Constant(r.type, k)) for k in range(count)]
            pointers = [p for row in at for p in _row24(context, builder, signature.args[0], rows, row)]
            exps = _emit_pexp(builder, [builder.load(p, align=4) for p in pointers])
            tail_lanes = _emit_label_lanes24(builder, n_labels)
            zero = ir.Constant(_vector(LANES), [0.0] * LANES)
            for k, row in enumerate(at):
                v0, v1, v2 = exps[3 * k:3 * k + 3]
                # Lanes 4-7 of v2 from the tails, 0 past the labels (kept in registers: no reload of stores).
                tail = builder.load(_block_pointer(context, builder, signature.args[2], tails, row,
                                                   context.get_constant(types.intp, 0), 4), align=4)
                spread = builder.shuffle_vector(tail, ir.Constant(tail.type, ir.Undefined), ir.Constant(
                    ir.VectorType(ir.IntType(32), LANES), [0] * 4 + [0, 1, 2, 3]))
                spread = builder.select(tail_lanes, spread, zero)
                v2 = builder.select(ir.Constant(ir.VectorType(ir.IntType(1), LANES), [1] * 4 + [0] * 4), v2, spread)
                ab = builder.fadd(v0, v1)
                a = builder.fadd(_half(builder, ab, 0), _half(builder, ab, 1))
                a = builder.fadd(a, _half(builder, v2, 0))
                total = builder.fadd(builder.fadd(_lane(builder, a, 0), _lane(builder, a, 2)),
                                     builder.fadd(_lane(builder, a, 1), _lane(builder, a, 3)))
                for j in range(4, 7):  # labels 20-22, where present (label 23 would make 24: another order)
                    present = builder.icmp_signed(">", n_labels, ir.Constant(n_labels.type, 16 + j))
                    total = builder.select(present, builder.fadd(total, _lane(builder, v2, j)), total)
                total = broadcast(builder, total, LANES)
                for pointer, v in zip(pointers[3 * k:3 * k + 3], (v0, v1, v2)):
                    builder.store(builder.fdiv(v, total), pointer, align=4)
            return context.get_dummy_value()

        return types.void(rows, types.intp, tails, types.intp), codegen

    return named_intrinsic(softmax_rows24, f"softmax_rows24_{count}")


@intrinsic
def _pexp_block(typingctx, flat, k):
    """flat[k:k + 4 * LANES] = `_pexp` of each, as four interleaved vectors (`_emit_pexp`)."""

    def codegen(context, builder, signature, args):
        flat, k = args
        pointers = []
        for b in range(4):
            at = builder.add(k, ir.Constant(k.type, b * LANES))
            pointers.append(builder.bitcast(item_pointer(context, builder, signature.args[0], flat, [at]),
                                            _vector(LANES).as_pointer()))
        for pointer, v in zip(pointers, _emit_pexp(builder, [builder.load(p, align=4) for p in pointers])):
            builder.store(v, pointer, align=4)
        return context.get_dummy_value()

    return types.void(flat, types.intp), codegen


_SOFTMAX_ROWS = 4  # rows per call of `_softmax_rows`: 4 measured fastest (2: 11% slower, 8: spills)
_softmax_rows = _softmax_rows24(_SOFTMAX_ROWS)
_softmax_row = _softmax_rows24(1)
_message8 = _message_block(LANES, 1)
_message_wide = _message_block(LANES, 3)
_message_minus_max24 = _message_block(LANES, 3, minus_max=True)
_scatter8 = _scatter_block(LANES, 1)
_scatter_wide = _scatter_block(LANES, 3)


def _blur_block(lanes, blocks):
    """Intrinsic: blurred[p, col:col+n] = values[p] + 0.5 * (values[n1] + values[n2]) over those
    columns (n = blocks * lanes), float32 as sseCompute, on `blocks` vectors of `lanes` floats:
    no alias checks or remainder loops per point."""

    def blur_block(typingctx, blurred, values, p, n1, n2, col):
        def codegen(context, builder, signature, args):
            blurred_t, values_t = signature.args[:2]
            blurred, values, p, n1, n2, col = args
            half = broadcast(builder, ir.Constant(ir.FloatType(), 0.5), lanes)
            for b in range(blocks):
                at = builder.add(col, ir.Constant(col.type, b * lanes))
                own, left, right = (builder.load(_block_pointer(context, builder, values_t, values, row, at, lanes),
                                                 align=4) for row in (p, n1, n2))
                result = builder.fadd(own, builder.fmul(half, builder.fadd(left, right)))
                builder.store(result, _block_pointer(context, builder, blurred_t, blurred, p, at, lanes), align=4)
            return context.get_dummy_value()

        return types.void(blurred, values, types.intp, types.intp, types.intp, types.intp), codegen

    return named_intrinsic(blur_block, f"blur_block_{blocks}x{lanes}")


def _combine_block(lanes, blocks):
    """Intrinsic: `_emit_messages` of the slices in g_acc[0] and b_acc[0] (the seqCompute path's), for
    columns col..col+n (n = blocks * lanes), on `blocks` vectors of `lanes` floats."""

    def combine_block(typingctx, rows, r, neg_unary, i, g_acc, g_compat, g_norm, b_acc, b_compat, b_norm,
                      col):
        def codegen(context, builder, signature, args):
            rows_t, _, unary_t, _, g_acc_t, _, _, b_acc_t = signature.args[:8]
            rows, r, neg_unary, i, g_acc, g_compat, g_norm, b_acc, b_compat, b_norm, col = args
            zero = context.get_constant(types.intp, 0)

            def sums(acc_t, acc):
                return [builder.load(_block_pointer(context, builder, acc_t, acc, zero,
                                                    builder.add(col, ir.Constant(col.type, k * lanes)), lanes),
                                     align=4) for k in range(blocks)]

            _store_blocks(context, builder, rows_t, rows, r, col, _emit_messages(
                context, builder, unary_t, neg_unary, i, col, lanes,
                sums(g_acc_t, g_acc), g_compat, g_norm, sums(b_acc_t, b_acc), b_compat, b_norm))
            return context.get_dummy_value()

        return types.void(rows, types.intp, neg_unary, types.intp, g_acc, types.float32, types.float32,
                          b_acc, types.float32, types.float32, types.intp), codegen

    return named_intrinsic(combine_block, f"combine_block_{blocks}x{lanes}")


def _gather_block(lanes, blocks):
    """Intrinsic: values[p+1, col:col+n] (n = blocks * lanes) = sum over point p's CSR entries e, in
    order, of csr_weight[e] * q[csr_pixel[e], col:col+n]: pydensecrf's splat of point p, summed in
    `blocks` registers of `lanes` floats from 0 (not through memory: no store-to-load chain per
    entry), the Q row _AHEAD entries on prefetched if `prefetch`."""

    def gather_block(typingctx, values, p, q, csr_start, csr_pixel, csr_weight, col, prefetch):
        def codegen(context, builder, signature, args):
            values_t, _, q_t, start_t, pixel_t, weight_t, _, _ = signature.args
            values, p, q, csr_start, csr_pixel, csr_weight, col, prefetch = args
            intp = p.type
            one = ir.Constant(intp, 1)

            def load(array_t, array, index):
                return builder.load(item_pointer(context, builder, array_t, array, [index]))

            def blocks_of(array_t, array, row):
                return [_block_pointer(context, builder, array_t, array, row,
                                       builder.add(col, ir.Constant(intp, b * lanes)), lanes) for b in range(blocks)]

            totals = [cgutils.alloca_once_value(builder, ir.Constant(_vector(lanes), None)) for _ in range(blocks)]
            begin = builder.sext(load(start_t, csr_start, p), intp)
            end = builder.sext(load(start_t, csr_start, builder.add(p, one)), intp)
            last_entry = builder.sub(cgutils.unpack_tuple(
                builder, context.make_array(pixel_t)(context, builder, csr_pixel).shape)[0], one)
            last_column = builder.sub(cgutils.unpack_tuple(
                builder, context.make_array(q_t)(context, builder, q).shape)[1], one)
            with cgutils.for_range_slice(builder, begin, end, one, intp) as (e, _):
                with builder.if_then(prefetch):
                    ahead = builder.add(e, ir.Constant(intp, _AHEAD))
                    ahead = builder.select(builder.icmp_signed("<", ahead, last_entry), ahead, last_entry)
                    ahead_pixel = builder.sext(load(pixel_t, csr_pixel, ahead), intp)
                    for column in (ir.Constant(intp, 0), last_column):  # a 96-byte row spans two cache lines
                        emit_prefetch(builder, item_pointer(context, builder, q_t, q, [ahead_pixel, column]))
                pixel = builder.sext(load(pixel_t, csr_pixel, e), intp)
                w = broadcast(builder, load(weight_t, csr_weight, e), lanes)
                for total, pointer in zip(totals, blocks_of(q_t, q, pixel)):
                    product = builder.fmul(w, builder.load(pointer, align=4))
                    builder.store(builder.fadd(builder.load(total), product), total)
            for total, pointer in zip(totals, blocks_of(values_t, values, builder.add(p, one))):
                builder.store(builder.load(total), pointer, align=4)
            return context.get_dummy_value()

        return types.void(values, types.intp, q, csr_start, csr_pixel, csr_weight, types.intp, types.boolean), codegen

    return named_intrinsic(gather_block, f"gather_block_{blocks}x{lanes}")


_gather8 = _gather_block(LANES, 1)
_gather_wide = _gather_block(LANES, 3)
_combine8 = _combine_block(LANES, 1)
_blur8 = _blur_block(LANES, 1)
_blur_wide = _blur_block(LANES, 3)


@njit(cache=True, nogil=True)
def mean_field_pass(lo, hi, rows, rows_flat, neg_unary, out, final, pairwise, seq,
                    g_offsets, g_weights, g_norm, g_blurred, g_alpha, g_compat, g_splat,
                    b_offsets, b_weights, b_norm, b_blurred, b_alpha, b_compat, b_splat):
    """Q of pixels lo..hi-1: softmax(-unary - sum over kernels of compat * (slice * norm)).

    rows: (N, W) float32 Q (W = label count padded to LANES), or a (CHUNK, W) scratch when the
    pass splats; rows_flat: the same memory, 1-D (numba's reshape would compile for seconds);
    neg_unary: (N, W) float32 log p, padding 0; out: (N, C) float32, written instead when `final`.
    Without `pairwise`, Q = softmax(-unary), the initial Q. compat = -weight (Potts); the messages
    are subtracted as DenseCRF::inference does. g_splat / b_splat: (M+1, W) lattices
    to splat Q onto, pixel by pixel (pydensecrf's order), or 0-row arrays for none.
    """
    n_labels = out.shape[1]
    width = rows.shape[1]
    wide = width // _WIDE * _WIDE
    full = n_labels // 4 * 4
    g_acc = np.empty((1, width), np.float32)
    b_acc = np.empty((1, width), np.float32)
    tails = np.empty((CHUNK, 4), np.float32)  # expf of the labels after the last 4-float packet
    rows24 = width == 3 * LANES  # 17-24 labels, VOC's 21: whole rows in registers
    minus_max = pairwise and not seq and rows24  # the messages come less their maximum
    for start in range(lo, hi, CHUNK):
        stop = min(hi, start + CHUNK)
        count = stop - start
        first = start if len(rows) == len(neg_unary) else 0
        chunk = rows[first:first + count]
        # Each step is a loop of its own over the chunk's rows, so that each vectorises.
        for r in range(count):
            i = start + r
            if pairwise and seq:
                _slice_seq(g_acc, g_blurred, g_offsets, g_weights, i, g_alpha)
                _slice_seq(b_acc, b_blurred, b_offsets, b_weights, i, b_alpha)
                for col in range(0, width, LANES):
                    _combine8(chunk, r, neg_unary, i, g_acc, g_compat, g_norm[i], b_acc, b_compat, b_norm[i], col)
            elif minus_max:
                # Intrinsics called here, not through an inlined njit helper: numba left an atomic
                # incref and decref of each array argument per call of one (18% of the pass, measured).
                _message_minus_max24(chunk, r, neg_unary, i, 0, g_blurred, g_offsets, g_weights, g_alpha, g_compat,
                                     g_norm[i], b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm[i],
                                     n_labels)
            elif pairwise:
                for col in range(0, wide, _WIDE):
                    _message_wide(chunk, r, neg_unary, i, col, g_blurred, g_offsets, g_weights, g_alpha, g_compat,
                                  g_norm[i], b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm[i], n_labels)
                for col in range(wide, width, LANES):
                    _message8(chunk, r, neg_unary, i, col, g_blurred, g_offsets, g_weights, g_alpha, g_compat,
                              g_norm[i], b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm[i], n_labels)
            else:
                for k in range(width):
                    chunk[r, k] = neg_unary[i, k]
        # Eigen's expAndNormalize: subtract the max, pexp on the labels before the last full
        # 4-float packet, expf on the rest, divide by the sum taken in Eigen's order.
        for r in range(count if not minus_max else 0):
            if rows24:
                _subtract_max24(chunk, r, n_labels)
            else:
                m = _row_max(chunk, r, n_labels)
                for k in range(width):
                    chunk[r, k] = chunk[r, k] - m
        for r in range(count):
            for k in range(full, n_labels):
                tails[r, k - full] = math.exp(chunk[r, k])
        if rows24 and full == 20:
            grouped = count // _SOFTMAX_ROWS * _SOFTMAX_ROWS
            for r in range(0, grouped, _SOFTMAX_ROWS):
                _softmax_rows(chunk, r, tails, n_labels)
            for r in range(grouped, count):
                _softmax_row(chunk, r, tails, n_labels)
        else:
            flat = rows_flat[first * width:(first + count) * width]
            blocked = len(flat) // (4 * LANES) * (4 * LANES)
            for k in range(0, blocked, 4 * LANES):
                _pexp_block(flat, k)
            for k in range(blocked, len(flat)):
                flat[k] = _pexp(flat[k])
            for r in range(count):
                for k in range(full, width):
                    chunk[r, k] = tails[r, k - full] if k < n_labels else np.float32(0)
                s = _eigen_sum(chunk, r, n_labels)
                for k in range(width):
                    chunk[r, k] = chunk[r, k] / s
        if final:
            for r in range(count):  # loops: an array assignment compiles numba's broadcasting (seconds)
                for k in range(n_labels):
                    out[start + r, k] = chunk[r, k]
        elif len(g_splat):
            for r in range(count):  # one lattice at a time: measured faster than interleaved
                for col in range(0, wide, _WIDE):
                    _scatter_wide(g_splat, g_offsets, g_weights, start + r, chunk, r, col)
                for col in range(wide, width, LANES):
                    _scatter8(g_splat, g_offsets, g_weights, start + r, chunk, r, col)
            for r in range(count):
                for col in range(0, wide, _WIDE):
                    _scatter_wide(b_splat, b_offsets, b_weights, start + r, chunk, r, col)
                for col in range(wide, width, LANES):
                    _scatter8(b_splat, b_offsets, b_weights, start + r, chunk, r, col)


@njit(cache=True, nogil=True, inline="always")
def _prefetch_row(values, row):
    """Prefetch values[row] (W floats): its first and last cache line (a 96-byte row spans two)."""
    prefetch(values, row, 0)
    prefetch(values, row, values.shape[1] - 1)


@njit(cache=True, nogil=True)
def _gather(lo, hi, q, csr_start, csr_pixel, csr_weight, values, ahead):
    """values[p+1] = sum over point p's pixels, ascending, of w * Q[pixel], for points lo..hi-1:
    pydensecrf's splat, summed in its order. q: (N, W) float32; values: (M+1, W) float32; ahead:
    prefetch Q's rows."""
    width = values.shape[1]
    wide = width // _WIDE * _WIDE
    for p in range(lo, hi):
        for col in range(0, wide, _WIDE):
            _gather_wide(values, p, q, csr_start, csr_pixel, csr_weight, col, ahead)
        for col in range(wide, width, LANES):
            _gather8(values, p, q, csr_start, csr_pixel, csr_weight, col, ahead)


@njit(cache=True, nogil=True)
def gather_pair(lo, hi, q, split, g_start, g_pixel, g_weight, g_values, b_start, b_pixel, b_weight, b_values,
                ahead):
    """`_gather` of points lo..hi-1 of two lattices numbered one after the other: the first `split`
    are the first lattice's (g), the rest the second's (b)."""
    if lo < split:
        _gather(lo, min(hi, split), q, g_start, g_pixel, g_weight, g_values, ahead)
    if hi > split:
        _gather(max(lo, split) - split, hi - split, q, b_start, b_pixel, b_weight, b_values, ahead)


@njit(cache=True, nogil=True)
def blur_pair(lo, hi, axis, split, g_values, g_blurred, g_neighbours, b_values, b_blurred, b_neighbours, seq,
              g_ahead, b_ahead):
    """`_blur` along `axis` of points lo..hi-1 of two lattices numbered one after the other: the
    first `split` are the first lattice's (g), the rest the second's (b)."""
    if lo < split:
        _blur(lo, min(hi, split), axis, g_values, g_blurred, g_neighbours, seq, g_ahead)
    if hi > split:
        _blur(max(lo, split) - split, hi - split, axis, b_values, b_blurred, b_neighbours, seq, b_ahead)


@njit(cache=True, nogil=True)
def _blur(lo, hi, axis, values, blurred, neighbours, seq, ahead):
    """blurred = v + 0.5 * (v[n1] + v[n2]) along one axis for points lo..hi-1, in float32
    (sseCompute) or with seqCompute's double 0.5. values, blurred: (M+1, W) float32, row 0 zero;
    ahead: prefetch the neighbours' rows."""
    width = values.shape[1]
    m = neighbours.shape[1]
    for p in range(lo, hi):
        if ahead:
            later = min(p + _AHEAD, m - 1)
            _prefetch_row(values, neighbours[axis, later, 0] + 1)
            _prefetch_row(values, neighbours[axis, later, 1] + 1)
        n1 = neighbours[axis, p, 0] + 1
        n2 = neighbours[axis, p, 1] + 1
        if seq:
            for k in range(width):
                blurred[p + 1, k] = np.float32(np.float64(values[p + 1, k])
                                               + 0.5 * np.float64(values[n1, k] + values[n2, k]))
        elif width == _WIDE:  # VOC's rows: one call, no loop over the columns (measured 35% faster)
            _blur_wide(blurred, values, p + 1, n1, n2, 0)
        else:
            wide = width // _WIDE * _WIDE
            for col in range(0, wide, _WIDE):
                _blur_wide(blurred, values, p + 1, n1, n2, col)
            for col in range(wide, width, LANES):
                _blur8(blurred, values, p + 1, n1, n2, col)
