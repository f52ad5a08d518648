import numpy as np
import pytest

from deeplab_cli.model.upsample import caffe_interp, labels_from_scores, resize_probs, softmax


def caffe_interp2_reference(data1: np.ndarray, zoom: int) -> np.ndarray:
    """Caffe's caffe_cpu_interp2 (Interp layer, zoom_factor), written out loop by loop.

    Output size (in - 1) * zoom + 1; ratios and source coordinates computed in float32 as Caffe does.
    """
    channels, height1, width1 = data1.shape
    height2, width2 = (height1 - 1) * zoom + 1, (width1 - 1) * zoom + 1
    rheight = np.float32(height1 - 1) / np.float32(height2 - 1) if height2 > 1 else np.float32(0)
    rwidth = np.float32(width1 - 1) / np.float32(width2 - 1) if width2 > 1 else np.float32(0)
    data2 = np.empty((channels, height2, width2), np.float32)
    for h2 in range(height2):
        h1r = np.float32(rheight * np.float32(h2))
        h1 = int(h1r)
        h1p = 1 if h1 < height1 - 1 else 0
        h1lambda = np.float32(h1r - h1)
        h0lambda = np.float32(1) - h1lambda
        for w2 in range(width2):
            w1r = np.float32(rwidth * np.float32(w2))
            w1 = int(w1r)
            w1p = 1 if w1 < width1 - 1 else 0
            w1lambda = np.float32(w1r - w1)
            w0lambda = np.float32(1) - w1lambda
            data2[:, h2, w2] = h0lambda * (
                w0lambda * data1[:, h1, w1] + w1lambda * data1[:, h1, w1 + w1p]
            ) + h1lambda * (w0lambda * data1[:, h1 + h1p, w1] + w1lambda * data1[:, h1 + h1p, w1 + w1p])
    return data2


@pytest.mark.parametrize(
    "logit_hw, out_hw, zoom",
    [
        ((48, 64), (375, 500), 8),  # a 375x500 VOC image at its own size
        ((65, 65), (513, 513), 8),  # the paper's padded 513x513 input: no crop
        ((6, 7), (37, 45), 8),  # what a 37x45 image gives with ceil pooling: 41x49, cropped
        ((5, 6), (33, 41), 8),
        ((1, 1), (1, 1), 8),  # degenerate: the upsampled map is a single pixel
        ((1, 6), (1, 41), 8),  # degenerate height only
        ((4, 5), (10, 13), 3),  # a zoom whose ratio 1/3 is inexact in float32
    ],
)
def test_caffe_interp_matches_caffe_formula(logit_hw, out_hw, zoom):
    logits = np.random.default_rng(0).standard_normal((21, *logit_hw)).astype(np.float32)
    expected = caffe_interp2_reference(logits, zoom)[:, : out_hw[0], : out_hw[1]]
    out = caffe_interp(logits, *out_hw, zoom=zoom)
    assert out.shape == (21, *out_hw) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_logit_i_lands_exactly_on_pixel_8i():
    logits = np.random.default_rng(2).standard_normal((2, 7, 9)).astype(np.float32)
    out = caffe_interp(logits, 49, 65)
    np.testing.assert_array_equal(out[:, ::8, ::8], logits)


def test_caffe_interp_accepts_float64():
    logits = np.random.default_rng(3).standard_normal((2, 5, 6))
    out = caffe_interp(logits, 33, 41)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, caffe_interp(logits.astype(np.float32), 33, 41), atol=1e-6)


def test_caffe_interp_rejects_too_small_logits():
    logits = np.zeros((21, 48, 64), np.float32)
    caffe_interp(logits, 377, 505)  # (48-1)*8+1 = 377 and (64-1)*8+1 = 505: the largest allowed
    with pytest.raises(ValueError, match="smaller than"):
        caffe_interp(logits, 378, 500)
    with pytest.raises(ValueError, match="smaller than"):
        caffe_interp(logits, 375, 506)


def test_caffe_interp_rejects_bad_shapes():
    with pytest.raises(ValueError):
        caffe_interp(np.zeros((48, 64), np.float32), 375, 500)
    with pytest.raises(ValueError):
        caffe_interp(np.zeros((2, 4, 4), np.float32), 0, 10)


def test_softmax_sums_to_one_and_matches_naive_formula():
    scores = np.random.default_rng(4).standard_normal((21, 6, 7)).astype(np.float32) * 3
    probs = softmax(scores)
    assert probs.dtype == np.float32 and probs.shape == scores.shape
    naive = np.exp(scores.astype(np.float64))
    naive /= naive.sum(axis=0)
    np.testing.assert_allclose(probs, naive, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=0), 1, atol=1e-6)


