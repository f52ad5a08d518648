"""Cross-checks against the references themselves (`pytest -m crosscheck`), where the crosscheck extra is
installed: tests/golden/ holds what pydensecrf and the PyTorch network compute today, and deeplab_cli
agrees with them directly. Elsewhere the tests compare with tests/golden/ alone."""

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest

import golden_cases as cases
from deeplab_cli.crf import meanfield
from deeplab_cli.crf import CRFParams
from test_network import assert_close_to_scale, run

pytestmark = pytest.mark.crosscheck


def make_golden():
    """tests/golden/make_golden.py as a module."""
    spec = importlib.util.spec_from_file_location("make_golden", cases.GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pydensecrf_computes_the_crf_golden_and_the_engine_computes_pydensecrfs():
    pytest.importorskip("pydensecrf.densecrf")
    from reference import pydensecrf_marginals

    golden = cases.load(cases.CRF_FILE)["cases"]
    maker = make_golden()
    made = cases.crf_cases()
    assert sorted(golden) == sorted(made)
    for name, make in made.items():
        assert maker.crf_record(make) == golden[name], name
        image, probs, changes, normalization = make()
        if normalization == "after":
            params = CRFParams(**changes)
            expected = pydensecrf_marginals(image, probs, params)
            for threads in (1, 2):
                np.testing.assert_array_equal(meanfield.dense_crf(image, probs, params, threads), expected, name)


@pytest.mark.slow
def test_torch_computes_the_network_golden_and_onnxruntime_agrees(weights, onnx_model):
    pytest.importorskip("torch")
    pytest.importorskip("pydensecrf.densecrf")  # the labels' reference CRF
    from reference import deeplab_labels, torch_logits

    golden = cases.load(cases.NETWORK_FILE)
    assert golden["weights"] == cases.sha256(*[a for pair in weights.values() for a in pair])
    for name, (image, pad_to) in cases.network_cases().items():
        ref = torch_logits(weights, image, pad_to)
        stored, step = cases.golden_logits(name, image, weights)
        assert_close_to_scale(ref[:, ::step, ::step], stored, rel=1e-6)
        assert_close_to_scale(run(onnx_model, image, pad_to), ref)
    with tempfile.TemporaryDirectory() as folder:
        for name, (image, crf, pad_to) in cases.label_cases(Path(folder)).items():
            expected, image_sha256 = cases.golden_labels(name)
            labels = deeplab_labels(weights, image, crf=crf, pad_to=pad_to)
            assert (labels == expected).mean() >= 0.999, (name, cases.sha256(image) == image_sha256)


def test_the_ports_network_computes_the_port_golden_and_onnxruntime_agrees(weights, port_model):
    pytest.importorskip("torch")
    from reference import port_logits, port_state_dict

    for name, (image, pad_to) in cases.port_cases().items():
        ref = port_logits(port_state_dict(weights), image, pad_to)
        stored, _ = cases.golden_logits(name, image, weights)
        assert_close_to_scale(ref, stored, rel=1e-6)
        assert_close_to_scale(run(port_model, image, pad_to), ref)


def test_pydensecrf_computes_the_scores_golden():
    pytest.importorskip("pydensecrf.densecrf")
    maker = make_golden()
    with np.load(cases.SCORES_FILE) as stored:
        made = maker.scores_golden()
        assert sorted(made) == sorted(stored.files)
        for name, array in made.items():
            np.testing.assert_array_equal(array, stored[name], name)
