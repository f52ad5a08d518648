"""The model registry (models/*.toml), the cache under DEEPLAB_HOME, and `deeplab models list|import|path|rm`."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from conftest import LENET, assert_one_line_error, files_in, run_cli
from deeplab_cli import registry
from deeplab_cli.errors import ModelError, WeightsError

NAME, FILE = "largefov-voc12", "train2_iter_8000.caffemodel"


@pytest.fixture
def largefov_file(largefov_caffemodel) -> Path:
    return largefov_caffemodel


@pytest.fixture(autouse=True)
def home(deeplab_home) -> Path:
    return deeplab_home


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
    assert len(info.classes) == 21
    assert (info.classes[0], info.classes[15], info.classes[20]) == ("background", "person", "tvmonitor")
    assert info.mean_bgr == (104.008, 116.669, 122.675)
    assert info.fc8 == "fc8_voc12"
    assert info.crf == {"bi_w": 4, "bi_xy_std": 121, "bi_rgb_std": 5, "pos_w": 3, "pos_xy_std": 3, "iters": 10}


def test_unknown_model_is_a_model_error_naming_the_known_ones():
    with pytest.raises(ModelError, match=r"unknown model 'nope' \(known: largefov-voc12\)"):
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
    assert registry.download_urls(info) == list(info.urls)

    monkeypatch.setenv("DEEPLAB_MIRROR", "http://127.0.0.1:8000/weights/")
    assert registry.download_urls(info) == [f"http://127.0.0.1:8000/weights/{FILE}"]

    monkeypatch.setenv("DEEPLAB_MIRROR", "  ")
    assert registry.download_urls(info) == list(info.urls)


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
    assert info.urls[0] in advice

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
    assert result.stdout.startswith(f"{NAME}\tnot cached\tDeepLab-CRF-LargeFOV")

    (home / NAME).mkdir(parents=True)
    (home / NAME / "model.onnx").write_bytes(b"graph")
    assert run_cli("models", "list").stdout.startswith(f"{NAME}\tcached\t")


def test_models_path_of_a_model_not_cached_says_how_to_get_it(home):
    result = run_cli("models", "path", NAME)
    assert_one_line_error(result, ModelError.exit_code, f"{NAME} is not in the cache ({home})",
                          f"deeplab models pull {NAME}")


def test_models_import_caches_and_prints_the_sha256(home, largefov_file):
    digest = hashlib.sha256(largefov_file.read_bytes()).hexdigest()

    result = run_cli("models", "import", largefov_file)

    assert result.exit_code == 0, result.output
    onnx_file = home / NAME / "model.onnx"
    assert result.stdout.splitlines() == [str(onnx_file), f"sha256 {digest}"]
    assert files_in(home / NAME) == ["model.onnx", FILE]
    assert (home / NAME / FILE).read_bytes() == largefov_file.read_bytes()
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


def test_models_import_refuses_a_file_that_is_not_largefov(home):
    result = run_cli("models", "import", LENET)
    assert_one_line_error(result, WeightsError.exit_code, str(LENET), "not DeepLab-LargeFOV")
    assert files_in(home) == []


def test_models_commands_refuse_an_unknown_name(home, largefov_file):
    for args in (("pull", "nope"), ("path", "nope"), ("rm", "nope"), ("import", largefov_file, "--name", "nope")):
        assert_one_line_error(run_cli("models", *args), ModelError.exit_code, "unknown model 'nope'")
    assert files_in(home) == []
