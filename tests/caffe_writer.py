"""An independent .caffemodel writer for tests: the "tool that is not ours".

It encodes protobuf wire format by hand from the encoding spec (varint keys, length-delimited
fields, packed little-endian scalars), with field numbers taken from Caffe's caffe.proto. It uses
neither the protobuf runtime nor deeplab_cli's schema, so a round trip checks our reader against
a second reading of the format rather than against itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

# Caffe's V1LayerParameter.LayerType numbers, for the layer types BVLC's enum has.
V1_TYPE_NUMBERS = {
    "Accuracy": 1, "Convolution": 4, "Data": 5, "Dropout": 6, "InnerProduct": 14, "Pooling": 17,
    "ReLU": 18, "Softmax": 20, "SoftmaxWithLoss": 21,
}


@dataclass(frozen=True)
class Conv:
    num_output: int
    pad: int
    kernel_size: int
    stride: int = 1
    dilation: int | None = None  # None: the file records no hole / dilation field


@dataclass(frozen=True)
class Layer:
    name: str
    type: str  # new-style type string, e.g. "Convolution"
    bottoms: tuple[str, ...] = ()
    tops: tuple[str, ...] = ()
    blobs: tuple[np.ndarray, ...] = ()
    conv: Conv | None = None
    v1_type: int | None = None  # enum number for the old layout when `type` is not in V1_TYPE_NUMBERS


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 are encoded as 10-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _uint(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _len(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _string(field: int, text: str) -> bytes:
    return _len(field, text.encode("utf-8"))


def _repeated_uint(field: int, values: list[int], packed: bool) -> bytes:
    if packed:
        return _len(field, b"".join(_varint(v) for v in values)) if values else b""
    return b"".join(_uint(field, v) for v in values)


def _blob(array: np.ndarray, layout: str, double: bool) -> bytes:
    if layout == "v1":
        if array.ndim > 4:
            raise ValueError(f"legacy blobs have at most 4 dims, got {array.shape}")
        # Legacy blobs are (num, channels, height, width); smaller arrays are padded with 1s in front.
        dims = (1,) * (4 - array.ndim) + array.shape
        header = b"".join(_uint(field, d) for field, d in zip((1, 2, 3, 4), dims))
    else:
        header = _len(7, _len(1, b"".join(_varint(d) for d in array.shape)))
    if double:
        values = _len(8, np.ascontiguousarray(array, dtype="<f8").tobytes())
    else:
        values = _len(5, np.ascontiguousarray(array, dtype="<f4").tobytes())
    return header + values


def _conv_v1(conv: Conv) -> bytes:
    fields = _uint(1, conv.num_output) + _uint(3, conv.pad) + _uint(4, conv.kernel_size) + _uint(6, conv.stride)
    if conv.dilation is not None:
        fields += _uint(17, conv.dilation)  # DeepLab's `hole`
    return fields


def _conv_v2(conv: Conv, packed: bool) -> bytes:
    fields = _uint(1, conv.num_output)
    for field, value in ((3, conv.pad), (4, conv.kernel_size), (6, conv.stride), (18, conv.dilation)):
        if value is not None:
            fields += _repeated_uint(field, [value], packed)
    return fields


def _layer(layer: Layer, layout: str, packed: bool, double: bool) -> bytes:
    blobs = [_blob(b, layout, double) for b in layer.blobs]
    if layout == "v1":
        kind = layer.v1_type if layer.v1_type is not None else V1_TYPE_NUMBERS[layer.type]
        out = b"".join(_string(2, b) for b in layer.bottoms) + b"".join(_string(3, t) for t in layer.tops)
        out += _string(4, layer.name) + _uint(5, kind) + b"".join(_len(6, b) for b in blobs)
        if layer.conv is not None:
            out += _len(10, _conv_v1(layer.conv))
        return _len(2, out)
    out = _string(1, layer.name) + _string(2, layer.type)
    out += b"".join(_string(3, b) for b in layer.bottoms) + b"".join(_string(4, t) for t in layer.tops)
    out += b"".join(_len(7, b) for b in blobs)
    if layer.conv is not None:
        out += _len(106, _conv_v2(layer.conv, packed))
    return _len(100, out)


def encode_caffemodel(layers, layout: str, name: str = "net", *, packed: bool = False, double: bool = False) -> bytes:
    """NetParameter bytes. layout "v1": `layers` (field 2) with enum types, `hole` and legacy 4-D
    blobs; "v2": `layer` (field 100) with string types, `dilation` and `shape`.

    packed: encode the repeated conv fields packed, as proto3-style writers do (Caffe does not).
    double: store blob values in `double_data` instead of `data`.
    """
    if layout not in ("v1", "v2"):
        raise ValueError(f"layout must be 'v1' or 'v2', got {layout!r}")
    return _string(1, name) + b"".join(_layer(layer, layout, packed, double) for layer in layers)


def write_caffemodel(path: str | os.PathLike, layers, layout: str, name: str = "net", **options) -> None:
    """Write `encode_caffemodel(layers, layout, name, **options)` to `path`."""
    with open(path, "wb") as f:
        f.write(encode_caffemodel(layers, layout, name, **options))
