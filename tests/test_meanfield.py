"""deeplab_cli.crf.meanfield: the numba mean field gives pydensecrf's marginals bit for bit (as recorded in
tests/golden/crf.json; tests/test_golden.py compares with pydensecrf itself), and behaves on its own."""

import numpy as np
import pytest

from deeplab_cli.crf import meanfield
from deeplab_cli.crf.threads import Workspace
from deeplab_cli.synthetic import noise_image, probabilities
from golden_cases import AWKWARD, PHOTOS, check_crf, photo, underflowed


class Params:
    """DeepLab-LargeFOV's CRF settings, with `changes`: what the engine reads of deeplab_cli.crf.CRFParams."""

    def __init__(self, **changes):
        self.bi_w, self.bi_xy_std, self.bi_rgb_std = 4.0, 121.0, 5.0
        self.pos_w, self.pos_xy_std, self.iters = 3.0, 3.0, 10
        self.__dict__.update(changes)


@pytest.mark.slow
@pytest.mark.parametrize("name", PHOTOS)
def test_photos_are_bit_identical_to_pydensecrf(name):
    image = photo(name)
    probs = probabilities(image)
    for threads in (1, 2):
        check_crf(f"photo: {name}", image, probs, meanfield.dense_crf(image, probs, Params(), threads=threads))


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
    for threads in (1, 2):
        check_crf(f"awkward: {case}", image, probs, meanfield.dense_crf(image, probs, Params(**changes), threads))


def test_underflowed_probabilities_are_bit_identical_to_pydensecrf():
    image, probs = underflowed()
    check_crf("underflowed probabilities", image, probs, meanfield.dense_crf(image, probs, Params()))


def test_marginals_are_distributions_and_threads_do_not_change_them():
    image = noise_image(45, 61)
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
    image = noise_image(9, 11)
    probs = probabilities(image, 6)
    q = meanfield.dense_crf(image, probs, Params(iters=0))
    np.testing.assert_allclose(q, probs / probs.sum(axis=0), atol=1e-6)


def test_buffers_reused_across_sizes_do_not_leak_between_images():
    small, large = noise_image(10, 12), noise_image(50, 70, seed=2)
    p_small, p_large = probabilities(small, 21, seed=3), probabilities(large, 5, seed=4)
    first = meanfield.dense_crf(large, p_large, Params())
    meanfield.dense_crf(small, p_small, Params())
    np.testing.assert_array_equal(meanfield.dense_crf(large, p_large, Params()), first)


def test_lattices_are_reused_while_the_weights_change():
    image = noise_image(30, 40)
    probs = probabilities(image, 21)
    kernels = meanfield.prepare(image, Params())
    for changes in ({}, {"bi_w": 6.0, "pos_w": 1.0, "iters": 3}):
        np.testing.assert_array_equal(meanfield.mean_field(kernels, probs, Params(**changes)),
                                      meanfield.dense_crf(image, probs, Params(**changes)))


def test_bad_inputs_are_refused():
    image = noise_image(8, 8)
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
    image = noise_image(24, 37)
    probs = probabilities(image, n_labels, sharpness=3.0)
    settings = grid_settings()
    alone = [meanfield.dense_crf(image, probs, p, threads) for p in settings]
    other_image = noise_image(13, 17, seed=5)
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
    image = noise_image(5, 6)
    assert list(meanfield.grid(image, probabilities(image, 3), [])) == []


def float32_sweep():
    """Every 4097th positive normal float32 up to 2 (both sides of each power of two, sqrt(1/2)
    included), and the bounds: from float32 tiny to 1 and a little over."""
    bits = np.arange(np.float32(np.finfo(np.float32).tiny).view(np.int32), np.float32(2).view(np.int32), 4097,
                     dtype=np.int32)
    root_half = np.float32(np.sqrt(0.5))
    special = np.float32([np.finfo(np.float32).tiny, 1, 0.5, root_half, np.nextafter(root_half, np.float32(0))])
    return np.concatenate([bits.view(np.float32), special])


def test_log_probs_is_within_one_ulp_of_the_true_log():
    values = float32_sweep()
    got = meanfield.log_probs(values[None, :, None])[0]
    exact = np.log(values.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - exact) <= ulp)  # cephes logf: under 0.8 ulp measured


def test_log_probs_clips_at_tiny_and_keeps_nan_and_inf():
    probs = np.float32([0, 1e-45, -1, np.nan, np.inf, 1])[:, None, None]
    got = meanfield.log_probs(probs)[:, 0]
    tiny_log = meanfield.log_probs(np.float32([[[np.finfo(np.float32).tiny]]]))[0, 0]
    np.testing.assert_array_equal(got[:3], [tiny_log] * 3)
    assert np.isnan(got[3]) and got[4] == np.inf and got[5] == 0


def test_log_probs_golden():
    # The same bits on every CPU and numpy release: float32 operations in a fixed order, no numpy log.
    import hashlib

    digest = hashlib.sha256(meanfield.log_probs(float32_sweep()[None, :, None]).tobytes()).hexdigest()
    assert digest == "4598105547a0079a9c6d9dee3cc8f37412052645a59d9a7ce74a67a554d72ac8"
