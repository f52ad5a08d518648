import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import needs_cuda
from deeplab_cli.errors import WeightsError
from deeplab_cli.model.network import build_onnx, check_weights, floor_input_size, largefov_layers, sequential_names
from deeplab_cli.model.runtime import open_session
from deeplab_cli.synthetic import natural_image
from golden_cases import golden_logits, port_cases
from reference import PORT_INDEX, port_state_dict


def run(model_path, image, pad_to=None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feeds = {"image": image[None]}
    if pad_to is not None:
        feeds["pad_to"] = np.array(pad_to, np.int64)
    return session.run(["logits"], feeds)[0][0]


def assert_close_to_scale(out, ref, rel=1e-4):
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= rel * np.abs(ref).max()


def assert_reference_logits(out, name, image, weights, rel=1e-4):
    """(C, h, w) logits `out` of network case `name` are the float64 PyTorch reference's (tests/golden/)
    within `rel` of their largest magnitude (on the rows and columns the file keeps)."""
    ref, step = golden_logits(name, image, weights)
    assert_close_to_scale(out[:, ::step, ::step], ref, rel)


@pytest.mark.parametrize("size", [(37, 45), (1, 1), (8, 9), (375, 500)])
def test_logits_match_reference(onnx_model, weights, size):
    image = natural_image(*size, seed=sum(size))
    assert_reference_logits(run(onnx_model, image), f"{size[0]}x{size[1]} seed {sum(size)}", image, weights)


def test_caffe_rounding_gives_papers_sizes(onnx_model):
    assert run(onnx_model, np.zeros((513, 513, 3), np.uint8)).shape == (21, 65, 65)
    assert run(onnx_model, np.zeros((375, 500, 3), np.uint8)).shape == (21, 48, 64)


def test_pad_to_pads_with_the_mean(onnx_model, weights):
    image = natural_image(50, 70, seed=3)
    out = run(onnx_model, image, pad_to=(97, 97))
    assert out.shape == (21, 13, 13)
    assert_reference_logits(out, "50x70 seed 3 padded to 97x97", image, weights)
    # Padding with the mean is padding with zeros after subtraction: not the same as padding pixels with 0.
    black = np.zeros((97, 97, 3), np.uint8)
    black[:50, :70] = image
    assert np.abs(out - run(onnx_model, black)).max() > 1e-3 * np.abs(out).max()


def test_batch_of_equal_sizes(onnx_model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_model), options, providers=["CPUExecutionProvider"])
    batch = np.stack([natural_image(33, 41, seed=s) for s in range(3)])
    out = session.run(["logits"], {"image": batch})[0]
    for i in range(3):
        assert_close_to_scale(out[i], run(onnx_model, batch[i]))


def test_metadata(onnx_model):
    meta = {p.key: p.value for p in onnx.load(str(onnx_model), load_external_data=False).metadata_props}
    assert meta["model_name"] == "test"
    assert json.loads(meta["classes"])[15] == "person"
    assert json.loads(meta["mean_bgr"]) == [104.008, 116.669, 122.675]
    assert meta["source_sha256"] == "0" * 64
    assert meta["pooling"] == "ceil"


@pytest.fixture(scope="module")
def fp16_model(weights, tmp_path_factory):
    model = build_onnx(check_weights(weights, "w"), classes=[str(i) for i in range(21)], model_name="t",
                       source_sha256="", float16=True)
    path = tmp_path_factory.mktemp("fp16") / "fp16.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_float16_graph_keeps_io_types(fp16_model, weights, device):
    session = open_session(fp16_model, device)
    inputs, outputs = session.ort_session.get_inputs(), session.ort_session.get_outputs()
    assert inputs[0].type == "tensor(uint8)" and outputs[0].type == "tensor(float)"
    model = onnx.load(str(fp16_model))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    image = natural_image(41, 53, seed=5)
    out = session.run(image[None])["logits"][0]
    assert_reference_logits(out, "41x53 seed 5", image, weights, rel=2e-2)
    ref, _ = golden_logits("41x53 seed 5", image, weights)
    assert (out.argmax(0) == ref.argmax(0)).mean() > 0.9


@needs_cuda
def test_cuda_logits_match_reference(onnx_model, weights):
    session = open_session(onnx_model, "cuda")
    assert session.provider == "CUDAExecutionProvider"
    for size in [(37, 45), (375, 500)]:
        image = natural_image(*size, seed=sum(size))
        # As tight as on the CPU: the CUDA session computes float32 in float32 (no TF32).
        assert_reference_logits(session.run(image[None])["logits"][0], f"{size[0]}x{size[1]} seed {sum(size)}",
                                image, weights)


def test_check_weights_reports_missing_layers(weights):
    partial = {k: v for k, v in weights.items() if k not in ("fc7", "fc8_voc12")}
    with pytest.raises(WeightsError, match=r"^src.caffemodel: not DeepLab-LargeFOV: missing layers fc7, fc8_voc12"):
        check_weights(partial, "src.caffemodel")


