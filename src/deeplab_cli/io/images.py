"""Loading images the way DeepLab did (OpenCV, BGR) and fitting them to the network's size limit.

Facts measured with opencv-python-headless 5.0 that shape this module:
- `cv2.imdecode` applies EXIF orientation (JPEG and PNG), exactly as `cv2.imread` does.
- A truncated JPEG, PNG, WebP, TIFF or BMP decodes to None; OpenCV 4.x instead returned a partly grey
  JPEG with only a "Premature end of JPEG file" warning, so JPEG and PNG completeness is checked here too.
- OpenCV logs decoder failures on stderr (silenced below); libpng prints its own errors, which the PNG
  chunk check keeps from being reached for truncated or damaged files.
- OpenCV refuses images over OPENCV_IO_MAX_IMAGE_PIXELS (default 2^30), an environment variable it reads
  once, when cv2 loads; `deeplab_cli/__init__.py` sets it before any module imports cv2.
- Pillow reads width and height from the header without decoding (`_header_size`); its own bomb guard
  (an error over 179 MP) is not used, as deeplab's limit is its own.
"""

import io
import os
import stat
import warnings
import zlib
from contextlib import contextmanager

import cv2
import numpy as np
from PIL import Image

from deeplab_cli.errors import InputError, UsageError

# Default pixel limit: a 20000x20000 scan (400 MP) passes, a decompression bomb does not. At 500 MP an
# image alone takes 1.5 GB decoded (BGR) plus 0.5 GB of labels, and up to 1.5 GB more for a colour or
# overlay output; anything larger deserves a deliberate --max-pixels.
DEFAULT_MAX_PIXELS = 500_000_000
MAX_PIXELS_ENV = "DEEPLAB_MAX_PIXELS"
DEFAULT_MAX_SIZE = 513  # the longer side the network sees by default: the paper's test size

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# File signatures, only to say *why* a file failed to decode; OpenCV sniffs formats on its own.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (_PNG_SIGNATURE, "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)


