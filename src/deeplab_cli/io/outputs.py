"""PASCAL VOC colours and class names, and writing results so that a killed run never leaves half a file.

Every writer goes through `atomic_write`: the bytes land in a hidden `.<name>.<random>.tmp` beside the
target and are renamed over it only when complete. `write_outputs` writes the formats a run asks for.
"""

import errno
import json
import os
import re
import secrets
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing
from PIL import Image, UnidentifiedImageError

from deeplab_cli.errors import InputError, OutputError
from deeplab_cli.model.upsample import prob_chunks

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 RGB: the VOC colour of each id. Bits 0, 1, 2 of the id become the top bits of
    R, G, B; bits 3, 4, 5 the next bits; and so on (1 = (128, 0, 0), 255 = (224, 224, 192))."""
    ids = np.arange(n)
    palette = np.zeros((n, 3), np.int64)
    for level in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * level + channel)) & 1) << (7 - level)
    return palette.astype(np.uint8)


def _check_labels(labels: np.ndarray, palette: np.ndarray) -> None:
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be (H, W) uint8, got {labels.shape} {labels.dtype}")
    if labels.size and int(labels.max()) >= len(palette):
        raise ValueError(f"label {int(labels.max())} has no colour in a {len(palette)}-entry palette")


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) uint8 ids, (n, 3) uint8 RGB palette -> (H, W, 3) uint8 BGR colour image."""
    _check_labels(labels, palette)
    palette_bgr = np.ascontiguousarray(palette[:, ::-1], dtype=np.uint8)
    return palette_bgr[labels]


def overlay(image_bgr: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8 BGR photo, (H, W) uint8 ids -> (H, W, 3) uint8 BGR blend.

    Every pixel becomes (1 - alpha) * photo + alpha * class colour, rounded; the background class is
    blended too (its black dims the photo), so one alpha means the same everywhere.
    alpha 0 gives the photo, 1 the colour map.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if image_bgr.shape != (*labels.shape, 3) or image_bgr.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 matching labels {labels.shape}, "
                         f"got {image_bgr.shape} {image_bgr.dtype}")
    return cv2.addWeighted(image_bgr, 1.0 - alpha, colorize(labels, palette), alpha, 0.0)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via `write(tmp)` to a hidden `.<name>.<random>.tmp` beside `path`, fsync it, then
    rename it onto `path`. Creates the parent directories.

    Readers and a killed process see either the old file or the complete new one. On any exception
    the temporary file is removed and the exception propagates (OSErrors unchanged). The temporary is
    locked while it exists, which is how `sweep_temporaries` tells a dead writer's leftovers from a
    live shard's file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _locked_temporary(path)
    try:
        write(tmp)
        # fsync before the rename: after a power loss the target is the old file or the whole new one.
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # releases the lock, only now that the name is gone


