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
from dataclasses import dataclass

import cv2
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


def labels_from_scores(scores: np.ndarray) -> np.ndarray:
    """(C, H, W) scores or probabilities -> (H, W) uint8 class index of the maximum (first on ties)."""
    if scores.ndim != 3 or not 1 <= scores.shape[0] <= 256:
        raise ValueError(f"scores must be (C, H, W) with 1 <= C <= 256, got shape {scores.shape}")
    return scores.argmax(axis=0).astype(np.uint8)


def resize_probs(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) float32 probabilities -> (C, height, width) float32, bilinear (cv2 INTER_LINEAR).

    Brings results computed at a reduced working size back to the image size. Bilinear weights
    sum to one, so each pixel's probabilities still sum to one up to float rounding: no
    renormalisation.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, h, w), got shape {probs.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}, {width}")
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    if probs.shape[1:] == (height, width):
        return probs
    # Channel by channel into one buffer: faster than one (H, W, C) call, and cv2's path for more
    # than 4 channels is less precise (errors ~4e-6 against ~1e-7 per channel).
    out = np.empty((probs.shape[0], height, width), np.float32)
    for channel, resized in zip(probs, out):
        cv2.resize(channel, (width, height), dst=resized, interpolation=cv2.INTER_LINEAR)
    return out


# ---------------------------------------------------------------------------------------------------
# The way back to the image size in bands of rows.
#
# `resize_probs` holds (C, H, W) float32 at once: 2 GB for a 24 MP photo, 31 GiB for a 20000x20000
# scan. The functions below give the same numbers, bit for bit, a band of rows at a time:
# - `labels_at_size` / `label_bands`: labels_from_scores(resize_probs(probs, H, W)).
# - `prob_chunks`: resize_probs(probs, H, W).astype(dtype), in the order of the .npy layout.
#
# How cv2.resize(INTER_LINEAR) computes, measured rather than assumed (opencv-python 5.0 on x86-64
# hands float32 resizes to Intel IPP, whose sampling positions differ from OpenCV's own formula by
# up to 1.5e-5 of a pixel):
# - it is separable, horizontal pass first: resize(src, (W, H)) == resize(resize(src, (W, h)), (W, H))
#   bit for bit, and rows are independent in the horizontal pass, so that pass is cv2's own on the
#   few source rows a band needs;
# - the vertical pass mixes two rows lo, hi = lo or lo + 1 with per-row float32 weights. Those are
#   read back from cv2 with a small probe image (`_probe_axis`), and its arithmetic is one of three
#   forms (IPP: fma(B - A, w_hi, A); OpenCV's own code: A * w_lo + B * w_hi, or fma(A, w_lo, B * w_hi)
#   where its SIMD has FMA), chosen by checking each against cv2 on test rows (`_plan`). numpy has
#   no FMA: `_fma32` emulates it exactly in float64.
# Where no form reproduces cv2 exactly (measured: only 1-pixel-wide or -high working maps, which IPP
# declines; other OpenCV builds may differ), labels come from cv2's own vertical pass over column
# slices (`_label_bands_by_columns`) and probabilities from one full-size class at a time: still
# exact, with more memory.
#
# Labels need few exact values: a pixel's probabilities are bilinear mixes of the four source pixels
# around it (its "cell"), so each class's value lies within that class's min and max over the cell
# (up to a few float32 roundings, `_MARGIN_RELATIVE`). Where one class's minimum beats every other class's
# maximum, that class wins the whole cell without computing anything; inside segments that is
# nearly every cell. Only cells where several classes could win (segment borders) are computed
# exactly, for the classes that could win there.
# ---------------------------------------------------------------------------------------------------

# Target bytes of one band's working arrays: small enough to stay in cache-friendly pieces and
# never to matter next to the image itself (3 bytes/pixel), large enough that per-band overheads
# (one cv2 call, some numpy calls) are negligible; 8-32 MiB all measured within a few percent.
BAND_BYTES = 16 << 20

