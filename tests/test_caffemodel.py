from pathlib import Path

import numpy as np
import pytest
from caffe_writer import Conv, Layer, encode_caffemodel, write_caffemodel
from conftest import CAFFE_DATA, LENET

from deeplab_cli.model.caffemodel import read_caffemodel
from deeplab_cli.errors import WeightsError


# DeepLab's own V1 enum values have no BVLC number; any value outside BVLC's enum will do here.
IMAGE_SEG_DATA, INTERP, SEG_ACCURACY = 40, 41, 42

# name, in channels, out channels, kernel, dilation (None: the prototxt sets no hole)
LARGEFOV_CONVS = [
    ("conv1_1", 3, 64, 3, None), ("conv1_2", 64, 64, 3, None),
    ("conv2_1", 64, 128, 3, None), ("conv2_2", 128, 128, 3, None),
    ("conv3_1", 128, 256, 3, None), ("conv3_2", 256, 256, 3, None), ("conv3_3", 256, 256, 3, None),
    ("conv4_1", 256, 512, 3, None), ("conv4_2", 512, 512, 3, None), ("conv4_3", 512, 512, 3, None),
    ("conv5_1", 512, 512, 3, 2), ("conv5_2", 512, 512, 3, 2), ("conv5_3", 512, 512, 3, 2),
    ("fc6", 512, 1024, 3, 12), ("fc7", 1024, 1024, 1, None), ("fc8_voc12", 1024, 21, 1, None),
]
POOL_AFTER = {"conv1_2": "pool1", "conv2_2": "pool2", "conv3_3": "pool3", "conv4_3": "pool4", "conv5_3": "pool5"}


def largefov_training_net(rng: np.random.Generator, width_divisor: int = 1) -> list[Layer]:
    """The DeepLab-LargeFOV training net as a snapshot carries it: blob-less data, ReLU, pooling,
    dropout, interp and loss layers around the convolutions. Channel counts (except the 3 input
    and 21 output ones) are divided by `width_divisor` to keep files small."""

    def width(c: int) -> int:
        return c if c in (3, 21) else c // width_divisor

    layers = [Layer("data", "ImageSegData", tops=("data", "label"), v1_type=IMAGE_SEG_DATA)]
    x = "data"
    for name, cin, cout, k, dilation in LARGEFOV_CONVS:
        weights = rng.standard_normal((width(cout), width(cin), k, k), dtype=np.float32)
        bias = rng.standard_normal(width(cout), dtype=np.float32)
        pad = 0 if k == 1 else (dilation or 1)
        conv = Conv(width(cout), pad, k, 1, dilation)
        layers.append(Layer(name, "Convolution", (x,), (name,), (weights, bias), conv))
        x = name
        if name == "fc8_voc12":
            break
        relu = name.replace("conv", "relu") if name.startswith("conv") else f"relu{name[2:]}"
        layers.append(Layer(relu, "ReLU", (x,), (x,)))
        if name in POOL_AFTER:
            layers.append(Layer(POOL_AFTER[name], "Pooling", (x,), (POOL_AFTER[name],)))
            x = POOL_AFTER[name]
        if name == "conv5_3":
            layers.append(Layer("pool5a", "Pooling", (x,), ("pool5a",)))
            x = "pool5a"
        if name in ("fc6", "fc7"):
            drop = f"drop{name[2:]}"
            layers.append(Layer(drop, "Dropout", (x,), (x,)))
    layers += [
        Layer("label_shrink", "Interp", ("label",), ("label_shrink",), v1_type=INTERP),
        Layer("loss", "SoftmaxWithLoss", ("fc8_voc12", "label_shrink"), ("loss",)),
        Layer("accuracy", "SegAccuracy", ("fc8_voc12", "label_shrink"), ("accuracy",), v1_type=SEG_ACCURACY),
    ]
    return layers


