"""The pieces of LLVM IR the kernel set's intrinsics share: pointers into numba arrays, vector
constants, lanes and halves, prefetch hints, and Eigen's polynomial exp on vectors (`emit_pexp`).

Functions named `emit_*`, and the others that take a builder, append IR to that llvmlite builder and
return the values made; they run while numba compiles an intrinsic, not when a kernel runs.
"""

from __future__ import annotations

from deeplab_cli.crf.plain import (
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
)

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic


def item_pointer(context, builder, array_type, array, indices):
    """LLVM pointer to array[indices] (for intrinsics; no wraparound)."""
    view = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer2(context, builder, view.data, cgutils.unpack_tuple(builder, view.shape),
                                     cgutils.unpack_tuple(builder, view.strides), array_type.layout, indices,
                                     wraparound=False)


def vector(lanes):
    """LLVM's <lanes x float>."""
    return ir.VectorType(ir.FloatType(), lanes)


def block_pointer(context, builder, array_type, array, row, col, lanes):
    """LLVM pointer to the `lanes` floats array[row, col:col + lanes] of a 2-D float32 array."""
    view = context.make_array(array_type)(context, builder, array)
    pointer = cgutils.get_item_pointer2(
        context, builder, view.data, cgutils.unpack_tuple(builder, view.shape),
        cgutils.unpack_tuple(builder, view.strides), array_type.layout, [row, col], wraparound=False)
    return builder.bitcast(pointer, vector(lanes).as_pointer())


def shape(context, builder, array_type, array):
    """The LLVM values of a numba array's shape, one per dimension."""
    return cgutils.unpack_tuple(builder, context.make_array(array_type)(context, builder, array).shape)


def named_intrinsic(typer, name):
    """intrinsic(typer) under its own name (factories make several intrinsics of one typer)."""
    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


def broadcast(builder, value, lanes):
    """LLVM IR: a vector of `lanes` copies of the scalar `value` (of any type)."""
    vector_type = ir.VectorType(value.type, lanes)
    first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def half(builder, value, high):
    """The low or high half of an LLVM vector."""
    lanes = value.type.count // 2
    mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), list(range(high * lanes, (high + 1) * lanes)))
    return builder.shuffle_vector(value, ir.Constant(value.type, ir.Undefined), mask)


def lane(builder, value, k):
    """Lane k of an LLVM vector."""
    return builder.extract_element(value, ir.Constant(ir.IntType(32), k))


def emit_max(builder, a, b):
    """LLVM IR: a where a > b, else b (SSE's maxps: b where either is NaN)."""
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


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


def emit_pexp(builder, xs):
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
        return emit_max(builder, a, b)

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
