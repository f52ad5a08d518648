"""deeplab_cli.crf.reference: the plain-numpy definition of the CRF computes the engine's numbers bit
for bit: lattices, unary, exp and softmax, the whole mean field (and with it pydensecrf's, as
tests/golden/crf.json records them)."""

import math

import numpy as np
import pytest
from numba import njit

from deeplab_cli.crf import reference as ref
from deeplab_cli.crf import lattice
from deeplab_cli.crf import meanfield
from deeplab_cli.crf import plain
from deeplab_cli.crf import CRFParams, dense_crf
from deeplab_cli.synthetic import natural_image, probabilities
from golden_cases import AWKWARD, check_crf


def assert_bits_equal(actual, expected):
    """Same shape, dtype and bits (so -0 differs from +0, and NaNs must match too)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    unsigned = np.dtype(f"u{actual.dtype.itemsize}")
    different = actual.view(unsigned) != expected.view(unsigned)
    assert not different.any(), (f"{different.sum()} of {different.size} differ, max abs difference "
                                 f"{np.nanmax(np.abs(actual.astype(np.float64) - expected))}")


def _inputs(height, width, n_labels, seed=0):
    image = natural_image(height, width, seed)
    return image, probabilities(image, n_labels, seed, sharpness=3.0)


@pytest.mark.parametrize("height, width, n_labels, changes", [
    (5, 7, 1, {"iters": 5}),
    (5, 7, 2, {"iters": 5}),
    (7, 5, 3, {"iters": 5}),
    (7, 5, 5, {"iters": 1}),
    (7, 5, 21, {"iters": 0}),
    (23, 31, 1, {"iters": 1}),  # seqCompute: the double 0.5 of the blur, (w * v) * alpha of the slice
    (23, 31, 2, {"iters": 5}),
    (23, 31, 3, {"iters": 5}),
    (23, 31, 5, {"iters": 5}),  # one label after the last full packet: glibc's expf
    (23, 31, 13, {"iters": 1}),
    (31, 23, 21, {"iters": 5}),
    (48, 64, 21, {"iters": 3}),
    (31, 23, 21, {"bi_w": 5.0, "bi_xy_std": 67.0, "bi_rgb_std": 3.0, "pos_w": 2.0, "pos_xy_std": 1.0, "iters": 5}),
    (31, 23, 4, {"bi_xy_std": 0.5, "bi_rgb_std": 0.003, "pos_xy_std": 0.2, "iters": 3}),  # keys wrap in 16 bits
])
def test_dense_crf_is_the_engines(height, width, n_labels, changes):
    image, probs = _inputs(height, width, n_labels)
    params = CRFParams(**changes)
    assert_bits_equal(ref.dense_crf(image, probs, params), dense_crf(image, probs, params, backend="numba"))


@pytest.mark.parametrize("name", list(AWKWARD))
def test_dense_crf_is_pydensecrfs(name):
    """The recorded pydensecrf results of the awkward inputs (sizes, label counts, settings)."""
    image, n_labels, changes = AWKWARD[name]
    probs = probabilities(image, n_labels, sharpness=3.0)  # as golden_cases.crf_cases makes them
    check_crf(f"awkward: {name}", image, probs, ref.dense_crf(image, probs, CRFParams(**changes)))


def test_dense_crf_contract():
    image, probs = _inputs(6, 9, 3)
    q = ref.dense_crf(image, probs)  # DeepLab's settings
    assert_bits_equal(q, dense_crf(image, probs))
    assert q.shape == (3, 6, 9) and q.dtype == np.float32
    with pytest.raises(ValueError):
        ref.dense_crf(image[:5], probs)
    with pytest.raises(ValueError):
        ref.dense_crf(image, probs.astype(np.float64))


def _features():
    image = natural_image(31, 23, 1)
    rng = np.random.default_rng(2)
    yield "gaussian", lattice.gaussian_features(31, 23, 3.0)
    yield "gaussian, small std", lattice.gaussian_features(31, 23, 0.7)
    yield "bilateral", lattice.bilateral_features(image, 121.0, 5.0)
    yield "bilateral, tiny stds", lattice.bilateral_features(image, 0.5, 0.003)
    for d in range(1, lattice.MAX_DIMS + 1):  # 303 pixels: not a multiple of 4
        yield f"{d}-d", (rng.random((303, d)) * 10).astype(np.float32)
        yield f"{d}-d, wrapping keys", (rng.random((303, d)) * 3e4).astype(np.float32)


@pytest.mark.parametrize("name, features", list(_features()), ids=[name for name, _ in _features()])
def test_lattice_is_the_engines(name, features):
    offsets, weights, neighbours, norm = ref.build_lattice(features)
    expected = lattice.build_lattice(features)
    assert_bits_equal(offsets, expected.offsets)
    assert_bits_equal(weights, expected.weights)
    assert_bits_equal(neighbours, expected.neighbours)
    assert_bits_equal(norm, expected.norm)
    assert (neighbours >= 0).any()  # the lookup finds neighbours (not only the -1 of none)


def test_features_are_the_engines():
    image = natural_image(7, 5)
    assert_bits_equal(ref.gaussian_features(7, 5, 3.0), lattice.gaussian_features(7, 5, 3.0))
    assert_bits_equal(ref.bilateral_features(image, 121.0, 5.0), lattice.bilateral_features(image, 121.0, 5.0))


def test_log_probs_are_the_engines():
    rng = np.random.default_rng(0)
    probs = rng.random((5, 9, 11), dtype=np.float32) ** 8
    probs[0, 0, :6] = [0, 1e-45, np.finfo(np.float32).tiny, 1, np.inf, np.nan]  # subnormal, clipped, ...
    probs[1] = np.float32(1) - probs[1]  # next to 1
    assert_bits_equal(ref.log_probs(probs), meanfield.log_probs(probs).T)


@njit
def _platform_expf(x, out):
    """What the engine's softmax calls on the labels after the last packet: math.exp of a float32."""
    for i in range(x.size):
        out[i] = math.exp(x[i])


def test_expf_is_the_platforms():
    # 2^20 float32 evenly spread over the bit patterns of [-105, 0] (all that the softmax gives expf),
    # and -63.09946, the one float32 there whose expf depends on glibc's FMA build (see the module).
    x = np.linspace(0x80000000, 0xC2D20000, 1 << 20).astype(np.uint32).view(np.float32)
    x = np.append(x, np.array([0xC27C65D9, 0xFF800000], np.uint32).view(np.float32))  # and -inf
    expected = np.empty_like(x)
    _platform_expf(x, expected)
    assert_bits_equal(ref._expf(x), expected)


@njit
def _engine_softmax(rows, n_labels):
    for r in range(rows.shape[0]):
        plain._softmax(rows, r, n_labels)


@pytest.mark.parametrize("n_labels", [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 17, 20, 21, 24, 25, 33])
def test_softmax_is_the_engines(n_labels):
    rng = np.random.default_rng(n_labels)
    x = (rng.standard_normal((2000, n_labels)) * rng.choice([0.1, 3, 30], (2000, 1))).astype(np.float32)
    rows = np.zeros((len(x), -(-n_labels // plain.LANES) * plain.LANES), np.float32)
    rows[:, :n_labels] = x
    _engine_softmax(rows, n_labels)
    assert_bits_equal(ref.softmax(x), rows[:, :n_labels])