def test_softmax_is_stable_for_huge_logits():
    scores = np.array([[1000.0, -1000.0], [999.0, 1000.0]], np.float32)  # (C=2, W=2)
    probs = softmax(scores, axis=0)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[:, 0], [1 / (1 + np.exp(-1)), 1 / (1 + np.e)], rtol=1e-6)
    np.testing.assert_allclose(probs[:, 1], [0, 1], atol=1e-30)


def test_softmax_along_other_axis():
    scores = np.random.default_rng(5).standard_normal((4, 5, 3)).astype(np.float32)
    channels_first = softmax(scores.transpose(2, 0, 1))
    np.testing.assert_allclose(softmax(scores, axis=-1), channels_first.transpose(1, 2, 0))


def test_labels_from_scores():
    scores = np.zeros((21, 2, 3), np.float32)
    scores[20, 0, 0] = 1
    scores[5, 1, 2] = 2
    labels = labels_from_scores(scores)
    assert labels.dtype == np.uint8 and labels.shape == (2, 3)
    np.testing.assert_array_equal(labels, [[20, 0, 0], [0, 0, 5]])  # ties: first class


def test_labels_from_scores_rejects_bad_shapes():
    with pytest.raises(ValueError):
        labels_from_scores(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError):
        labels_from_scores(np.zeros((257, 2, 2), np.float32))


def half_pixel_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of cv2 INTER_LINEAR: half-pixel centres, edge clamped."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    lower = np.floor(src).astype(int)
    frac = src - lower
    frac[lower < 0], lower[lower < 0] = 0, 0
    frac[lower >= n_in - 1], lower[lower >= n_in - 1] = 0, n_in - 1
    matrix = np.zeros((n_out, n_in))
    matrix[np.arange(n_out), lower] = 1 - frac
    matrix[np.arange(n_out), np.minimum(lower + 1, n_in - 1)] += frac
    return matrix


@pytest.mark.parametrize("out_hw", [(375, 500), (20, 30), (61, 79)])
def test_resize_probs_is_bilinear_and_keeps_sums(out_hw):
    probs = softmax(np.random.default_rng(6).standard_normal((21, 60, 80)).astype(np.float32) * 2)
    out = resize_probs(probs, *out_hw)
    assert out.shape == (21, *out_hw) and out.dtype == np.float32
    rows, cols = half_pixel_bilinear_matrix(60, out_hw[0]), half_pixel_bilinear_matrix(80, out_hw[1])
    expected = rows @ probs.astype(np.float64) @ cols.T
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=0), 1, atol=1e-6)


