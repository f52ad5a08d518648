"""deeplab_cli.densecrf, pydensecrf's API on the project's engine, against pydensecrf: through
tests/golden/densecrf.json (what pydensecrf computed for tests/golden_cases.py's programs) everywhere, and
against pydensecrf itself under `-m crosscheck`, on the same programs and on random ones.

Every comparison here is bit for bit: the API reproduces pydensecrf2 1.1's float32 operations in their
order, the matrix compatibility's product in Eigen's order included, so no case needs a tolerance (the
issue allows 1e-4 in Q; none is used).
"""

import numpy as np
import pytest

import golden_cases as cases
import deeplab_cli.densecrf as dcrf
from deeplab_cli.crf import reference_terms
from deeplab_cli.crf.meanfield import log_probs
from deeplab_cli.densecrf import utils
from deeplab_cli.errors import DenseCRFError
from deeplab_cli.synthetic import natural_image, noise_image, probabilities


def assert_bits_equal(actual, expected, message=""):
    """Equal float32 arrays, bit for bit (so -0 != 0 and NaNs compare)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype == np.float32 and actual.shape == expected.shape, message
    np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32), message)


@pytest.mark.parametrize("name", sorted(cases.densecrf_cases()))
def test_the_api_computes_pydensecrfs_golden_marginals(name):
    golden = cases.load(cases.DENSECRF_FILE)["cases"][name]
    inputs, q = cases.densecrf_cases()[name](dcrf, utils)
    record = cases.densecrf_record(inputs, q)
    assert record["inputs"] == golden["inputs"], f"{name}: the inputs changed (synthetic, densecrf.utils or numpy's log)"
    assert q.dtype == np.float32 and q.flags.c_contiguous
    assert record == golden, f"{name}: Q differs from pydensecrf's"


def test_the_golden_file_has_every_case():
    assert sorted(cases.load(cases.DENSECRF_FILE)["cases"]) == sorted(cases.densecrf_cases())


def deeplab_crf(image, unary, normalization=dcrf.NORMALIZE_AFTER, threads=1, kernel=dcrf.DIAG_KERNEL):
    """DeepLab's CRF (LargeFOV's settings) through the API."""
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, len(unary), threads=threads)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=3, compat=3, kernel=kernel, normalization=normalization)
    crf.addPairwiseBilateral(sxy=121, srgb=5, rgbim=image, compat=4, kernel=kernel, normalization=normalization)
    return crf


def test_deeplabs_crf_runs_on_the_engine_and_equals_the_general_mean_field_and_the_engines_own_api():
    from deeplab_cli.crf import CRFParams, general, meanfield

    image = natural_image(50, 70, seed=2)
    probs = probabilities(image, 21, sharpness=3.0)
    unary = -log_probs(probs)
    q = deeplab_crf(image, unary).inference(10)
    # The same CRF on the general mean field, and on the engine's own API (which crf.json holds to pydensecrf).
    from deeplab_cli.crf.lattice import bilateral_features, gaussian_features

    terms = [general.make_term(gaussian_features(50, 70, 3.0), general.NORMALIZE_AFTER, 3.0, 21),
             general.make_term(bilateral_features(image, 121.0, 5.0), general.NORMALIZE_AFTER, 4.0, 21)]
    rows = np.zeros((50 * 70, general.row_width(21)), np.float32)
    rows[:, :21] = -unary.T
    assert_bits_equal(q, np.ascontiguousarray(general.mean_field(rows, 21, terms, 10)[:, :21].T))
    assert_bits_equal(q, meanfield.dense_crf(image, probs, CRFParams()).reshape(21, -1))


def random_program(rng):
    """A random CRF program on `dcrf`-like modules: image size, labels, 0-3 terms of every kind, every
    normalisation and compatibility, inference or stepInference. Returns run(dcrf) -> Q."""
    height, width = (int(v) for v in rng.integers(1, 30, 2))
    n_labels = int(rng.choice([1, 2, 3, 4, 5, 7, 8, 13, 21, 33, 255]))
    image = natural_image(height, width, seed=int(rng.integers(100)))
    unary = -log_probs(probabilities(image, n_labels, seed=int(rng.integers(100)), sharpness=float(rng.uniform(.5, 6))))
    terms = []
    for _ in range(int(rng.integers(0, 4))):
        shape = rng.choice(["potts", "diag", "matrix"])
        compat = (float(rng.uniform(-2, 12)) if shape == "potts" else
                  rng.uniform(-5, 5, n_labels if shape == "diag" else (n_labels, n_labels)).astype(np.float32))
        options = {"compat": compat, "kernel": int(rng.integers(3)), "normalization": int(rng.integers(4))}
        kind = rng.choice(["gaussian", "bilateral", "features"])
        if kind == "gaussian":
            terms.append(("addPairwiseGaussian", dict(sxy=tuple(float(s) for s in rng.uniform(.5, 10, 2)), **options)))
        elif kind == "bilateral":
            terms.append(("addPairwiseBilateral", dict(sxy=float(rng.uniform(5, 150)), srgb=float(rng.uniform(2, 30)),
                                                       rgbim=image, **options)))
        else:
            features = (rng.standard_normal((int(rng.integers(1, 7)), height * width)) * 3).astype(np.float32)
            terms.append(("addPairwiseEnergy", dict(features=features, **options)))
    iterations, steps = int(rng.integers(0, 5)), bool(rng.random() < .3)

    def run(module):
        crf = module.DenseCRF2D(width, height, n_labels)
        crf.setUnaryEnergy(unary)
        for method, arguments in terms:
            arguments = {k: getattr(module, ("CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL")[v]) if k == "kernel" else
                         getattr(module, ("NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER",
                                          "NORMALIZE_SYMMETRIC")[v]) if k == "normalization" else v
                         for k, v in arguments.items()}
            getattr(crf, method)(**arguments)
        return cases._infer(crf, iterations, iterations if steps else None)

    run.definition = lambda: _definition(unary, terms, width, height, iterations)
    return run


def _definition(unary, terms, width, height, iterations):
    """The program's Q by crf.reference_terms, the plain-numpy definition."""
    from deeplab_cli.crf.lattice import bilateral_features, gaussian_features

    made = []
    for method, arguments in terms:
        if method == "addPairwiseGaussian":
            features = gaussian_features(height, width, arguments["sxy"])
        elif method == "addPairwiseBilateral":
            features = bilateral_features(arguments["rgbim"], arguments["sxy"], arguments["srgb"])
        else:
            features = arguments["features"].T
        compat = arguments["compat"]
        made.append(reference_terms.make_term(features, arguments["normalization"],
                                              float(np.float32(compat)) if np.ndim(compat) == 0 else compat))
    return np.ascontiguousarray(reference_terms.mean_field(np.ascontiguousarray(-unary.T), made, iterations).T)


