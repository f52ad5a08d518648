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

from deeplab_cli.io import images
from deeplab_cli.errors import InputError, UsageError
from deeplab_cli.io.images import DEFAULT_MAX_PIXELS, load_image, max_pixels_from_env, resize_for_network
from deeplab_cli.synthetic import natural_image

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
    assert (tmp_path / "g16.png").read_bytes()[24] == 16  # the IHDR's bit depth: a real 16-bit file
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


def png_declaring(width, height):
    """A valid, tiny PNG whose header declares width x height (a decompression bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def jpeg_declaring(tmp_path, width, height):
    """A real small JPEG whose start-of-frame is patched to declare width x height."""
    cv2.imwrite(str(tmp_path / "small.jpg"), natural_image(16, 16))
    data = bytearray((tmp_path / "small.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if anything reaches OpenCV's decoder."""
    def refuse(*args, **kwargs):
        raise AssertionError("cv2.imdecode was called")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)


def test_absurd_size_is_refused(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_declaring(100_000, 100_000))
    expect_error(tmp_path / "huge.png", "too large")


def test_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path, no_decoding):
    (tmp_path / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    message = expect_error(tmp_path / "bomb.png", "too large", "100000x100000", "(10,000 MP)", "limit of 500 MP",
                           "--max-pixels", "DEEPLAB_MAX_PIXELS")
    assert message == (f"{tmp_path / 'bomb.png'}: image too large: 100000x100000 (10,000 MP) is over the limit "
                       "of 500 MP; raise it with --max-pixels or DEEPLAB_MAX_PIXELS")
    (tmp_path / "bomb.jpg").write_bytes(jpeg_declaring(tmp_path, 60_000, 40_000))
    expect_error(tmp_path / "bomb.jpg", "60000x40000", "(2,400 MP)")


def test_the_limit_counts_pixels_of_any_shape(tmp_path, no_decoding):
    (tmp_path / "strip.png").write_bytes(png_declaring(1_000_000, 501))  # 501 MP in a strip
    expect_error(tmp_path / "strip.png", "1000000x501")


def test_a_20000_pixel_square_scan_is_under_the_default_limit():
    assert 20_000 * 20_000 <= DEFAULT_MAX_PIXELS < 100_000 * 100_000


def test_the_limit_is_the_callers(tmp_path):
    cv2.imwrite(str(tmp_path / "photo.png"), natural_image(300, 200))  # 60,000 pixels
    with pytest.raises(InputError, match=r"200x300 \(60,000 pixels\) is over the limit of 59,999 pixels"):
        load_image(tmp_path / "photo.png", max_pixels=59_999)
    assert load_image(tmp_path / "photo.png", max_pixels=60_000).shape == (300, 200, 3)
    assert load_image(tmp_path / "photo.png", max_pixels=None).shape == (300, 200, 3)
    assert load_image(tmp_path / "photo.png", max_pixels=0).shape == (300, 200, 3)


@pytest.mark.skipif(int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30)) >= 2_400_000_000,
                    reason="OpenCV's limit is raised here: the test would allocate 7 GB")
def test_raising_the_limit_lets_the_header_check_pass_to_opencv(tmp_path):
    # 2.4 GP is beyond OpenCV's own limit (2^30 unless raised): with deeplab's lifted, OpenCV's speaks.
    (tmp_path / "huge.png").write_bytes(png_declaring(60_000, 40_000))
    with pytest.raises(InputError, match="OpenCV's limit") as info:
        load_image(tmp_path / "huge.png", max_pixels=None)
    assert "DEEPLAB_MAX_PIXELS" in str(info.value) and "\n" not in str(info.value)


def test_rotated_jpeg_is_measured_as_stored(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(rgb_image(30, 40)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg", max_pixels=1200).shape == (40, 30, 3)
    with pytest.raises(InputError, match="40x30"):
        load_image(tmp_path / "r.jpg", max_pixels=1199)


def test_max_pixels_from_env():
    assert max_pixels_from_env({}) == DEFAULT_MAX_PIXELS
    assert max_pixels_from_env({"DEEPLAB_MAX_PIXELS": " 2_000_000_000 "}) == 2_000_000_000
    assert max_pixels_from_env({"DEEPLAB_MAX_PIXELS": "0"}) is None
    for bad in ("-1", "500M", "1e9"):
        with pytest.raises(UsageError, match="DEEPLAB_MAX_PIXELS"):
            max_pixels_from_env({"DEEPLAB_MAX_PIXELS": bad})


@pytest.mark.parametrize("env, expected", [
    ({}, str(1 << 30)),  # OpenCV's default stays where deeplab's limit is below it
    ({"DEEPLAB_MAX_PIXELS": "2000000000"}, "2000000000"),
    ({"DEEPLAB_MAX_PIXELS": "0"}, str(1 << 40)),
    ({"DEEPLAB_MAX_PIXELS": "0", "OPENCV_IO_MAX_IMAGE_PIXELS": "12345"}, "12345"),  # the user's own wins
])
def test_opencv_limit_is_raised_before_cv2_loads(env, expected):
    script = ("import os, deeplab_cli, cv2\n"
              "print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    base = {k: v for k, v in os.environ.items() if k not in ("DEEPLAB_MAX_PIXELS", "OPENCV_IO_MAX_IMAGE_PIXELS")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**base, **env, "PYTHONPATH": src})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


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
        "from deeplab_cli.io.images import load_image\n"
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
    log = getattr(cv2.utils, "logging", cv2)  # where OpenCV 4.8 and newer keep the level
    before = log.getLogLevel()
    with pytest.raises(InputError):
        load_image(tmp_path / "notes.png")
    assert log.getLogLevel() == before


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


def test_header_size_reads_only_the_header(tmp_path, no_decoding):
    (tmp_path / "bomb.png").write_bytes(png_declaring(100_000, 70_000))
    cv2.imwrite(str(tmp_path / "photo.jpg"), natural_image(30, 45))
    assert images.header_size(tmp_path / "bomb.png") == (100_000, 70_000)
    assert images.header_size(tmp_path / "photo.jpg") == (45, 30)
    (tmp_path / "notes.png").write_text("text")
    assert images.header_size(tmp_path / "notes.png") is None
    assert images.header_size(tmp_path / "missing.png") is None


@pytest.mark.parametrize("content", [b"", b"BM", b"\x89PNG", b"not an image at all"])
def test_header_size_of_short_or_foreign_files_is_unknown_not_an_error(tmp_path, content):
    from deeplab_cli.io.images import header_size

    (tmp_path / "x.png").write_bytes(content)
    assert header_size(tmp_path / "x.png") is None
    assert header_size(tmp_path / "missing.png") is None


def test_header_size_of_a_fifo_is_unknown_at_once(tmp_path):
    from deeplab_cli.io.images import header_size

    os.mkfifo(tmp_path / "pipe.png")
    assert header_size(tmp_path / "pipe.png") is None  # no writer: a blocking open would never return
