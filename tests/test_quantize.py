"""int8: `deeplab models quantize` (model/quantize.py, run/quantize.py) and `deeplab segment --precision`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import assert_one_line_error, files_in, run_cli
from deeplab_cli.errors import ModelError, UsageError
from deeplab_cli.io.outputs import read_index_png
from deeplab_cli.model import quantize as q
from deeplab_cli.model import registry
from deeplab_cli.model.weights import sha256_file

NAME = registry.DEFAULT_MODEL


@pytest.fixture
def home(quantized_home, tmp_path, monkeypatch):
    """A copy of `quantized_home`'s cache, for a test to use or change."""
    copy = tmp_path / "home"
    shutil.copytree(quantized_home[0] / "home", copy)
    monkeypatch.setenv("DEEPLAB_HOME", str(copy))
    monkeypatch.delenv("DEEPLAB_OFFLINE", raising=False)
    return copy


@pytest.fixture
def photos(quantized_home):
    return quantized_home[0] / "photos"


# -- model/quantize.py ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", True),
    ("flags\t\t: fpu sse2 avx2 amx_tile amx_int8\n", True),
    ("flags\t\t: fpu sse2 avx2 fma\n", False),  # AVX2 without VNNI: int8 may be slower than fp32
    ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp\n", True),  # Arm's SDOT
    ("Features\t: fp asimd evtstrm\n", False),
    ("", None),
])
def test_fast_int8_cpu_reads_the_flags(cpuinfo, expected):
    assert q.fast_int8_cpu(cpuinfo) is expected


def test_the_int8_graph_quantizes_every_convolution_and_records_its_calibration(quantized_home, photos,
                                                                                 largefov_caffemodel):
    root, result = quantized_home
    path = root / "home" / NAME / "model.int8.onnx"
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(path)
    model = onnx.load(str(path))
    int8 = {init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    produced = {node.output[0]: node for node in model.graph.node}
    # Every convolution's weights come out of a DequantizeLinear of int8 weights, its input out of another.
    assert len(convs) == 16
    for conv in convs:
        data, weight = (produced[name] for name in conv.input[:2])
        assert data.op_type == "DequantizeLinear" and weight.op_type == "DequantizeLinear"
        assert weight.input[0] in int8
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["precision"] == "int8" and meta["model_name"] == NAME
    record = json.loads(meta["calibration"])
    assert record["images"] == [{"file": f"{i}.png", "sha256": sha256_file(photos / f"{i}.png")} for i in range(3)]
    assert record["scheme"] == q.SCHEME and record["reduce_range"] == (q.fast_int8_cpu() is False)
    assert record["onnxruntime"] == __import__("onnxruntime").__version__
    assert record["source_sha256"] == sha256_file(largefov_caffemodel)


def test_quantize_reports_the_agreement_on_the_images_it_held_out(quantized_home):
    lines = quantized_home[1].stderr.strip().splitlines()
    assert lines[0] == f"deeplab: {NAME}: int8 graph calibrated on 3 images"
    shares = lines[1].removeprefix("deeplab: int8 labels equal fp32's on ").split("% of pixels after the CRF (")
    assert 90 <= float(shares[0]) <= 100 and shares[1].startswith("2 held-out images, lowest ")
    assert len(lines) == 2  # no warning: above 96%


# -- deeplab models quantize: errors and warnings ------------------------------------------------------


def test_an_empty_or_unreadable_calibration_folder_is_a_usage_error(home, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("models", "quantize", "--calibrate", tmp_path / "empty"), UsageError.exit_code,
                          f"--calibrate {tmp_path / 'empty'}: no images in it")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "bad/b.png").write_bytes(b"")
    assert_one_line_error(run_cli("models", "quantize", "--calibrate", tmp_path / "bad"), UsageError.exit_code,
                          "none of its 2 images could be read", "a.jpg")
    assert files_in(home / NAME) == ["model.int8.onnx", "model.onnx", "source.json", "train2_iter_8000.caffemodel"]


def test_unreadable_images_are_named_and_the_rest_calibrate(home, photos, tmp_path, monkeypatch):
    from deeplab_cli.run import quantize as run_quantize

    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    (folder / "0a.png").write_bytes(b"broken")
    monkeypatch.setattr(run_quantize, "LOW_AGREEMENT", 1.01)  # every agreement is low now

    result = run_cli("models", "quantize", NAME, "--calibrate", folder, "--count", "2")

    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"deeplab: {folder / '0a.png'}: ")
    assert lines[1] == f"deeplab: {NAME}: int8 graph calibrated on 2 images"
    assert "3 held-out images" in lines[2]
    assert lines[3].startswith("deeplab: warning: below 101%")