def test_the_general_mean_field_is_its_plain_numpy_definition():
    rng = np.random.default_rng(26)
    for case in range(25):
        program = random_program(rng)
        assert_bits_equal(program(dcrf), program.definition(), f"case {case}")


@pytest.mark.parametrize("normalization", [dcrf.NORMALIZE_AFTER, dcrf.NORMALIZE_SYMMETRIC])
def test_threads_do_not_change_the_result(normalization):
    image = natural_image(60, 70, seed=3)  # 4,200 pixels: parallel_for slices from 2,048 on
    unary = -log_probs(probabilities(image, 21))
    one = deeplab_crf(image, unary, normalization).inference(3)
    crf = deeplab_crf(image, unary, normalization, threads=3)
    assert_bits_equal(crf.inference(3), one)
    crf.setThreads(2)
    assert_bits_equal(crf.inference(3), one)


@pytest.mark.parametrize("normalization", [dcrf.NORMALIZE_AFTER, dcrf.NORMALIZE_BEFORE])
def test_kernel_types_and_step_inference_give_inferences_result(normalization):
    image = natural_image(20, 30, seed=4)
    unary = -log_probs(probabilities(image, 5))
    q = deeplab_crf(image, unary, normalization).inference(3)
    for kernel in (dcrf.CONST_KERNEL, dcrf.FULL_KERNEL):
        assert_bits_equal(deeplab_crf(image, unary, normalization, kernel=kernel).inference(3), q)
    crf = deeplab_crf(image, unary, normalization)
    stepped, tmp1, tmp2 = crf.startInference()
    assert_bits_equal(stepped, crf.inference(0))
    for _ in range(3):
        crf.stepInference(stepped, tmp1, tmp2)
    assert_bits_equal(stepped, q)


