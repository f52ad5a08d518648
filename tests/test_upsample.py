import numpy as np
import pytest

from deeplab_cli.upsample import caffe_interp, labels_from_scores, resize_probs, softmax


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


def test_resize_probs_single_class_and_same_size():
    probs = np.full((1, 4, 5), 1.0, np.float32)
    np.testing.assert_array_equal(resize_probs(probs, 8, 10), np.ones((1, 8, 10), np.float32))
    same = np.random.default_rng(7).random((3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(resize_probs(same, 4, 5), same)
