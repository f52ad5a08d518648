"""Source weights -> checked -> ONNX file, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from deeplab_cli.model import build_onnx, check_weights
from deeplab_cli.outputs import atomic_write
from deeplab_cli.weights import load_weights

if TYPE_CHECKING:  # the registry calls export; export needs only the registry's record type
    from deeplab_cli.registry import ModelInfo


def export(source: str | os.PathLike, out: str | os.PathLike, info: ModelInfo, *, float16: bool = False,
           with_probs: bool = False) -> str:
    """Convert a .caffemodel or .npz to the ONNX graph at `out`; return the source's SHA-256.

    Raises WeightsError when `source` is unreadable or not DeepLab-LargeFOV; `out` is then untouched.
    """
    import onnx

    weights = load_weights(source)
    checked = check_weights(weights.arrays, os.fspath(source), weights.dilations,
                            num_classes=len(info.classes), fc8=info.fc8)
    model = build_onnx(checked, classes=list(info.classes), model_name=info.name, source_sha256=weights.sha256,
                       mean_bgr=info.mean_bgr, fc8=info.fc8, float16=float16,
                       with_probs=with_probs)
    atomic_write(Path(out), lambda tmp: onnx.save(model, os.fspath(tmp)))
    return weights.sha256