def bilinear_in_numpy(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """The resize's definition written with numpy's float32 operations, one whole array at a time."""
    rows, cols = linear_axis(probs.shape[1], height), linear_axis(probs.shape[2], width)
    above, below = probs[:, rows.lo], probs[:, rows.hi]
    above = above[:, :, cols.lo] * cols.w_lo + above[:, :, cols.hi] * cols.w_hi
    below = below[:, :, cols.lo] * cols.w_lo + below[:, :, cols.hi] * cols.w_hi
    return above * rows.w_lo[:, None] + below * rows.w_hi[:, None]


# (C, h, w) -> (H, W): up, down, by exactly 2 (where cv2 averages instead), mixed, and 1-pixel sides.
RESIZES = [((21, 43, 64), (342, 509)), ((3, 41, 37), (20, 19)), ((5, 40, 40), (20, 20)),
           ((21, 29, 31), (97, 13)), ((4, 1, 31), (1, 257)), ((4, 31, 1), (257, 1)), ((4, 1, 1), (7, 11)),
           ((2, 65, 65), (513, 513))]


@pytest.mark.parametrize("shape, size", RESIZES)
def test_resize_probs_is_its_definition_bit_for_bit(shape, size):
    probs = np.random.default_rng(8).random(shape, dtype=np.float32)
    np.testing.assert_array_equal(resize_probs(probs, *size), bilinear_in_numpy(probs, *size))


@pytest.mark.parametrize("shape, size", RESIZES)
def test_resize_probs_agrees_with_cv2_within_its_sampling_error(shape, size):
    import cv2

    # cv2 rounds sampling positions to float32 (Intel IPP's differ by up to 1.5e-5 pixel) and averages
    # when halving: for values in [0, 1] that moves a result by at most a few 1e-5 (measured: 1e-6).
    probs = np.random.default_rng(9).random(shape, dtype=np.float32)
    expected = np.stack([cv2.resize(channel, size[::-1], interpolation=cv2.INTER_LINEAR) for channel in probs])
    np.testing.assert_allclose(resize_probs(probs, *size), expected, rtol=0, atol=3e-5)


def test_linear_axis_is_opencvs_geometry():
    for n_in, n_out in [(43, 342), (40, 20), (41, 20), (1, 7), (31, 1), (65, 513)]:
        axis = linear_axis(n_in, n_out)
        expected = half_pixel_bilinear_matrix(n_in, n_out)
        got = np.zeros((n_out, n_in))
        got[np.arange(n_out), axis.lo] = axis.w_lo
        got[np.arange(n_out), axis.hi] += axis.w_hi
        np.testing.assert_allclose(got, expected, rtol=0, atol=2 ** -24)
        assert np.all(np.diff(axis.lo) >= 0) and np.all((axis.hi - axis.lo == 0) | (axis.hi - axis.lo == 1))
        assert np.all(axis.w_hi[axis.hi == axis.lo] == 0)


# SHA-256 of resize_probs' float32 bytes on numpy-made inputs: the same on every machine, numpy and
# OpenCV release (IEEE float32 operations in a fixed order); a change means the definition moved.
RESIZE_GOLDEN = {
    ((21, 43, 64), (342, 509)): "5089464486598e9f65104e880b3b7e0a4c6c8abef055d94a146692e73176e2d3",
    ((3, 41, 37), (20, 19)): "ef169e5c7e3803367be6ba08d4e3424dac2f8ed15cc1ce6d50dc29f6804d8b14",
    ((2, 65, 65), (513, 513)): "de93e3c9ebdd982b609e487d46429b2cdd48b98929f80b1b4f06b0c15be1ef39",
}


@pytest.mark.parametrize("shape, size", list(RESIZE_GOLDEN))
def test_resize_probs_golden(shape, size):
    import hashlib

    probs = np.random.default_rng(10).random(shape, dtype=np.float32)
    digest = hashlib.sha256(resize_probs(probs, *size).tobytes()).hexdigest()
    assert digest == RESIZE_GOLDEN[shape, size]


def test_resize_probs_single_class_and_same_size():
    probs = np.full((1, 4, 5), 1.0, np.float32)
    np.testing.assert_array_equal(resize_probs(probs, 8, 10), np.ones((1, 8, 10), np.float32))
    same = np.random.default_rng(7).random((3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(resize_probs(same, 4, 5), same)


# --- the banded way back to the image size -----------------------------------------------------------

import cv2  # noqa: E402

from deeplab_cli.model import upsample  # noqa: E402
from deeplab_cli.model.upsample import label_bands, labels_at_size, linear_axis, prob_chunks  # noqa: E402


def smooth_probs(classes, height, width, seed=0, sharpness=12.0):
    """Softmax of smooth random fields: segments with borders, like a network's output."""
    rng = np.random.default_rng(seed)
    fields = rng.standard_normal((classes, max(2, height // 6), max(2, width // 6))).astype(np.float32)
    logits = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_CUBIC) for f in fields])
    return softmax(logits * sharpness)


def tied_probs(classes, height, width, seed=0):
    """Few distinct values, and the last class a copy of the first: exact ties everywhere."""
    probs = np.random.default_rng(seed).choice(np.array([0, 0.25, 0.5, 1], np.float32), (classes, height, width))
    probs[-1] = probs[0]
    return probs


SIZES = [
    # (C, h, w) -> (H, W)
    ((21, 43, 64), (342, 509)),  # upscaling by a non-integer factor, prime width
    ((21, 64, 43), (509, 342)),
    ((21, 1, 31), (1, 257)),  # one row
    ((21, 31, 1), (257, 1)),  # one column
    ((21, 1, 1), (7, 11)),
    ((1, 13, 17), (101, 103)),  # one class
    ((3, 41, 37), (20, 19)),  # downscaling
    ((5, 40, 40), (20, 20)),  # downscaling by exactly 2
    ((21, 29, 31), (97, 13)),  # up one way, down the other
    ((21, 50, 60), (50, 60)),  # same size
]


@pytest.mark.parametrize("shape, size", SIZES)
@pytest.mark.parametrize("make", [smooth_probs, tied_probs])
@pytest.mark.parametrize("band_bytes", [1, 1 << 16, upsample.BAND_BYTES])
def test_labels_at_size_equal_the_full_map(shape, size, make, band_bytes):
    probs = make(*shape)
    expected = labels_from_scores(resize_probs(probs, *size))
    np.testing.assert_array_equal(labels_at_size(probs, *size, band_bytes=band_bytes), expected)


@pytest.mark.parametrize("shape, size", SIZES)
@pytest.mark.parametrize("band_bytes", [1, 1 << 16])
def test_prob_chunks_equal_the_full_map_in_npy_order(shape, size, band_bytes):
    probs = smooth_probs(*shape)
    full = resize_probs(probs, *size)
    chunks = list(prob_chunks(probs, *size, dtype=np.float32, band_bytes=band_bytes))
    assert all(c.dtype == np.float32 and c.ndim == 2 and c.shape[1] == size[1] for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.ravel() for c in chunks]), full.ravel())
    half = np.concatenate([c.ravel() for c in prob_chunks(probs, *size, band_bytes=band_bytes)])
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, full.astype(np.float16).ravel())


