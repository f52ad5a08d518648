"""pydensecrf.utils' helpers, with its results bit for bit: each is the same numpy operations in the same
order and types (numpy's log included, so a unary equals pydensecrf's on the machine it runs on).

`unary_from_softmax` and `unary_from_labels` make unaries; `create_pairwise_gaussian` and
`create_pairwise_bilateral` make features for `DenseCRF.addPairwiseEnergy`.
"""

from __future__ import annotations

from numbers import Number
from typing import Sequence

import numpy as np

from deeplab_cli.errors import DenseCRFError


def unary_from_softmax(sm: np.ndarray, scale: float | None = None, clip: float | None = 1e-5) -> np.ndarray:
    """(n_classes, N) float32 unary -log p of softmax outputs sm (n_classes, ...).

    scale: if given, in (0, 1]: p = scale * sm + (1 - scale) / n_classes (in float64).
    clip: p is clipped to [clip, 1] (None: not clipped; log 0 is then inf).
    """
    n_classes = sm.shape[0]
    if scale is not None:
        if not 0 < scale <= 1:
            raise DenseCRFError(f"unary_from_softmax: scale must be in (0, 1], got {scale!r}")
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / n_classes)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([n_classes, -1]).astype(np.float32)


def unary_from_labels(labels: np.ndarray, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> np.ndarray:
    """(n_labels, N) float32 unary of a label map, trusting each label with probability gt_prob in (0, 1)
    and spreading the rest evenly over the other labels.

    zero_unsure: label value 0 means "unknown" (a uniform unary) and labels 1..n_labels are the classes;
    else values 0..n_labels-1 are the classes.
    """
    if not 0 < gt_prob < 1:
        raise DenseCRFError(f"unary_from_labels: gt_prob must be in (0, 1), got {gt_prob!r}")
    labels = np.asarray(labels).flatten().astype(np.intp)  # no unsigned wrap-around in labels - 1
    unary = np.full((n_labels, len(labels)), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype="float32")
    # Later assignments overwrite earlier ones: the unknown pixels' label -1 row is reset below.
    unary[labels - 1 if zero_unsure else labels, np.arange(len(labels))] = -np.log(gt_prob)
    if zero_unsure:
        unary[:, labels == 0] = -np.log(1.0 / n_labels)
    return unary


def create_pairwise_gaussian(sdims: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """(len(shape), N) float32 features: each pixel's index along each axis of `shape` divided by that
    axis's std in sdims (for a 2-D image: (row / s0, column / s1))."""
    mesh = np.array(np.meshgrid(*[range(size) for size in shape], indexing="ij"), dtype=np.float32)
    for axis, std in enumerate(sdims):
        mesh[axis] /= std
    return mesh.reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims: Sequence[float], schan: float | Sequence[float], img: np.ndarray,
                              chdim: int = -1) -> np.ndarray:
    """(len(sdims) + channels, N) float32 features: `create_pairwise_gaussian`'s positions, then each
    channel of img divided by its std in schan (one number: all channels). chdim: img's channel axis,
    -1 for an image without one."""
    channels = (img[np.newaxis] if chdim == -1 else np.rollaxis(img, chdim)).astype(np.float32)
    if isinstance(schan, Number):
        channels /= schan
    else:
        for channel, std in enumerate(schan):
            channels[channel] /= std
    mesh = np.array(np.meshgrid(*[range(size) for size in channels.shape[1:]], indexing="ij"), dtype=np.float32)
    for axis, std in enumerate(sdims):
        mesh[axis] /= std
    features = np.concatenate([mesh, channels])
    return features.reshape([features.shape[0], -1])
