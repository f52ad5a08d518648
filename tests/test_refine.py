"""`deeplab crf` on any model's scores (run/refine.py, io/scores.py): `--scores probs|labels` give the labels
pydensecrf gives with DeepLab's settings (tests/golden/scores.npz), and bad score files fail alone."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_cli
from deeplab_cli.errors import InputError
from deeplab_cli.io import scores as files
from deeplab_cli.io.outputs import read_index_png, voc_palette, write_index_png
from deeplab_cli.synthetic import natural_image, probabilities
from golden_cases import golden_scores, score_cases

# Probabilities at another size pass through bilinear resizing, the reference's in float64 and the
# engine's in float32: a pixel whose two best classes are that close may flip.
AT_LEAST = {"probs at a quarter of the size": 0.999}


def write_scores(folder, name, kind, scores):
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "probs":
        np.save(folder / f"{name}.npy", scores)
    else:
        write_index_png(folder / f"{name}.png", scores, voc_palette())


def refine(tmp_path, kind, *options, images="img", scores="scores"):
    return run_cli("crf", tmp_path / images, tmp_path / scores, "--scores", kind, "--out", tmp_path / "masks",
                   "--json", "-j", "1", *options)


@pytest.mark.parametrize("name", sorted(score_cases()))
def test_scores_of_any_model_give_pydensecrfs_labels(tmp_path, name):
    image, kind, scores, options = score_cases()[name]
    expected = golden_scores(name, image, scores)
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img/x.png"), image)
    write_scores(tmp_path / "scores", "x", kind, scores)

    result = refine(tmp_path, kind, *options)

    assert result.exit_code == 0, result.output
    labels = read_index_png(tmp_path / "masks/x.png")
    assert (labels == expected).mean() >= AT_LEAST.get(name, 1.0)
    if name not in AT_LEAST:
        assert np.array_equal(labels, expected)


def test_probs_pair_by_relative_path_in_every_file_form(tmp_path):
    image = natural_image(24, 32, seed=1)
    probs = probabilities(image[..., ::-1], 21, seed=2)
    for sub in ("a", "b/c", "d"):
        (tmp_path / "img" / sub).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "img" / f"{sub}.png"), image)
    (tmp_path / "scores/b").mkdir(parents=True)
    np.save(tmp_path / "scores/a.npy", probs)
    np.savez(tmp_path / "scores/b/c.npz", whatever=probs)  # one array, any name
    np.savez(tmp_path / "scores/d.probs.npz", probs=probs.astype(np.float16), other=np.zeros(3))  # segment -f probs

    result = refine(tmp_path, "probs", "-r")

    assert result.exit_code == 0, result.output
    masks = [read_index_png(tmp_path / "masks" / f"{sub}.png") for sub in ("a", "b/c", "d")]
    assert np.array_equal(masks[0], masks[1]) and (masks[0] == masks[2]).mean() > 0.99


BAD_PROBS = {
    "missing.png": (None, "no probs file for this image (looked for missing.npy, missing.npz, missing.probs.npz)"),
    "flat.png": (np.full((21, 24), 1 / 21, np.float32), "probabilities must be (C, H, W), got shape (21, 24)"),
    "classes.png": (np.full((5, 4, 4), 0.2, np.float32), "5 classes, expected 21 (--classes)"),
    "nan.png": (np.full((21, 4, 4), np.nan, np.float32), "holds NaN or infinite values"),
    "sums.png": (np.full((21, 4, 4), 0.5, np.float32), "probabilities do not sum to 1 over the classes"),
    "ints.png": (np.ones((21, 4, 4), np.int64), "probabilities must be floats, got int64"),
}


def test_bad_score_files_fail_alone_with_one_line_naming_them(tmp_path):
    image = natural_image(24, 32, seed=1)
    (tmp_path / "img").mkdir()
    (tmp_path / "scores").mkdir()
    negative = probabilities(image[..., ::-1], 21, seed=2)
    negative[0, 0, 0], negative[1, 0, 0] = -0.5, negative[1, 0, 0] + 0.5 + negative[0, 0, 0]
    cases = dict(BAD_PROBS, **{"negative.png": (negative, "holds negative probabilities")})
    for name, (array, _) in cases.items():
        cv2.imwrite(str(tmp_path / "img" / name), image)
        if array is not None:
            np.save(tmp_path / "scores" / name.replace(".png", ".npy"), array)
    cv2.imwrite(str(tmp_path / "img/good.png"), image)
    np.save(tmp_path / "scores/good.npy", probabilities(image[..., ::-1], 21, seed=2))

    result = refine(tmp_path, "probs")

    assert result.exit_code == 1
    records = {json.loads(line)["input"].rsplit("/", 1)[1]: json.loads(line) for line in result.stdout.splitlines()}
    assert records.pop("good.png")["status"] == "ok"
    for name, (_, reason) in cases.items():
        error = records[name]["error"]
        assert records[name]["status"] == "error" and "\n" not in error
        assert str(tmp_path / "scores" / name.replace(".png", ".npy")) in error and reason in error, (name, error)
    assert "Traceback" not in result.output


def test_label_maps_are_checked_against_the_image_and_the_classes(tmp_path):
    image = natural_image(24, 32, seed=1)
    (tmp_path / "img").mkdir()
    for name in ("small", "unknown", "ok"):
        cv2.imwrite(str(tmp_path / f"img/{name}.png"), image)
    labels = np.zeros((24, 32), np.uint8)
    labels[5:9, 5:9] = 255
    write_scores(tmp_path / "scores", "small", "labels", labels[:10])
    write_scores(tmp_path / "scores", "unknown", "labels", labels)
    write_scores(tmp_path / "scores", "ok", "labels", np.minimum(labels, 20))

    result = refine(tmp_path, "labels")

    assert result.exit_code == 1
    errors = [json.loads(line)["error"] for line in result.stdout.splitlines()]
    assert errors[0] is None
    assert "label map is 10x32, image is 24x32" in errors[1]
    assert "label 255 is not one of the 21 classes (--classes); --ignore-label names a label" in errors[2]
    assert refine(tmp_path, "labels", "--ignore-label", "255", "--overwrite").exit_code == 1  # only `small` fails


@pytest.mark.parametrize("args, message", [
    (["--scores", "probs", "-f", "logits"], "--format logits: --scores probs has no logits to write"),
    (["--scores", "labels", "--crf-backend", "onnx"], "--crf-backend onnx takes probabilities"),
    (["--scores", "probs", "--gt-prob", "0.8"], "--gt-prob and --ignore-label are for --scores labels"),
    (["--scores", "labels", "--gt-prob", "1"], "--gt-prob"),
])
def test_options_that_do_not_fit_the_scores_are_usage_errors(tmp_path, args, message):
    (tmp_path / "img").mkdir()
    (tmp_path / "scores").mkdir()
    result = run_cli("crf", tmp_path / "img", tmp_path / "scores", "--out", tmp_path / "masks", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_other_class_counts_name_their_classes(tmp_path):
    image = natural_image(24, 32, seed=1)
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img/x.png"), image)
    write_scores(tmp_path / "scores", "x", "probs", probabilities(image[..., ::-1], 5, seed=2))
    assert refine(tmp_path, "probs", "--classes", "5").exit_code == 0
    assert [c["name"] for c in json.loads((tmp_path / "masks/classes.json").read_text())] == \
        ["0", "1", "2", "3", "4"]


def test_labels_unary_is_pydensecrfs_with_unknown_pixels_uniform():
    from deeplab_cli.densecrf.utils import unary_from_labels

    labels = np.array([[0, 3], [255, 20]], np.uint8)
    unary = files.labels_unary(labels, 21, 0.7, 255)
    expected = unary_from_labels(np.array([0, 3, 0, 20]), 21, 0.7, zero_unsure=False)
    np.testing.assert_array_equal(unary[:, [0, 1, 3]], expected[:, [0, 1, 3]])
    np.testing.assert_array_equal(unary[:, 2], np.full(21, -np.log(1 / 21), np.float32))

    with pytest.raises(InputError, match=r"^/nowhere/x.png: no labels file for this image \(looked for x.png\)$"):
        files.scores_path(Path("/nowhere"), "x", "labels")
    with pytest.raises(InputError, match=r"x.logits.npz\); run `deeplab segment --format logits` first$"):
        files.scores_path(Path("/nowhere"), "x", "logits")
