import json
from importlib import metadata

import numpy as np
import onnxruntime
import pytest

from conftest import CUDA_OFFERED
from deeplab_cli.model import runtime
from deeplab_cli.errors import RuntimeSetupError
from deeplab_cli.model.runtime import CPU, CUDA, open_session, parse_device

CLASSES = ["background", "thing"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The exported graph's interface on a 1x1 stride-8 convolution: `logits[:, 0]` is the blue channel
    and `logits[:, 1]` the red one, sampled every 8 pixels after zero-padding to `pad_to`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.zeros((2, 3, 1, 1), np.float32)
    weight[0, 0] = weight[1, 2] = 1
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array([2], np.int64), "i2"),
        numpy_helper.from_array(np.array([4], np.int64), "i4"),
        numpy_helper.from_array(np.zeros(2, np.int64), "zeros2"),
        numpy_helper.from_array(np.zeros(6, np.int64), "zeros6"),
        numpy_helper.from_array(np.zeros(2, np.int64), "pad_to"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Shape", ["nchw"], ["shape"]),
        helper.make_node("Slice", ["shape", "i2", "i4"], ["hw"]),
        helper.make_node("Sub", ["pad_to", "hw"], ["short"]),
        helper.make_node("Max", ["short", "zeros2"], ["grow"]),
        helper.make_node("Concat", ["zeros6", "grow"], ["pads"], axis=0),
        helper.make_node("Pad", ["nchw", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w"], ["logits"], kernel_shape=[1, 1], strides=[8, 8]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        inputs=[helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3]),
                helper.make_tensor_value_info("pad_to", TensorProto.INT64, [2])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, "h", "w"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"classes": json.dumps(CLASSES), "model_name": "tiny"})
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(model, path)
    return path


class FakeInferenceSession:
    """Records what open_session asks onnxruntime for, and runs on `active` providers only."""

    active = [CPU]
    calls: list = []

    def __init__(self, path, options, providers):
        self.calls.append({"path": path, "options": options, "providers": providers})

    def get_providers(self):
        return list(self.active)

    def get_modelmeta(self):
        class Meta:
            custom_metadata_map = {"classes": json.dumps(CLASSES), "model_name": "fake"}
        return Meta()


@pytest.fixture
def fake_ort(monkeypatch):
    """onnxruntime that reports CUDA available but whose sessions fall back to the CPU. Its preload_dlls
    prints, as onnxruntime's does, that it could not load cuDNN, and is recorded in `calls` too."""
    FakeInferenceSession.calls = []
    FakeInferenceSession.active = [CPU]

    def preload_dlls():
        FakeInferenceSession.calls.append("preload")
        print("Failed to load libcudnn.so.9: libcudnn.so.9: cannot open shared object file")
        print("Please follow https://onnxruntime.ai/docs/install/#cuda-and-cudnn to install CUDA.")

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeInferenceSession)
    monkeypatch.setattr(onnxruntime, "preload_dlls", preload_dlls, raising=False)
    return FakeInferenceSession


@pytest.mark.parametrize("text, parsed", [
    ("auto", ("auto", 0)), ("cpu", ("cpu", 0)), ("cuda", ("cuda", 0)), ("cuda:1", ("cuda", 1)),
    ("CUDA", ("cuda", 0)), ("Cpu", ("cpu", 0)),
])
def test_parse_device_accepts(text, parsed):
    assert parse_device(text) == parsed


@pytest.mark.parametrize("text", ["gpu", "cpu:1", "cuda:x", "auto:0", "cuda:", ""])
def test_parse_device_rejects(text):
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        parse_device(text)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_open_session_on_cpu(tiny_model, device):
    session = open_session(tiny_model, device)
    assert session.provider == CPU
    assert session.classes == CLASSES
    assert session.model_name == "tiny"


def test_logits_shape_values_and_pad_to(tiny_model):
    session = open_session(tiny_model, "cpu")
    images = np.random.default_rng(0).integers(0, 256, (2, 37, 45, 3), dtype=np.uint8)

    logits = session.run(images)["logits"]
    assert logits.dtype == np.float32 and logits.shape == (2, 2, 5, 6)
    np.testing.assert_array_equal(logits[:, 0], images[:, ::8, ::8, 0])
    np.testing.assert_array_equal(logits[:, 1], images[:, ::8, ::8, 2])

    padded = session.run(images, pad_to=(64, 72))["logits"]
    assert padded.shape == (2, 2, 8, 9)
    np.testing.assert_array_equal(padded[:, :, :5, :6], logits)
    assert not padded[:, :, 5:].any() and not padded[:, :, :, 6:].any()


