"""From stride-8 scores to per-pixel probabilities and labels.

DeepLab's `fc8_interp` is Caffe's Interp layer with zoom_factor 8: align-corners bilinear
sampling onto ((h-1)*8+1, (w-1)*8+1), so logit i lands exactly on pixel 8*i, then the top-left
H x W crop. Because the zoom is an integer, every output row/column mixes two neighbours with
fixed weights (1 - k/8, k/8), so the whole layer is two small matrix products.

Results computed at a reduced working size go back to the image's size with `resize_probs`
(the whole (C, H, W) map) or, bit for bit the same in bounded memory, with `labels_at_size` /
`label_bands` (labels) and `prob_chunks` (probabilities for a streamed .npz): see the second half.
"""

import functools
from collections.abc import Iterator
from typing import Callable, NamedTuple

import numpy as np


def _interp_matrix(n_in: int, n_out: int, zoom: int) -> np.ndarray:
    """(n_out, n_in) float32 align-corners weights: output j samples input j/zoom."""
    out = np.arange(n_out)
    lower = out // zoom
    frac = (out % zoom) / zoom
    upper = np.minimum(lower + 1, n_in - 1)  # the last input row only ever gets frac == 0
    matrix = np.zeros((n_out, n_in), np.float32)
    matrix[out, lower] = 1.0 - frac
    matrix[out, upper] += frac
    return matrix


def caffe_interp(logits: np.ndarray, height: int, width: int, zoom: int = 8) -> np.ndarray:
    """(C, h, w) float32 stride-8 scores -> (C, height, width) float32.

    Caffe Interp with zoom_factor `zoom` (align-corners bilinear to ((h-1)*zoom+1, (w-1)*zoom+1)),
    then the top-left height x width crop; the uncropped map is never built.
    Raises ValueError if (h-1)*zoom+1 < height (or width), i.e. the logits are too small.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (C, h, w), got shape {logits.shape}")
    if zoom < 1 or height < 1 or width < 1:
        raise ValueError(f"zoom, height and width must be >= 1, got {zoom}, {height}, {width}")
    channels, h, w = logits.shape
    full_h, full_w = (h - 1) * zoom + 1, (w - 1) * zoom + 1
    if full_h < height or full_w < width:
        raise ValueError(
            f"logits {h}x{w} upsample to {full_h}x{full_w} at zoom {zoom}, smaller than {height}x{width}"
        )
    rows = _interp_matrix(h, height, zoom)  # (height, h)
    cols_t = _interp_matrix(w, width, zoom).T  # (w, width)
    # Widen first, as one (C*h, w) x (w, width) GEMM on the small map; the larger second product
    # then contracts over h input rows, cheaper than w for landscape images such as VOC's 48x64.
    flat = logits.astype(np.float32, copy=False).reshape(channels * h, w)
    wide = (flat @ cols_t).reshape(channels, h, width)
    return np.matmul(rows, wide)


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    """Softmax along `axis` (default: classes of a (C, H, W) map), float32, same shape.

    Subtracts the per-pixel maximum first so large logits cannot overflow exp.
    """
    scores = scores.astype(np.float32, copy=False)
    probs = scores - scores.max(axis=axis, keepdims=True)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=axis, keepdims=True)
    return probs


def scores_to_probs(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h', w') float32 stride-8 logits -> (C, h, w) float32 softmax at the working size `size`."""
    return softmax(caffe_interp(logits, *size))