# Bound on the rounding of the two passes, relative to the largest |value|: each pass rounds a
# product, a sum and (for the plain form) a weight 1 - f, at most ~4 float32 ulps (2^-22) in all;
# 2^-18 leaves a factor 16. The absolute term covers float32 subnormals.
_MARGIN_RELATIVE = 2.0 ** -18
_MARGIN_ABSOLUTE = 2.0 ** -120

_FORMS = ("lerp_fma", "fma", "plain")
_NEVER = np.float32(-1e30)  # pads candidate lists: below any probability, and finite so 0 * it is 0


@dataclass(frozen=True)
class _Axis:
    """How cv2.resize(INTER_LINEAR) fills one axis of n_out samples from n_in: sample i mixes
    source samples lo[i] and hi[i] (hi - lo is 0 or 1) with float32 weights w_lo[i], w_hi[i]."""

    lo: np.ndarray  # (n_out,) int64, nondecreasing
    hi: np.ndarray  # (n_out,) int64
    w_lo: np.ndarray  # (n_out,) float32
    w_hi: np.ndarray  # (n_out,) float32, 0 where hi == lo


@dataclass(frozen=True)
class _Plan:
    rows: _Axis | None
    cols: _Axis | None
    form: str | None  # how the vertical pass rounds (see _FORMS); None: no form reproduces cv2


def _fma32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float32 x * y + z rounded once (a fused multiply-add), broadcasting; x, y, z float32.

    The float64 product of two float32 is exact, and the float64 sum's rounding matters only where it
    lands exactly halfway between two float32 (or among float32 subnormals): those few are redone
    with round-to-odd, which makes the final float32 rounding correct.
    """
    p = np.multiply(x, y, dtype=np.float64)
    s = np.add(p, z, dtype=np.float64)
    out = s.astype(np.float32)
    bits = s.view(np.uint64)
    suspect = (bits & 0x1FFFFFFF) == 0x10000000  # the 29 bits float32 drops are exactly one half
    suspect |= np.abs(s) < 2.0 ** -126
    if suspect.any():
        ps = np.broadcast_to(p, s.shape)[suspect]
        zs = np.broadcast_to(np.asarray(z, np.float64), s.shape)[suspect]
        ss = ps + zs
        # TwoSum: err is exactly (ps + zs) - ss.
        bb = ss - ps
        err = (ps - (ss - bb)) + (zs - bb)
        even = (ss.view(np.uint64) & 1) == 0
        nudge = (err != 0) & even
        ss[nudge] = np.nextafter(ss[nudge], np.where(err[nudge] > 0, np.inf, -np.inf))
        out[suspect] = ss.astype(np.float32)
    return out


def _mix(a: np.ndarray, b: np.ndarray, w_lo: np.ndarray, w_hi: np.ndarray, form: str) -> np.ndarray:
    """One bilinear pass in cv2's arithmetic `form`: a, b float32 source samples, weights broadcast."""
    if form == "lerp_fma":
        return _fma32(b - a, w_hi, a)
    if form == "fma":
        return _fma32(a, w_lo, b * w_hi)
    return a * w_lo + b * w_hi