def legacy_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """What a v1 (num, channels, height, width) blob of `shape` reads back as."""
    return (1,) * (4 - len(shape)) + shape


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_round_trip_of_the_largefov_training_net(tmp_path, layout):
    net = largefov_training_net(np.random.default_rng(0), width_divisor=32)
    path = tmp_path / "train.caffemodel"
    write_caffemodel(path, net, layout)

    layers = read_caffemodel(path)

    assert list(layers) == [layer.name for layer in net]
    for written in net:
        read = layers[written.name]
        assert read.name == written.name
        assert len(read.blobs) == len(written.blobs)
        for got, want in zip(read.blobs, written.blobs):
            assert got.dtype == np.float32
            assert got.shape == (want.shape if layout == "v2" else legacy_shape(want.shape))
            np.testing.assert_array_equal(got.reshape(want.shape), want)
        assert read.dilation == (written.conv.dilation if written.conv else None)
    assert layers["fc6"].dilation == 12
    assert layers["conv5_1"].dilation == 2
    assert layers["conv1_1"].dilation is None
    assert layers["pool5a"].blobs == () and layers["drop6"].blobs == () and layers["data"].blobs == ()


def test_types_read_as_stored_in_each_layout(tmp_path):
    net = largefov_training_net(np.random.default_rng(1), width_divisor=64)
    write_caffemodel(tmp_path / "v1.caffemodel", net, "v1")
    write_caffemodel(tmp_path / "v2.caffemodel", net, "v2")

    old = read_caffemodel(tmp_path / "v1.caffemodel")
    new = read_caffemodel(tmp_path / "v2.caffemodel")

    assert [old[n].type for n in ("conv1_1", "relu1_1", "pool1", "drop6", "loss")] == [
        "CONVOLUTION", "RELU", "POOLING", "DROPOUT", "SOFTMAX_LOSS"]
    assert old["label_shrink"].type == f"V1_{INTERP}"
    assert old["data"].type == f"V1_{IMAGE_SEG_DATA}"
    assert [new[n].type for n in ("data", "conv1_1", "relu1_1", "label_shrink", "loss")] == [
        "ImageSegData", "Convolution", "ReLU", "Interp", "SoftmaxWithLoss"]


def test_v1_hole_is_read_as_dilation(tmp_path):
    # Field 17 of the newer ConvolutionParameter is not `hole`: reading a v1 file with that
    # schema would silently give no dilation.
    weights = np.ones((2, 3, 3, 3), np.float32)
    layer = Layer("fc6", "Convolution", blobs=(weights,), conv=Conv(2, 12, 3, 1, dilation=12))
    write_caffemodel(tmp_path / "m.caffemodel", [layer], "v1")

    assert read_caffemodel(tmp_path / "m.caffemodel")["fc6"].dilation == 12


@pytest.mark.parametrize("packed", [False, True])
def test_v2_conv_fields_read_packed_or_not(tmp_path, packed):
    layer = Layer("fc6", "Convolution", blobs=(np.zeros((1, 1, 3, 3), np.float32),), conv=Conv(1, 12, 3, 1, 12))
    write_caffemodel(tmp_path / "m.caffemodel", [layer], "v2", packed=packed)

    assert read_caffemodel(tmp_path / "m.caffemodel")["fc6"].dilation == 12


def test_double_data_is_read_when_data_is_empty(tmp_path):
    weights = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32)
    write_caffemodel(tmp_path / "m.caffemodel", [Layer("ip", "InnerProduct", blobs=(weights,))], "v2", double=True)

    blob = read_caffemodel(tmp_path / "m.caffemodel")["ip"].blobs[0]

    assert blob.dtype == np.float32
    np.testing.assert_array_equal(blob, weights)


def test_a_file_with_both_layer_lists_reads_both(tmp_path):
    old = Layer("conv1", "Convolution", blobs=(np.full((1, 1, 1, 2), 3.0, np.float32),), conv=Conv(1, 0, 1, 1, 4))
    new = Layer("conv2", "Convolution", blobs=(np.full((2, 1, 1, 1), 5.0, np.float32),), conv=Conv(2, 0, 1, 1, 6))
    # Concatenated protobuf messages parse as their merge: one NetParameter with both lists.
    (tmp_path / "m.caffemodel").write_bytes(encode_caffemodel([old], "v1") + encode_caffemodel([new], "v2"))

    layers = read_caffemodel(tmp_path / "m.caffemodel")

    assert list(layers) == ["conv1", "conv2"]
    assert (layers["conv1"].dilation, layers["conv2"].dilation) == (4, 6)
    assert layers["conv2"].blobs[0].shape == (2, 1, 1, 1)