def test_kl_divergence_is_its_definition():
    image = natural_image(20, 30, seed=4)
    unary = -log_probs(probabilities(image, 5))
    compat = np.random.default_rng(0).uniform(-2, 4, (5, 5)).astype(np.float32)
    crf = deeplab_crf(image, unary, dcrf.NORMALIZE_SYMMETRIC)
    crf.addPairwiseGaussian(sxy=5, compat=compat, normalization=dcrf.NORMALIZE_BEFORE)
    q = crf.inference(2)
    from deeplab_cli.crf.lattice import bilateral_features, gaussian_features

    expected = float(np.sum(q * np.log(q.astype(np.float64))) + np.sum(unary * q.astype(np.float64)))
    for features, normalization, compat in [(gaussian_features(20, 30, 3.0), 3, 3.0),
                                            (bilateral_features(image, 121.0, 5.0), 3, 4.0),
                                            (gaussian_features(20, 30, 5.0), 1, compat)]:
        lattice, pre, post, compat = reference_terms.make_term(features, normalization, compat)
        y = reference_terms.filter_values(q.T * pre[:, None] if pre is not None else q.T, lattice, False)
        message = reference_terms.apply_compat(compat, y if post is None else y * post[:, None])
        expected += float(np.sum(message.T * q.astype(np.float64)))
    assert crf.klDivergence(q) == pytest.approx(expected, rel=1e-6)  # its terms' sums are float32, as pydensecrf's


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 8, 12, 13, 16, 21, 100])
def test_eigen_sum_adds_in_eigens_order(n):
    from deeplab_cli.crf.general import eigen_sum

    values = np.random.default_rng(n).standard_normal(n).astype(np.float32) * np.float32(1e3)
    a, b = values[0:4].copy(), values[4:8].copy()
    for k in range(8, n // 8 * 8, 8):
        a, b = a + values[k:k + 4], b + values[k + 4:k + 8]
    if n >= 8:
        a = a + b
    if n // 4 * 4 > n // 8 * 8 >= 8:
        a = a + values[n // 8 * 8:n // 4 * 4]
    total = (a[0] + a[2]) + (a[1] + a[3]) if n >= 4 else np.float32(0)
    for k in range(n // 4 * 4, n):
        total = values[k] if n < 4 and k == 0 else total + values[k]
    assert eigen_sum(values).view(np.int32) == np.float32(total).view(np.int32)


def test_without_a_unary_as_pydensecrf():
    # pydensecrf: inference starts from a zero unary (uniform Q); startInference returns zeros.
    crf = dcrf.DenseCRF2D(5, 4, 3)
    crf.addPairwiseGaussian(sxy=3, compat=3)
    assert_bits_equal(crf.inference(2), np.full((3, 20), np.float32(1) / np.float32(3)))
    assert not crf.startInference()[0].any()


def test_the_constants_are_pydensecrfs():
    assert (dcrf.CONST_KERNEL, dcrf.DIAG_KERNEL, dcrf.FULL_KERNEL) == (0, 1, 2)
    assert (dcrf.NO_NORMALIZATION, dcrf.NORMALIZE_BEFORE, dcrf.NORMALIZE_AFTER, dcrf.NORMALIZE_SYMMETRIC) == (0, 1, 2, 3)


@pytest.mark.parametrize("call, message", [
    (lambda c: c.setUnaryEnergy(np.zeros((3, 19), np.float32)), r"Bad shape for unary energy \(Need \(3, 20\)"),
    (lambda c: c.setUnaryEnergy(np.zeros((3, 20))), "unary energy must be a 2-D float32 array"),
    (lambda c: c.setUnaryEnergy(np.zeros((3, 20), np.float32), np.zeros((2, 20), np.float32)), "logistic unary"),
    (lambda c: c.addPairwiseEnergy(np.zeros((7, 20), np.float32), compat=3), "features of dimension 7 are not supported"),
    (lambda c: c.addPairwiseEnergy(np.zeros((2, 21), np.float32), compat=3), "Bad shape for pairwise energy"),
    (lambda c: c.addPairwiseGaussian(sxy=0, compat=3), "sxy must be finite and non-zero"),
    (lambda c: c.addPairwiseEnergy(np.full((2, 20), np.inf, np.float32), compat=3), "features must be finite"),
    (lambda c: c.addPairwiseGaussian(sxy=(1, 2, 3), compat=3), "sxy must be a number or 2 numbers"),
    (lambda c: c.addPairwiseGaussian(sxy=3, compat=np.ones(4, np.float32)), r"compat must be a number, a \(3,\)"),
    (lambda c: c.addPairwiseGaussian(sxy=3, compat=np.ones((3, 3))), "float32"),
    (lambda c: c.addPairwiseGaussian(sxy=3, compat=3, normalization=7), "normalization must be one of"),
    (lambda c: c.addPairwiseGaussian(sxy=3, compat=3, kernel=5), "kernel must be one of"),
    (lambda c: c.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((5, 4, 3), np.uint8), compat=3),
     "Bad shape for pairwise bilateral"),
    (lambda c: c.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((4, 5, 1), np.uint8), compat=3), "only works for RGB"),
    (lambda c: c.stepInference(np.zeros((3, 20)), None, None), r"Q must be a \(3, 20\) float32 array"),
    (lambda c: c.inference(-1), "niter must be an integer >= 0"),
    (lambda c: c.setThreads(0), "threads must be an integer >= 1"),
])
def test_what_cannot_run_raises_a_value_error_that_says_why(call, message):
    with pytest.raises(DenseCRFError, match=message) as raised:
        call(dcrf.DenseCRF2D(5, 4, 3))
    assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)