def _probe_axis(n_in: int, n_out: int) -> _Axis:
    """Read lo, hi and the weights of cv2's vertical pass n_in -> n_out rows from a 4-column probe:
    three columns mark the source rows by index mod 3, one holds the index itself."""
    index = np.arange(n_in)
    probe = np.zeros((n_in, 4), np.float32)
    probe[index, index % 3] = 1.0
    probe[:, 3] = index
    out = cv2.resize(probe, (4, n_out), interpolation=cv2.INTER_LINEAR)
    marked = out[:, :3] != 0
    count = marked.sum(axis=1)
    if not np.all((count == 1) | (count == 2)):
        raise _Unexpected("a probe row mixes other than one or two source rows")
    # The residue of lo: the only marked one, or the one whose successor mod 3 is marked too.
    successor = marked[:, [1, 2, 0]]
    residue = np.where(count == 1, marked.argmax(axis=1), (marked & successor).argmax(axis=1))
    near = np.floor(out[:, 3]).astype(np.int64)[:, None] + np.array([-1, 0, 1])
    lo = near[(near % 3) == residue[:, None]]
    hi = lo + (count == 2)
    if lo.shape != (n_out,) or lo.min() < 0 or hi.max() >= n_in or np.any(np.diff(lo) < 0):
        raise _Unexpected("probe gives source rows out of order or range")
    rows = np.arange(n_out)
    w_lo = out[rows, lo % 3]
    w_hi = np.where(count == 2, out[rows, hi % 3], np.float32(0)).astype(np.float32)
    return _Axis(lo, hi, w_lo, w_hi)


class _Unexpected(Exception):
    """cv2.resize does not behave as this module measured; the exact fallbacks take over."""


def _test_rows(n_in: int, columns: int, seed: int) -> np.ndarray:
    """(n_in, columns) float32 to check a form on: uniform values, with columns of zeros, ones, a few
    repeated values and subnormals where there are enough columns."""
    rng = np.random.default_rng(seed)
    rows = rng.random((n_in, columns), dtype=np.float32)
    special = [np.zeros(n_in, np.float32), np.ones(n_in, np.float32),
               rng.random(n_in, dtype=np.float32) * np.float32(2.0 ** -130),
               rng.choice(np.array([0.25, 0.5, 1.0], np.float32), n_in),
               rng.random(n_in, dtype=np.float32) * np.float32(1e-30),
               # Alternating 1 and 1e-9: fma(B - A, 1, A) is 0 there, not B, which tells the readings apart.
               np.where(np.arange(n_in) % 2 == 0, np.float32(1.0), np.float32(1e-9)).astype(np.float32)]
    for column, values in zip(range(2, columns), special):  # columns 0 and 1 stay uniform
        rows[:, column] = values
    return rows


