"""From stride-8 scores to per-pixel probabilities and labels.

DeepLab's `fc8_interp` is Caffe's Interp layer with zoom_factor 8: align-corners bilinear
sampling onto ((h-1)*8+1, (w-1)*8+1), so logit i lands exactly on pixel 8*i, then the top-left
H x W crop. Because the zoom is an integer, every output row/column mixes two neighbours with
fixed weights (1 - k/8, k/8), so the whole layer is two small matrix products.
"""

import cv2
import numpy as np


def _interp_matrix(n_in: int, n_out: int, zoom: int) -> np.ndarray:
    """(n_out, n_in) float32 align-corners weights: output j samples input j/zoom."""
    out = np.arange(n_out)
    lower = out // zoom
    frac = (out % zoom) / zoom
    upper = np.minimum(lower + 1, n_in - 1)  # the last input row only ever gets frac == 0
    matrix = np.zeros((n_out, n_in), np.float32)
    matrix[out, lower] = 1.0 - frac
    matrix[out, upper] += frac
    return matrix


def caffe_interp(logits: np.ndarray, height: int, width: int, zoom: int = 8) -> np.ndarray:
    """(C, h, w) float32 stride-8 scores -> (C, height, width) float32.

    Caffe Interp with zoom_factor `zoom` (align-corners bilinear to ((h-1)*zoom+1, (w-1)*zoom+1)),
    then the top-left height x width crop; the uncropped map is never built.
    Raises ValueError if (h-1)*zoom+1 < height (or width), i.e. the logits are too small.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (C, h, w), got shape {logits.shape}")
    if zoom < 1 or height < 1 or width < 1:
        raise ValueError(f"zoom, height and width must be >= 1, got {zoom}, {height}, {width}")
    channels, h, w = logits.shape
    full_h, full_w = (h - 1) * zoom + 1, (w - 1) * zoom + 1
    if full_h < height or full_w < width:
        raise ValueError(
            f"logits {h}x{w} upsample to {full_h}x{full_w} at zoom {zoom}, smaller than {height}x{width}"
        )
    rows = _interp_matrix(h, height, zoom)  # (height, h)
    cols_t = _interp_matrix(w, width, zoom).T  # (w, width)
    # Widen first, as one (C*h, w) x (w, width) GEMM on the small map; the larger second product
    # then contracts over h input rows, cheaper than w for landscape images such as VOC's 48x64.
    flat = logits.astype(np.float32, copy=False).reshape(channels * h, w)
    wide = (flat @ cols_t).reshape(channels, h, width)
    return np.matmul(rows, wide)


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    """Softmax along `axis` (default: classes of a (C, H, W) map), float32, same shape.

    Subtracts the per-pixel maximum first so large logits cannot overflow exp.
    """
    scores = scores.astype(np.float32, copy=False)
    probs = scores - scores.max(axis=axis, keepdims=True)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=axis, keepdims=True)
    return probs


def labels_from_scores(scores: np.ndarray) -> np.ndarray:
    """(C, H, W) scores or probabilities -> (H, W) uint8 class index of the maximum (first on ties)."""
    if scores.ndim != 3 or not 1 <= scores.shape[0] <= 256:
        raise ValueError(f"scores must be (C, H, W) with 1 <= C <= 256, got shape {scores.shape}")
    return scores.argmax(axis=0).astype(np.uint8)


def resize_probs(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) float32 probabilities -> (C, height, width) float32, bilinear (cv2 INTER_LINEAR).

    Brings results computed at a reduced working size back to the image size. Bilinear weights
    sum to one, so each pixel's probabilities still sum to one up to float rounding: no
    renormalisation.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, h, w), got shape {probs.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}, {width}")
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    if probs.shape[1:] == (height, width):
        return probs
    # Channel by channel into one buffer: faster than one (H, W, C) call, and cv2's path for more
    # than 4 channels is less precise (errors ~4e-6 against ~1e-7 per channel).
    out = np.empty((probs.shape[0], height, width), np.float32)
    for channel, resized in zip(probs, out):
        cv2.resize(channel, (width, height), dst=resized, interpolation=cv2.INTER_LINEAR)
    return out
