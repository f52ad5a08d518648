"""int8 graphs for CPUs: onnxruntime's static quantization of the exported graph, calibrated on images.

The scheme was chosen by measurement (BENCHMARKS.md, `int8`): QDQ nodes, MinMax calibration, weights
int8 per output channel, activations uint8, every layer quantized. On LargeFOV with random weights and
photo-like images that runs the network 3.7x faster than float32 on 2 AVX-512 VNNI cores, and labels
agree with float32's on 97% of pixels after the CRF. Entropy calibration gave the same labels, the
99.999th percentile 0.1 point fewer; keeping fc6 to fc8 in float gained 0.1 point for a third of the
speed, keeping the first convolution and fc8 lost 0.3. It is not the paper's numerics: every label
that differs from float32's is the quantization's.

On x86 without VNNI or AMX, onnxruntime's uint8 x int8 kernels can saturate their 16-bit sums, so a
graph quantized there uses 7-bit weights (`reduce_range`, onnxruntime issue #12072), and int8 may be
no faster than float32 (issues #6732, #5319).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SCHEME = {"format": "QDQ", "calibration": "MinMax", "weights": "int8, per channel", "activations": "uint8"}
# /proc/cpuinfo flags of int8 dot-product instructions: x86's VNNI and AMX, Arm's SDOT and I8MM.
FAST_INT8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}


@dataclass(frozen=True)
class Calibration:
    """What an int8 graph was calibrated on, kept in its metadata (`calibration`)."""

    images: list[dict]  # {"file": name, "sha256": of the file}, in calibration order
    reduce_range: bool
    onnxruntime: str
    source_sha256: str  # the float32 graph's weights
    date: str
    scheme: dict

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def fast_int8_cpu(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has int8 dot-product instructions (VNNI, AMX, SDOT); None where it cannot tell
    (no /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & FAST_INT8_FLAGS) if flags else None


def quantize_graph(fp32: Path, out: Path, images: Sequence[np.ndarray], calibration: Calibration) -> None:
    """Write the int8 graph of the float32 graph `fp32` to `out` (atomically), calibrated on `images`,
    each (H, W, 3) uint8 BGR at the size the network sees it. `calibration` goes into its metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from deeplab_cli.io.outputs import atomic_write

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"image": image[None]} for image in images])

        def get_next(self):
            return next(self.feeds, None)

    def write(tmp: Path) -> None:
        with _quiet():
            quantize_static(os.fspath(fp32), os.fspath(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=calibration.reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        model = onnx.load(os.fspath(tmp))
        props = {p.key: p.value for p in model.metadata_props}
        onnx.helper.set_model_props(model, {**props, "precision": "int8", "calibration": calibration.to_json()})
        onnx.save(model, os.fspath(tmp))

    atomic_write(out, write)


def new_calibration(images: list[dict], source_sha256: str, date: str) -> Calibration:
    """The record of a calibration on this machine now: reduce_range where the CPU lacks fast int8."""
    import onnxruntime

    return Calibration(images=images, reduce_range=fast_int8_cpu() is False, onnxruntime=onnxruntime.__version__,
                       source_sha256=source_sha256, date=date, scheme=SCHEME)


def slow_int8_note() -> str | None:
    """A line for the user when this CPU lacks fast int8, else None."""
    if fast_int8_cpu() is not False:
        return None
    return (f"this CPU ({platform.machine()}) has no VNNI or AMX: int8 may be no faster than fp32 here "
            "(measured 3.7x faster than fp32 with AVX-512 VNNI; see BENCHMARKS.md, int8)")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs advice on the root logger, and its calibration sessions warn about
    the graph's optional `pad_to` input: neither is for the user."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)