@pytest.mark.parametrize("shape, size", SIZES)
def test_labels_at_size_read_pixel_major_marginals_as_class_major(shape, size):
    # The CRF returns Q as a (C, H, W) view of (H*W, C) memory; at the same size no copy is made.
    probs = tied_probs(*shape)
    pixel_major = np.ascontiguousarray(probs.reshape(shape[0], -1).T).T.reshape(shape)
    np.testing.assert_array_equal(labels_at_size(pixel_major, *size), labels_at_size(probs, *size))
    pixel_major[-1, -1, -1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        labels_at_size(pixel_major, *size)


def test_label_bands_cover_the_rows_in_order():
    probs = smooth_probs(21, 43, 64)
    bands = list(label_bands(probs, 997, 1283, band_bytes=1 << 18))  # 997: prime, no band divides it
    assert len(bands) > 3
    starts = [y0 for y0, _ in bands]
    ends = [y0 + band.shape[0] for y0, band in bands]
    assert starts[0] == 0 and ends[-1] == 997 and starts[1:] == ends[:-1]
    assert all(band.dtype == np.uint8 and band.shape[1] == 1283 for _, band in bands)


def test_ties_go_to_the_first_class():
    probs = np.full((3, 4, 5), 0.25, np.float32)
    probs[1] = probs[2] = 0.375  # classes 1 and 2 tie everywhere, above class 0
    labels = labels_at_size(probs, 37, 41)
    assert (labels == 1).all()
    np.testing.assert_array_equal(labels, labels_from_scores(resize_probs(probs, 37, 41)))


def test_crf_like_marginals_and_noise_equal_the_full_map():
    # Peaked marginals (most cells decided without arithmetic) and pure noise (nearly none).
    peaked = smooth_probs(21, 57, 85, seed=3, sharpness=200.0)
    noise = softmax(np.random.default_rng(4).standard_normal((21, 57, 85)).astype(np.float32))
    for probs in (peaked, noise):
        np.testing.assert_array_equal(labels_at_size(probs, 451, 677),
                                      labels_from_scores(resize_probs(probs, 451, 677)))


def test_non_contiguous_probs_as_the_crf_returns_them():
    probs = np.ascontiguousarray(smooth_probs(21, 30, 40).transpose(1, 2, 0)).transpose(2, 0, 1)
    assert not probs.flags.c_contiguous
    np.testing.assert_array_equal(labels_at_size(probs, 211, 307), labels_from_scores(resize_probs(probs, 211, 307)))


def test_memory_is_bounded_by_a_band():
    import tracemalloc

    probs = smooth_probs(21, 60, 80)
    labels_at_size(probs, 60, 81)  # cv2 and numpy warmed, so their one-off allocations are not counted
    tracemalloc.start()
    try:
        labels = labels_at_size(probs, 1500, 2000, band_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_map = 21 * 1500 * 2000 * 4  # what resize_probs holds: 252 MB
    assert peak < labels.nbytes + 12 * (1 << 20), peak  # the labels (3 MB) and a few bands
    assert peak < full_map / 15


def test_banded_functions_reject_bad_input():
    with pytest.raises(ValueError, match="finite"):
        labels_at_size(np.full((2, 3, 3), np.nan, np.float32), 5, 5)
    with pytest.raises(ValueError):
        labels_at_size(np.zeros((3, 3), np.float32), 5, 5)
    with pytest.raises(ValueError):
        next(prob_chunks(np.zeros((2, 3, 3), np.float32), 0, 5))


def test_to_float16_equals_numpys_conversion():
    rng = np.random.default_rng(6)
    patterns = rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # Every float32 from 2^-26 to 2^-13 in steps of 37 ulps: float16's subnormals, its smallest normal,
    # the halfway points between them (ties to even) and the values that round to zero.
    dense = np.arange(np.float32(2.0 ** -26).view(np.uint32), np.float32(2.0 ** -13).view(np.uint32), 37,
                      dtype=np.uint32).view(np.float32)
    values = np.concatenate([patterns[np.isfinite(patterns)], dense, -dense,
                             np.float32([0, -0.0, 2.0 ** -25, 2.0 ** -24, 3 * 2.0 ** -25, 65504, 65520, 1e-45])])
    with np.errstate(over="ignore"):  # 65520 and up overflow to inf, with numpy's warning, in both
        expected = values.astype(np.float16)
        got = upsample._to_float16(values)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
