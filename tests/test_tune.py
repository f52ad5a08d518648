"""`deeplab crf tune`: the written setting is the best row of its own table, and applying it gives that score."""

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from deeplab_cli.cli import cli
from deeplab_cli.crf import CRFParams
from deeplab_cli.io.outputs import SavedLogits, voc_palette, write_index_png, write_logits
from deeplab_cli.crf.tune import Sample, grid, parse_values, parts, sample_confusions


@pytest.fixture
def labelled_set(tmp_path):
    """Images of coloured shapes, their true labels, and blurry noisy stride-8 logits for them."""
    rng = np.random.default_rng(0)
    for i in range(4):
        h, w = 57 + 8 * i, 73
        yy, xx = np.mgrid[0:h, 0:w]
        truth = np.zeros((h, w), np.uint8)
        truth[(yy - h / 2) ** 2 + (xx - 25 - 5 * i) ** 2 < 15 ** 2] = 8
        truth[(yy > h - 15) & (xx > 40)] = 15
        image = np.zeros((h, w, 3), np.float32)
        for label, colour in ((0, (90, 120, 60)), (8, (40, 60, 200)), (15, (180, 170, 160))):
            image[truth == label] = colour
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        sh, sw = (h - 1) // 8 + 2, (w - 1) // 8 + 2
        onehot = np.eye(21, dtype=np.float32)[cv2.resize(truth, (sw, sh), interpolation=cv2.INTER_NEAREST)]
        logits = 2.5 * onehot.transpose(2, 0, 1) + rng.normal(0, 1.0, (21, sh, sw)).astype(np.float32)
        (tmp_path / "img").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / f"img/{i}.png"), image)
        write_logits(tmp_path / f"logits/{i}.logits.npz", SavedLogits(logits, (h, w), (h, w), "synthetic"))
        write_index_png(tmp_path / f"gt/{i}.png", truth, voc_palette())
    return tmp_path


def test_parse_values():
    assert parse_values("5:10:1") == (5, 6, 7, 8, 9, 10)
    assert parse_values("50:100:10") == (50, 60, 70, 80, 90, 100)
    assert parse_values("0.1:0.3:0.1") == (0.1, 0.2, 0.3)
    assert parse_values("4,6") == (4, 6) and parse_values("3") == (3,)
    for bad in ("5:1:1", "1:2:0", "a", "1:2"):
        with pytest.raises(ValueError):
            parse_values(bad)


def test_grid_covers_every_combination():
    settings = grid(CRFParams(iters=5), {"bi_w": (1, 2), "bi_xy_std": (10, 20, 30)})
    assert len(settings) == 6 and len(set(settings)) == 6
    assert all(s.iters == 5 and s.bi_rgb_std == 5 for s in settings)


def test_each_setting_is_scored_as_it_scores_alone(labelled_set):
    # The numba backend computes the settings grouped by kernel widths, not in the grid's order.
    root = labelled_set
    sample = Sample(root / "img/0.png", root / "logits/0.logits.npz", root / "gt/0.png")
    settings = grid(CRFParams(iters=3), {"bi_w": (2, 8), "bi_xy_std": (5, 60), "bi_rgb_std": (3, 30)})
    confusions = sample_confusions(sample, settings, 21)
    assert len({c.tobytes() for c in confusions}) > 1  # the settings score apart: a misplaced one would show
    for setting, confusion in zip(settings, confusions, strict=True):
        np.testing.assert_array_equal(confusion, sample_confusions(sample, [setting], 21)[0])


def test_parts_deal_whole_width_groups_once():
    settings = grid(CRFParams(), {"bi_w": (4, 5, 6), "bi_xy_std": (50, 60), "bi_rgb_std": (3, 4, 5)})
    for count in (1, 2, 4, 6, 50):
        cut = parts(settings, count)
        assert len(cut) == min(count, 6)  # 6 width groups of 3 weights each
        assert sorted(i for part in cut for i in part) == list(range(len(settings)))
        widths = [{(settings[i].bi_xy_std, settings[i].bi_rgb_std) for i in part} for part in cut]
        assert all(not a & b for k, a in enumerate(widths) for b in widths[k + 1:])  # no group is split
        assert max(map(len, cut)) - min(map(len, cut)) <= 3


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_best_setting_reproduces_its_score(labelled_set):
    root = labelled_set
    best_file = root / "best.json"
    result = invoke("crf", "tune", root / "img", root / "logits", "--gt", root / "gt", "-o", best_file,
                    "--bi-w", "2,8", "--bi-xy-std", "5,60", "--bi-rgb-std", "3,30", "--iters", "5",
                    "--json", "-j", "2")
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    rows = table["rows"]
    assert len(rows) == 8 and table["images"] == 4
    assert [r["miou"] for r in rows] == sorted((r["miou"] for r in rows), reverse=True)
    assert rows[0]["miou"] > rows[-1]["miou"]  # the grid matters on this problem
    written = json.loads(best_file.read_text())
    assert written == table["best"] == {k: v for k, v in rows[0].items() if k not in ("miou", "pixel_accuracy")}

    applied = invoke("crf", root / "img", root / "logits", "--out", root / "masks", "--crf-params", best_file, "-q")
    assert applied.exit_code == 0, applied.output
    scored = invoke("eval", "--pred", root / "masks", "--gt", root / "gt", "--json")
    assert abs(json.loads(scored.stdout)["miou"] - rows[0]["miou"]) < 1e-6


def test_one_worker_and_many_agree(labelled_set):
    root = labelled_set
    tables = []
    for jobs in ("1", "2"):
        result = invoke("crf", "tune", root / "img", root / "logits", "--gt", root / "gt", "-o", root / "b.json",
                        "--bi-w", "4", "--bi-xy-std", "20,80", "--bi-rgb-std", "5", "--json", "-j", jobs)
        tables.append(json.loads(result.stdout)["rows"])
    assert tables[0] == tables[1]


def test_a_broken_sample_is_reported_and_skipped(labelled_set):
    root = labelled_set
    (root / "gt/2.png").unlink()
    # Two workers and three samples: each sample's four width groups run in three parts.
    result = invoke("crf", "tune", root / "img", root / "logits", "--gt", root / "gt", "-o", root / "b.json",
                    "--bi-w", "4", "--bi-xy-std", "50,60", "--bi-rgb-std", "5,6", "--json", "--limit", "3",
                    "-j", "2")
    assert result.exit_code == 1
    assert result.stderr.count(str(root / "gt/2.png")) == 1  # once, though each of its parts failed
    assert json.loads(result.stdout)["images"] == 2  # --limit 3 took 0, 1, 2; 2 failed


def test_bad_range_is_a_usage_error(labelled_set):
    root = labelled_set
    result = invoke("crf", "tune", root / "img", root / "logits", "--gt", root / "gt", "--bi-w", "9:1:1")
    assert result.exit_code == 2 and "START:STOP:STEP" in result.output


def test_ground_truth_of_another_size_is_an_input_error_naming_it(labelled_set):
    from deeplab_cli.errors import InputError

    root = labelled_set
    write_index_png(root / "gt/0.png", np.zeros((10, 12), np.uint8), voc_palette())
    sample = Sample(root / "img/0.png", root / "logits/0.logits.npz", root / "gt/0.png")
    with pytest.raises(InputError, match=r"gt/0.png: ground truth is 10x12, image is 57x73$"):
        sample_confusions(sample, [CRFParams(iters=1)], 21)