def _locked_temporary(path: Path) -> tuple[int, Path]:
    """(open descriptor holding an exclusive lock, name) of a new hidden temporary beside `path`."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        # O_EXCL never clobbers another file; mode 0o666 lets the umask decide (mkstemp would force 0o600).
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        if _try_lock(fd, blocking=True) is False:
            return fd, tmp  # no locks on this file system: nothing sweeps, so nothing can race
        try:
            # A sweep may have locked and deleted the file between open and lock: then take another name.
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


def _try_lock(fd: int, blocking: bool) -> bool | None:
    """flock(LOCK_EX): True when taken, None when another process holds it (non-blocking), False where
    the platform or file system has no such locks (Windows; some network file systems)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return None
    except OSError:  # ENOLCK, ENOSYS, EOPNOTSUPP
        return False
    return True


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def sweep_temporaries(folder: Path) -> int:
    """Delete the temporaries that killed writers left under `folder` (an output tree); returns how many.

    A temporary is a dead writer's when its lock can be taken: a live writer, in this run or in another
    shard writing into the same tree, holds it until its file is renamed into place. Where the file
    system has no locks nothing is deleted, since a live writer cannot be told apart.
    """
    removed = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if not _TEMPORARY.match(name):
                continue
            stale = Path(root, name)
            try:
                fd = os.open(stale, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue  # gone already, or not ours to open
            try:
                if _try_lock(fd, blocking=False):
                    stale.unlink(missing_ok=True)
                    removed += 1
            finally:
                os.close(fd)
    return removed


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_index_png(path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Save (H, W) uint8 ids as a palette ("P" mode) PNG: pixel values are the ids, shown in colour
    by any viewer; `read_index_png` or Pillow read the ids back. `palette` is (n, 3) uint8 RGB."""
    _check_labels(labels, palette)
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels).tobytes())
    image.putpalette(np.asarray(palette, np.uint8).tobytes(), rawmode="RGB")

    def save(tmp: Path) -> None:
        image.save(tmp, format="PNG")

    atomic_write(path, save)


def write_png(path: Path, image_bgr: np.ndarray) -> None:
    """Save an (H, W, 3) uint8 BGR image (colour map, overlay) as PNG."""
    ok, encoded = cv2.imencode(".png", image_bgr)
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode a {image_bgr.shape} {image_bgr.dtype} image as PNG")
    _write_bytes(path, encoded.tobytes())


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Save arrays, dtypes kept, as an uncompressed .npz.

    Uncompressed on purpose: for (21, 375, 500) float16 probabilities, savez_compressed took ~320 ms
    against ~6 ms and only halved the file (7.9 MB -> 4.1 MB).
    """
    def save(tmp: Path) -> None:
        # A file object, because np.savez appends ".npz" to a name that lacks it.
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, save)


def write_npz_streamed(path: Path, name: str, shape: tuple[int, ...], dtype: np.typing.DTypeLike,
                       chunks: Iterable[np.ndarray]) -> None:
    """Save one array given as chunks, without ever holding it whole: the .npz that
    `write_npz(path, **{name: array})` writes (uncompressed, `name`.npy inside), read the same by np.load.

    `chunks` are arrays of dtype `dtype` whose elements, concatenated in C order, are the array of
    `shape` (for (C, H, W) probabilities: class 0's rows top to bottom, then class 1's;
    `upsample.prob_chunks` yields them so). The zip entry is always zip64, as np.savez writes it, so
    arrays over 4 GiB work. Raises ValueError, leaving no file, when a chunk has another dtype or the
    chunks do not add up to `shape`; OSErrors as `atomic_write`.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    total = int(np.prod(shape, dtype=np.int64))

    def save(tmp: Path) -> None:
        written = 0
        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(entry, header)  # the header np.save writes
                for chunk in chunks:
                    if chunk.dtype != dtype:
                        raise ValueError(f"{path}: chunk of dtype {chunk.dtype}, expected {dtype}")
                    written += chunk.size
                    if written > total:
                        raise ValueError(f"{path}: chunks hold more than the {total} elements of {shape}")
                    entry.write(memoryview(np.ascontiguousarray(chunk).reshape(-1)).cast("B"))
        if written != total:
            raise ValueError(f"{path}: chunks hold {written} elements, {shape} needs {total}")

    atomic_write(path, save)


def read_index_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label map PNG (palette "P" or 8-bit grayscale "L") as (H, W) uint8 ids.

    Raises InputError("<path>: <reason>") when the file is missing, unreadable, not a PNG, truncated,
    or holds colours (RGB, alpha, 16-bit) instead of ids.
    """
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise InputError(f"{path}: not a PNG label map ({image.format} file)")
            if image.mode not in ("P", "L"):
                raise InputError(f"{path}: not a label map (PNG mode {image.mode}; expected palette 'P' "
                                 "or 8-bit grayscale 'L')")
            return np.array(image)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a label map") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image (cannot identify format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow reports truncated or damaged data as OSError, SyntaxError or ValueError.
        raise InputError(f"{path}: corrupt or truncated PNG ({e})") from None


def write_classes_json(path: Path, classes: Sequence[str], palette: np.ndarray) -> None:
    """Save [{"id": 0, "name": "background", "color": [0, 0, 0]}, ...] with RGB colours."""
    entries = [{"id": i, "name": name, "color": [int(v) for v in palette[i]]}
               for i, name in enumerate(classes)]
    _write_bytes(path, (json.dumps(entries, indent=2) + "\n").encode())


@dataclass(frozen=True)
class SavedLogits:
    """What `deeplab segment --format logits` keeps so that `deeplab crf` can finish without the network."""

    logits: np.ndarray  # (C, h', w') float32 stride-8 scores
    work_size: tuple[int, int]  # (h, w) the network saw
    image_size: tuple[int, int]  # (H, W) of the decoded image
    model: str


def write_logits(path: Path, saved: SavedLogits) -> None:
    write_npz(path, logits=saved.logits.astype(np.float32), work_size=np.array(saved.work_size, np.int64),
              image_size=np.array(saved.image_size, np.int64), model=np.array(saved.model))


def read_logits(path: Path) -> SavedLogits:
    """Read a `.logits.npz`; InputError("<path>: <reason>") when missing, unreadable or incomplete."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            logits, work, size, model = (npz[k] for k in ("logits", "work_size", "image_size", "model"))
    except FileNotFoundError:
        raise InputError(f"{path}: no logits file (run `deeplab segment --format logits` first)") from None
    except KeyError as e:
        raise InputError(f"{path}: not a deeplab logits file (no {e} array)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: unreadable logits file ({e})") from None
    if logits.ndim != 3 or work.shape != (2,) or size.shape != (2,):
        raise InputError(f"{path}: logits file has unexpected shapes {logits.shape}, {work.shape}, {size.shape}")
    return SavedLogits(logits, (int(work[0]), int(work[1])), (int(size[0]), int(size[1])), str(model))


# Errors of the output device, not of one file: every later write would fail the same way.
_DEVICE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def write_outputs(targets: Iterable[tuple[str, Path]], *, image, labels, probs, logits, work_size, model,
                  alpha: float) -> None:
    """Write each (format, path) of `targets` for one image; every file appears complete or not at all.
    Raises OutputError naming the file that could not be written."""
    palette = voc_palette()
    writers = {
        "index": lambda path: write_index_png(path, labels, palette),
        "color": lambda path: write_png(path, colorize(labels, palette)),
        "overlay": lambda path: write_png(path, overlay(image, labels, palette, alpha)),
        # At the image's size, streamed class by class: the full map is never held.
        "probs": lambda path: write_npz_streamed(path, "probs", (len(probs), *labels.shape), np.float16,
                                                 prob_chunks(probs, *labels.shape)),
        "logits": lambda path: write_logits(path, SavedLogits(logits, tuple(work_size), image.shape[:2], model)),
    }
    for fmt, path in targets:
        try:
            writers[fmt](path)
        except OSError as e:
            raise OutputError(f"{path}: cannot write ({e.strerror or e})",
                              stops_batch=e.errno in _DEVICE_ERRORS) from None
