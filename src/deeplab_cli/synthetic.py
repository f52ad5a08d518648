"""Test and benchmark data made with numpy alone: LargeFOV weights, photo-like images, class probabilities.

Every generator gives the same bits on every machine and numpy version, so outputs computed from them
can be checked against stored hashes. They draw only from `numpy.random.default_rng` streams and use
only exactly rounded arithmetic (+ - * /, sqrt, comparisons, integer operations), applied element by
element; sums over classes run class by class in a fixed order. numpy's exp, log and trigonometric
functions (whose SIMD code differs by CPU and version) and OpenCV are left out on purpose.
"""

from __future__ import annotations

import math

import numpy as np

from deeplab_cli.model.network import Conv, largefov_layers

# The power in `softmax`'s stand-in for exp: (1 + x/256)^256 is eight squarings, and differs from
# e^x by under a factor 2 for x in [-23, 0] (enough to look like a network's softmax).
_EXP_POWER_LOG2 = 8


def random_weights(seed: int = 0, num_classes: int = 21) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """LargeFOV layer name -> (weights (O, I, kH, kW) float32, bias (O,) float32), the real shapes.

    He-initialised (std sqrt(2 / fan_in)) so activations keep a sane scale through the 16 layers; biases
    have std 0.1. Drawn layer by layer, weights then bias, from one float32 normal stream. The scores
    are far sharper than a trained net's: most softmax probabilities underflow.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in largefov_layers(num_classes):
        if isinstance(layer, Conv):
            fan_in = layer.in_ch * layer.kernel * layer.kernel
            w = rng.standard_normal(layer.weight_shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))
            b = rng.standard_normal(layer.out_ch, dtype=np.float32) * np.float32(0.1)
            weights[layer.name] = (w, b)
    return weights


def smooth_field(coarse: np.ndarray, height: int, width: int, step: int) -> np.ndarray:
    """(K, gh, gw) control values, one every `step` pixels -> (K, height, width) float64, interpolated
    bilinearly. Needs gh > (height - 1) // step + 1 and gw > (width - 1) // step + 1."""
    coarse = np.asarray(coarse, np.float64)
    y, x = np.arange(height) / step, np.arange(width) / step
    y0, x0 = y.astype(np.intp), x.astype(np.intp)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    rows0, rows1 = coarse[:, y0], coarse[:, y0 + 1]
    top = rows0[:, :, x0] * (1 - fx) + rows0[:, :, x0 + 1] * fx
    bottom = rows1[:, :, x0] * (1 - fx) + rows1[:, :, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def natural_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 BGR like a photo more than like noise: smooth shading, four flat-coloured disks
    with sharp edges, and sensor noise (std 8)."""
    rng = np.random.default_rng(seed)
    image = smooth_field(rng.integers(40, 216, (3, height // 16 + 2, width // 16 + 2)), height, width, 16)
    image = np.ascontiguousarray(image.transpose(1, 2, 0))
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(4):
        cy, cx = rng.random() * height, rng.random() * width
        r = 1 + rng.random() * max(1.0, max(height, width) / 3 - 1)
        dy, dx = yy - cy, xx - cx
        image[dy * dy + dx * dx < r * r] = rng.integers(0, 256, 3)
    image += rng.standard_normal(image.shape) * 8
    return np.clip(image, 0, 255).astype(np.uint8)


def noise_image(height: int, width: int, seed: int = 1) -> np.ndarray:
    """(H, W, 3) uint8 uniform noise whose top half is one colour (many pixels share a lattice simplex)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[: height // 2] = image[0, 0]
    return image


def softmax(scores: np.ndarray) -> np.ndarray:
    """(C, H, W) scores -> (C, H, W) float32 probabilities, a softmax with e^x replaced by
    max(0, 1 + x/256)^256 (x = score - the pixel's highest): exactly rounded steps only. Scores more
    than about 100 below the highest give float32 subnormals or 0, as a float32 softmax does."""
    scores = np.asarray(scores, np.float64)
    x = scores - scores.max(axis=0)
    e = np.maximum(1 + x / (1 << _EXP_POWER_LOG2), 0)
    for _ in range(_EXP_POWER_LOG2):
        e = e * e
    total = e[0].copy()
    for c in range(1, len(e)):  # class by class: a fixed order of additions
        total += e[c]
    return (e / total).astype(np.float32)


def probabilities(image: np.ndarray, n_labels: int = 21, seed: int = 0, sharpness: float = 1.0) -> np.ndarray:
    """(H, W, 3) uint8 image -> (n_labels, H, W) float32 probabilities like a network's: `softmax` of
    smooth random scores (std 2, varying over about 25 pixels) less each class's squared colour
    distance / 2000 to a random colour, times `sharpness` (larger: more peaked, more values underflow)."""
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    scores = 2 * smooth_field(rng.standard_normal((n_labels, height // 25 + 2, width // 25 + 2)), height, width, 25)
    centres = rng.integers(0, 256, (n_labels, 3))
    pixels = image.astype(np.int64)
    for c in range(n_labels):
        d = pixels - centres[c]
        d = d * d
        scores[c] -= (d[..., 0] + d[..., 1] + d[..., 2]) / 2000
    return softmax(scores * sharpness)
