"""The kernel set's mean-field kernels: label-minor rows padded to a multiple of 8 floats, handled as
whole 8-float vectors by small LLVM intrinsics (no FMA: a multiply, then an add, as SSE2 does; no alias
checks or remainder loops per row). Rows of 24 floats (17-24 labels, VOC's 21) are handled three
vectors at a time: one read of a vertex's offset and weight per slice, and the max, Eigen-order sum and
division of the softmax in registers. Long chains of dependent operations (pexp's polynomial) are
emitted for several rows at once, interleaved: one row's chain alone fills the CPU's schedulers with
operations that wait.
"""

from __future__ import annotations

import math

from deeplab_cli.crf.plain import CHUNK, LANES, _eigen_sum, _pexp, _row_max, _slice_seq
from deeplab_cli.crf.simd.ir import (
    block_pointer,
    broadcast,
    emit_max,
    emit_pexp,
    emit_prefetch,
    half,
    item_pointer,
    lane,
    named_intrinsic,
    prefetch,
    shape,
    vector,
)

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

_WIDE = 3 * LANES  # rows of 17-24 labels (VOC's 21), handled three vectors at a time
_AHEAD = 16  # points (entries) between the blur's (gather's) prefetch of a row and its use


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
            source = [builder.load(block_pointer(context, builder, rows_t, rows, r, at, lanes), align=4)
                      for at in columns]
            with cgutils.for_range(builder, shape(context, builder, offsets_t, offsets)[1]) as loop:
                o = builder.load(item_pointer(context, builder, offsets_t, offsets, [i, loop.index]))
                weight = broadcast(builder, builder.load(item_pointer(context, builder, weights_t, weights,
                                                                       [i, loop.index])), lanes)
                row = builder.add(builder.sext(o, i.type), ir.Constant(i.type, 1))
                for at, value in zip(columns, source):
                    pointer = block_pointer(context, builder, values_t, values, row, at, lanes)
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
    totals = [cgutils.alloca_once_value(builder, ir.Constant(vector(lanes), None)) for _ in range(blocks)]
    columns = [builder.add(col, ir.Constant(col.type, b * lanes)) for b in range(blocks)]
    with cgutils.for_range(builder, shape(context, builder, offsets_t, offsets)[1]) as loop:
        o = builder.load(item_pointer(context, builder, offsets_t, offsets, [i, loop.index]))
        w = builder.load(item_pointer(context, builder, weights_t, weights, [i, loop.index]))
        row = builder.add(builder.sext(o, i.type), ir.Constant(i.type, 1))
        weight = broadcast(builder, builder.fmul(w, alpha), lanes)
        for at, total in zip(columns, totals):
            v = builder.load(block_pointer(context, builder, values_t, values, row, at, lanes), align=4)
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
        unary = builder.load(block_pointer(context, builder, unary_t, neg_unary, i, at, lanes), align=4)
        value = builder.fsub(unary, builder.fmul(g_compat, builder.fmul(g_k, g_norm)))
        values.append(builder.fsub(value, builder.fmul(b_compat, builder.fmul(b_k, b_norm))))
    return values


def _store_blocks(context, builder, rows_t, rows, r, col, values):
    """LLVM IR: rows[r, col:] = the vectors `values`, one after the other."""
    at = col
    for value in values:
        builder.store(value, block_pointer(context, builder, rows_t, rows, r, at, value.type.count), align=4)
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


