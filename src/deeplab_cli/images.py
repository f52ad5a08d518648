"""Loading images the way DeepLab did (OpenCV, BGR) and fitting them to the network's size limit.

Facts measured with opencv-python-headless 5.0 that shape this module:
- `cv2.imdecode` applies EXIF orientation (JPEG and PNG), exactly as `cv2.imread` does.
- A truncated JPEG, PNG, WebP, TIFF or BMP decodes to None; OpenCV 4.x instead returned a partly grey
  JPEG with only a "Premature end of JPEG file" warning, so JPEG and PNG completeness is checked here too.
- OpenCV logs decoder failures on stderr (silenced below); libpng prints its own errors, which the PNG
  chunk check keeps from being reached for truncated or damaged files.
"""

import os
import stat
import zlib
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from .errors import InputError

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


@contextmanager
def _quiet_opencv():
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)


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


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 BGR, C-contiguous, EXIF orientation applied.

    Pixel for pixel what DeepLab's `cv2.imread(path, cv2.IMREAD_COLOR)` gives: grayscale is replicated
    to three channels, an alpha channel is DROPPED (not composited: transparent pixels keep their
    colour), 16-bit samples keep their high byte (v >> 8), palette images are expanded. Any format
    this OpenCV build reads (JPEG, PNG, BMP, TIFF, WebP, GIF, ...) works; multi-page files give page one.
    Raises InputError("<path>: <reason>") when the file is missing, unreadable, empty, truncated,
    corrupt, too large for OpenCV, or not an image.
    """
    data = _read_bytes(path)
    kind = _format_of(data)
    check = _COMPLETENESS_CHECKS.get(kind)
    problem = check(data) if check else None
    if problem:
        raise InputError(f"{path}: {problem}")
    try:
        with _quiet_opencv():
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:
        if "CV_IO_MAX_IMAGE_PIXELS" in e.err:
            raise InputError(f"{path}: image too large to decode (over OpenCV's pixel limit)") from None
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
    if max_size is None:
        return image
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest <= max_size:
        return image
    # Fix the long side to max_size exactly; rounding the short side keeps the aspect closest.
    new_height = max(1, round(height * max_size / longest)) if height < longest else max_size
    new_width = max(1, round(width * max_size / longest)) if width < longest else max_size
    return resize_to(image, (new_height, new_width))


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 for size = (h, w), by area interpolation; `image` itself if
    it already has that size. `deeplab crf` uses it to rebuild the working image `segment` saw."""
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