def test_unary_from_labels():
    labels = np.array([[0, 1], [2, 3]], np.uint8)  # uint8: no wrap-around for the unknown label 0
    unary = utils.unary_from_labels(labels, 3, gt_prob=0.7)
    assert unary.dtype == np.float32 and unary.shape == (3, 4)
    np.testing.assert_array_equal(unary[:, 0], np.float32(-np.log(1 / 3)))  # unknown: uniform
    assert unary[0, 1] == np.float32(-np.log(0.7)) and unary[1, 1] == np.float32(-np.log(0.15))
    plain = utils.unary_from_labels(labels, 4, gt_prob=0.7, zero_unsure=False)
    assert plain[0, 0] == np.float32(-np.log(0.7)) and plain[3, 3] == np.float32(-np.log(0.7))
    with pytest.raises(DenseCRFError, match="gt_prob must be in"):
        utils.unary_from_labels(labels, 3, gt_prob=1.0)


def test_unary_from_softmax():
    sm = np.array([[0.0, 0.25], [1.0, 0.75]], np.float32)
    unary = utils.unary_from_softmax(sm)
    assert unary.dtype == np.float32 and unary[0, 0] == -np.log(np.float32(1e-5))
    scaled = utils.unary_from_softmax(sm, scale=0.5, clip=None)
    assert scaled[0, 0] == np.float32(-np.log(0.25))
    with pytest.raises(DenseCRFError, match="scale must be in"):
        utils.unary_from_softmax(sm, scale=0)


# ---------------------------------------------------------------- against pydensecrf itself


@pytest.mark.crosscheck
def test_pydensecrf_computes_the_golden_marginals():
    pytest.importorskip("pydensecrf.densecrf")
    import pydensecrf.densecrf as reference
    import pydensecrf.utils as reference_utils

    golden = cases.load(cases.DENSECRF_FILE)["cases"]
    for name, program in cases.densecrf_cases().items():
        assert cases.densecrf_record(*program(reference, reference_utils)) == golden[name], name


