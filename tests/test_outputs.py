import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import files_in
from deeplab_cli.errors import InputError
from deeplab_cli.io.outputs import (
    VOC_CLASSES,
    atomic_write,
    colorize,
    overlay,
    read_index_png,
    sweep_temporaries,
    voc_palette,
    write_classes_json,
    write_index_png,
    write_npz,
    write_npz_streamed,
    write_png,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def labels_grid(height=6, width=7):
    """(H, W) uint8 covering all 21 classes and void (255)."""
    ids = np.arange(height * width) % 22
    return np.where(ids == 21, 255, ids).astype(np.uint8).reshape(height, width)


def test_voc_classes():
    assert len(VOC_CLASSES) == 21
    assert VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person" and VOC_CLASSES[20] == "tvmonitor"


@pytest.mark.parametrize("class_id, rgb", [
    (0, (0, 0, 0)), (1, (128, 0, 0)), (2, (0, 128, 0)), (3, (128, 128, 0)), (4, (0, 0, 128)),
    (8, (64, 0, 0)), (15, (192, 128, 128)), (20, (0, 64, 128)), (255, (224, 224, 192)),
])
def test_palette_values(class_id, rgb):
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert tuple(palette[class_id]) == rgb


def test_palette_prefix_and_distinct_colours():
    np.testing.assert_array_equal(voc_palette(21), voc_palette()[:21])
    assert len({tuple(c) for c in voc_palette()}) == 256


def test_colorize_is_palette_in_bgr():
    labels = labels_grid()
    palette = voc_palette()
    colours = colorize(labels, palette)
    assert colours.shape == (*labels.shape, 3) and colours.dtype == np.uint8
    for y, x in np.ndindex(labels.shape):
        assert tuple(colours[y, x]) == tuple(palette[labels[y, x]][::-1])


def test_colorize_rejects_ids_without_colour():
    with pytest.raises(ValueError):
        colorize(np.full((2, 2), 21, np.uint8), voc_palette(21))
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2), np.int64), voc_palette())


def test_overlay_extremes_and_middle():
    labels = labels_grid()
    palette = voc_palette()
    photo = np.random.default_rng(0).integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(overlay(photo, labels, palette, 0.0), photo)
    np.testing.assert_array_equal(overlay(photo, labels, palette, 1.0), colorize(labels, palette))
    half = overlay(photo, labels, palette, 0.5)
    expected = (photo.astype(float) + colorize(labels, palette)) / 2
    assert half.dtype == np.uint8
    assert np.abs(half - expected).max() <= 0.5  # rounded, background included


def test_overlay_rejects_bad_alpha_and_shapes():
    labels = labels_grid()
    with pytest.raises(ValueError):
        overlay(np.zeros((*labels.shape, 3), np.uint8), labels, voc_palette(), 1.5)
    with pytest.raises(ValueError):
        overlay(np.zeros((3, 3, 3), np.uint8), labels, voc_palette(), 0.5)


def test_index_png_round_trip(tmp_path):
    labels = labels_grid()
    path = tmp_path / "sub" / "mask.png"
    write_index_png(path, labels, voc_palette())
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "P"
        np.testing.assert_array_equal(np.array(image), labels)
        palette = np.array(image.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(palette[:256], voc_palette())
    # Shown in colour: converting to RGB gives the VOC colours.
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.array(image.convert("RGB")), voc_palette()[labels])
    np.testing.assert_array_equal(read_index_png(path), labels)


def test_index_png_rejects_ids_outside_palette(tmp_path):
    with pytest.raises(ValueError):
        write_index_png(tmp_path / "m.png", np.full((2, 2), 30, np.uint8), voc_palette(21))
    assert not list(tmp_path.iterdir())


