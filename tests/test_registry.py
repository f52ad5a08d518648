"""The model registry (models/*.toml), the cache under DEEPLAB_HOME, and `deeplab models list|import|path|rm`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import LENET, assert_one_line_error, files_in, run_cli
from deeplab_cli.model import registry
from deeplab_cli.errors import ModelError, WeightsError

NAME, FILE = "largefov-voc12", "train2_iter_8000.caffemodel"
PORT = "largefov-voc12-pytorch"


@pytest.fixture
def largefov_file(largefov_caffemodel) -> Path:
    return largefov_caffemodel


@pytest.fixture(scope="module")
def largefov_npz(weights, tmp_path_factory) -> Path:
    """The same weights as an .npz of <layer>/W, <layer>/b arrays."""
    path = tmp_path_factory.mktemp("npz") / "largefov.npz"
    np.savez(path, **{f"{layer}/{kind}": array for layer, (w, b) in weights.items()
                      for kind, array in (("W", w), ("b", b))})
    return path


@pytest.fixture(autouse=True)
def home(deeplab_home) -> Path:
    return deeplab_home


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- registry ------------------------------------------------------------------------------------------


def test_largefov_voc12_is_registered_with_the_paper_settings():
    info = registry.known_models()[NAME]
    assert registry.DEFAULT_MODEL == NAME
    assert info.file == FILE
    assert info.urls == (
        "http://ccvl.stat.ucla.edu/ccvl/DeepLab-LargeFOV/train2_iter_8000.caffemodel",
        "http://www.cs.jhu.edu/~alanlab/ccvl/DeepLab-LargeFOV/train2_iter_8000.caffemodel",
    )
    assert info.sha256 is None  # none was ever published; an empty string must not count as one
    assert info.archive == "https://web.archive.org/web/2016id_/"
    assert len(info.classes) == 21
    assert (info.classes[0], info.classes[15], info.classes[20]) == ("background", "person", "tvmonitor")
    assert info.mean_bgr == (104.008, 116.669, 122.675)
    assert info.fc8 == "fc8_voc12"
    assert info.crf == {"bi_w": 4, "bi_xy_std": 121, "bi_rgb_std": 5, "pos_w": 3, "pos_xy_std": 3, "iters": 10}


def test_the_pytorch_port_is_registered_with_its_own_conventions():
    info = registry.known_models()[PORT]
    assert registry.FALLBACK_MODEL == PORT
    assert info.file == "model_last_20000_poly2.pth"
    # Pinned at the port's commit 950b489, so the file under the URL cannot change; its git blob id checks it.
    assert info.urls[0] == ("https://raw.githubusercontent.com/wangleihitcs/DeepLab-V1-PyTorch/"
                            "950b489c43d539acd585d5296ae2a5a90360cbb4/exp/model_last_20000_poly2.pth")
    assert info.git_blob_sha1 == "3c470b121d60e258a1bcd50363f5103e0d6b56c0"
    assert info.pooling == "floor" and registry.get_model(NAME).pooling == "ceil"
    assert info.classes == registry.get_model(NAME).classes and info.mean_bgr == (104.008, 116.669, 122.675)
    assert info.crf == {"bi_w": 5, "bi_xy_std": 140, "bi_rgb_std": 5, "pos_w": 3, "pos_xy_std": 3, "iters": 10}


def test_unknown_model_is_a_model_error_naming_the_known_ones():
    with pytest.raises(ModelError, match=r"unknown model 'nope' \(known: largefov-voc12, largefov-voc12-pytorch\)"):
        registry.get_model("nope")


def test_cache_lives_under_deeplab_home(home, monkeypatch, tmp_path):
    info = registry.get_model(NAME)
    assert registry.cache_dir() == home
    assert registry.weights_path(info) == home / NAME / FILE
    assert registry.onnx_path(info) == home / NAME / "model.onnx"
    assert registry.onnx_path(info, float16=True) == home / NAME / "model.fp16.onnx"

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DEEPLAB_HOME", "~/shared-cache")
    assert registry.cache_dir() == tmp_path / "shared-cache"


def test_mirror_replaces_the_published_urls(monkeypatch):
    info = registry.get_model(NAME)
    published = [*info.urls, *(f"https://web.archive.org/web/2016id_/{url}" for url in info.urls)]
    assert registry.download_urls(info) == published  # the mirrors, then the archived copies of both
    assert registry.download_urls(dataclasses.replace(info, archive=None)) == list(info.urls)

    monkeypatch.setenv("DEEPLAB_MIRROR", "http://127.0.0.1:8000/weights/")
    assert registry.download_urls(info) == [f"http://127.0.0.1:8000/weights/{FILE}"]

    monkeypatch.setenv("DEEPLAB_MIRROR", "  ")
    assert registry.download_urls(info) == published


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("yes", True), ("TRUE", True), ("", False), ("0", False), ("false", False), ("No", False),
])
def test_offline_setting(monkeypatch, value, expected):
    monkeypatch.setenv("DEEPLAB_OFFLINE", value)
    assert registry.offline() is expected


def test_how_to_get_names_both_commands_and_the_source():
    info = registry.get_model(NAME)
    advice = registry.how_to_get(info)
    assert f"deeplab models pull {NAME}" in advice
    assert f"deeplab models import {FILE} --name {NAME}" in advice
    assert f"from {info.archive}{info.urls[0]} " in advice  # the copy that may still answer
    assert f"from {info.urls[0]} " in registry.how_to_get(dataclasses.replace(info, archive=None))

    assert "deeplab models import FILE" in registry.how_to_get(dataclasses.replace(info, urls=()))


def test_remove_reports_whether_there_was_anything(home):
    info = registry.get_model(NAME)
    assert registry.remove(info) is False
    (home / NAME).mkdir(parents=True)
    (home / NAME / "model.onnx").write_bytes(b"graph")
    assert registry.remove(info) is True
    assert files_in(home) == []


# -- deeplab models ------------------------------------------------------------------------------------


def test_models_list_shows_whether_cached(home):
    result = run_cli("models", "list")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"{NAME}\tnot cached\t-\tDeepLab-CRF-LargeFOV")

    (home / NAME).mkdir(parents=True)
    (home / NAME / FILE).write_bytes(b"weights")
    assert run_cli("models", "list").stdout.startswith(f"{NAME}\tweights only\t-\t")
    (home / NAME / "model.onnx").write_bytes(b"graph")
    assert run_cli("models", "list").stdout.startswith(f"{NAME}\tunverified\t-\t")  # no record of the weights
    record = {"file": FILE, "sha256": "ab" * 32, "source": "http://x/" + FILE, "date": "2024-01-01T00:00:00+00:00"}
    (home / NAME / "source.json").write_text(json.dumps(record))
    assert run_cli("models", "list").stdout.startswith(f"{NAME}\tcached\t{'ab' * 32}\t")
    # The default first, then the PyTorch port.
    assert run_cli("models", "list").stdout.splitlines()[1].startswith(f"{PORT}\tnot cached\t-\tDeepLab-LargeFOV")


def test_verified_needs_the_graph_the_record_its_weights_and_the_registry_sha256(home, monkeypatch):
    info = registry.get_model(NAME)
    folder = home / NAME
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"graph")
    assert registry.verified(info) is None
    (folder / "source.json").write_text(json.dumps(
        {"file": "w.npz", "sha256": "ab" * 32, "source": "imported from /x/w.npz", "date": "2024-01-01T00:00:00+00:00"}))
    assert registry.verified(info) is None  # the weights it names are missing
    (folder / "w.npz").write_bytes(b"weights")
    assert registry.verified(info) == registry.SourceRecord("w.npz", "ab" * 32, "imported from /x/w.npz",
                                                            "2024-01-01T00:00:00+00:00")
    assert registry.verified(dataclasses.replace(info, sha256="AB" * 32)) is not None
    assert registry.verified(dataclasses.replace(info, sha256="cd" * 32)) is None
    for broken in ("{", json.dumps({"file": "../w.npz", "sha256": "ab" * 32, "source": "x", "date": "y"})):
        (folder / "source.json").write_text(broken)
        assert registry.verified(info) is None and registry.read_source(info) is None


def test_models_path_of_a_model_not_cached_says_how_to_get_it(home):
    result = run_cli("models", "path", NAME)
    assert_one_line_error(result, ModelError.exit_code, f"{NAME} is not in the cache ({home})",
                          f"deeplab models pull {NAME}")


def test_models_import_caches_and_prints_the_sha256(home, largefov_file):
    digest = hashlib.sha256(largefov_file.read_bytes()).hexdigest()

    result = run_cli("models", "import", largefov_file)

    assert result.exit_code == 0, result.output
    onnx_file = home / NAME / "model.onnx"
    assert result.stdout.splitlines() == [str(onnx_file)]
    assert result.stderr.strip() == f"deeplab: {NAME}: sha256 {digest} imported from {largefov_file}"
    assert files_in(home / NAME) == ["model.onnx", "source.json", FILE]
    assert (home / NAME / FILE).read_bytes() == largefov_file.read_bytes()
    record = registry.read_source(registry.get_model(NAME))
    assert (record.file, record.sha256, record.source) == (FILE, digest, f"imported from {largefov_file.resolve()}")
    assert run_cli("models", "list").stdout.startswith(f"{NAME}\tcached\t{digest}\t")
    assert run_cli("models", "path", NAME).stdout.strip() == str(onnx_file)

    result = run_cli("models", "rm", NAME)
    assert result.exit_code == 0 and result.output == ""
    assert files_in(home) == []
    result = run_cli("models", "rm", NAME)
    assert result.exit_code == 0 and f"{NAME} was not cached" in result.stderr


def test_models_import_refuses_a_file_that_does_not_match_the_registry_sha256(home, monkeypatch, largefov_file):
    info = dataclasses.replace(registry.get_model(NAME), sha256="AB" * 32)
    monkeypatch.setattr(registry, "known_models", lambda: {NAME: info})

    result = run_cli("models", "import", largefov_file)

    assert_one_line_error(result, ModelError.exit_code, str(largefov_file), "SHA-256", "AB" * 32)
    assert files_in(home) == []


def test_imported_npz_is_kept_under_its_own_name_and_converted_again_from_it(home, monkeypatch, largefov_file,
                                                                            largefov_npz):
    info = registry.get_model(NAME)
    assert run_cli("models", "import", largefov_file).exit_code == 0
    (home / NAME / "model.gpu.onnx").write_bytes(b"converted from the .caffemodel")

    result = run_cli("models", "import", largefov_npz)

    assert result.exit_code == 0, result.output
    # The .caffemodel and the graphs converted from it are gone: nothing stale is left to be used.
    assert files_in(home / NAME) == ["largefov.npz", "model.onnx", "source.json"]
    assert (home / NAME / "largefov.npz").read_bytes() == largefov_npz.read_bytes()
    assert registry.read_source(info).file == "largefov.npz"
    assert registry.cached_weights(info) == home / NAME / "largefov.npz"

    # The graph lost, the weights kept: converted again from the .npz, with no network.
    (home / NAME / "model.onnx").unlink()
    monkeypatch.setenv("DEEPLAB_OFFLINE", "1")
    assert registry.ensure(info) == home / NAME / "model.onnx"
    assert files_in(home / NAME) == ["largefov.npz", "model.onnx", "source.json"]
    assert registry.verified(info).sha256 == sha256(largefov_npz)


def test_models_import_refuses_a_name_the_cache_uses_itself(home, tmp_path):
    for name in ("source.json", "model.onnx"):
        (tmp_path / name).write_bytes(b"weights?")
        assert_one_line_error(run_cli("models", "import", tmp_path / name), ModelError.exit_code,
                              str(tmp_path / name), "rename it")
    assert files_in(home) == []


def test_models_import_refuses_a_file_that_is_not_largefov(home):
    result = run_cli("models", "import", LENET)
    assert_one_line_error(result, WeightsError.exit_code, str(LENET), "not DeepLab-LargeFOV")
    assert files_in(home) == []


def test_models_commands_refuse_an_unknown_name(home, largefov_file):
    for args in (("pull", "nope"), ("path", "nope"), ("rm", "nope"), ("import", largefov_file, "--name", "nope")):
        assert_one_line_error(run_cli("models", *args), ModelError.exit_code, "unknown model 'nope'")
    assert files_in(home) == []


# -- a PyTorch port's .pth ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def port_pth(weights, tmp_path_factory) -> Path:
    """The weights in the port's checkpoint layout, as PyTorch 1.2 saved it (the legacy format, on a GPU)."""
    from pth_writer import write_pth
    from reference import port_state_dict

    path = tmp_path_factory.mktemp("pth") / "model_last_20000_poly2.pth"
    write_pth(path, port_state_dict(weights), zip_format=False, location="cuda:0")
    return path