@pytest.mark.crosscheck
def test_random_programs_equal_pydensecrfs():
    pytest.importorskip("pydensecrf.densecrf")
    import pydensecrf.densecrf as reference

    rng = np.random.default_rng(1)
    for case in range(150):
        program = random_program(rng)
        assert_bits_equal(program(dcrf), program(reference), f"case {case}")


@pytest.mark.crosscheck
def test_deeplabs_crf_on_a_photo_sized_image_and_infinite_unaries_equal_pydensecrfs():
    pytest.importorskip("pydensecrf.densecrf")
    import pydensecrf.densecrf as reference

    image = natural_image(375, 500, seed=875)
    unary = -log_probs(probabilities(image, 21))
    for normalization in ("NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"):
        ours = deeplab_crf(image, unary, getattr(dcrf, normalization), threads=2).inference(10)
        crf = reference.DenseCRF2D(500, 375, 21)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=3, compat=3, normalization=getattr(reference, normalization))
        crf.addPairwiseBilateral(sxy=121, srgb=5, rgbim=image, compat=4, normalization=getattr(reference, normalization))
        assert_bits_equal(ours, np.array(crf.inference(10)), normalization)
    image = noise_image(9, 11)
    with np.errstate(divide="ignore"):
        unary = utils.unary_from_softmax(probabilities(image, 5, sharpness=40.0), clip=None)  # inf where p = 0
    assert np.isinf(unary).any()
    results = []
    for module in (dcrf, reference):
        crf = module.DenseCRF2D(11, 9, 5)
        crf.setUnaryEnergy(np.ascontiguousarray(unary))
        crf.addPairwiseBilateral(sxy=10, srgb=13, rgbim=image, compat=10)
        results.append(np.array(crf.inference(3)))
    assert_bits_equal(*results)


@pytest.mark.crosscheck
def test_the_readme_step_by_step_examples_kl_divergence_equals_pydensecrfs():
    pytest.importorskip("pydensecrf.densecrf")
    import pydensecrf.densecrf as reference

    image = natural_image(48, 64, seed=7)
    unary = -log_probs(probabilities(image, 5, seed=3))
    values = []
    for module in (dcrf, reference):
        crf = module.DenseCRF2D(64, 48, 5)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=3, compat=3)
        crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=np.eye(5, dtype=np.float32) * 10)
        q, tmp1, tmp2 = crf.startInference()
        for _ in range(3):
            values.append(crf.klDivergence(q))
            crf.stepInference(q, tmp1, tmp2)
    ours, theirs = values[:3], values[3:]
    assert ours == pytest.approx(theirs, rel=1e-12)  # measured: 6e-14 at 375x500 (the double sums' order)


@pytest.mark.crosscheck
def test_utils_equal_pydensecrfs():
    pytest.importorskip("pydensecrf.utils")
    import pydensecrf.utils as reference

    image = natural_image(23, 31, seed=2)
    for dtype in (np.float32, np.float64):
        sm = probabilities(image, 5, sharpness=8.0).astype(dtype)
        for scale in (None, 0.7, 1.0):
            for clip in (1e-5, 0.01):
                assert_bits_equal(utils.unary_from_softmax(sm, scale, clip), reference.unary_from_softmax(sm, scale, clip))
    labels = np.random.default_rng(0).integers(0, 4, (23, 31))
    for zero_unsure, n_labels in ((True, 3), (False, 4)):
        for gt_prob in (0.5, 0.7, 0.95):
            assert_bits_equal(utils.unary_from_labels(labels, n_labels, gt_prob, zero_unsure),
                              reference.unary_from_labels(labels, n_labels, gt_prob, zero_unsure))
    for sdims in ((3, 3), (2.5, 7)):
        assert_bits_equal(utils.create_pairwise_gaussian(sdims, (23, 31)), reference.create_pairwise_gaussian(sdims, (23, 31)))
        for schan in (13, (13, 7, 20)):
            assert_bits_equal(utils.create_pairwise_bilateral(sdims, schan, image, 2),
                              reference.create_pairwise_bilateral(sdims, schan, image, 2))