def test_with_no_image_left_over_the_agreement_is_not_measured_and_it_says_so(home, photos):
    result = run_cli("models", "quantize", "--calibrate", photos, "--count", "5")
    assert result.exit_code == 0, result.output
    assert "no image of" in result.stderr and "give it more than --count images" in result.stderr


# -- deeplab segment --precision -----------------------------------------------------------------------


def segment(photos, out, *args):
    return run_cli("segment", photos, "--out", out, "--device", "cpu", "--json", *args)


def masks(out):
    return {p.name: read_index_png(p) for p in sorted(out.glob("*.png"))}


def test_int8_segments_and_agrees_with_fp32_as_eval_measures_it(home, photos, tmp_path):
    int8, fp32 = segment(photos, tmp_path / "int8", "--precision", "int8"), segment(photos, tmp_path / "fp32")
    assert int8.exit_code == 0 and fp32.exit_code == 0, int8.output + fp32.output
    assert {json.loads(line)["model"] for line in int8.stdout.splitlines()} == {NAME}
    a, b = masks(tmp_path / "int8"), masks(tmp_path / "fp32")
    share = sum(int((a[k] == b[k]).sum()) for k in a) / sum(v.size for v in a.values())
    assert 0.9 <= share and any((a[k] != b[k]).any() for k in a)  # int8, not fp32 under another name
    # `deeplab eval` scores int8 output as any other: against fp32's masks, its pixel accuracy is the agreement.
    result = run_cli("eval", "--pred", tmp_path / "int8", "--gt", tmp_path / "fp32", "--json")
    assert json.loads(result.stdout)["pixel_accuracy"] == pytest.approx(share)
    # Lanes carry the precision: two worker processes give what one process gives.
    assert segment(photos, tmp_path / "lanes", "--precision", "int8", "-j", "2").exit_code == 0
    assert all(np.array_equal(a[k], v) for k, v in masks(tmp_path / "lanes").items())


def test_int8_without_a_quantized_graph_names_the_quantize_command(home, photos, tmp_path):
    (home / NAME / "model.int8.onnx").unlink()
    result = segment(photos, tmp_path / "m", "--precision", "int8")
    assert_one_line_error(result, ModelError.exit_code, f"{NAME} has no int8 graph",
                          f"deeplab models quantize {NAME} --calibrate DIR")


def test_int8_is_refused_on_cuda_and_with_another_precision_or_a_file(home, photos, tmp_path, onnx_model):
    result = run_cli("segment", photos, "--out", tmp_path / "m", "--device", "cuda", "--precision", "int8")
    assert_one_line_error(result, UsageError.exit_code, "int8 graphs are for CPUs", "--precision fp16")
    result = segment(photos, tmp_path / "m", "--precision", "int8", "--fp16")
    assert result.exit_code == UsageError.exit_code and "contradicts --precision int8" in result.stderr
    result = segment(photos, tmp_path / "m", "--precision", "int8", "-m", onnx_model)
    assert_one_line_error(result, UsageError.exit_code, "for registry models", "runs as it was exported")
    assert not (tmp_path / "m").exists()


def test_a_cpu_without_fast_int8_is_told_what_was_measured(home, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(q, "fast_int8_cpu", lambda cpuinfo=None: False)
    result = segment(photos, tmp_path / "m", "--precision", "int8")
    assert result.exit_code == 0, result.output
    assert "has no VNNI or AMX: int8 may be no faster than fp32 here (measured" in result.stderr
    monkeypatch.setattr(q, "fast_int8_cpu", lambda cpuinfo=None: True)
    assert "VNNI" not in segment(photos, tmp_path / "n", "--precision", "int8").stderr


def test_the_default_takes_the_port_when_only_the_port_has_an_int8_graph(home, photos, tmp_path):
    port = registry.get_model(registry.FALLBACK_MODEL)
    shutil.move(home / NAME, home / port.name)
    info, warning = registry.default_quantized()
    assert info.name == port.name and warning.startswith(f"using {port.name}: it has an int8 graph")
    assert registry.default_quantized()[0].name == port.name
    result = segment(photos, tmp_path / "m", "--precision", "int8")
    assert result.exit_code == 0, result.output
    assert f"deeplab: using {port.name}" in result.stderr
