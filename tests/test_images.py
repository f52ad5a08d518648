import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from conftest import natural_image
from deeplab_cli.errors import InputError
from deeplab_cli.images import load_image, resize_for_network

ORIENTATION = 0x0112


def rgb_image(height=24, width=32, seed=0):
    """(H, W, 3) uint8 RGB with an asymmetric corner, so flips and rotations show."""
    image = natural_image(height, width, seed)[..., ::-1].copy()
    image[:4, :6] = (255, 0, 0)
    return image


def assert_loaded(image, shape):
    assert image.shape == shape
    assert image.dtype == np.uint8
    assert image.flags.c_contiguous


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_8bit_files_match_cv2_imread(tmp_path, suffix):
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(rgb_image(60, 80)).save(path)
    image = load_image(path)
    assert_loaded(image, (60, 80, 3))
    np.testing.assert_array_equal(image, cv2.imread(str(path), cv2.IMREAD_COLOR))


def test_png_is_bgr(tmp_path):
    rgb = rgb_image()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb[..., ::-1])


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".webp"])
def test_lossless_formats(tmp_path, suffix):
    rgb = rgb_image()
    path = tmp_path / f"a{suffix}"
    Image.fromarray(rgb).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    image = load_image(path)
    assert_loaded(image, rgb.shape)
    np.testing.assert_array_equal(image, rgb[..., ::-1])


def test_grayscale_is_replicated(tmp_path):
    gray = rgb_image()[..., 1]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert_loaded(image, (*gray.shape, 3))
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], gray)


def test_rgba_alpha_is_dropped_not_composited(tmp_path):
    rgb = rgb_image()
    alpha = np.zeros(rgb.shape[:2], np.uint8)  # fully transparent: colours must survive anyway
    alpha[:, ::2] = 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb[..., ::-1])


def test_palette_png_is_expanded(tmp_path):
    ids = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    image = Image.frombytes("P", (3, 2), ids.tobytes())
    colours = np.array([[255, 0, 0], [0, 255, 0], [10, 20, 30]], np.uint8)
    image.putpalette(colours.tobytes(), rawmode="RGB")
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), colours[ids][..., ::-1])


def test_16bit_gray_png_keeps_high_byte(tmp_path):
    gray = np.array([[0, 255, 256, 4660, 65535, 32768]], np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    image = load_image(tmp_path / "g16.png")
    assert_loaded(image, (1, 6, 3))
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], gray >> 8)


def test_16bit_colour_png_keeps_high_byte(tmp_path):
    rng = np.random.default_rng(1)
    bgr16 = rng.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), bgr16)
    image = load_image(tmp_path / "c16.png")
    assert_loaded(image, (5, 7, 3))
    np.testing.assert_array_equal(image, (bgr16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, orientation, suffix):
    # Measured: cv2.imdecode applies EXIF orientation itself in OpenCV 5; this guards that.
    rgb = rgb_image(30, 40)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = tmp_path / f"o{orientation}{suffix}"
    Image.fromarray(rgb).save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[..., ::-1]
    image = load_image(path)
    assert image.shape == upright.shape == ((30, 40, 3) if orientation == 3 else (40, 30, 3))
    assert np.abs(image.astype(int) - upright).max() <= 2  # JPEG decoders may differ by rounding
    np.testing.assert_array_equal(image, cv2.imread(str(path), cv2.IMREAD_COLOR))


def expect_error(path, *words):
    with pytest.raises(InputError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for word in words:
        assert word in message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.jpg", "not found")


def test_directory(tmp_path):
    expect_error(tmp_path, "directory")


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    expect_error(tmp_path / "empty.png", "empty")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    Image.fromarray(rgb_image()).save(path)
    path.chmod(0)
    expect_error(path, "permission denied")


def test_permission_error_is_reported(tmp_path, monkeypatch):
    def deny(path, *args):  # chmod cannot deny root, who runs CI
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", deny)
    expect_error(tmp_path / "x.png", "permission denied")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    expect_error(tmp_path / "pipe.png", "not a regular file (a FIFO)")


def test_a_directory_is_refused(tmp_path):
    (tmp_path / "folder.png").mkdir()
    expect_error(tmp_path / "folder.png", "is a directory")


def test_a_symlink_loop_is_refused(tmp_path):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    expect_error(tmp_path / "loop.png", "cannot read", "symbolic links")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("just some text\n")
    expect_error(tmp_path / "notes.png", "not an image")


@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_truncated_jpeg(tmp_path, fraction):
    Image.fromarray(rgb_image(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * fraction)])
    expect_error(tmp_path / "cut.jpg", ": truncated JPEG (")


def test_jpeg_without_only_its_end_marker(tmp_path):
    Image.fromarray(rgb_image(64, 64)).save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:-2])
    expect_error(tmp_path / "cut.jpg", ": truncated JPEG (")


