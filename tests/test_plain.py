"""The CRF engine's plain kernels (deeplab_cli.crf.plain) against its IR kernels (simd),
bit for bit, and the choice between them (deeplab_cli.crf.meanfield.compiled)."""

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import deeplab_cli
from deeplab_cli.crf import lattice
from deeplab_cli.crf import meanfield
from deeplab_cli.crf import plain
from deeplab_cli.errors import UsageError


def settings(**changes):
    """DeepLab-LargeFOV's CRF settings, some changed."""
    values = dict(bi_w=4.0, bi_xy_std=121.0, bi_rgb_std=5.0, pos_w=3.0, pos_xy_std=3.0, iters=10)
    return SimpleNamespace(**{**values, **changes})


def scene(height, width, seed=1):
    """(H, W, 3) uint8 noise, its top half one flat colour (many pixels share a simplex there)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[: height // 2] = image[0, 0]
    return image


def probabilities(n_labels, height, width, seed=0, spread=2.0):
    """(C, H, W) float32 softmax of smooth random logits: normal noise of std `spread` on a coarse
    grid, bilinearly upsampled. A large spread underflows most probabilities (to around float32's
    smallest normal and below)."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, spread, (n_labels, height // 8 + 2, width // 8 + 2))
    ys = np.linspace(0, coarse.shape[1] - 1.001, height)
    xs = np.linspace(0, coarse.shape[2] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], xs - x0
    rows = coarse[:, y0] * (1 - fy) + coarse[:, y0 + 1] * fy
    logits = rows[:, :, x0] * (1 - fx) + rows[:, :, x0 + 1] * fx
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


@pytest.fixture(scope="module")
def ir():
    """The IR kernel set, compiled; the tests that compare with it skip where it does not compile."""
    from deeplab_cli.crf import simd

    previous = meanfield._chosen
    meanfield._chosen = simd
    try:
        meanfield.run_every_kernel()
    except Exception as error:  # the engine would fall back to the plain kernels here
        pytest.skip(f"the IR kernels do not compile here: {type(error).__name__}: {error}")
    finally:
        meanfield._chosen = previous
    return simd


@pytest.fixture
def both(ir, monkeypatch):
    """compute() run with the IR kernels, then with the plain ones: the two results."""

    def run(compute):
        results = []
        for kernels in (ir, plain):
            monkeypatch.setattr(meanfield, "_chosen", kernels)
            monkeypatch.setattr(meanfield, "_gaussian_memo", {})  # each set builds its own lattices
            results.append(compute())
        return results

    return run


@pytest.fixture(params=["gather", "splat"])
def regime(request, monkeypatch):
    """How one thread splats: a gather after the pass (small images), or in the pass (large ones),
    forced by taking every image as large. The IR kernels then also prefetch."""
    if request.param == "splat":
        monkeypatch.setattr(meanfield, "_CACHED_BYTES", 0)


def assert_same(pair):
    ir_q, plain_q = pair
    assert plain_q.dtype == np.float32 and plain_q.shape == ir_q.shape
    np.testing.assert_array_equal(plain_q, ir_q)


# Every row-width branch of the IR kernels: seqCompute (1, 2), one 8-float vector (3-8), two (9-16),
# rows of 24 (17-24: 17-19 one to three tail labels, 20-23 the grouped softmax, 24 none), a 24-float
# block and a vector (25-32), two blocks (41-48).
LABELS = [1, 2, 3, 5, 8, 13, 16, 17, 19, 20, 21, 23, 24, 25, 32, 45]


@pytest.mark.parametrize("n_labels", LABELS)
def test_every_label_count_gives_the_ir_kernels_bits(n_labels, both, regime):
    image, probs = scene(23, 29), probabilities(n_labels, 23, 29, seed=n_labels)
    assert_same(both(lambda: meanfield.dense_crf(image, probs, settings())))


@pytest.mark.parametrize("height, width", [(1, 1), (1, 37), (41, 1), (7, 13), (4, 4), (64, 3)])
@pytest.mark.parametrize("n_labels", [2, 21])
def test_tiny_and_odd_sizes_give_the_ir_kernels_bits(height, width, n_labels, both, regime):
    image, probs = scene(height, width), probabilities(n_labels, height, width)
    assert_same(both(lambda: meanfield.dense_crf(image, probs, settings())))


@pytest.mark.parametrize("image", [np.full((20, 30, 3), 77, np.uint8), np.zeros((20, 30, 3), np.uint8)],
                         ids=["flat", "black"])
def test_flat_images_give_the_ir_kernels_bits(image, both):
    probs = probabilities(21, 20, 30)
    assert_same(both(lambda: meanfield.dense_crf(image, probs, settings())))