@functools.lru_cache(maxsize=16)
def _plan(h: int, w: int, height: int, width: int) -> _Plan:
    """The measured plan for resizing (h, w) to (height, width); cached, as a batch repeats sizes.

    Checks cost a few cv2 calls on narrow test images (well under a millisecond per 1000 rows).
    """
    try:
        rows = _probe_axis(h, height)
        cols = _probe_axis(w, width)
    except _Unexpected:
        return _Plan(None, None, None)
    # The whole resize on a narrow image of the same heights: cv2's horizontal pass then the
    # emulated vertical one must give it bit for bit. Its width keeps the real one's remainder mod
    # 64, so cv2's SIMD loops end in the same scalar tail, and is the real one up to 128 (so that a
    # 1-column image, which IPP declines, takes OpenCV's own code here as it does there).
    narrow_out = width if width <= 128 else 64 + width % 64
    narrow_in = w if w <= 128 else max(2, round(w * narrow_out / width))
    # A probe row that shows one source row with weight 1 may also be a mix of the row above it
    # with weight exactly 1, which IPP's fma(B - A, 1, A) makes differ from B in the last bit: each
    # such row takes the reading that reproduces cv2. Tiny images get several test images, so that
    # some thousand values are checked.
    alone = np.flatnonzero((rows.hi == rows.lo) & (rows.lo > 0))
    above = _Axis(rows.lo.copy(), rows.hi.copy(), rows.w_lo.copy(), rows.w_hi.copy())
    above.lo[alone] -= 1
    above.w_lo[alone], above.w_hi[alone] = 0.0, 1.0
    fits = {f: (np.ones(height, bool), np.ones(height, bool)) for f in _FORMS}
    for seed in range(min(64, max(1, 4096 // (h * narrow_in)))):
        test = _test_rows(h, narrow_in, seed=(h * 7919 + height) * 64 + seed)
        expected = cv2.resize(test, (narrow_out, height), interpolation=cv2.INTER_LINEAR)
        across = cv2.resize(test, (narrow_out, h), interpolation=cv2.INTER_LINEAR)
        for f, (as_probed, as_above) in fits.items():
            for reading, fit in ((rows, as_probed), (above, as_above)):
                mixed = _mix(across[reading.lo], across[reading.hi], reading.w_lo[:, None], reading.w_hi[:, None], f)
                fit &= (mixed == expected).all(axis=1)
    form = next((f for f in _FORMS if np.all(fits[f][0] | fits[f][1])), None)
    if form is not None:
        switch = ~fits[form][0]  # only rows in `alone` can fit `above` and not `rows`
        rows = _Axis(*(np.where(switch, b, a) for a, b in
                       zip((rows.lo, rows.hi, rows.w_lo, rows.w_hi), (above.lo, above.hi, above.w_lo, above.w_hi))))
    # The cells need the horizontal pass's lo/hi right: check them on a few rows at the real width.
    test = _test_rows(w, 5, seed=w * 7919 + width).T.copy()
    expected = cv2.resize(test, (width, 5), interpolation=cv2.INTER_LINEAR)
    if not any(np.array_equal(_mix(test[:, cols.lo], test[:, cols.hi], cols.w_lo, cols.w_hi, f), expected)
               for f in _FORMS):
        form = None
    return _Plan(rows, cols, form)


def banding_is_exact(probs_hw: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether the fast banded path reproduces cv2 for this size pair on this OpenCV build (the
    fallbacks are exact too, with more memory); for tests and diagnostics."""
    return _plan(*probs_hw, *size).form is not None


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


def _horizontal(probs: np.ndarray, width: int) -> np.ndarray:
    """(K, k, w) float32 -> (K, k, width): cv2's horizontal pass, every row in one call."""
    k_classes, k, w = probs.shape
    flat = np.ascontiguousarray(probs).reshape(k_classes * k, w)
    return cv2.resize(flat, (width, k_classes * k), interpolation=cv2.INTER_LINEAR).reshape(k_classes, k, width)


def _cells(probs: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell (2x2 source pixels; a 1-pixel side stays 1): (winner (hc, wc) uint8 where a single
    class can win, mixed (hc, wc) bool where several can, candidates (C, hc, wc) bool)."""
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
    (bilinear cv2 INTER_LINEAR, first class on ties), without building the (C, height, width) map:
    memory is about `band_bytes` plus the band itself, plus a few (C, h, w) arrays at the working
    size. A 6000x4000 photo from a 513x342 map takes ~0.15 s and ~60 MB, a 20000x20000 scan ~0.7 s
    and its 400 MB of labels (benchmarks/bigimage.py). Where the fast path cannot reproduce cv2
    (`banding_is_exact`), one band holds the whole map, computed by cv2 over column slices.
    Raises ValueError for bad shapes or non-finite values.
    """
    if probs.ndim == 3 and probs.shape[1:] == (height, width):  # any memory layout: no copy
        yield 0, labels_from_scores(_checked(probs, height, width, contiguous=False))
        return
    probs = _checked(probs, height, width)
    channels, h, w = probs.shape
    plan = _plan(h, w, height, width)
    if plan.form is None:
        yield from _label_bands_by_columns(probs, height, width, band_bytes)
        return
    rows, cols = plan.rows, plan.cols
    margin = _MARGIN_RELATIVE * float(np.abs(probs).max()) + _MARGIN_ABSOLUTE
    winner, mixed, candidates = _cells(probs, margin)
    cell_rows, cell_cols = winner.shape
    cell_of_row = np.minimum(rows.lo, cell_rows - 1)
    cell_of_col = np.minimum(cols.lo, cell_cols - 1)
    # Cell rows per band: the exact values need (classes, source rows, width) float32 from cv2.
    per_band = max(1, band_bytes // (channels * width * 4) - 1)
    for first in range(0, cell_rows, per_band):
        last = min(cell_rows, first + per_band)
        y0, y1 = np.searchsorted(cell_of_row, [first, last])
        if y0 == y1:
            continue  # downscaling: no output row falls in these cells
        band = np.take(winner[first:last], cell_of_col, axis=1)[cell_of_row[y0:y1] - first]
        band_mixed = np.take(mixed[first:last], cell_of_col, axis=1)
        if band_mixed.any():
            _settle_mixed(probs, plan, band, band_mixed, candidates[:, first:last], mixed[first:last],
                          first, y0, y1, cell_of_row, margin)
        yield int(y0), band


def _settle_mixed(probs, plan: _Plan, band, band_mixed, candidates, mixed, first: int, y0: int, y1: int,
                  cell_of_row, margin: float) -> None:
    """Compute the labels of `band` (rows y0..y1) in cells where several classes can win, exactly.

    Three sieves, each cheaper than the next one's work: per output column of a run of rows sharing
    two source rows, the bounds of cv2's horizontal results (one class can still win the whole
    column); per pixel, plain float32 values (a clear winner stands); and only near-ties get the
    exact arithmetic of cv2's vertical pass.
    """
    rows, form = plan.rows, plan.form
    width = band.shape[1]
    classes = np.flatnonzero(candidates[:, mixed].any(axis=1))
    r0, r1 = int(rows.lo[y0]), int(rows.hi[y0:y1].max()) + 1
    if r1 - r0 < 2 <= probs.shape[1]:
        r0, r1 = max(0, r1 - 2), max(r1, 2)  # the same cv2 code path as a many-row call
    values = _horizontal(probs[classes, r0:r1], width)  # (K, k, width), bit for bit cv2's rows
    lo, hi = rows.lo[y0:y1], rows.hi[y0:y1]
    starts = np.flatnonzero(np.r_[True, (np.diff(lo) != 0) | (np.diff(hi) != 0)])
    for start, stop in zip(starts, np.r_[starts[1:], y1 - y0]):
        cell = int(cell_of_row[y0 + start]) - first
        columns = np.flatnonzero(band_mixed[cell])
        if columns.size == 0:
            continue
        mine = np.flatnonzero(candidates[:, cell, mixed[cell]].any(axis=1)[classes])
        above = values[mine, int(lo[start]) - r0][:, columns]  # (K, X): cv2's row lo at these columns
        below = values[mine, int(hi[start]) - r0][:, columns]
        # Sieve 1: every pixel of the column lies between `above` and `below`.
        low = np.minimum(above, below)
        can = np.maximum(above, below) >= low.max(axis=0) - np.float32(2 * margin)
        single = can.sum(axis=0) == 1
        band[start:stop, columns[single]] = classes[mine[low[:, single].argmax(axis=0)]]
        if single.all():
            continue
        keep = ~single
        columns, can = columns[keep], can[:, keep]
        # Per column, its candidates in class order, padded with a value no probability reaches:
        # the per-pixel work then runs over the few classes that can win there, not all of them.
        rank = np.cumsum(can, axis=0, dtype=np.int32) - 1
        kind, column = np.nonzero(can)
        slot = rank[kind, column]
        order = np.zeros((int(rank[-1].max()) + 1, columns.size), np.intp)
        valid = np.zeros(order.shape, bool)
        order[slot, column], valid[slot, column] = kind, True
        spread = np.arange(columns.size)
        above = np.where(valid, above[:, keep][order, spread], _NEVER)
        below = np.where(valid, below[:, keep][order, spread], _NEVER)
        labels_of = classes[mine][order]  # (K, X)
        w_lo = rows.w_lo[y0 + start:y0 + stop, None]
        w_hi = rows.w_hi[y0 + start:y0 + stop, None]
        step = max(1, (1 << 20) // (len(order) * (stop - start)))  # ~4 MB of float32 values
        for c0 in range(0, columns.size, step):
            part = slice(c0, c0 + step)
            a, b = above[:, None, part], below[:, None, part]
            # Sieve 2: float32 values within a few ulps of cv2's (`_mix` "plain"), class by class.
            rough = _mix(a, b, w_lo, w_hi, "plain")  # (K, Y, X)
            top, pick = rough[0].copy(), np.zeros(rough.shape[1:], np.uint8)
            for k in range(1, len(rough)):
                np.copyto(pick, k, where=rough[k] > top)
                np.maximum(top, rough[k], out=top)
            top -= np.float32(2 * margin)
            rivals = np.zeros(rough.shape[1:], np.uint8)
            for k in range(len(rough)):
                rivals += rough[k] >= top
            near = rivals > 1
            if near.any():
                # Sieve 3: the exact values, for near-ties only; argmax keeps the first class on ties.
                ys, xs = np.nonzero(near)
                exact = _mix(a[:, 0, xs], b[:, 0, xs], w_lo[ys, 0], w_hi[ys, 0], form)
                pick[ys, xs] = exact.argmax(axis=0)
            winner = np.take_along_axis(labels_of[:, part], pick, axis=0)
            band[start:stop, columns[part]] = winner


def labels_at_size(probs: np.ndarray, height: int, width: int, band_bytes: int = BAND_BYTES) -> np.ndarray:
    """(C, h, w) float32 probabilities -> (height, width) uint8 labels, exactly
    labels_from_scores(resize_probs(probs, height, width)), in bands (see `label_bands`)."""
    labels = np.empty((height, width), np.uint8)
    for y0, band in label_bands(probs, height, width, band_bytes):
        labels[y0:y0 + band.shape[0]] = band
    return labels


def _label_bands_by_columns(probs: np.ndarray, height: int, width: int,
                            band_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """The exact fallback: cv2's horizontal pass of every class kept whole ((C, h, width) float32),
    then cv2's vertical pass on slices of columns, which it computes independently."""
    channels = probs.shape[0]
    across = _horizontal(probs, width)
    labels = np.empty((height, width), np.uint8)
    # Slices at least 64 wide (the last one overlaps the one before): cv2 sends a 1-column image
    # to other code than a wide one.
    step = min(width, max(64, band_bytes // (8 * height)))
    for x0 in range(0, width, step):
        x0 = min(x0, width - step)
        x1 = x0 + step
        best = winner = None
        for c in range(channels):
            value = cv2.resize(np.ascontiguousarray(across[c, :, x0:x1]), (x1 - x0, height),
                               interpolation=cv2.INTER_LINEAR)
            if best is None:
                best, winner = value, np.zeros(value.shape, np.uint8)
            else:
                better = value > best
                np.copyto(best, value, where=better)
                winner[better] = c
        labels[:, x0:x1] = winner
    yield 0, labels


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


def _rows_exact(a: np.ndarray, b: np.ndarray, w_lo: np.ndarray, w_hi: np.ndarray, form: str,
                out: np.ndarray, wide: np.ndarray, bits: np.ndarray, suspect: np.ndarray) -> None:
    """out (r, W) float32 = `_mix` of source rows a, b (W,) float32 with weights (r, 1), bit for bit,
    through preallocated float64, uint64 and bool scratch of out's shape: the dense path of
    `prob_chunks`, where fresh temporaries would cost more than the arithmetic.

    As in `_fma32`, the float64 sum is rounded to float32 once more; only values where that second
    rounding can go wrong (exact float32 midpoints, and results among float32 subnormals) are redone.
    """
    if form == "plain":
        np.multiply(a, w_lo, out=out)
        np.multiply(b, w_hi, out=wide, dtype=np.float32)  # float32 products, held in float64
        np.add(out, wide, out=out, casting="same_kind")
        return
    if form == "lerp_fma":
        x, y, z = b - a, w_hi, a
    else:
        x, y, z = a, w_lo, b * w_hi  # z: (r, W)
    np.multiply(x, y, out=wide, dtype=np.float64)  # exact
    np.add(wide, z, out=wide)
    np.copyto(out, wide, casting="same_kind")
    np.bitwise_and(wide.view(np.uint64), np.uint64(0x1FFFFFFF), out=bits)
    np.equal(bits, np.uint64(0x10000000), out=suspect)
    # Subnormal results need both sources tiny (or of opposite signs): look only in those columns.
    small = np.minimum(np.abs(a), np.abs(b))
    tiny = np.flatnonzero(((small < 2.0 ** -125) | (np.sign(a) * np.sign(b) < 0)) & ((a != 0) | (b != 0)))
    if tiny.size:
        values = np.abs(wide[:, tiny])
        suspect[:, tiny] |= (values < 2.0 ** -126) & (values != 0)
    if suspect.any():
        ys, xs = np.nonzero(suspect)
        zs = z[xs] if z.ndim == 1 else z[ys, xs]
        out[ys, xs] = _fma32(x[xs], y[ys, 0], zs)


def prob_chunks(probs: np.ndarray, height: int, width: int, dtype=np.float16,
                band_bytes: int = BAND_BYTES) -> Iterator[np.ndarray]:
    """(C, h, w) float32 probabilities -> resize_probs(probs, height, width).astype(dtype), exactly, as
    a sequence of (r, width) arrays in C order: class 0's rows top to bottom, then class 1's, and so on.

    Concatenated flat they are the (C, height, width) array, which is what a streamed .npy needs
    (`outputs.write_npz_streamed`). Memory is about `band_bytes` of scratch plus the chunk yielded.
    """
    probs = _checked(probs, height, width)
    channels, h, w = probs.shape
    convert = _to_float16 if np.dtype(dtype) == np.float16 else lambda values: values.astype(dtype)
    if (h, w) == (height, width):
        for channel in probs:
            yield convert(channel)
        return
    plan = _plan(h, w, height, width)
    if plan.form is None:
        # The exact fallback: one class at full size at a time (1/C of resize_probs).
        for channel in probs:
            yield convert(cv2.resize(channel, (width, height), interpolation=cv2.INTER_LINEAR))
        return
    rows = plan.rows
    # Scratch per output element: float32 result, float64 sum, uint64 bits, bool flag: 21 bytes.
    step = max(1, min(height, band_bytes // (21 * width)))
    out32 = np.empty((step, width), np.float32)
    wide = np.empty((step, width), np.float64)
    bits = np.empty((step, width), np.uint64)
    suspect = np.empty((step, width), bool)
    # Runs of output rows that share their two source rows: their values differ only by the weight.
    changes = np.flatnonzero((np.diff(rows.lo) != 0) | (np.diff(rows.hi) != 0)) + 1
    for channel in probs:
        for y0 in range(0, height, step):
            y1 = min(height, y0 + step)
            r0, r1 = int(rows.lo[y0]), int(rows.hi[y0:y1].max()) + 1
            if r1 - r0 < 2 <= h:
                r0, r1 = max(0, r1 - 2), max(r1, 2)  # the same cv2 code path as a many-row call
            across = _horizontal(channel[None, r0:r1], width)[0]
            cuts = [y0, *changes[(changes > y0) & (changes < y1)], y1]
            for start, stop in zip(cuts[:-1], cuts[1:]):
                part = slice(start - y0, stop - y0)
                _rows_exact(across[rows.lo[start] - r0], across[rows.hi[start] - r0],
                            rows.w_lo[start:stop, None], rows.w_hi[start:stop, None], plan.form,
                            out32[part], wide[part], bits[part], suspect[part])
            yield convert(out32[:y1 - y0])