def test_a_pth_is_imported_as_the_pytorch_port_unless_a_name_says_otherwise(home, monkeypatch, port_pth,
                                                                           largefov_file):
    from deeplab_cli.model.download import git_blob_id

    # The registry pins the real file's blob id; these random weights have their own.
    models = registry.known_models()
    models[PORT] = dataclasses.replace(models[PORT], git_blob_sha1=git_blob_id(port_pth))
    monkeypatch.setattr(registry, "known_models", lambda: models)
    result = run_cli("models", "import", port_pth)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(home / PORT / "model.onnx")
    assert f"deeplab: {PORT}: sha256 {sha256(port_pth)} imported from {port_pth}" in result.stderr
    assert registry.model_for_file(port_pth).name == PORT and registry.model_for_file(largefov_file).name == NAME
    assert run_cli("models", "import", port_pth, "--name", NAME).exit_code == 0
    assert files_in(home) == [NAME, PORT]


def test_models_import_checks_the_git_blob_id(home, monkeypatch, port_pth):
    from deeplab_cli.model.download import git_blob_id

    info = dataclasses.replace(registry.get_model(PORT), git_blob_sha1="0" * 40)
    monkeypatch.setattr(registry, "known_models", lambda: {PORT: info})
    assert_one_line_error(run_cli("models", "import", port_pth), ModelError.exit_code, str(port_pth),
                          "git blob id", "0" * 40)
    assert files_in(home) == []
    info = dataclasses.replace(info, git_blob_sha1=git_blob_id(port_pth))
    assert run_cli("models", "import", port_pth).exit_code == 0