def _row24(context, builder, rows_type, rows, r):
    """Pointers to the three 8-float blocks of rows[r] (a row of 24 floats)."""
    return [block_pointer(context, builder, rows_type, rows, r, context.get_constant(types.intp, col), LANES)
            for col in (0, LANES, 2 * LANES)]


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
        return emit_max(builder, a, b)

    m = vmax(vmax(v0, v1), v2_labels)
    m = vmax(half(builder, m, 0), half(builder, m, 1))
    m = vmax(half(builder, m, 0), half(builder, m, 1))
    m = vmax(lane(builder, m, 0), lane(builder, m, 1))
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
            exps = emit_pexp(builder, [builder.load(p, align=4) for p in pointers])
            tail_lanes = _emit_label_lanes24(builder, n_labels)
            zero = ir.Constant(vector(LANES), [0.0] * LANES)
            for k, row in enumerate(at):
                v0, v1, v2 = exps[3 * k:3 * k + 3]
                # Lanes 4-7 of v2 from the tails, 0 past the labels (kept in registers: no reload of stores).
                tail = builder.load(block_pointer(context, builder, signature.args[2], tails, row,
                                                   context.get_constant(types.intp, 0), 4), align=4)
                spread = builder.shuffle_vector(tail, ir.Constant(tail.type, ir.Undefined), ir.Constant(
                    ir.VectorType(ir.IntType(32), LANES), [0] * 4 + [0, 1, 2, 3]))
                spread = builder.select(tail_lanes, spread, zero)
                v2 = builder.select(ir.Constant(ir.VectorType(ir.IntType(1), LANES), [1] * 4 + [0] * 4), v2, spread)
                ab = builder.fadd(v0, v1)
                a = builder.fadd(half(builder, ab, 0), half(builder, ab, 1))
                a = builder.fadd(a, half(builder, v2, 0))
                total = builder.fadd(builder.fadd(lane(builder, a, 0), lane(builder, a, 2)),
                                     builder.fadd(lane(builder, a, 1), lane(builder, a, 3)))
                for j in range(4, 7):  # labels 20-22, where present (label 23 would make 24: another order)
                    present = builder.icmp_signed(">", n_labels, ir.Constant(n_labels.type, 16 + j))
                    total = builder.select(present, builder.fadd(total, lane(builder, v2, j)), total)
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
                                            vector(LANES).as_pointer()))
        for pointer, v in zip(pointers, emit_pexp(builder, [builder.load(p, align=4) for p in pointers])):
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
                own, left, right = (builder.load(block_pointer(context, builder, values_t, values, row, at, lanes),
                                                 align=4) for row in (p, n1, n2))
                result = builder.fadd(own, builder.fmul(half, builder.fadd(left, right)))
                builder.store(result, block_pointer(context, builder, blurred_t, blurred, p, at, lanes), align=4)
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
                return [builder.load(block_pointer(context, builder, acc_t, acc, zero,
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
                return [block_pointer(context, builder, array_t, array, row,
                                       builder.add(col, ir.Constant(intp, b * lanes)), lanes) for b in range(blocks)]

            totals = [cgutils.alloca_once_value(builder, ir.Constant(vector(lanes), None)) for _ in range(blocks)]
            begin = builder.sext(load(start_t, csr_start, p), intp)
            end = builder.sext(load(start_t, csr_start, builder.add(p, one)), intp)
            last_entry = builder.sub(shape(context, builder, pixel_t, csr_pixel)[0], one)
            last_column = builder.sub(shape(context, builder, q_t, q)[1], one)
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
    g_acc = np.empty((1, width), np.float32)
    b_acc = np.empty((1, width), np.float32)
    tails = np.empty((CHUNK, 4), np.float32)  # expf of the labels after the last 4-float packet
    minus_max = pairwise and not seq and width == _WIDE  # the messages come less their maximum
    for start in range(lo, hi, CHUNK):
        count = min(hi, start + CHUNK) - start
        first = start if len(rows) == len(neg_unary) else 0
        chunk = rows[first:first + count]
        # Each step is a loop of its own over the chunk's rows, so that each vectorises. The helpers
        # take whole chunks: an inlined njit helper costs an atomic incref and decref of each array
        # argument per call (per row, 18% of the pass, measured).
        if pairwise and seq:
            _combine_rows(chunk, count, start, neg_unary, g_acc, g_blurred, g_offsets, g_weights, g_alpha, g_compat,
                          g_norm, b_acc, b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm)
        elif minus_max:
            for r in range(count):
                i = start + r
                _message_minus_max24(chunk, r, neg_unary, i, 0, g_blurred, g_offsets, g_weights, g_alpha, g_compat,
                                     g_norm[i], b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm[i],
                                     n_labels)
        elif pairwise:
            _message_rows(chunk, count, start, neg_unary, g_blurred, g_offsets, g_weights, g_alpha, g_compat, g_norm,
                          b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm, n_labels)
        else:
            for r in range(count):
                for k in range(width):
                    chunk[r, k] = neg_unary[start + r, k]
        _softmax_chunk(chunk, count, rows_flat, first, tails, n_labels, minus_max)
        if final:
            for r in range(count):  # loops: an array assignment compiles numba's broadcasting (seconds)
                for k in range(n_labels):
                    out[start + r, k] = chunk[r, k]
        elif len(g_splat):  # one lattice at a time: measured faster than interleaved
            _scatter_rows(g_splat, g_offsets, g_weights, start, chunk, count)
            _scatter_rows(b_splat, b_offsets, b_weights, start, chunk, count)


@njit(cache=True, nogil=True, inline="always")
def _combine_rows(chunk, count, start, neg_unary, g_acc, g_blurred, g_offsets, g_weights, g_alpha, g_compat, g_norm,
                  b_acc, b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm):
    """chunk[r] = the messages of pixel start + r, r < count, from both kernels' seqCompute slices
    (`_slice_seq`, into the (1, W) scratch rows g_acc and b_acc)."""
    for r in range(count):
        i = start + r
        _slice_seq(g_acc, g_blurred, g_offsets, g_weights, i, g_alpha)
        _slice_seq(b_acc, b_blurred, b_offsets, b_weights, i, b_alpha)
        for col in range(0, chunk.shape[1], LANES):
            _combine8(chunk, r, neg_unary, i, g_acc, g_compat, g_norm[i], b_acc, b_compat, b_norm[i], col)


@njit(cache=True, nogil=True, inline="always")
def _message_rows(chunk, count, start, neg_unary, g_blurred, g_offsets, g_weights, g_alpha, g_compat, g_norm,
                  b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm, n_labels):
    """chunk[r] = the messages of pixel start + r, r < count, from both kernels' slices (sseCompute's),
    24 floats at a time, then 8."""
    width = chunk.shape[1]
    wide = width // _WIDE * _WIDE
    for r in range(count):
        i = start + r
        for col in range(0, wide, _WIDE):
            _message_wide(chunk, r, neg_unary, i, col, g_blurred, g_offsets, g_weights, g_alpha, g_compat,
                          g_norm[i], b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm[i], n_labels)
        for col in range(wide, width, LANES):
            _message8(chunk, r, neg_unary, i, col, g_blurred, g_offsets, g_weights, g_alpha, g_compat,
                      g_norm[i], b_blurred, b_offsets, b_weights, b_alpha, b_compat, b_norm[i], n_labels)


@njit(cache=True, nogil=True, inline="always")
def _softmax_chunk(chunk, count, rows_flat, first, tails, n_labels, minus_max):
    """chunk[:count] = Eigen's expAndNormalize of each row: subtract the max (unless `minus_max`: the
    rows come less it), pexp on the labels before the last full 4-float packet, expf on the rest
    (into `tails`, (CHUNK, 4)), divide by the sum taken in Eigen's order. rows_flat: the memory of
    the rows chunk is a slice of, from its row `first`, 1-D."""
    width = chunk.shape[1]
    rows24 = width == _WIDE  # 17-24 labels, VOC's 21: whole rows in registers
    full = n_labels // 4 * 4
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


@njit(cache=True, nogil=True, inline="always")
def _scatter_rows(splat, offsets, weights, start, chunk, count):
    """Splat chunk[:count], the Q of pixels start.., onto the (M+1, W) lattice `splat`, pixel by pixel
    (pydensecrf's order)."""
    width = chunk.shape[1]
    wide = width // _WIDE * _WIDE
    for r in range(count):
        for col in range(0, wide, _WIDE):
            _scatter_wide(splat, offsets, weights, start + r, chunk, r, col)
        for col in range(wide, width, LANES):
            _scatter8(splat, offsets, weights, start + r, chunk, r, col)


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