@pytest.mark.parametrize("n_labels", [5, 19, 21])
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_ir_kernels_bits(n_labels, threads, both, regime):
    image, probs = scene(48, 50), probabilities(n_labels, 48, 50)  # 2400 pixels: two threads share them
    assert_same(both(lambda: meanfield.dense_crf(image, probs, settings(), threads)))


@pytest.mark.parametrize("iters", [0, 1, 10])
@pytest.mark.parametrize("n_labels", [2, 21])
def test_iterations_give_the_ir_kernels_bits(iters, n_labels, both):
    image, probs = scene(30, 40), probabilities(n_labels, 30, 40)
    assert_same(both(lambda: meanfield.dense_crf(image, probs, settings(iters=iters))))


@pytest.mark.parametrize("n_labels", [1, 19, 21, 32])
def test_underflowed_probabilities_give_the_ir_kernels_bits(n_labels, both, regime):
    image, probs = scene(30, 40), probabilities(n_labels, 30, 40, spread=60.0)
    if n_labels > 1:
        tiny = np.finfo(np.float32).tiny
        assert (probs < tiny).mean() > 0.3 and ((probs > tiny / 1e6) & (probs < tiny * 1e6)).any()
    assert_same(both(lambda: meanfield.dense_crf(image, probs, settings())))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_grid_gives_the_ir_kernels_bits(threads, both):
    image, probs = scene(48, 50), probabilities(21, 48, 50)
    grid = [settings(bi_w=w, bi_xy_std=xy, pos_w=p, iters=i)
            for w in (3.0, 5.0) for xy in (50.0, 121.0) for p, i in ((3.0, 10), (1.0, 0), (2.0, 1))]
    ir_results, plain_results = both(lambda: sorted(meanfield.grid(image, probs, grid, threads),
                                                    key=lambda item: item[0]))
    assert [index for index, _ in plain_results] == list(range(len(grid)))
    for (_, ir_q), (_, plain_q) in zip(ir_results, plain_results):
        np.testing.assert_array_equal(plain_q, ir_q)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("threads", [1, 2])
def test_lattices_are_the_ir_kernels(d, threads, both):
    rng = np.random.default_rng(d)
    features = (rng.normal(0, 2, (3001, d)) + rng.integers(-3, 4, (3001, d))).astype(np.float32)
    features[100:300] = features[100]  # a flat run
    features[400:600] = np.round(features[400:600])  # ties in the rounding and the ranks
    ir_lattice, plain_lattice = both(lambda: lattice.build_lattice(features, threads))
    for name in ("offsets", "weights", "neighbours", "norm", "csr_start", "csr_pixel", "csr_weight"):
        np.testing.assert_array_equal(getattr(plain_lattice, name), getattr(ir_lattice, name), err_msg=name)


@pytest.mark.parametrize("d", [2, 5])
def test_simplices_from_any_first_pixel_are_the_ir_kernels(d, ir):
    # The IR kernel takes eight pixels at a time from `lo`, then one at a time up to `hi`.
    rng = np.random.default_rng(d)
    features = (rng.normal(0, 1, (203, d)) + rng.integers(-3, 4, (203, d))).astype(np.float32)
    args = (features, lattice._scale_factors(d), lattice._vertex_steps(d))
    results = []
    for kernels in (ir, plain):
        keys, weights = np.zeros((204, d + 1, 3), np.int64), np.zeros((204, d + 1), np.float32)
        for lo, hi in ((0, 3), (3, 150), (150, 204)):
            kernels.simplices(lo, hi, *args, keys, weights)
        results.append((keys, weights))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])


@pytest.fixture
def unchosen(monkeypatch):
    """No kernel set chosen yet in this process, and DEEPLAB_CRF_KERNELS unset."""
    monkeypatch.setattr(meanfield, "_chosen", None)
    monkeypatch.setattr(meanfield, "_gaussian_memo", {})
    monkeypatch.delenv(meanfield.ENV, raising=False)


def fail(*_):
    raise AssertionError("the IR kernels were tried")


@pytest.mark.parametrize("value", ["plain", " Plain "])
def test_the_variable_chooses_the_plain_kernels_without_trying_the_ir_ones(value, unchosen, monkeypatch, caplog):
    monkeypatch.setenv(meanfield.ENV, value)
    monkeypatch.setattr(meanfield, "_load_ir", fail)
    meanfield.warm()
    assert meanfield.compiled() is plain
    assert caplog.records == []


