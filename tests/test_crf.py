import json

import numpy as np
import pytest

from deeplab_cli.crf import BACKENDS, CRFParams, check_backend, dense_crf, dense_crf_grid
from deeplab_cli.errors import RuntimeSetupError
from golden_cases import CRF_FILE, check_crf, load, sha256
from golden_cases import scene as make_scene

try:
    import pydensecrf.densecrf as dcrf
except ImportError:  # Python 3.13 and later, or installed without the extra
    dcrf = None
# The pydensecrf backend's own tests: they run where it is installed, as cross-checks.
HERE = [b if b != "pydensecrf" else pytest.param(b, marks=pytest.mark.crosscheck)
        for b in BACKENDS if b != "pydensecrf" or dcrf is not None]


@pytest.fixture(scope="module")
def scene():
    """(120, 160, 3) uint8 RGB scene, its noisy (21, H, W) float32 probabilities, its (H, W) true labels."""
    return make_scene()


@pytest.fixture(params=HERE)
def backend(request):
    """Each backend installed: the behaviour below holds for all."""
    return request.param


@pytest.fixture(params=[b for b in HERE if b != "onnx"])
def exact_backend(request):
    """The installed backends that compute pydensecrf's marginals bit for bit (onnx agrees to rounding:
    tests/test_graph.py), and that `crf tune` runs."""
    return request.param


@pytest.mark.parametrize("sharpness", [1, 6])  # 6: confident, many probabilities below 1e-8
@pytest.mark.parametrize("threads", [1, 2])
def test_dense_crf_equals_pydensecrf_with_deeplab_settings(sharpness, threads):
    image, probs, _ = make_scene(sharpness)
    probs_before = probs.copy()
    q = dense_crf(image, probs, threads=threads)
    check_crf(f"scene, sharpness {sharpness}", image, probs, q)
    np.testing.assert_allclose(q.sum(axis=0), 1, atol=1e-5)
    np.testing.assert_array_equal(probs, probs_before)  # the input is not modified


def test_normalize_after_is_applied_not_pydensecrf_default(scene):
    image, probs, _ = scene
    check_crf("scene, sharpness 1", image, probs, dense_crf(image, probs))  # normalised after filtering
    symmetric = load(CRF_FILE)["cases"]["scene, symmetric normalisation"]
    assert symmetric["inputs"] == sha256(image, probs)
    assert symmetric["max_abs_dq_from_after"] > 0.1  # pydensecrf's default is far from it on this scene


def test_crf_cleans_up_noisy_labels(scene, backend):
    image, probs, truth = scene
    error_before = np.mean(probs.argmax(axis=0) != truth)
    error_after = np.mean(dense_crf(image, probs, backend=backend).argmax(axis=0) != truth)
    assert error_before > 0.3
    assert error_after < 0.01


def test_crf_two_regions_two_classes(backend):
    rng = np.random.default_rng(1)
    truth = np.zeros((40, 60), np.intp)
    truth[:, 30:] = 1
    image = np.where(truth[..., None] == 1, 180, 60) + rng.normal(0, 5, (40, 60, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    p_one = np.clip(np.where(truth == 1, 0.6, 0.4) + rng.normal(0, 0.2, truth.shape), 0.01, 0.99)
    probs = np.stack([1 - p_one, p_one]).astype(np.float32)
    error_before = np.mean(probs.argmax(axis=0) != truth)
    error_after = np.mean(dense_crf(image, probs, backend=backend).argmax(axis=0) != truth)
    assert error_after < error_before / 4


def test_zero_iterations_returns_the_probabilities(scene, backend):
    image, probs, _ = scene
    np.testing.assert_allclose(dense_crf(image, probs, CRFParams(iters=0), backend=backend), probs, rtol=0, atol=1e-6)


def test_zero_probabilities_give_finite_marginals(scene, backend):
    image, probs, _ = scene
    hard = np.zeros_like(probs)
    hard[0] = 1
    q = dense_crf(image, hard, backend=backend)
    assert np.isfinite(q).all()
    assert (q.argmax(axis=0) == 0).all()


def test_float64_probs_accepted(scene, backend):
    image, probs, _ = scene
    q64 = dense_crf(image, probs.astype(np.float64), backend=backend)
    np.testing.assert_allclose(q64, dense_crf(image, probs, backend=backend), rtol=0, atol=1e-6)


def test_zero_kernel_weights_leave_the_probabilities(scene, backend):
    image, probs, _ = scene
    no_pairwise = CRFParams(bi_w=0.0, pos_w=0.0)
    np.testing.assert_allclose(dense_crf(image, probs, no_pairwise, backend=backend), probs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "image_shape, image_dtype, probs_shape",
    [
        ((12, 16), np.uint8, (21, 12, 16)),  # grayscale image
        ((12, 16, 4), np.uint8, (21, 12, 16)),  # RGBA
        ((12, 16, 3), np.float32, (21, 12, 16)),  # float image
        ((12, 16, 3), np.uint8, (21, 16, 12)),  # transposed probabilities
        ((12, 16, 3), np.uint8, (12, 16)),  # labels, not probabilities
        ((12, 16, 3), np.uint8, (0, 12, 16)),  # no classes
    ],
)
def test_dense_crf_rejects_bad_shapes(image_shape, image_dtype, probs_shape, backend):
    with pytest.raises(ValueError):
        dense_crf(np.zeros(image_shape, image_dtype), np.full(probs_shape, 0.5, np.float32), backend=backend)


def test_an_unknown_backend_is_refused_not_replaced():
    image, probs = np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), 0.5, np.float32)
    with pytest.raises(ValueError, match="unknown CRF backend 'numpy'"):
        dense_crf(image, probs, backend="numpy")
    with pytest.raises(ValueError, match="unknown CRF backend 'numpy'"):
        list(dense_crf_grid(image, probs, [CRFParams()], backend="numpy"))


