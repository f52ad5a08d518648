"""`deeplab export`: weight files written by tools that are not ours, in every supported layout."""

import numpy as np
import pytest
from click.testing import CliRunner

from caffe_writer import write_caffemodel
from conftest import LENET
from deeplab_cli.cli import cli
from deeplab_cli.synthetic import natural_image
from reference import training_net
from test_network import assert_reference_logits, run



@pytest.fixture(scope="module")
def sources(weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    write_caffemodel(folder / "v1.caffemodel", training_net(weights), "v1", name="DeepLab-LargeFOV")
    write_caffemodel(folder / "v2.caffemodel", training_net(weights), "v2", name="DeepLab-LargeFOV")
    np.savez(folder / "w.npz", **{f"{k}/{n}": a for k, (w, b) in weights.items() for n, a in (("W", w), ("b", b))})
    return folder


def export(source, out):
    return CliRunner().invoke(cli, ["export", str(source), "-o", str(out)])


@pytest.mark.parametrize("name", ["v1.caffemodel", "v2.caffemodel", "w.npz"])
def test_export_matches_reference(sources, weights, tmp_path, name):
    result = export(sources / name, tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    for size in [(37, 45), (23, 61)]:
        image = natural_image(*size, seed=size[0])
        assert_reference_logits(run(tmp_path / "m.onnx", image), f"{size[0]}x{size[1]} seed {size[0]}", image, weights)


def test_file_that_records_no_dilation_is_accepted(weights, tmp_path):
    # Converted files may drop the field; the graph takes its dilations from the layer table anyway.
    write_caffemodel(tmp_path / "nohole.caffemodel", training_net(weights, dilation_recorded=False), "v1")
    assert export(tmp_path / "nohole.caffemodel", tmp_path / "m.onnx").exit_code == 0


def bad(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_refused(path, tmp_path, *fragments):
    result = export(path, tmp_path / "out.onnx")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert str(path) in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_caffemodel(sources, tmp_path):
    data = (sources / "v1.caffemodel").read_bytes()
    assert_refused(bad(tmp_path, "cut.caffemodel", data[: len(data) // 2]), tmp_path, "truncated")


def test_missing_layer(weights, tmp_path):
    net = [layer for layer in training_net(weights) if layer.name != "fc7"]
    path = tmp_path / "nofc7.caffemodel"
    write_caffemodel(path, net, "v2")
    assert_refused(path, tmp_path, "missing layer fc7")


def test_plain_vgg_classifier(weights, tmp_path):
    vgg = dict(weights, fc6=(np.zeros((4096, 512, 7, 7), np.float32), np.zeros(4096, np.float32)))
    path = tmp_path / "vgg.caffemodel"
    write_caffemodel(path, training_net(vgg), "v2")
    assert_refused(path, tmp_path, "fc6 has weights 4096x512x7x7", "VGG-16 classifier")


def test_wrong_dilation_recorded(weights, tmp_path):
    net = training_net(weights)
    fc6 = next(i for i, layer in enumerate(net) if layer.name == "fc6")
    net[fc6] = type(net[fc6])(**{**net[fc6].__dict__, "conv": type(net[fc6].conv)(1024, 12, 3, 1, 4)})
    path = tmp_path / "hole4.caffemodel"
    write_caffemodel(path, net, "v1")
    assert_refused(path, tmp_path, "fc6 has dilation 4, expected 12")


def test_not_a_caffemodel(tmp_path):
    assert_refused(bad(tmp_path, "notes.caffemodel", b"just some text\nnot protobuf\n" * 10), tmp_path)
    assert_refused(bad(tmp_path, "empty.caffemodel", b""), tmp_path, "empty")


def test_real_caffe_file_that_is_not_largefov(tmp_path):
    assert LENET.is_file()
    assert_refused(LENET, tmp_path, "not DeepLab-LargeFOV", "missing layers conv1_1", "conv1, conv2, ip1, ip2")


def test_npz_errors(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, something=np.zeros(3))
    assert_refused(path, tmp_path, "no arrays named <layer>/W")
    obj = tmp_path / "obj.npz"
    np.savez(obj, **{"conv1_1/W": np.array([object()], dtype=object), "conv1_1/b": np.zeros(1)})
    assert_refused(obj, tmp_path, "not a readable .npz")


# -- a PyTorch port's .pth ---------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_a_pth_exports_to_the_ports_logits_at_odd_and_even_sizes(weights, tmp_path, zip_format):
    from golden_cases import port_cases
    from pth_writer import write_pth
    from reference import port_state_dict

    write_pth(tmp_path / "port.pth", port_state_dict(weights), zip_format=zip_format, location="cuda:0")
    result = export(tmp_path / "port.pth", tmp_path / "m.onnx")  # a .pth is the port's without --name
    assert result.exit_code == 0, result.output
    for name in ("port: 37x45 seed 127", "port: 40x64 seed 168", "port: 33x41 seed 115"):
        image, pad_to = port_cases()[name]
        assert_reference_logits(run(tmp_path / "m.onnx", image, pad_to), name, image, weights)


def test_a_pth_whose_pickle_runs_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    import os

    from pth_writer import legacy_bytes, malicious_pickle

    monkeypatch.setattr(os, "system", lambda *args: pytest.fail(f"the pickle ran: {args}"))
    marker = tmp_path / "ran"
    path = bad(tmp_path, "evil.pth", legacy_bytes(malicious_pickle("reduce", marker), {}))
    assert_refused(path, tmp_path, "refused: its pickle calls os.system")
    assert not marker.exists()
