"""Read Caffe .caffemodel files (protobuf `NetParameter`) without Caffe.

The schema below is our own, built in Python from the field numbers of Caffe's caffe.proto; it
declares a small subset of the fields and protobuf skips the rest. It covers both layer lists:
the old `layers` (field 2, `V1LayerParameter`, used by DeepLab v1) and the newer `layer`
(field 100, `LayerParameter`). Parsing is pure data decoding: nothing is unpickled or executed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from deeplab_cli.errors import WeightsError

# BVLC caffe.proto, V1LayerParameter.LayerType. DeepLab's own additions (Interp, ImageSegData, ...)
# have no public number we can vouch for, so they read as "V1_<n>".
V1_LAYER_TYPES = {
    0: "NONE", 1: "ACCURACY", 2: "BNLL", 3: "CONCAT", 4: "CONVOLUTION", 5: "DATA", 6: "DROPOUT",
    7: "EUCLIDEAN_LOSS", 8: "FLATTEN", 9: "HDF5_DATA", 10: "HDF5_OUTPUT", 11: "IM2COL",
    12: "IMAGE_DATA", 13: "INFOGAIN_LOSS", 14: "INNER_PRODUCT", 15: "LRN",
    16: "MULTINOMIAL_LOGISTIC_LOSS", 17: "POOLING", 18: "RELU", 19: "SIGMOID", 20: "SOFTMAX",
    21: "SOFTMAX_LOSS", 22: "SPLIT", 23: "TANH", 24: "WINDOW_DATA", 25: "ELTWISE", 26: "POWER",
    27: "SIGMOID_CROSS_ENTROPY_LOSS", 28: "HINGE_LOSS", 29: "MEMORY_DATA", 30: "ARGMAX",
    31: "THRESHOLD", 32: "DUMMY_DATA", 33: "SLICE", 34: "MVN", 35: "ABSVAL", 36: "SILENCE",
    37: "CONTRASTIVE_LOSS", 38: "EXP", 39: "DECONVOLUTION",
}


@dataclass(frozen=True)
class CaffeLayer:
    """One layer of a caffemodel.

    `type` is the string as stored ("Convolution") or, for the old layer list, the name of its
    enum value ("CONVOLUTION"). `blobs` are float32 arrays in their declared shape: `shape.dim`
    when the blob has one, else the legacy (num, channels, height, width), so old biases read as
    (1, 1, 1, N). `dilation` is `hole` (old list) or `dilation` (new list); None when the file
    records none.
    """

    name: str
    type: str
    blobs: tuple[np.ndarray, ...]
    dilation: int | None


_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "deeplab_cli.caffe"


def _field(name: str, number: int, kind: str, repeated: bool = False, packed: bool = False) -> _F:
    """kind: a scalar type ("uint32", "float", ...) or the name of one of our messages ("BlobProto")."""
    field = _F(name=name, number=number, label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if kind[0].isupper():
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{_PACKAGE}.{kind}"
    else:
        field.type = getattr(_F, f"TYPE_{kind.upper()}")
    if packed:
        field.options.packed = True
    return field


def _message(name: str, *fields: _F) -> descriptor_pb2.DescriptorProto:
    return descriptor_pb2.DescriptorProto(name=name, field=fields)


def _schema() -> type:
    """Build NetParameter in a private descriptor pool and return its message class."""
    file = descriptor_pb2.FileDescriptorProto(name="deeplab_cli_caffe.proto", package=_PACKAGE, syntax="proto2")
    file.message_type.extend([
        _message("BlobShape", _field("dim", 1, "int64", repeated=True, packed=True)),
        _message(
            "BlobProto",
            _field("num", 1, "int32"),
            _field("channels", 2, "int32"),
            _field("height", 3, "int32"),
            _field("width", 4, "int32"),
            _field("data", 5, "float", repeated=True, packed=True),
            _field("shape", 7, "BlobShape"),
            _field("double_data", 8, "double", repeated=True, packed=True),
        ),
        # Field 17 is `hole` in DeepLab's schema but another field in newer Caffe, hence two variants.
        _message(
            "V1ConvolutionParameter",
            _field("num_output", 1, "uint32"),
            _field("pad", 3, "uint32"),
            _field("kernel_size", 4, "uint32"),
            _field("stride", 6, "uint32"),
            _field("hole", 17, "uint32"),
        ),
        _message(
            "ConvolutionParameter",
            _field("num_output", 1, "uint32"),
            _field("pad", 3, "uint32", repeated=True),
            _field("kernel_size", 4, "uint32", repeated=True),
            _field("stride", 6, "uint32", repeated=True),
            _field("dilation", 18, "uint32", repeated=True),
        ),
        # `type` is an enum in caffe.proto; as int32 it keeps values outside BVLC's enum
        # (DeepLab's own layer types) instead of dropping them into unknown fields.
        _message(
            "V1LayerParameter",
            _field("bottom", 2, "string", repeated=True),
            _field("top", 3, "string", repeated=True),
            _field("name", 4, "string"),
            _field("type", 5, "int32"),
            _field("blobs", 6, "BlobProto", repeated=True),
            _field("convolution_param", 10, "V1ConvolutionParameter"),
        ),
        _message(
            "LayerParameter",
            _field("name", 1, "string"),
            _field("type", 2, "string"),
            _field("bottom", 3, "string", repeated=True),
            _field("top", 4, "string", repeated=True),
            _field("blobs", 7, "BlobProto", repeated=True),
            _field("convolution_param", 106, "ConvolutionParameter"),
        ),
        _message(
            "NetParameter",
            _field("name", 1, "string"),
            _field("layers", 2, "V1LayerParameter", repeated=True),
            _field("layer", 100, "LayerParameter", repeated=True),
        ),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.NetParameter"))


_NetParameter = _schema()


def _blob_array(blob, where: str) -> np.ndarray:
    """BlobProto -> float32 array in its declared shape; `where` names the blob in errors."""
    shape = tuple(blob.shape.dim) if blob.HasField("shape") else (blob.num, blob.channels, blob.height, blob.width)
    values = blob.data if len(blob.data) or not len(blob.double_data) else blob.double_data
    if any(d < 0 for d in shape):
        raise WeightsError(f"{where} has a negative dimension in its shape {shape}")
    if len(values) != math.prod(shape):
        raise WeightsError(f"{where} holds {len(values)} values but its shape {shape} needs {math.prod(shape)}")
    return np.array(values, dtype=np.float32).reshape(shape)


def _single_dilation(values, where: str) -> int | None:
    """Caffe's repeated `dilation`: one value for all axes, or one per axis."""
    if not values:
        return None
    if len(set(values)) > 1:
        raise WeightsError(f"{where} has a different dilation per axis {tuple(values)}, which is not supported")
    return int(values[0])