def test_default_params_are_deeplab_largefov():
    assert CRFParams().to_dict() == {
        "bi_w": 4.0,
        "bi_xy_std": 121.0,
        "bi_rgb_std": 5.0,
        "pos_w": 3.0,
        "pos_xy_std": 3.0,
        "iters": 10,
    }


def test_params_json_round_trip(tmp_path):
    params = CRFParams(bi_w=5, bi_xy_std=67.0, bi_rgb_std=3.0, pos_xy_std=1.0, iters=5)
    path = tmp_path / "crf.json"
    path.write_text(json.dumps(params.to_dict()))
    loaded = CRFParams.from_dict(json.loads(path.read_text()))
    assert loaded == params
    assert isinstance(loaded.bi_w, float) and isinstance(loaded.iters, int)


def test_params_from_partial_dict_keeps_defaults():
    params = CRFParams.from_dict({"bi_xy_std": 67, "bi_rgb_std": 3})
    assert params == CRFParams(bi_xy_std=67.0, bi_rgb_std=3.0)
    assert params.bi_w == 4.0 and params.iters == 10


@pytest.mark.parametrize(
    "mapping, key",
    [
        ({"bi_xy": 100.0}, "bi_xy"),  # unknown key
        ({"bi_w": "4"}, "bi_w"),
        ({"pos_w": None}, "pos_w"),
        ({"pos_w": True}, "pos_w"),
        ({"bi_w": float("nan")}, "bi_w"),
        ({"iters": 10.0}, "iters"),
        ({"iters": -1}, "iters"),
        ({"bi_w": -4.0}, "bi_w"),
        ({"bi_rgb_std": 0}, "bi_rgb_std"),
        ({"pos_xy_std": -3}, "pos_xy_std"),
    ],
)
def test_params_from_dict_rejects_bad_entries(mapping, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        CRFParams.from_dict(mapping)


def test_marginals_can_be_refined_again(backend):
    # dense_crf returns a pixel-major view; feeding it back (or any strided probs) must work.
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(3), size=(4, 5)).transpose(2, 0, 1).astype(np.float32)
    once = dense_crf(image, probs, CRFParams(iters=2), backend=backend)
    assert not once.flags.c_contiguous
    twice = dense_crf(image, once, CRFParams(iters=2), backend=backend)
    assert twice.shape == (3, 4, 5) and np.allclose(twice.sum(0), 1, atol=1e-5)


def test_a_grid_gives_what_each_setting_gives_alone_and_builds_each_lattice_once(scene, exact_backend, monkeypatch):
    from deeplab_cli.crf import meanfield
    from deeplab_cli.crf.tune import grid

    image, probs, _ = scene
    # `crf tune`'s order: bi_w outermost, so the kernel widths change from each setting to the next.
    settings = grid(CRFParams(iters=3), {"bi_w": (4.0, 5.0, 6.0), "bi_xy_std": (50.0, 60.0), "bi_rgb_std": (3.0, 4.0)})
    prepared = []
    real = meanfield.prepare
    monkeypatch.setattr(meanfield, "prepare", lambda *args: prepared.append(args[1]) or real(*args))
    results = list(dense_crf_grid(image, probs, settings, backend=exact_backend))
    assert sorted(index for index, _ in results) == list(range(len(settings)))
    if exact_backend == "numba":
        assert len(prepared) == 4  # one per (sigma_alpha, sigma_beta), not one per setting
    for index, q in results:
        np.testing.assert_array_equal(q, dense_crf(image, probs, settings[index], backend=exact_backend))


def test_threads_do_not_change_the_marginals(scene):
    image, probs, _ = scene
    np.testing.assert_array_equal(dense_crf(image, probs, threads=2), dense_crf(image, probs, threads=1))


def test_pydensecrf_backend_missing_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # as where it is not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(RuntimeSetupError, match=r"pip install 'deeplab-cli\[pydensecrf\]'"):
        check_backend("pydensecrf")
    check_backend("numba")  # the default needs nothing more


def test_dense_crf_on_unary_is_dense_crf_on_the_probabilities_that_unary_comes_from():
    from deeplab_cli.crf import dense_crf_on_unary
    from deeplab_cli.crf.meanfield import log_probs
    from deeplab_cli.synthetic import natural_image, probabilities

    image = natural_image(30, 41, seed=3)
    probs = probabilities(image, 21, seed=4)
    unary = -log_probs(probs)
    np.testing.assert_array_equal(dense_crf_on_unary(image, unary, threads=2), dense_crf(image, probs))
    with pytest.raises(ValueError, match="takes probabilities, not energies"):
        dense_crf_on_unary(image, unary, backend="onnx")
    with pytest.raises(ValueError, match="unary must be"):
        dense_crf_on_unary(image, unary[:, :-1])


@pytest.mark.crosscheck
def test_dense_crf_on_unary_is_pydensecrfs():
    pytest.importorskip("pydensecrf.densecrf")
    from deeplab_cli.crf import dense_crf_on_unary
    from deeplab_cli.synthetic import natural_image

    image = natural_image(30, 41, seed=3)
    unary = np.random.default_rng(5).uniform(0, 5, (4, 30 * 41)).astype(np.float32)
    np.testing.assert_array_equal(dense_crf_on_unary(image, unary), dense_crf_on_unary(image, unary, backend="pydensecrf"))