def test_read_index_png_accepts_grayscale(tmp_path):
    labels = labels_grid()
    Image.fromarray(labels, "L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_index_png(tmp_path / "gray.png"), labels)


def expect_read_error(path, *words):
    with pytest.raises(InputError) as info:
        read_index_png(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for word in words:
        assert word in message


def test_read_index_png_errors(tmp_path):
    expect_read_error(tmp_path / "missing.png", "not found")
    expect_read_error(tmp_path, "directory")
    (tmp_path / "text.png").write_text("not a picture")
    expect_read_error(tmp_path / "text.png", "not an image")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    expect_read_error(tmp_path / "rgb.png", "mode RGB")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as deep:  # 16-bit gray: "I;16", or "I" in Pillow 10.0
        expect_read_error(tmp_path / "deep.png", f"mode {deep.mode}")
    Image.fromarray(labels_grid(), "L").save(tmp_path / "lossy.jpg")
    expect_read_error(tmp_path / "lossy.jpg", "not a PNG", "JPEG")


def test_read_index_png_truncated(tmp_path):
    labels = np.random.default_rng(0).integers(0, 21, (200, 200), dtype=np.uint8)
    write_index_png(tmp_path / "full.png", labels, voc_palette())
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    expect_read_error(tmp_path / "cut.png", "truncated")


def test_write_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (5, 9, 3), dtype=np.uint8)
    write_png(tmp_path / "a" / "b.png", image)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "a" / "b.png"), cv2.IMREAD_COLOR), image)


def test_npz_round_trip_keeps_dtypes(tmp_path):
    probs = np.random.default_rng(0).random((21, 5, 6)).astype(np.float16)
    labels = labels_grid(5, 6)
    path = tmp_path / "out.npz"
    write_npz(path, probs=probs, labels=labels)
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]  # no ".npz.npz", no temp left
    with np.load(path) as data:
        assert set(data.files) == {"probs", "labels"}
        assert data["probs"].dtype == np.float16 and data["labels"].dtype == np.uint8
        np.testing.assert_array_equal(data["probs"], probs)
        np.testing.assert_array_equal(data["labels"], labels)


def test_streamed_npz_loads_as_the_whole_array_written_at_once(tmp_path):
    probs = np.random.default_rng(0).random((21, 37, 53), dtype=np.float32).astype(np.float16)
    write_npz(tmp_path / "whole.npz", probs=probs)
    # Uneven chunks, in C order: class by class, rows in runs of 5 (37 is not a multiple).
    chunks = (probs[c, y:y + 5] for c in range(21) for y in range(0, 37, 5))
    write_npz_streamed(tmp_path / "streamed.npz", "probs", probs.shape, np.float16, chunks)
    with np.load(tmp_path / "whole.npz") as whole, np.load(tmp_path / "streamed.npz") as streamed:
        assert streamed.files == whole.files == ["probs"]
        assert streamed["probs"].dtype == np.float16 and streamed["probs"].shape == (21, 37, 53)
        np.testing.assert_array_equal(streamed["probs"], whole["probs"])
    assert files_in(tmp_path) == ["streamed.npz", "whole.npz"]  # no temporaries left


def test_streamed_npz_of_banded_probabilities_equals_todays_probs_output(tmp_path):
    from deeplab_cli.model.upsample import prob_chunks, resize_probs, softmax

    small = softmax(np.random.default_rng(1).standard_normal((21, 23, 31)).astype(np.float32))
    write_npz(tmp_path / "old.npz", probs=resize_probs(small, 181, 247).astype(np.float16))
    write_npz_streamed(tmp_path / "new.npz", "probs", (21, 181, 247), np.float16,
                       prob_chunks(small, 181, 247, band_bytes=1 << 14))
    with np.load(tmp_path / "old.npz") as old, np.load(tmp_path / "new.npz") as new:
        np.testing.assert_array_equal(new["probs"], old["probs"])


@pytest.mark.parametrize("chunks, message", [
    ([np.zeros((2, 3), np.float16)] * 3, "hold 18 elements"),  # too few
    ([np.zeros((2, 3), np.float16)] * 5, "more than the 24"),  # too many
    ([np.zeros((2, 3), np.float32)] * 4, "dtype float32"),
])
def test_streamed_npz_refuses_chunks_that_do_not_make_the_array(tmp_path, chunks, message):
    (tmp_path / "out.npz").write_bytes(b"old")
    with pytest.raises(ValueError, match=message):
        write_npz_streamed(tmp_path / "out.npz", "probs", (2, 2, 6), np.float16, iter(chunks))
    assert files_in(tmp_path) == ["out.npz"] and (tmp_path / "out.npz").read_bytes() == b"old"