def _format_of(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _jpeg_problem(data: bytes) -> str | None:
    # Entropy-coded data cannot hold FF D9 or FF DA (FF is stuffed), so a complete file has an EOI
    # after its last start-of-scan; an EXIF thumbnail's own EOI comes before the main scan.
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return "truncated JPEG (no end-of-image marker after the last scan)"
    return None


def _png_problem(data: bytes) -> str | None:
    # Walk the chunks up to IEND, checking the CRCs of critical ones (uppercase first letter): catches
    # truncation and damage before libpng sees the file and prints its own error on stderr. A bad CRC
    # in an ancillary chunk (text, EXIF) only makes libpng drop that chunk, so it passes, as in imread.
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            return "truncated PNG (ends before the IEND chunk)"
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            return f"truncated PNG (chunk {kind.decode('latin-1')!r} is cut short)"
        critical = kind[:1].isupper()
        if critical and zlib.crc32(data[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            return f"corrupt PNG (bad CRC in chunk {kind.decode('latin-1')!r})"
        if kind == b"IEND":
            return None
        pos = end + 4


_COMPLETENESS_CHECKS = {"JPEG": _jpeg_problem, "PNG": _png_problem}
_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device"}


# Where OpenCV keeps its log level: cv2.utils.logging in newer releases, cv2 itself in 4.8.
_OPENCV_LOG = getattr(cv2.utils, "logging", cv2)
_OPENCV_SILENT = 0  # LOG_LEVEL_SILENT


@contextmanager
def _quiet_opencv():
    previous = _OPENCV_LOG.getLogLevel()
    _OPENCV_LOG.setLogLevel(_OPENCV_SILENT)
    try:
        yield
    finally:
        _OPENCV_LOG.setLogLevel(previous)


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind == stat.S_IFDIR:
                raise IsADirectoryError
            if kind != stat.S_IFREG:
                raise InputError(f"{path}: not a regular file ({_FILE_KINDS.get(kind, 'special file')})")
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as e:  # a symlink loop (ELOOP) among them
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise InputError(f"{path}: empty file (0 bytes)")
    return data


def max_pixels_from_env(environ: dict[str, str] | None = None) -> int | None:
    """The pixel limit from DEEPLAB_MAX_PIXELS: DEFAULT_MAX_PIXELS when unset, None (no limit) for 0.
    Raises UsageError naming the variable when its value is not a whole number >= 0."""
    text = (os.environ if environ is None else environ).get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{MAX_PIXELS_ENV}={text!r}: expected a whole number of pixels (0 = no limit)")
    return value or None


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) as an image file's header declares them, reading only the header; None when the
    file cannot be read or Pillow does not know its format. For planning (lanes, memory) before decoding."""
    try:
        # O_NONBLOCK, and regular files only: a FIFO would wait for a writer (load_image says what it is).
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            return _header_size(f) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else None
    except (OSError, ValueError):  # ValueError: a name no file can have (a NUL byte in it)
        return None


def _header_size(fp) -> tuple[int, int] | None:
    """(width, height) from the header of a binary file object, without decoding; None when Pillow
    does not know the format (OpenCV's own limit then guards the decoder). Image.open's core without
    its bomb check, which would refuse any image over 179 MP before telling its size."""
    prefix = fp.read(16)
    # Pillow's common plugins first, as Image.open does: loading all of them takes ~0.1 s.
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for format_id in Image.ID:
            factory, accept = Image.OPEN[format_id]
            try:
                claimed = accept(prefix) if accept else False
            except Exception:  # a plugin's check on a prefix too short for it (an empty file)
                continue
            if not claimed or isinstance(claimed, str):
                continue
            fp.seek(0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image = factory(fp, "")
            except Exception:  # a damaged header: OpenCV will say what is wrong with the file
                continue
            width, height = image.size
            return int(width), int(height)
    return None


def _check_pixels(path, data: bytes, max_pixels: int | None) -> None:
    if not max_pixels:
        return
    size = _header_size(io.BytesIO(data))
    if size is None or size[0] * size[1] <= max_pixels:
        return
    width, height = size
    raise InputError(f"{path}: image too large: {width}x{height} ({_amount(width * height)}) is over the "
                     f"limit of {_amount(max_pixels)}; raise it with --max-pixels or {MAX_PIXELS_ENV}")


def _amount(pixels: int) -> str:
    """500000000 -> '500 MP', 24000000 -> '24 MP', 2500000 -> '2.5 MP', 50000 -> '50,000 pixels'."""
    if pixels < 1_000_000:
        return f"{pixels:,} pixels"
    return f"{pixels / 1e6:,.1f}".removesuffix(".0") + " MP"


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 BGR, C-contiguous, EXIF orientation applied.

    Pixel for pixel what DeepLab's `cv2.imread(path, cv2.IMREAD_COLOR)` gives: grayscale is replicated
    to three channels, an alpha channel is DROPPED (not composited: transparent pixels keep their
    colour), 16-bit samples keep their high byte (v >> 8), palette images are expanded. Any format
    this OpenCV build reads (JPEG, PNG, BMP, TIFF, WebP, GIF, ...) works; multi-page files give page one.
    Images over `max_pixels` (width x height; None or 0: no limit) are refused from their header,
    before anything is decoded or allocated.
    Raises InputError("<path>: <reason>") when the file is missing, unreadable, empty, truncated,
    corrupt, over the pixel limit or OpenCV's, or not an image.
    """
    data = _read_bytes(path)
    kind = _format_of(data)
    check = _COMPLETENESS_CHECKS.get(kind)
    problem = check(data) if check else None
    if problem:
        raise InputError(f"{path}: {problem}")
    _check_pixels(path, data, max_pixels)
    try:
        with _quiet_opencv():
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:
        if "CV_IO_MAX_IMAGE_PIXELS" in e.err:
            limit = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 30))
            raise InputError(f"{path}: image too large to decode (over OpenCV's limit of {limit} pixels; "
                             f"set {MAX_PIXELS_ENV} before starting deeplab to raise both)") from None
        raise InputError(f"{path}: cannot decode ({e.err})") from None
    if image is None:
        if kind is None:
            raise InputError(f"{path}: not an image (unrecognised or unsupported format)")
        raise InputError(f"{path}: corrupt or truncated {kind} data (cannot decode)")
    return np.ascontiguousarray(image)


def resize_for_network(image: np.ndarray, max_size: int | None) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with max(h, w) <= max_size, aspect ratio kept.

    Downscales with area interpolation (averages pixels instead of skipping them). Returns `image`
    itself when it already fits or max_size is None.
    """
    return resize_to(image, network_size(*image.shape[:2], max_size))


def network_size(height: int, width: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) the network sees for an (height, width) image: max(h, w) <= max_size, aspect ratio kept;
    (height, width) itself when it fits or max_size is None."""
    if max_size is None:
        return height, width
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    longest = max(height, width)
    if longest <= max_size:
        return height, width
    # Fix the long side to max_size exactly; rounding the short side keeps the aspect closest.
    new_height = max(1, round(height * max_size / longest)) if height < longest else max_size
    new_width = max(1, round(width * max_size / longest)) if width < longest else max_size
    return new_height, new_width


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 for size = (h, w), by area interpolation; `image` itself if
    it already has that size. `deeplab crf` uses it to rebuild the working image `segment` saw."""
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