@pytest.mark.skipif(CUDA_OFFERED, reason="the GPU build is installed")
def test_cuda_without_the_gpu_build_says_how_to_fix(tiny_model):
    with pytest.raises(RuntimeSetupError) as info:
        open_session(tiny_model, "cuda")
    message = str(info.value)
    assert "\n" not in message
    assert f"onnxruntime {metadata.version('onnxruntime')}" in message
    assert all(p in message for p in onnxruntime.get_available_providers())
    assert "pip install 'deeplab-cli[gpu]'" in message


def test_cuda_never_falls_back_to_cpu(fake_ort, capsys):
    with pytest.raises(RuntimeSetupError, match="CUDA provider did not start") as info:
        open_session("model.onnx", "cuda")
    assert "\n" not in str(info.value)
    assert "Failed to load libcudnn.so.9" in str(info.value)  # what the preload could not find
    assert fake_ort.calls[0] == "preload"  # the pip-installed CUDA libraries, before the session
    assert fake_ort.calls[1]["providers"][0][0] == CUDA
    assert capsys.readouterr().out == ""  # stdout carries results: onnxruntime's report must not reach it


def test_auto_reports_the_cpu_fallback(fake_ort, capsys):
    session = open_session("model.onnx", "auto")
    assert session.provider == CPU
    assert fake_ort.calls[1]["providers"][0][0] == CUDA  # CUDA was asked for, and did not start
    assert capsys.readouterr().out == ""


def test_auto_reports_cuda_when_it_starts(fake_ort):
    fake_ort.active = [CUDA, CPU]
    assert open_session("model.onnx", "auto").provider == CUDA


def test_cpu_does_not_ask_for_cuda(fake_ort):
    open_session("model.onnx", "cpu")
    assert "preload" not in fake_ort.calls  # no CUDA libraries loaded either
    assert fake_ort.calls[0]["providers"] == [CPU]


def test_cuda_provider_options(fake_ort):
    fake_ort.active = [CUDA, CPU]
    assert open_session("model.onnx", "cuda:1").provider == CUDA
    (name, options), fallback = fake_ort.calls[1]["providers"]
    assert (name, fallback) == (CUDA, CPU)
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert options["device_id"] == 1
    assert options["use_tf32"] == "0"  # float32 convolutions in float32, not TF32's 10-bit mantissa


def test_cuda_without_preload_in_old_onnxruntime(fake_ort, monkeypatch):
    monkeypatch.delattr(onnxruntime, "preload_dlls")
    with pytest.raises(RuntimeSetupError, match=r"did not start \(active: CPUExecutionProvider\); check"):
        open_session("model.onnx", "cuda")


@pytest.mark.parametrize("threads, expected", [(3, 3), (None, 0)])
def test_threads_set_intra_op_threads(fake_ort, threads, expected):
    open_session("model.onnx", "cpu", threads=threads)
    assert fake_ort.calls[0]["options"].intra_op_num_threads == expected  # 0: onnxruntime's default


def test_both_onnxruntime_packages_installed(monkeypatch, tiny_model):
    def version(name):
        if name in ("onnxruntime", "onnxruntime-gpu"):
            return "1.20.0"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    assert runtime.installed_onnxruntime() == ["onnxruntime 1.20.0", "onnxruntime-gpu 1.20.0"]
    with pytest.raises(RuntimeSetupError) as info:
        open_session(tiny_model, "cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "onnxruntime 1.20.0 and onnxruntime-gpu 1.20.0" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in message


def test_unreadable_model_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(RuntimeSetupError) as info:
        open_session(path, "cpu")
    message = str(info.value)
    assert message.startswith(f"{path}: cannot load the model (")
    assert "\n" not in message


def test_load_error_without_a_message_still_names_the_reason(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(onnxruntime, "InferenceSession", fail)
    with pytest.raises(RuntimeSetupError, match=r"^m\.onnx: cannot load the model \(RuntimeError\)$"):
        open_session("m.onnx", "cpu")


def test_a_floor_pooling_network_is_padded_to_sizes_8k_plus_1(port_model, onnx_model, weights):
    from deeplab_cli.synthetic import natural_image
    from golden_cases import port_cases
    from test_network import assert_reference_logits

    port = open_session(port_model, "cpu")
    name = "port: 40x64 seed 7 padded to 41x65"
    image, _ = port_cases()[name]
    assert_reference_logits(port.run(image[None])["logits"][0], name, image, weights)
    assert port.padding((40, 64), None) == (41, 65)
    assert port.padding((40, 64), (50, 30)) == (57, 65)  # --pad-to first, then up to 8k + 1
    assert port.padding((33, 41), None) == (33, 41)
    # Its scores then reach every pixel under Caffe's zoom-8 upsampling, as a ceil-pooling network's do.
    h, w = port.run(natural_image(40, 64, seed=1)[None])["logits"].shape[2:]
    assert (h - 1) * 8 + 1 >= 40 and (w - 1) * 8 + 1 >= 64
    caffe = open_session(onnx_model, "cpu")
    assert caffe.padding((40, 64), None) is None and caffe.padding((40, 64), (50, 30)) == (50, 30)
