"""Any model's scores for `deeplab crf`: the file paired with an image, and its checks.

Three kinds, found by the image's relative path (`key`) in the scores folder:
- logits: `<key>.logits.npz`, what `deeplab segment --format logits` wrote (read by `outputs.read_logits`);
- probs: `<key>.npy`, `<key>.npz` (one array, or one named `probs`) or `<key>.probs.npz` (what
  `segment --format probs` writes): (C, h, w) class probabilities at any resolution;
- labels: `<key>.png`, a label map (palette or 8-bit gray).
Each problem is an InputError naming the file, so the image fails alone and the batch goes on.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from deeplab_cli.errors import InputError

KINDS = ("logits", "probs", "labels")
SUFFIXES = {"logits": (".logits.npz",), "probs": (".npy", ".npz", ".probs.npz"), "labels": (".png",)}
DEFAULT_GT_PROB = 0.7  # labels: the probability a label is given, as pydensecrf's examples give it
SUM_TOLERANCE = 1e-3  # |sum over classes - 1| a pixel may have: float16 files of 21 classes stay within 5e-4


def scores_path(folder: Path, key: str, kind: str) -> Path:
    """The scores file of the image with relative path `key` (no extension); InputError when none."""
    candidates = [folder / (key + suffix) for suffix in SUFFIXES[kind]]
    for path in candidates:
        if path.is_file():
            return path
    hint = "; run `deeplab segment --format logits` first" if kind == "logits" else ""
    raise InputError(f"{candidates[0]}: no {kind} file for this image (looked for "
                     f"{', '.join(p.name for p in candidates)}){hint}")


def read_probs(path: Path, classes: int) -> np.ndarray:
    """(C, h, w) float32 class probabilities from a .npy or .npz, checked: C == classes, finite, non-negative,
    each pixel summing to 1 (within SUM_TOLERANCE). InputError("<path>: <reason>") otherwise."""
    try:
        loaded = np.load(path, allow_pickle=False)  # no pickle: object arrays would be code, not data
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                probs = _one_array(path, loaded)
        else:
            probs = loaded
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: unreadable probabilities ({e})") from None
    if probs.ndim != 3 or 0 in probs.shape:
        raise InputError(f"{path}: probabilities must be (C, H, W), got shape {probs.shape}")
    if probs.shape[0] != classes:
        raise InputError(f"{path}: {probs.shape[0]} classes, expected {classes} (--classes)")
    if not np.issubdtype(probs.dtype, np.floating):
        raise InputError(f"{path}: probabilities must be floats, got {probs.dtype}")
    probs = probs.astype(np.float32, copy=False)
    if not np.isfinite(probs).all():
        raise InputError(f"{path}: holds NaN or infinite values")
    if probs.min() < 0:
        raise InputError(f"{path}: holds negative probabilities (min {probs.min():.3g}); give softmax outputs")
    worst = float(np.abs(probs.sum(axis=0, dtype=np.float64) - 1).max())
    if worst > SUM_TOLERANCE:
        raise InputError(f"{path}: probabilities do not sum to 1 over the classes (off by up to {worst:.3g}); "
                         "normalise them (a softmax), or use --scores logits for raw scores")
    return probs


def _one_array(path: Path, npz) -> np.ndarray:
    names = npz.files
    if "probs" in names:
        return npz["probs"]
    if len(names) != 1:
        raise InputError(f"{path}: holds {len(names)} arrays ({', '.join(names[:5])}); save one, or name it 'probs'")
    return npz[names[0]]


def read_labels(path: Path, classes: int, ignore: int | None, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 labels of a palette or gray PNG, checked: the image's `size`, every value a class
    (< classes) or the ignore label. InputError("<path>: <reason>") otherwise."""
    from deeplab_cli.io.outputs import read_index_png

    labels = read_index_png(path)
    if labels.shape != tuple(size):
        raise InputError(f"{path}: label map is {labels.shape[0]}x{labels.shape[1]}, image is {size[0]}x{size[1]}")
    wrong = (labels >= classes) & (labels != (-1 if ignore is None else ignore))
    if wrong.any():
        value = int(labels[wrong].max())
        hint = "" if ignore is not None else "; --ignore-label names a label of unknown pixels"
        raise InputError(f"{path}: label {value} is not one of the {classes} classes (--classes){hint}")
    return labels


def labels_unary(labels: np.ndarray, classes: int, gt_prob: float, ignore: int | None) -> np.ndarray:
    """(classes, H*W) float32 energies of an (H, W) label map, as pydensecrf's `unary_from_labels` makes
    them with zero_unsure=False: each pixel's label has probability gt_prob, the others share the rest.
    Pixels with the `ignore` label get the uniform energy -log(1 / classes), as its unsure pixels do."""
    from deeplab_cli.densecrf.utils import unary_from_labels

    unknown = labels == ignore if ignore is not None else np.zeros(labels.shape, bool)
    unary = unary_from_labels(np.where(unknown, 0, labels), classes, gt_prob, zero_unsure=False)
    unary[:, unknown.reshape(-1)] = -np.log(1.0 / classes)
    return unary