@pytest.mark.parametrize("value", ["ir", ""])
def test_ir_or_nothing_chooses_the_ir_kernels(value, ir, unchosen, monkeypatch, caplog):
    monkeypatch.setenv(meanfield.ENV, value)
    assert meanfield.compiled() is ir
    assert caplog.records == []


def test_an_unknown_choice_is_refused(unchosen, monkeypatch):
    monkeypatch.setenv(meanfield.ENV, "fast")
    with pytest.raises(UsageError, match="DEEPLAB_CRF_KERNELS must be one of ir, plain, got 'fast'"):
        meanfield.compiled()
    assert meanfield._chosen is None


def broken_ir():
    raise RuntimeError("Failed in nopython mode pipeline (step: native lowering)\nmore lines\nof detail")


def test_ir_kernels_that_do_not_compile_give_way_to_the_plain_ones_with_one_warning(ir, unchosen, monkeypatch,
                                                                                     caplog):
    image, probs = scene(30, 40), probabilities(21, 30, 40)
    monkeypatch.setattr(meanfield, "_chosen", ir)
    expected = meanfield.dense_crf(image, probs, settings())
    monkeypatch.setattr(meanfield, "_chosen", None)
    monkeypatch.setattr(meanfield, "_load_ir", broken_ir)
    meanfield.warm()
    q = meanfield.dense_crf(image, probs, settings(), threads=2)
    meanfield.warm()
    assert meanfield.compiled() is plain
    np.testing.assert_array_equal(q, expected)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.name == "deeplab_cli.crf.meanfield"
    message = record.getMessage()
    assert "\n" not in message and message.startswith("deeplab: the CRF's IR kernels do not compile on numba ")
    assert "(RuntimeError: Failed in nopython mode pipeline (step: native lowering)); using its plain" in message


def test_a_fallback_passes_the_plain_kernels_on_to_the_processes_it_starts(unchosen, monkeypatch):
    # The CLI chooses before it spawns its workers: they must neither retry the IR kernels nor warn again.
    monkeypatch.setattr(meanfield, "_load_ir", broken_ir)
    assert meanfield.compiled() is plain
    assert os.environ[meanfield.ENV] == "plain"
    child = subprocess.run([sys.executable, "-c", "from deeplab_cli.crf import meanfield; print(meanfield.compiled().__name__)"],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["deeplab_cli.crf.plain"] and child.stderr == ""


FIRST_CALL = """
import numpy as np
from deeplab_cli.crf import meanfield
from deeplab_cli.synthetic import natural_image, probabilities
image = np.ascontiguousarray(natural_image(40, 52, seed=3)[..., ::-1])
probs = probabilities(image, seed=3)
first = meanfield.dense_crf(image, probs, threads=2)  # choosing the kernels happens in this call
print(int((first != meanfield.dense_crf(image, probs, threads=2)).sum()))
"""


def test_the_first_mean_field_of_a_process_is_not_disturbed_by_choosing_the_kernels():
    # Choosing runs a mean field of its own on this thread: it must not share the first call's buffers.
    done = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]


def test_an_ir_module_that_does_not_import_gives_way_to_the_plain_kernels(unchosen, monkeypatch, caplog):
    # As when numba.core.cgutils or llvmlite.ir have moved: importing deeplab_cli.crf.simd fails.
    monkeypatch.delattr(deeplab_cli.crf, "simd", raising=False)
    monkeypatch.setitem(sys.modules, "deeplab_cli.crf.simd", None)
    assert meanfield.compiled() is plain
    [record] = caplog.records
    assert "(ModuleNotFoundError: " in record.getMessage() or "(ImportError: " in record.getMessage()


CHILD = """
import sys
from deeplab_cli.crf import meanfield
if sys.argv[1] == "broken":
    def broken():
        raise RuntimeError("cannot compile\\nsecond line")
    meanfield._load_ir = broken
meanfield.warm()
meanfield.warm()
print(meanfield.compiled().__name__)
"""


@pytest.mark.parametrize("variable, ir_state, chosen, lines", [
    ("plain", "fine", "deeplab_cli.crf.plain", 0),
    (None, "broken", "deeplab_cli.crf.plain", 1),
])
def test_a_process_shows_the_fallback_as_one_line_on_stderr(variable, ir_state, chosen, lines):
    env = {k: v for k, v in os.environ.items() if k != meanfield.ENV}
    if variable:
        env[meanfield.ENV] = variable
    done = subprocess.run([sys.executable, "-c", CHILD, ir_state], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [chosen]
    stderr = done.stderr.splitlines()
    assert len(stderr) == lines
    if lines:
        assert stderr[0].startswith("deeplab: the CRF's IR kernels do not compile on numba ")
        assert "(RuntimeError: cannot compile); using its plain kernels" in stderr[0]
