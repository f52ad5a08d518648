import json

import numpy as np
import pytest
from click.testing import CliRunner

from deeplab_cli.cli import cli
from deeplab_cli.metrics import confusion_matrix, scores
from deeplab_cli.io.outputs import voc_palette, write_index_png


def independent_miou(pairs, num_classes):
    """Per-class counts by boolean masks, summed over the set, then the mean over classes that occur."""
    tp, fp, fn = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    correct = counted = 0
    for gt, pred in pairs:
        valid = gt != 255
        for c in range(num_classes):
            tp[c] += np.sum((gt == c) & (pred == c) & valid)
            fp[c] += np.sum((gt != c) & (pred == c) & valid)
            fn[c] += np.sum((gt == c) & (pred != c) & valid)
        correct += np.sum((gt == pred) & valid)
        counted += valid.sum()
    union = tp + fp + fn
    return np.mean(tp[union > 0] / union[union > 0]), correct / counted


def synthetic_pairs(seed, count=4, num_classes=21):
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        h, w = rng.integers(20, 60, 2)
        gt = rng.integers(0, 6, (h, w)).astype(np.uint8)  # a few classes only: absent ones must not count
        gt[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.7, gt, rng.integers(0, 8, (h, w))).astype(np.uint8)
        pred[pred == 255] = 0
        pairs.append((gt, pred))
    return pairs


def test_matches_independent_computation():
    pairs = synthetic_pairs(0)
    total = sum(confusion_matrix(g, p, 21) for g, p in pairs)
    result = scores(total)
    miou, accuracy = independent_miou(pairs, 21)
    assert abs(result.miou - miou) < 1e-6
    assert abs(result.pixel_accuracy - accuracy) < 1e-6
    assert np.isnan(result.per_class[15])  # no person anywhere


def test_one_matrix_for_the_set_not_a_mean_of_images():
    small = (np.zeros((1, 2), np.uint8), np.array([[0, 1]], np.uint8))
    large = (np.ones((10, 10), np.uint8), np.ones((10, 10), np.uint8))
    result = scores(confusion_matrix(*small, 2) + confusion_matrix(*large, 2))
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 100, FP 1 -> 100/101
    assert result.miou == pytest.approx((0.5 + 100 / 101) / 2, abs=1e-12)


def test_void_and_out_of_range_predictions():
    gt = np.array([[0, 255], [1, 1]], np.uint8)
    pred = np.array([[0, 1], [1, 255]], np.uint8)  # a prediction of 255 is wrong, never void
    matrix = confusion_matrix(gt, pred, 2)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 1]]
    with pytest.raises(ValueError):
        confusion_matrix(gt, pred[:1], 2)


def write_set(root, pairs):
    for i, (gt, pred) in enumerate(pairs):
        write_index_png(root / "gt" / f"img{i}.png", gt, voc_palette())
        write_index_png(root / "pred" / f"img{i}.png", pred, voc_palette())


def test_eval_command_json(tmp_path):
    pairs = synthetic_pairs(1)
    write_set(tmp_path, pairs)
    result = CliRunner().invoke(cli, ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    miou, accuracy = independent_miou(pairs, 21)
    assert abs(report["miou"] - miou) < 1e-6 and abs(report["pixel_accuracy"] - accuracy) < 1e-6
    assert report["per_class"]["person"] is None and report["images"] == 4


def test_eval_reports_missing_and_mismatched(tmp_path):
    pairs = synthetic_pairs(2)
    write_set(tmp_path, pairs)
    (tmp_path / "pred/img1.png").unlink()
    write_index_png(tmp_path / "pred/img2.png", np.zeros((3, 3), np.uint8), voc_palette())
    (tmp_path / "val.txt").write_text("img0\nimg1\nimg2\nimg3\n")
    result = CliRunner().invoke(cli, ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                                      "--list", str(tmp_path / "val.txt"), "--json"])
    assert result.exit_code == 1
    assert str(tmp_path / "pred/img1.png") in result.stderr
    assert "prediction is 3x3" in result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 2
    miou, _ = independent_miou([pairs[0], pairs[3]], 21)
    assert abs(report["miou"] - miou) < 1e-6


def test_eval_table(tmp_path):
    write_set(tmp_path, synthetic_pairs(3))
    result = CliRunner().invoke(cli, ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("background") and lines[-2].startswith("mean IoU")
