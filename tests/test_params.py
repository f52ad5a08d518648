"""deeplab_cli.crf.params: the CRF settings, layered from a model's defaults, a file and the options."""

import json

import pytest

from deeplab_cli.crf.params import CRFParams, merge
from deeplab_cli.errors import UsageError


def test_the_options_override_the_file_which_overrides_the_model(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"bi_w": 5, "bi_xy_std": 60}))
    params = merge({"bi_w": 4, "bi_rgb_std": 3, "iters": 5}, path, {"bi_xy_std": 70, "pos_w": None})
    assert params == CRFParams(bi_w=5.0, bi_xy_std=70.0, bi_rgb_std=3.0, iters=5)


def test_nothing_given_is_deeplabs_settings():
    assert merge({}) == CRFParams()


@pytest.mark.parametrize("text, reason", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "expected a JSON object of CRF settings"),
    ('{"bi_w": -1}', "'bi_w' must be >= 0"),
    ('{"sigma": 3}', "unknown CRF parameter 'sigma'"),
])
def test_a_bad_file_is_a_usage_error_naming_it(tmp_path, text, reason):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        merge({}, path)
    assert str(caught.value).startswith(f"--crf-params {path}: ") and reason in str(caught.value)


def test_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="missing.json"):
        merge({}, tmp_path / "missing.json")


def test_a_bad_option_value_is_a_usage_error():
    with pytest.raises(UsageError, match="'pos_xy_std' must be > 0"):
        merge({}, None, {"pos_xy_std": 0.0})