def test_classes_json(tmp_path):
    write_classes_json(tmp_path / "classes.json", VOC_CLASSES, voc_palette())
    entries = json.loads((tmp_path / "classes.json").read_text())
    assert len(entries) == 21
    assert entries[0] == {"id": 0, "name": "background", "color": [0, 0, 0]}
    assert entries[15] == {"id": 15, "name": "person", "color": [192, 128, 128]}


def test_atomic_write_replaces_and_creates_parents(tmp_path):
    target = tmp_path / "x" / "y" / "out.txt"
    atomic_write(target, lambda tmp: tmp.write_text("one"))
    atomic_write(target, lambda tmp: tmp.write_text("two"))
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["out.txt"]


def test_atomic_write_uses_umask_not_private_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.txt", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    seen = []

    def fail(tmp):
        seen.append(tmp)
        tmp.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
    assert seen[0].parent == tmp_path
    assert seen[0].name.startswith(".out.txt.") and seen[0].name.endswith(".tmp")


KILLED_WRITER = """
import sys, time
from pathlib import Path
from deeplab_cli.io.outputs import atomic_write

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"n" * 8_000_000)
        f.flush()
        print("halfway", flush=True)
        time.sleep(600)
        f.write(b"n" * 8_000_000)

atomic_write(Path(sys.argv[1]), write)
"""


@pytest.mark.parametrize("had_old_file", [False, True])
def test_killed_writer_leaves_nothing_or_old_file(tmp_path, had_old_file):
    target = tmp_path / "big.bin"
    if had_old_file:
        target.write_bytes(b"o" * 1000)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)],
                             stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"halfway\n"
        child.kill()  # SIGKILL: no cleanup code runs
    finally:
        child.wait()
    if had_old_file:
        assert target.read_bytes() == b"o" * 1000
    else:
        assert not target.exists()
    # The half-written leftover is hidden and named so that nobody mistakes it for an output.
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".big.bin.") and leftovers[0].endswith(".tmp")


def test_sweep_removes_a_killed_writers_temporary_but_not_a_live_shards(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "sub").mkdir()
    killed, live = tmp_path / "sub/dead.bin", tmp_path / "classes.json"
    writers = [subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, env=env)
               for target in (killed, live)]
    try:
        for writer in writers:
            assert writer.stdout.readline() == b"halfway\n"
        writers[0].kill()
        writers[0].wait()
        (tmp_path / ".notes.txt").write_text("a user's hidden file, not ours")
        before = sorted(p.name for p in tmp_path.rglob(".*"))
        assert len(before) == 3

        assert sweep_temporaries(tmp_path) == 1

        after = sorted(p.name for p in tmp_path.rglob(".*"))
        assert after == sorted([".notes.txt", *(n for n in before if n.startswith(".classes.json."))])
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    assert sweep_temporaries(tmp_path) == 1  # the second writer is dead now too


def test_a_sweep_racing_a_new_temporary_never_deletes_a_live_write(tmp_path, monkeypatch):
    import deeplab_cli.io.outputs as outputs

    real_open, swept = os.open, []

    def open_then_sweep(path, flags, *mode):
        fd = real_open(path, flags, *mode)
        if flags & os.O_EXCL and not swept:  # a sweep runs between the writer's open and its lock
            swept.append(sweep_temporaries(tmp_path))
        return fd

    monkeypatch.setattr(outputs.os, "open", open_then_sweep)
    atomic_write(tmp_path / "mask.png", lambda tmp: tmp.write_bytes(b"whole"))
    assert swept == [1]  # it took the unlocked new file for a leftover...
    assert (tmp_path / "mask.png").read_bytes() == b"whole"  # ...and the writer noticed and took another name
    assert os.listdir(tmp_path) == ["mask.png"]