def test_jpeg_with_trailing_bytes_still_loads(tmp_path):
    # Some cameras and editors append data after the end-of-image marker; OpenCV ignores it.
    Image.fromarray(rgb_image(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "tail.jpg").write_bytes(data + b"trailing junk")
    np.testing.assert_array_equal(load_image(tmp_path / "tail.jpg"), load_image(tmp_path / "full.jpg"))


@pytest.mark.parametrize("cut", [0.5, -12])
def test_truncated_png(tmp_path, cut):
    Image.fromarray(rgb_image(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    end = int(len(data) * cut) if cut > 0 else len(data) + cut  # -12 drops just the IEND chunk
    (tmp_path / "cut.png").write_bytes(data[:end])
    expect_error(tmp_path / "cut.png", ": truncated PNG (")


def test_damaged_png(tmp_path):
    Image.fromarray(rgb_image(64, 64)).save(tmp_path / "full.png")
    data = bytearray((tmp_path / "full.png").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.png").write_bytes(bytes(data))
    expect_error(tmp_path / "bad.png", "corrupt PNG", "CRC")


def test_png_with_damaged_text_chunk_loads_like_imread(tmp_path):
    # libpng drops an ancillary chunk with a bad CRC and decodes the pixels; so must we.
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    Image.fromarray(rgb_image()).save(tmp_path / "full.png", pnginfo=info)
    data = bytearray((tmp_path / "full.png").read_bytes())
    data[data.find(b"hello")] ^= 1
    (tmp_path / "text.png").write_bytes(bytes(data))
    np.testing.assert_array_equal(load_image(tmp_path / "text.png"), rgb_image()[..., ::-1])


@pytest.mark.parametrize("suffix", [".webp", ".tif", ".bmp"])
def test_truncated_other_formats(tmp_path, suffix):
    Image.fromarray(rgb_image(64, 64)).save(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / f"cut{suffix}", "corrupt or truncated")


def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_absurd_size_is_refused(tmp_path):
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))
    (tmp_path / "huge.png").write_bytes(data)
    expect_error(tmp_path / "huge.png", "too large")


def test_failures_print_nothing(tmp_path):
    # A child process, because libpng's messages are buffered C stdio that only shows up at exit.
    # Noise this big makes a half PNG reach libpng's error path (a small one does not).
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    for suffix in (".png", ".tif", ".jpg", ".webp"):
        Image.fromarray(noise).save(tmp_path / f"full{suffix}")
        data = (tmp_path / f"full{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("text")
    script = (
        "import sys\n"
        "from deeplab_cli.errors import InputError\n"
        "from deeplab_cli.images import load_image\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        load_image(path)\n"
        "    except InputError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(path + ' loaded')\n"
    )
    paths = [str(p) for p in sorted(tmp_path.glob("cut.*"))] + [str(tmp_path / "notes.png")]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_log_level_is_restored(tmp_path):
    (tmp_path / "notes.png").write_text("text")
    before = cv2.utils.logging.getLogLevel()
    with pytest.raises(InputError):
        load_image(tmp_path / "notes.png")
    assert cv2.utils.logging.getLogLevel() == before


def test_resize_keeps_small_images():
    image = np.zeros((300, 400, 3), np.uint8)
    assert resize_for_network(image, 400) is image
    assert resize_for_network(image, None) is image


@pytest.mark.parametrize("shape, max_size, expected", [
    ((1000, 500, 3), 513, (513, 256, 3)),
    ((375, 500, 3), 250, (188, 250, 3)),
    ((600, 600, 3), 100, (100, 100, 3)),
    ((2000, 3, 3), 100, (100, 1, 3)),
])
def test_resize_fits_and_keeps_aspect(shape, max_size, expected):
    out = resize_for_network(np.zeros(shape, np.uint8), max_size)
    assert out.shape == expected
    assert out.dtype == np.uint8


def test_resize_averages_when_shrinking():
    image = np.zeros((4, 8, 3), np.uint8)
    image[:, 1::2] = 200  # one-pixel stripes: area averaging gives their mean, skipping would not
    np.testing.assert_array_equal(resize_for_network(image, 4), np.full((2, 4, 3), 100, np.uint8))


def test_resize_rejects_nonpositive_size():
    with pytest.raises(ValueError):
        resize_for_network(np.zeros((4, 4, 3), np.uint8), 0)