def labels_from_scores(scores: np.ndarray) -> np.ndarray:
    """(C, H, W) scores or probabilities -> (H, W) uint8 class index of the maximum (first on ties)."""
    if scores.ndim != 3 or not 1 <= scores.shape[0] <= 256:
        raise ValueError(f"scores must be (C, H, W) with 1 <= C <= 256, got shape {scores.shape}")
    return scores.argmax(axis=0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# The way back to the image size.
#
# Bilinear interpolation in OpenCV's INTER_LINEAR geometry (half-pixel centres, edges clamped),
# computed by the kernels below rather than by cv2.resize, whose rounding is private and changes
# between OpenCV releases and CPUs (Intel IPP's sampling positions differ from OpenCV's own code).
# Every full-size value is defined by one fixed sequence of float32 operations:
#     above = src[y_lo, x_lo] * wx_lo + src[y_lo, x_hi] * wx_hi
#     below = src[y_hi, x_lo] * wx_lo + src[y_hi, x_hi] * wx_hi
#     value = above * wy_lo + below * wy_hi
# numba compiles the kernels below (on first use: importing this module does not import numba) without
# fast-math, so LLVM neither reorders the operations nor fuses a multiply into an add.
# A value depends on nothing but its own inputs, so the banded functions give the full map's numbers
# bit for bit by construction:
# - `labels_at_size` / `label_bands`: labels_from_scores(resize_probs(probs, H, W)), a band at a time;
# - `prob_chunks`: resize_probs(probs, H, W).astype(dtype), in the order of the .npy layout.
#
# Labels need few values: a pixel's probabilities are bilinear mixes of the four source pixels around
# it (its "cell"), so each class's value lies within that class's min and max over the cell, up to a
# few float32 roundings (`_MARGIN_RELATIVE`). Where one class's minimum beats every other class's
# maximum, that class wins the whole cell without arithmetic; inside segments that is nearly every
# cell. Only pixels of cells where several classes could win (segment borders) are computed.
# ---------------------------------------------------------------------------------------------------

# Target bytes of one band: small next to the image itself (3 bytes/pixel), large enough that the
# per-band overhead (one kernel call) is negligible.
BAND_BYTES = 16 << 20

# Bound on the rounding of the two passes, relative to the largest |value|: each pass rounds two
# products and a sum, and its weights are rounded to float32, at most ~4 float32 ulps (2^-22) in all;
# 2^-18 leaves a factor 16. The absolute term covers float32 subnormals.
_MARGIN_RELATIVE = 2.0 ** -18
_MARGIN_ABSOLUTE = 2.0 ** -120


class Axis(NamedTuple):
    """One axis of a bilinear resize from n_in samples to n_out: sample i mixes source samples lo[i]
    and hi[i] (hi - lo is 0 or 1) with float32 weights w_lo[i] and w_hi[i]."""

    lo: np.ndarray  # (n_out,) int64, nondecreasing
    hi: np.ndarray  # (n_out,) int64
    w_lo: np.ndarray  # (n_out,) float32
    w_hi: np.ndarray  # (n_out,) float32, 0 where hi == lo


@functools.lru_cache(maxsize=32)
def linear_axis(n_in: int, n_out: int) -> Axis:
    """OpenCV's INTER_LINEAR geometry for one axis: output sample i sits at source position
    (i + 0.5) * n_in / n_out - 0.5, clamped to [0, n_in - 1]; cached, as a batch repeats sizes.

    The position is computed in float64 and its fraction rounded once to float32 (OpenCV's own code
    rounds the position to float32 first, IPP differently again).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"axis sizes must be >= 1, got {n_in} -> {n_out}")
    position = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    lo = np.floor(position)
    frac = position - lo
    lo = lo.astype(np.int64)
    clamped = (lo < 0) | (lo >= n_in - 1)
    lo = np.clip(lo, 0, n_in - 1)
    frac[clamped] = 0.0
    hi = np.minimum(lo + 1, n_in - 1)
    axis = Axis(lo, hi, (1.0 - frac).astype(np.float32), frac.astype(np.float32))
    for array in axis:
        array.flags.writeable = False  # shared by every caller through the cache
    return axis


def _resize_band(src, rows_lo, rows_hi, rows_w_lo, rows_w_hi, cols_lo, cols_hi, cols_w_lo, cols_w_hi, y0, out):
    """out (C, r, W) float32 = rows y0 .. y0 + r of the bilinear resize of src (C, h, w) float32.

    Each source row's horizontal pass is computed once per run of output rows that read it.
    """
    channels, count, width = out.shape
    above = np.empty(width, np.float32)
    below = np.empty(width, np.float32)
    for c in range(channels):
        held_lo, held_hi = -1, -1
        for i in range(count):
            y = y0 + i
            if rows_lo[y] != held_lo:
                held_lo = rows_lo[y]
                row = src[c, held_lo]
                for x in range(width):
                    above[x] = row[cols_lo[x]] * cols_w_lo[x] + row[cols_hi[x]] * cols_w_hi[x]
            if rows_hi[y] != held_hi:
                held_hi = rows_hi[y]
                row = src[c, held_hi]
                for x in range(width):
                    below[x] = row[cols_lo[x]] * cols_w_lo[x] + row[cols_hi[x]] * cols_w_hi[x]
            w_lo, w_hi = rows_w_lo[y], rows_w_hi[y]
            for x in range(width):
                out[c, i, x] = above[x] * w_lo + below[x] * w_hi


def _label_band(src, rows_lo, rows_hi, rows_w_lo, rows_w_hi, cols_lo, cols_hi, cols_w_lo, cols_w_hi,
                winner, mixed, candidates, slack, y0, out):
    """out (r, W) uint8 = labels of rows y0 .. y0 + r: the cell's winner where one class wins the whole
    cell, elsewhere the first class of largest value among the cell's candidates (no other class can
    reach it, nor tie), each value computed as `_resize_band` does. src (h, w, C) and candidates
    (hc, wc, C) are class-minor, so that one pixel's classes sit side by side in memory; slack
    (float32): twice the rounding margin.

    Rows that mix the same two source rows form a run, and within a run a column's values lie between
    its two horizontal results (up to rounding): where one class's smaller result beats every other
    class's larger one by the slack, it wins the whole column of the run, with no vertical pass.
    """
    channels = src.shape[2]
    count, width = out.shape
    cell_rows, cell_cols = winner.shape
    above = np.empty(channels, np.float32)
    below = np.empty(channels, np.float32)
    start = 0
    while start < count:
        r_lo, r_hi = rows_lo[y0 + start], rows_hi[y0 + start]
        stop = start + 1
        while stop < count and rows_lo[y0 + stop] == r_lo and rows_hi[y0 + stop] == r_hi:
            stop += 1
        cell_row = min(r_lo, cell_rows - 1)
        for x in range(width):
            cell_col = min(cols_lo[x], cell_cols - 1)
            if not mixed[cell_row, cell_col]:
                for i in range(start, stop):
                    out[i, x] = winner[cell_row, cell_col]
                continue
            c_lo, c_hi = cols_lo[x], cols_hi[x]
            x_lo, x_hi = cols_w_lo[x], cols_w_hi[x]
            sole, sole_low = -1, np.float32(0)
            for c in range(channels):
                if candidates[cell_row, cell_col, c]:
                    above[c] = src[r_lo, c_lo, c] * x_lo + src[r_lo, c_hi, c] * x_hi
                    below[c] = src[r_hi, c_lo, c] * x_lo + src[r_hi, c_hi, c] * x_hi
                    low = min(above[c], below[c])
                    if sole < 0 or low > sole_low:
                        sole, sole_low = c, low
            for c in range(channels):
                if c != sole and candidates[cell_row, cell_col, c] and max(above[c], below[c]) >= sole_low - slack:
                    sole = -1
                    break
            for i in range(start, stop):
                if sole >= 0:
                    out[i, x] = sole
                    continue
                w_lo, w_hi = rows_w_lo[y0 + i], rows_w_hi[y0 + i]
                best_class, best = -1, np.float32(0)
                for c in range(channels):
                    if candidates[cell_row, cell_col, c]:
                        value = above[c] * w_lo + below[c] * w_hi
                        if best_class < 0 or value > best:  # strictly greater: the first class wins ties
                            best_class, best = c, value
                out[i, x] = best_class
        start = stop


@functools.cache
def _compiled(kernel: Callable) -> Callable:
    """`kernel` compiled by numba (cached on disk, see deeplab_cli.jit)."""
    from deeplab_cli.jit import configure_numba

    configure_numba()
    from numba import njit

    return njit(cache=True, nogil=True)(kernel)


def _geometry(h: int, w: int, height: int, width: int) -> tuple[np.ndarray, ...]:
    """The eight arrays of the two axes, in the kernels' argument order."""
    return (*linear_axis(h, height), *linear_axis(w, width))


