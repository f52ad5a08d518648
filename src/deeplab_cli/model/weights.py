"""Reading source weights (.caffemodel in either layout, a PyTorch .pth state_dict, .npz of OIHW arrays) as
data, never as code."""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeplab_cli.errors import WeightsError
from deeplab_cli.model import pth


@dataclass(frozen=True)
class SourceWeights:
    """Convolution weights by layer name: (OIHW float32, bias), the dilations the file records, its hash."""

    arrays: dict[str, tuple[np.ndarray, np.ndarray]]
    dilations: dict[str, int | None]
    sha256: str


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_format(path: str | os.PathLike) -> str:
    """"pth", "npz" or "caffemodel", told by content, not by name. Raises WeightsError when unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head:
        raise WeightsError(f"{path}: empty file")
    if pth.is_pth(path):
        return "pth"
    return "npz" if head.startswith(b"PK\x03\x04") else "caffemodel"


def load_weights(path: str | os.PathLike) -> SourceWeights:
    """Read a `.caffemodel`, a `.pth` (`<layer>.weight`, `<layer>.bias`) or a `.npz` (`<layer>/W`,
    `<layer>/b`), chosen by content."""
    path = Path(path)
    kind = weights_format(path)
    if kind == "pth":
        arrays, dilations = _read_pth(path), {}
    elif kind == "npz":
        arrays, dilations = _read_npz(path)
    else:
        arrays, dilations = _read_caffemodel(path)
    return SourceWeights(arrays, dilations, sha256_file(path))


def _read_caffemodel(path: Path):
    from deeplab_cli.model.caffemodel import read_caffemodel

    layers = read_caffemodel(path)
    arrays, dilations = {}, {}
    for name, layer in layers.items():
        if len(layer.blobs) == 2:  # convolutions carry weights then bias; blob-less layers are skipped
            arrays[name] = (layer.blobs[0], layer.blobs[1])
            dilations[name] = layer.dilation
    return arrays, dilations


def _read_pth(path: Path):
    state = pth.read_pth(path)
    arrays = {}
    for key, weight in state.items():
        layer = key.removesuffix(".weight")
        if layer != key and f"{layer}.bias" in state:
            arrays[layer] = (weight, state[f"{layer}.bias"])
    if not arrays:
        raise WeightsError(f"{path}: no tensors named <layer>.weight and <layer>.bias "
                           f"(found: {', '.join(sorted(state)) or 'none'})")
    return arrays


def _read_npz(path: Path):
    try:
        # allow_pickle=False: object arrays in a weight file would be code, not data.
        with np.load(path, allow_pickle=False) as npz:
            raw = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise WeightsError(f"{path}: not a readable .npz ({e})") from None
    arrays = {}
    for key in raw:
        layer, _, kind = key.rpartition("/")
        if kind == "W":
            if f"{layer}/b" not in raw:
                raise WeightsError(f"{path}: {layer}/W has no {layer}/b beside it")
            arrays[layer] = (raw[key], raw[f"{layer}/b"])
    if not arrays:
        raise WeightsError(f"{path}: no arrays named <layer>/W and <layer>/b (found: {', '.join(sorted(raw)) or 'none'})")
    return arrays, {}