def test_real_lenet_written_by_caffe():
    layers = read_caffemodel(LENET)

    assert list(layers) == ["mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"]
    assert layers["conv1"].type == "Convolution"
    assert [b.shape for b in layers["conv1"].blobs] == [(20, 1, 5, 5), (20,)]
    assert [b.shape for b in layers["conv2"].blobs] == [(50, 20, 5, 5), (50,)]
    assert layers["ip1"].type == "InnerProduct"
    assert [b.shape for b in layers["ip1"].blobs] == [(500, 800), (500,)]
    assert layers["mnist"].blobs == () and layers["conv1"].dilation is None
    assert all(np.isfinite(b).all() and b.std() > 0 for layer in layers.values() for b in layer.blobs)


def assert_refused(path: Path, reason: str) -> None:
    with pytest.raises(WeightsError) as caught:
        read_caffemodel(path)
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message
    assert reason in message


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    assert_refused(tmp_path / "empty.caffemodel", "empty")


def test_missing_file_is_refused(tmp_path):
    assert_refused(tmp_path / "absent.caffemodel", "cannot read")


@pytest.mark.parametrize("content", [
    np.random.default_rng(3).bytes(4096),
    b"name: \"DeepLab-LargeFOV\"\nlayers {\n  name: \"conv1_1\"\n  type: CONVOLUTION\n}\n",
    bytes.fromhex("ffd8ffe000104a4649460001010000010001") + np.random.default_rng(4).bytes(2048) + b"\xff\xd9",
], ids=["random bytes", "text (a prototxt)", "jpeg"])
def test_files_that_are_not_protobuf_are_refused(tmp_path, content):
    (tmp_path / "bad.caffemodel").write_bytes(content)
    assert_refused(tmp_path / "bad.caffemodel", "not a caffemodel")


def test_protobuf_without_layers_is_refused(tmp_path):
    (tmp_path / "net.caffemodel").write_bytes(encode_caffemodel([], "v2", name="only a name"))
    assert_refused(tmp_path / "net.caffemodel", "no layers")


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_truncated_file_is_refused(tmp_path, layout):
    whole = encode_caffemodel(largefov_training_net(np.random.default_rng(5), width_divisor=64), layout)
    (tmp_path / "cut.caffemodel").write_bytes(whole[: len(whole) // 2])
    assert_refused(tmp_path / "cut.caffemodel", "truncated or corrupt")


def test_blob_whose_data_does_not_fill_its_shape_is_refused(tmp_path):
    good = encode_caffemodel([Layer("ip", "InnerProduct", blobs=(np.zeros((2, 3), np.float32),))], "v2")
    declared_2x3 = bytes([7 << 3 | 2, 4, 1 << 3 | 2, 2, 2, 3])  # shape { dim: [2, 3] }, packed
    assert good.count(declared_2x3) == 1
    (tmp_path / "m.caffemodel").write_bytes(good.replace(declared_2x3, declared_2x3[:-1] + b"\x04"))
    assert_refused(tmp_path / "m.caffemodel", "layer 'ip' blob 0 holds 6 values")


def test_duplicate_layer_names_are_refused(tmp_path):
    blob = (np.zeros(2, np.float32),)
    write_caffemodel(tmp_path / "m.caffemodel", [Layer("fc", "InnerProduct", blobs=blob)] * 2, "v2")
    assert_refused(tmp_path / "m.caffemodel", "appears twice")


@pytest.mark.slow
def test_full_size_largefov_snapshot_over_64_mib(tmp_path):
    # 20.5M parameters make an ~82 MB file, past protobuf's historical 64 MiB parse limit.
    net = largefov_training_net(np.random.default_rng(6))
    write_caffemodel(tmp_path / "train_iter_8000.caffemodel", net, "v1")
    assert (tmp_path / "train_iter_8000.caffemodel").stat().st_size > 64 * 2**20

    layers = read_caffemodel(tmp_path / "train_iter_8000.caffemodel")

    assert sum(b.size for layer in layers.values() for b in layer.blobs) == sum(
        b.size for layer in net for b in layer.blobs)
    assert layers["fc6"].blobs[0].shape == (1024, 512, 3, 3)
    np.testing.assert_array_equal(layers["fc7"].blobs[0], net[[n.name for n in net].index("fc7")].blobs[0])


def test_caffe_test_data_ships_inside_the_repository():
    # A user's or packager's clone has nothing beside it: the real Caffe file must travel with the tests.
    tests_dir = Path(__file__).resolve().parent
    assert LENET.resolve().is_relative_to(tests_dir) and LENET.is_file()
    assert (CAFFE_DATA / "lenet.prototxt").is_file()
    assert "BSD 2-Clause" in (CAFFE_DATA / "README.md").read_text()