def resize_probs(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) float32 probabilities -> (C, height, width) float32, bilinear in OpenCV's INTER_LINEAR
    geometry (see above; the same size returns probs as they are).

    Brings results computed at a reduced working size back to the image size. Bilinear weights
    sum to one, so each pixel's probabilities still sum to one up to float rounding: no
    renormalisation. Raises ValueError for bad shapes or non-finite values.
    """
    probs = _checked(probs, height, width)
    if probs.shape[1:] == (height, width):
        return probs
    out = np.empty((probs.shape[0], height, width), np.float32)
    _compiled(_resize_band)(probs, *_geometry(*probs.shape[1:], height, width), 0, out)
    return out


def _checked(probs: np.ndarray, height: int, width: int, contiguous: bool = True) -> np.ndarray:
    """probs as float32, C-contiguous unless not `contiguous`; ValueError for bad shapes or values."""
    if probs.ndim != 3 or not 1 <= probs.shape[0] <= 256:
        raise ValueError(f"probs must be (C, h, w) with 1 <= C <= 256, got shape {probs.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}, {width}")
    probs = np.ascontiguousarray(probs, dtype=np.float32) if contiguous else probs.astype(np.float32, copy=False)
    if not np.isfinite(probs).all():
        raise ValueError("probs must be finite")
    return probs


def _cells(probs: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell (2x2 source pixels; a 1-pixel side stays 1): (winner (hc, wc) uint8, the class whose
    smallest value is largest; mixed (hc, wc) bool, where another class can still win a pixel;
    candidates (C, hc, wc) bool, the classes that can win a pixel of the cell)."""
    low, high = probs, probs
    if probs.shape[1] > 1:
        low, high = np.minimum(low[:, :-1], low[:, 1:]), np.maximum(high[:, :-1], high[:, 1:])
    if probs.shape[2] > 1:
        low, high = np.minimum(low[:, :, :-1], low[:, :, 1:]), np.maximum(high[:, :, :-1], high[:, :, 1:])
    # A class can win a pixel only if its largest possible value reaches the best smallest one.
    floor = low.max(axis=0) - np.float32(2 * margin)
    candidates = high >= floor
    mixed = candidates.sum(axis=0, dtype=np.uint16) > 1
    return low.argmax(axis=0).astype(np.uint8), mixed, candidates


