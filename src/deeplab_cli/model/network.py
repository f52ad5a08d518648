"""DeepLab-LargeFOV: the layer table, weight checks, and the ONNX inference graph.

The graph takes what image decoders give, (N, H, W, 3) uint8 BGR, and does the cast, mean subtraction
and NHWC -> NCHW change itself, so an accelerator does that work and the host sends a quarter of the
bytes of a float32 tensor. It returns the fc8 scores at stride 8, (N, C, h, w) float32, with Caffe's
rounding up: each stride-2 pooling maps a side of n to n // 2 + 1 (513 -> 65, 375 -> 48, 500 -> 64).
A PyTorch port pools rounding down, (n - 1) // 2 + 1, which differs from Caffe's whenever n is even
(37 -> 19 -> 10 -> 6 scores in Caffe, 5 in PyTorch); at sizes 8k + 1 every intermediate is odd and the two
agree (`floor_input_size`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from deeplab_cli.errors import WeightsError

VOC_MEAN_BGR = (104.008, 116.669, 122.675)
OPSET = 17


@dataclass(frozen=True)
class Conv:
    name: str
    in_ch: int
    out_ch: int
    kernel: int = 3
    pad: int = 1
    dilation: int = 1
    relu: bool = True

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_ch, self.in_ch, self.kernel, self.kernel)


@dataclass(frozen=True)
class Pool:
    name: str
    stride: int
    average: bool = False


def largefov_layers(num_classes: int = 21, fc8: str = "fc8_voc12") -> tuple[Conv | Pool, ...]:
    """The inference net in order (largefov.md, "The graph"). Dropout is the identity at test time."""
    return (
        Conv("conv1_1", 3, 64), Conv("conv1_2", 64, 64), Pool("pool1", 2),
        Conv("conv2_1", 64, 128), Conv("conv2_2", 128, 128), Pool("pool2", 2),
        Conv("conv3_1", 128, 256), Conv("conv3_2", 256, 256), Conv("conv3_3", 256, 256), Pool("pool3", 2),
        Conv("conv4_1", 256, 512), Conv("conv4_2", 512, 512), Conv("conv4_3", 512, 512),
        # pool4 and pool5 keep stride 1; the atrous convolutions after them see what the lost
        # strides would have shown, so the output stays at stride 8.
        Pool("pool4", 1),
        Conv("conv5_1", 512, 512, pad=2, dilation=2), Conv("conv5_2", 512, 512, pad=2, dilation=2),
        Conv("conv5_3", 512, 512, pad=2, dilation=2), Pool("pool5", 1), Pool("pool5a", 1, average=True),
        Conv("fc6", 512, 1024, pad=12, dilation=12), Conv("fc7", 1024, 1024, kernel=1, pad=0),
        Conv(fc8, 1024, num_classes, kernel=1, pad=0, relu=False),
    )


Weights = Mapping[str, tuple[np.ndarray, np.ndarray]]
POOLINGS = ("ceil", "floor")


def floor_input_size(side: int) -> int:
    """The smallest 8k + 1 >= side: where a floor-pooling network's scores reach the last pixel.

    Caffe's zoom-8 upsampling puts score i on pixel 8i and needs (h - 1) * 8 + 1 >= side, which ceil pooling
    always gives; floor pooling gives it at sizes 8k + 1, where both roundings agree (513 = 8 * 64 + 1)."""
    return (side + 6) // 8 * 8 + 1


def sequential_names(layers) -> dict[int, str]:
    """Index in a PyTorch `nn.Sequential` of the layer table -> convolution name. PyTorch ports number a
    convolution, its ReLU, and the dropout after fc6 and fc7 as separate modules (fc8 is features.38)."""
    names, index = {}, 0
    for layer in layers:
        if isinstance(layer, Conv):
            names[index] = layer.name
            index += 1 + layer.relu + (layer.name in ("fc6", "fc7"))
        else:
            index += 1
    return names


def _by_layer_name(weights: Weights, layers) -> Weights:
    """A state_dict's `[module.]features.N` keys (a PyTorch port, DataParallel or not) -> layer names."""
    names = sequential_names(layers)
    renamed = {}
    for key, pair in weights.items():
        index = key.removeprefix("module.").removeprefix("features.")
        renamed[names.get(int(index), key) if index.isdigit() and key != index else key] = pair
    return renamed