def test_check_weights_recognises_a_vgg_classifier(weights):
    vgg = dict(weights, fc6=(np.zeros((4096, 512, 7, 7), np.float32), np.zeros(4096, np.float32)))
    with pytest.raises(WeightsError, match="fc6 has weights 4096x512x7x7.*VGG-16 classifier"):
        check_weights(vgg, "vgg.caffemodel")


def test_check_weights_checks_recorded_dilation(weights):
    with pytest.raises(WeightsError, match="fc6 has dilation 4, expected 12"):
        check_weights(weights, "f", dilations={"fc6": 4})
    check_weights(weights, "f", dilations={"fc6": 12, "conv5_1": 2, "conv1_1": None, "fc7": 1})


def test_check_weights_accepts_legacy_bias_shape(weights):
    w, b = weights["fc7"]
    checked = check_weights(dict(weights, fc7=(w, b.reshape(1, 1, 1, -1))), "f")
    assert checked["fc7"][1].shape == (1024,)


# -- the PyTorch port: poolings that round down ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(port_cases()))
def test_floor_pooling_gives_the_ports_logits(port_model, weights, name):
    image, pad_to = port_cases()[name]
    assert_reference_logits(run(port_model, image, pad_to), name, image, weights)


def test_floor_and_ceil_pooling_differ_where_a_side_is_even(onnx_model, port_model):
    # The issue's example: 37 -> 19 -> 10 -> 6 scores in Caffe, 5 in PyTorch; 33 is odd all the way down.
    assert run(onnx_model, np.zeros((37, 33, 3), np.uint8)).shape[1:] == (6, 5)
    assert run(port_model, np.zeros((37, 33, 3), np.uint8)).shape[1:] == (5, 5)


def pooled(side, ceil):
    """A side after LargeFOV's three stride-2 poolings (kernel 3, pad 1), rounding up or down."""
    for _ in range(3):
        side = (side - 1 + ceil) // 2 + 1
    return side


@pytest.mark.parametrize("side", range(1, 100))
def test_floor_input_size_is_where_both_roundings_agree_and_reach_the_last_pixel(side):
    padded = floor_input_size(side)
    assert padded >= side and padded % 8 == 1 and padded - side < 8
    assert pooled(padded, ceil=False) == pooled(padded, ceil=True)
    assert (pooled(padded, ceil=False) - 1) * 8 + 1 == padded  # Caffe's zoom-8 upsampling ends on its last pixel


def test_sequential_names_number_the_layers_as_the_port_does():
    assert {name: index for index, name in sequential_names(largefov_layers()).items()} == PORT_INDEX


def test_check_weights_reads_a_ports_state_dict_keys(weights):
    state = port_state_dict(weights)
    layers = {key.removesuffix(".weight"): (state[key], state[key.removesuffix(".weight") + ".bias"])
              for key in state if key.endswith(".weight")}
    checked = check_weights(layers, "port.pth")
    assert checked.keys() == weights.keys()
    for name, (w, b) in weights.items():
        assert np.array_equal(checked[name][0], w) and np.array_equal(checked[name][1], b)
    del layers["module.features.38"]
    with pytest.raises(WeightsError, match="missing layer fc8_voc12"):
        check_weights(layers, "port.pth")


def test_pooling_is_recorded_and_checked(weights, port_model):
    meta = {p.key: p.value for p in onnx.load(str(port_model), load_external_data=False).metadata_props}
    assert meta["pooling"] == "floor"
    assert open_session(port_model, "cpu").pooling == "floor"
    with pytest.raises(ValueError, match="pooling"):
        build_onnx(check_weights(weights, "w"), classes=["a"] * 21, model_name="t", source_sha256="0", pooling="round")


PROBS_CASES = [((37, 45), None), ((1, 1), None), ((30, 52), (65, 70))]  # (size, pad_to)


def assert_probs_and_labels(session, size, pad_to):
    """The graph's probs and labels outputs are the softmax and argmax of its upsampled logits."""
    from reference import caffe_interp

    out = session.run(natural_image(*size, seed=9)[None], pad_to, ("logits", "probs", "labels"))
    logits, probs, labels = (out[name][0] for name in ("logits", "probs", "labels"))
    scores = caffe_interp(logits, *size).astype(np.float64)
    expected = np.exp(scores - scores.max(0)) / np.exp(scores - scores.max(0)).sum(0)
    assert probs.shape == (21, *size) and labels.shape == size and labels.dtype == np.uint8
    assert np.abs(probs - expected).max() < 1e-5
    assert (labels == expected.argmax(0)).mean() > 0.999


@pytest.mark.parametrize("size,pad_to", PROBS_CASES)
def test_probs_and_labels_in_the_graph(probs_model, size, pad_to):
    assert_probs_and_labels(open_session(probs_model, "cpu"), size, pad_to)


@needs_cuda
def test_probs_and_labels_in_the_graph_on_cuda(probs_model):
    session = open_session(probs_model, "cuda")
    for size, pad_to in PROBS_CASES:
        assert_probs_and_labels(session, size, pad_to)