def label_bands(probs: np.ndarray, height: int, width: int,
                band_bytes: int = BAND_BYTES) -> Iterator[tuple[int, np.ndarray]]:
    """(C, h, w) float32 probabilities -> (y0, (r, width) uint8 labels of rows y0..y0+r), top to bottom.

    Concatenated, the bands equal labels_from_scores(resize_probs(probs, height, width)) exactly
    (first class on ties), without building the (C, height, width) map: memory is a band of about
    `band_bytes` labels plus a few (C, h, w) arrays at the working size.
    Raises ValueError for bad shapes or non-finite values.
    """
    if probs.ndim == 3 and probs.shape[1:] == (height, width):  # any memory layout: no copy
        yield 0, labels_from_scores(_checked(probs, height, width, contiguous=False))
        return
    probs = _checked(probs, height, width)
    geometry = _geometry(*probs.shape[1:], height, width)
    margin = _MARGIN_RELATIVE * float(np.abs(probs).max()) + _MARGIN_ABSOLUTE
    winner, mixed, candidates = _cells(probs, margin)
    slack = np.float32(2 * margin)
    class_minor = np.ascontiguousarray(probs.transpose(1, 2, 0))
    candidates = np.ascontiguousarray(candidates.transpose(1, 2, 0))
    per_band = max(1, band_bytes // width)
    label_band = _compiled(_label_band)
    for y0 in range(0, height, per_band):
        band = np.empty((min(per_band, height - y0), width), np.uint8)
        label_band(class_minor, *geometry, winner, mixed, candidates, slack, y0, band)
        yield y0, band


def labels_at_size(probs: np.ndarray, height: int, width: int, band_bytes: int = BAND_BYTES) -> np.ndarray:
    """(C, h, w) float32 probabilities -> (height, width) uint8 labels, exactly
    labels_from_scores(resize_probs(probs, height, width)), in bands (see `label_bands`)."""
    labels = np.empty((height, width), np.uint8)
    for y0, band in label_bands(probs, height, width, band_bytes):
        labels[y0:y0 + band.shape[0]] = band
    return labels


def _to_float16(values: np.ndarray) -> np.ndarray:
    """float32 -> float16 exactly as values.astype(np.float16) (nearest, ties to even), faster.

    numpy converts results in float16's subnormal range (|x| < 2^-14) in software, ~65 ns each against
    ~4 ns for the rest, and probabilities are full of them. Those are round(|x| * 2^24) units of 2^-24
    (1024 of them reach 2^-14, the smallest normal, whose bit pattern is 1024 too): computed here
    with rint (ties to even) and written as bits.
    """
    magnitude = np.abs(values)
    small = (magnitude < np.float32(2.0 ** -14)) & (values != 0)
    if not small.any():
        return values.astype(np.float16)
    half = np.where(small, np.float32(0), values).astype(np.float16)
    units = np.rint(magnitude[small] * np.float32(2.0 ** 24)).astype(np.uint16)
    units |= np.signbit(values[small]).astype(np.uint16) << np.uint16(15)
    half.view(np.uint16)[small] = units
    return half


def prob_chunks(probs: np.ndarray, height: int, width: int, dtype=np.float16,
                band_bytes: int = BAND_BYTES) -> Iterator[np.ndarray]:
    """(C, h, w) float32 probabilities -> resize_probs(probs, height, width).astype(dtype), exactly, as
    a sequence of (r, width) arrays in C order: class 0's rows top to bottom, then class 1's, and so on.

    Concatenated flat they are the (C, height, width) array, which is what a streamed .npy needs
    (`outputs.write_npz_streamed`). Memory is about `band_bytes` of scratch plus the chunk yielded.
    """
    probs = _checked(probs, height, width)
    convert = _to_float16 if np.dtype(dtype) == np.float16 else lambda values: values.astype(dtype)
    if probs.shape[1:] == (height, width):
        for channel in probs:
            yield convert(channel)
        return
    geometry = _geometry(*probs.shape[1:], height, width)
    # Scratch per output element: the float32 value and its conversion.
    step = max(1, min(height, band_bytes // (8 * width)))
    resize_band = _compiled(_resize_band)
    for c in range(probs.shape[0]):
        for y0 in range(0, height, step):
            band = np.empty((1, min(step, height - y0), width), np.float32)
            resize_band(probs[c:c + 1], *geometry, y0, band)
            yield convert(band[0])