def check_weights(
    weights: Weights, source: str, dilations: Mapping[str, int | None] | None = None,
    num_classes: int = 21, fc8: str = "fc8_voc12",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Check every convolution of LargeFOV is present with its shape; return float32 (OIHW, (O,)) arrays
    by layer name. A PyTorch port's `[module.]features.N` keys are read as the layers they number.

    `dilations` holds what the file records (None where it records nothing). Raises WeightsError with one
    line naming `source` and everything wrong, so a user fixes the file in one go.
    """
    layers = largefov_layers(num_classes, fc8)
    weights = _by_layer_name(weights, layers)
    convs = [layer for layer in layers if isinstance(layer, Conv)]
    missing = [c.name for c in convs if c.name not in weights]
    if missing:
        found = ", ".join(sorted(weights)) or "none"
        raise WeightsError(
            f"{source}: not DeepLab-LargeFOV: missing layer{'s' * (len(missing) > 1)} "
            f"{', '.join(missing)} (layers with weights: {found})"
        )
    checked, problems = {}, []
    for conv in convs:
        w, b = weights[conv.name]
        w, b = np.asarray(w, dtype=np.float32), np.asarray(b, dtype=np.float32)
        if b.size == conv.out_ch:
            b = b.reshape(conv.out_ch)  # old Caffe stores biases as (1, 1, 1, N)
        if w.shape != conv.weight_shape or b.shape != (conv.out_ch,):
            hint = " (a VGG-16 classifier, not DeepLab-LargeFOV)" if conv.name == "fc6" and w.shape[-1:] == (7,) else ""
            problems.append(
                f"{conv.name} has weights {_dims(w.shape)} and bias {_dims(b.shape)}, expected "
                f"{_dims(conv.weight_shape)} and {conv.out_ch}{hint}"
            )
        recorded = (dilations or {}).get(conv.name)
        # Files that record no dilation for a layer leave it at Caffe's default, 1.
        if recorded is not None and recorded != conv.dilation and not (recorded == 0 and conv.dilation == 1):
            problems.append(f"{conv.name} has dilation {recorded}, expected {conv.dilation}")
        checked[conv.name] = (np.ascontiguousarray(w), np.ascontiguousarray(b))
    if problems:
        raise WeightsError(f"{source}: not DeepLab-LargeFOV: {'; '.join(problems)}")
    return checked


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


class _Graph:
    """ONNX nodes and initializers in the order they are added; each node is named after its output."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits = [], []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def build_onnx(
    weights: Weights, *, classes: list[str], model_name: str, source_sha256: str,
    mean_bgr: tuple[float, float, float] = VOC_MEAN_BGR, fc8: str = "fc8_voc12", pooling: str = "ceil",
    float16: bool = False, with_probs: bool = False,
):
    """Build the LargeFOV inference graph as an `onnx.ModelProto` from checked weights.

    Inputs: `image` (N, H, W, 3) uint8 BGR with N, H, W dynamic; `pad_to` (2,) int64, optional (defaults to
    [0, 0]): pad the bottom and right to at least this height and width with the mean, the paper's
    513x513 test protocol. Output: `logits` (N, C, h, w) float32. `pooling` "floor" rounds as a PyTorch port
    does (a caller pads to `floor_input_size` for the upsampling). With `float16` the convolutions run in
    half precision while the inputs and outputs keep their types.

    `with_probs` adds what a GPU should finish before anything crosses back to the host: `probs`
    (N, C, H, W) float32, the softmax of Caffe's Interp upsampling cropped to the (unpadded) image, and
    `labels` (N, H, W) uint8, their argmax. onnxruntime computes every output whether fetched or not,
    so CPU runs use the graph without them and upsample in their CRF workers instead.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    g = _Graph()
    x, hw = _centred_padded(g, mean_bgr, float16)
    x = _layers(g, x, weights, largefov_layers(len(classes), fc8), np.float16 if float16 else np.float32,
                ceil=pooling == "ceil")
    g.node("Cast", [x], "logits", to=TensorProto.FLOAT)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(classes), "h", "w"])]
    if with_probs:
        _probs_and_labels(g, hw)
        outputs += [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(classes), "H", "W"]),
                    helper.make_tensor_value_info("labels", TensorProto.UINT8, ["N", "H", "W"])]
    graph = helper.make_graph(
        g.nodes, "deeplab_largefov",
        inputs=[
            helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3]),
            helper.make_tensor_value_info("pad_to", TensorProto.INT64, [2]),
        ],
        outputs=outputs,
        initializer=g.inits,
    )
    # An initializer that is also a graph input is an input with a default value: callers may omit pad_to.
    graph.initializer.append(numpy_helper.from_array(np.zeros(2, np.int64), "pad_to"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="deeplab-cli")
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    metadata = {
        "model_name": model_name,
        "classes": json.dumps(classes),
        "mean_bgr": json.dumps(list(mean_bgr)),
        "source_sha256": source_sha256,
        "precision": "float16" if float16 else "float32",
        "output_stride": "8",
        "pooling": pooling,
    }
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model


def _centred_padded(g: _Graph, mean_bgr: tuple[float, float, float], float16: bool) -> tuple[str, str]:
    """The uint8 NHWC image minus the mean, NCHW, padded to `pad_to`: (that tensor, the image's (H, W))."""
    from onnx import TensorProto

    x = g.node("Cast", ["image"], "image_f32", to=TensorProto.FLOAT)
    x = g.node("Sub", [x, g.const("mean_bgr", np.array(mean_bgr, np.float32))], "centered")
    x = g.node("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
    # Padding after the mean subtraction pads with the mean itself, which uint8 pixels cannot express.
    hw = g.node("Slice", [g.node("Shape", [x], "shape"), g.const("i2", np.array([2], np.int64)),
                          g.const("i4", np.array([4], np.int64))], "hw")
    grow = g.node("Max", [g.node("Sub", ["pad_to", hw], "pad_short"), g.const("zeros2", np.zeros(2, np.int64))],
                  "pad_hw")
    pads = g.node("Concat", [g.const("zeros6", np.zeros(6, np.int64)), grow], "pads", axis=0)
    x = g.node("Pad", [x, pads], "padded", mode="constant")
    if float16:
        x = g.node("Cast", [x], "padded_f16", to=TensorProto.FLOAT16)
    return x, hw


def _layers(g: _Graph, x: str, weights: Weights, layers, dtype, ceil: bool) -> str:
    """The VGG-16 trunk and the LargeFOV head on x, weights as `dtype`; returns the fc8 scores."""
    for layer in layers:
        if isinstance(layer, Pool):
            # ceil_mode reproduces Caffe's rounding up; pool5a divides by 9 everywhere, padding included.
            op = "AveragePool" if layer.average else "MaxPool"
            extra = {"count_include_pad": 1} if layer.average else {}
            x = g.node(op, [x], layer.name, kernel_shape=[3, 3], strides=[layer.stride] * 2,
                       pads=[1, 1, 1, 1], ceil_mode=int(ceil), **extra)
            continue
        w, b = weights[layer.name]
        x = g.node("Conv", [x, g.const(f"{layer.name}/W", w.astype(dtype)), g.const(f"{layer.name}/b", b.astype(dtype))],
                   layer.name, kernel_shape=[layer.kernel] * 2, pads=[layer.pad] * 4, dilations=[layer.dilation] * 2)
        if layer.relu:
            x = g.node("Relu", [x], f"{layer.name}_relu")
    return x


def _probs_and_labels(g: _Graph, hw: str) -> None:
    """`probs` and `labels` from `logits`: Caffe's Interp with zoom 8 (align-corners onto (h - 1) * 8 + 1
    rows, so logit i lands on pixel 8i), the top-left crop to the unpadded image `hw`, softmax, argmax."""
    from onnx import TensorProto

    logits_shape = g.node("Shape", ["logits"], "logits_shape")
    nc = g.node("Slice", [logits_shape, g.const("i0", np.array([0], np.int64)), g.const("i2b", np.array([2], np.int64))],
                "nc")
    small_hw = g.node("Slice", [logits_shape, "i2", "i4"], "logits_hw")
    zoomed = g.node("Add", [g.node("Mul", [g.node("Sub", [small_hw, g.const("one", np.array([1], np.int64))], "hw_m1"),
                                           g.const("eight", np.array([8], np.int64))], "hw_x8"), "one"], "zoomed_hw")
    sizes = g.node("Concat", [nc, zoomed], "interp_sizes", axis=0)
    up = g.node("Resize", ["logits", "", "", sizes], "interp", mode="linear",
                coordinate_transformation_mode="align_corners")
    crop = g.node("Slice", [up, g.const("zeros2b", np.zeros(2, np.int64)), hw,
                            g.const("axes23", np.array([2, 3], np.int64))], "interp_crop")
    g.node("Softmax", [crop], "probs", axis=1)
    g.node("Cast", [g.node("ArgMax", ["probs"], "argmax", axis=1, keepdims=0)], "labels", to=TensorProto.UINT8)