def _add(layers: dict[str, CaffeLayer], path, name: str, kind: str, blobs, dilation: int | None) -> None:
    if name in layers:
        raise WeightsError(f"{path}: layer name '{name}' appears twice, its weights are ambiguous")
    arrays = tuple(_blob_array(b, f"{path}: layer '{name}' blob {i}") for i, b in enumerate(blobs))
    layers[name] = CaffeLayer(name=name, type=kind, blobs=arrays, dilation=dilation)


def read_caffemodel(path: str | os.PathLike) -> dict[str, CaffeLayer]:
    """Parse a .caffemodel into {layer name: CaffeLayer}, in file order (old list, then new).

    A cut that falls exactly between two layers leaves a valid, shorter message: protobuf cannot
    tell it from a whole file, so callers must check that the layers they need are present.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw:
        raise WeightsError(f"{path}: empty file, not a caffemodel")
    net = _NetParameter()
    try:
        net.ParseFromString(raw)
    except DecodeError:
        raise WeightsError(f"{path}: truncated or corrupt, or not a caffemodel (protobuf decoding failed)") from None
    del raw  # the parsed message holds its own copy of the ~80 MB
    if not net.layers and not net.layer:
        raise WeightsError(f"{path}: not a caffemodel (no layers in it)")

    layers: dict[str, CaffeLayer] = {}
    for old in net.layers:
        hole = old.convolution_param.hole if old.convolution_param.HasField("hole") else None
        _add(layers, path, old.name, V1_LAYER_TYPES.get(old.type, f"V1_{old.type}"), old.blobs, hole)
    for new in net.layer:
        dilation = _single_dilation(new.convolution_param.dilation, f"{path}: layer '{new.name}'")
        _add(layers, path, new.name, new.type, new.blobs, dilation)
    return layers
