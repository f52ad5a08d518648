"""The CRF's mean-field iterations as an ONNX graph, run by onnxruntime on the network's provider.

The lattices are built on the host, exactly as pydensecrf builds them (`deeplab_cli.crf.lattice`). `pack`
turns one batch's lattices into index and weight tensors; `build_graph` generates a graph that runs
the iterations on them with Gather, Mul, Add, ReduceSum and Softmax only. Each filter is pydensecrf's:
splat, a blur along each of the d+1 lattice axes, slice times the NORMALIZE_AFTER norm.

- The splat is a gather, not a scatter-add: each lattice point sums w * Q over its own pixels. A GPU's
  scatter-add sums in whatever order its atomics land; a gather sums in one order on every run, so the
  result is deterministic. Points are sorted by pixel count and split into BUCKETS runs, each a dense
  (points, width) block padded with weight-0 entries: one Gather, Mul and ReduceSum per run.
- Points are renumbered in that order. The blur's missing neighbour is a point with no pixels, whose
  row stays 0, as pydensecrf's row 0 does.
- A batch is one problem: the images' pixels and lattice points are concatenated and the indices
  shifted, so a batch of images costs the kernel launches of one.

It differs from pydensecrf by rounding only (summation order, onnxruntime's exp and softmax);
tests/test_graph.py measures by how much.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from deeplab_cli.crf.params import MIN_PROB, CRFParams
from deeplab_cli.crf.lattice import Lattice
from deeplab_cli.model.network import OPSET

from numba import njit  # noqa: E402

BUCKETS = 8  # splat blocks per kernel: fewer launches against less padding
KERNELS = (("g", 2, "pos_w"), ("b", 5, "bi_w"))  # Gaussian (x, y) and bilateral (x, y, r, g, b): prefix, d, weight


def build_graph(iters: int):
    """The mean field of `iters` iterations as an `onnx.ModelProto` (the network's opset).

    Inputs: `probs` (N, C, H, W) float32 softmax probabilities; `pos_w`, `bi_w` float32 scalars (the
    Potts weights); per kernel k in (g, b) with d = 2, 5, for P = N*H*W pixels and M lattice points:
    `k_slice_index` (P, d+1) int32 and `k_slice_weight` (P, d+1, 1) float32 (barycentric weight times
    alpha), `k_norm` (P, 1) float32, `k_blur` (d+1, M, 2) int32 neighbours, and for each bucket i
    `k_splat_index_i` (n_i, w_i) int32 pixels with `k_splat_weight_i` (n_i, w_i, 1) float32; the
    buckets' points, in order, are the M points. Outputs: `marginals` (N, H, W, C) float32, pixel-major
    as the iterations hold them (as the other backends return Q), and `labels` (N, H, W) uint8, their argmax.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(array: np.ndarray) -> str:
        name = f"c{len(inits)}"
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op: str, *inputs: str, **attrs) -> str:
        output = f"{op.lower()}{len(nodes)}"
        nodes.append(helper.make_node(op, list(inputs), [output], **attrs))
        return output

    axis1, half = const(np.array([1], np.int64)), const(np.float32(0.5))

    def row_sum(x: str) -> str:
        return node("ReduceSum", x, axis1, keepdims=0)

    inputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", "C", "H", "W"]),
              helper.make_tensor_value_info("pos_w", TensorProto.FLOAT, []),
              helper.make_tensor_value_info("bi_w", TensorProto.FLOAT, [])]
    kernels = []
    for k, d, weight in KERNELS:
        def tensor(name, dtype, shape):
            inputs.append(helper.make_tensor_value_info(f"{k}_{name}", dtype, shape))
            return f"{k}_{name}"

        slice_index = tensor("slice_index", TensorProto.INT32, ["P", d + 1])
        slice_weight = tensor("slice_weight", TensorProto.FLOAT, ["P", d + 1, 1])
        norm = tensor("norm", TensorProto.FLOAT, ["P", 1])
        blur = tensor("blur", TensorProto.INT32, [d + 1, f"{k}_M", 2])
        splat = [(tensor(f"splat_index_{i}", TensorProto.INT32, [f"{k}_n{i}", f"{k}_w{i}"]),
                  tensor(f"splat_weight_{i}", TensorProto.FLOAT, [f"{k}_n{i}", f"{k}_w{i}", 1]))
                 for i in range(BUCKETS)]
        axes = [node("Gather", blur, const(np.int64(j)), axis=0) for j in range(d + 1)]  # once, not per iteration
        kernels.append((weight, slice_index, slice_weight, norm, axes, splat))

    shape = node("Shape", "probs")
    rows = node("Flatten", node("Transpose", "probs", perm=[0, 2, 3, 1]), axis=3)  # (P, C), a pixel per row
    log_p = node("Log", node("Max", rows, const(np.float32(MIN_PROB))))  # -unary
    q = node("Softmax", log_p, axis=1)
    for _ in range(iters):
        energy = log_p
        for weight, slice_index, slice_weight, norm, axes, splat in kernels:
            values = node("Concat", *(row_sum(node("Mul", node("Gather", q, index, axis=0), w)) for index, w in splat),
                          axis=0)
            for neighbours in axes:  # pydensecrf's blur: v + 0.5 * (v[n1] + v[n2])
                values = node("Add", values, node("Mul", row_sum(node("Gather", values, neighbours, axis=0)), half))
            sliced = row_sum(node("Mul", node("Gather", values, slice_index, axis=0), slice_weight))
            # DenseCRF subtracts -w * (K Q * norm): adding w * (K Q * norm) is the same float operation.
            energy = node("Add", energy, node("Mul", node("Mul", sliced, norm), weight))
        q = node("Softmax", energy, axis=1)
    nodes.append(helper.make_node("Reshape", [q, node("Gather", shape, const(np.array([0, 2, 3, 1], np.int64)), axis=0)],
                                  ["marginals"]))
    labels = node("Reshape", node("ArgMax", q, axis=1, keepdims=0),
                  node("Gather", shape, const(np.array([0, 2, 3], np.int64)), axis=0))
    nodes.append(helper.make_node("Cast", [labels], ["labels"], to=TensorProto.UINT8))
    outputs = [helper.make_tensor_value_info("marginals", TensorProto.FLOAT, ["N", "H", "W", "C"]),
               helper.make_tensor_value_info("labels", TensorProto.UINT8, ["N", "H", "W"])]
    graph = helper.make_graph(nodes, "dense_crf_mean_field", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="deeplab-cli")
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    onnx.checker.check_model(model)
    return model


def pack(lattices: Sequence[tuple[Lattice, Lattice]]) -> dict[str, np.ndarray]:
    """The graph's lattice inputs for a batch: one (Gaussian, bilateral) pair per image, images in order."""
    feeds = {}
    for kernel, (k, d, _) in enumerate(KERNELS):
        parts = [pair[kernel] for pair in lattices]
        if any(p.dims != d for p in parts):
            raise ValueError(f"kernel {k} needs {d}-dimensional lattices")
        feeds.update(_pack_kernel(k, parts))
    return feeds


def _pack_kernel(k: str, parts: Sequence[Lattice]) -> dict[str, np.ndarray]:
    """One kernel's inputs: the lattices of the batch's images as one lattice, points in bucket order.

    Old point ids: the images' points one after another, then BUCKETS points with no pixels (the first
    is the missing neighbour; together they make every bucket non-empty).
    """
    point_base = np.cumsum([0] + [p.n_points for p in parts])
    entry_base = np.cumsum([0] + [p.csr_pixel.size for p in parts])
    # Per old point: its pixel count, its first CSR entry, and the index of its image's first pixel.
    degree = np.concatenate([np.diff(p.csr_start) for p in parts] + [np.zeros(BUCKETS, np.int32)])
    start = np.concatenate([p.csr_start[:-1] + e for p, e in zip(parts, entry_base)] + [np.zeros(BUCKETS, np.int64)])
    first_pixel = np.repeat(np.cumsum([0] + [p.offsets.shape[0] for p in parts]),
                            [p.n_points for p in parts] + [BUCKETS])
    pixel = np.concatenate([p.csr_pixel for p in parts])
    weight = np.concatenate([p.csr_weight for p in parts])

    order = np.argsort(degree, kind="stable")  # new id -> old id
    new_id = np.empty_like(order)
    new_id[order] = np.arange(order.size)
    feeds = {}
    for i, (lo, hi) in enumerate(_runs(degree[order])):
        points = order[lo:hi]
        width = max(1, int(degree[points].max()))
        index = feeds[f"{k}_splat_index_{i}"] = np.empty((points.size, width), np.int32)
        values = feeds[f"{k}_splat_weight_{i}"] = np.empty((points.size, width, 1), np.float32)
        _fill_bucket(points, start, degree, first_pixel, pixel, weight, index, values[..., 0])
    neighbours = np.concatenate([p.neighbours for p in parts], axis=1)
    feeds[f"{k}_blur"] = _blur_table(neighbours, np.repeat(point_base[:-1], [p.n_points for p in parts]),
                                     order, new_id)
    feeds[f"{k}_slice_index"] = np.concatenate([_renumber(p.offsets, b, new_id) for p, b in zip(parts, point_base)])
    # pydensecrf's slice weight is barycentric * alpha, rounded to float32 before it multiplies.
    feeds[f"{k}_slice_weight"] = np.concatenate([p.weights * p.alpha for p in parts])[..., None]
    feeds[f"{k}_norm"] = np.concatenate([p.norm for p in parts])[:, None]
    return feeds


def _runs(sorted_degree: np.ndarray) -> list[tuple[int, int]]:
    """Split points sorted by pixel count into exactly BUCKETS non-empty runs, each padded to its
    largest count, with little padding: runs of equal power-of-two class, then the adjacent pair that
    costs least merged while there are too many, and the largest split in two while there are too few."""
    classes = np.ceil(np.log2(np.maximum(sorted_degree, 1))).astype(np.int64)
    bounds = [0, *np.flatnonzero(np.diff(classes)) + 1, sorted_degree.size]
    runs = list(zip(bounds[:-1], bounds[1:]))

    def largest(run):
        return int(sorted_degree[run[1] - 1])

    while len(runs) > BUCKETS:
        # Merging run i into run i+1 pads run i's points up to run i+1's width.
        cost = [(a[1] - a[0]) * (largest(b) - largest(a)) for a, b in zip(runs, runs[1:])]
        i = int(np.argmin(cost))
        runs[i:i + 2] = [(runs[i][0], runs[i + 1][1])]
    while len(runs) < BUCKETS:
        i = max(range(len(runs)), key=lambda r: runs[r][1] - runs[r][0])
        lo, hi = runs[i]
        runs[i:i + 1] = [(lo, (lo + hi) // 2), ((lo + hi) // 2, hi)]
    return runs


@njit(cache=True, nogil=True)
def _fill_bucket(points, start, degree, first_pixel, pixel, weight, index, values):
    """Rows of one splat bucket: point points[r]'s pixels (its image's, shifted by first_pixel) and
    weights, then padding that adds an exact +0 (weight 0 on pixel 0). index: (n, width) int32 and
    values: (n, width) float32, written."""
    for r in range(points.size):
        p = points[r]
        first, count = start[p], degree[p]
        for c in range(index.shape[1]):
            if c < count:
                index[r, c] = pixel[first + c] + first_pixel[p]
                values[r, c] = weight[first + c]
            else:
                index[r, c] = 0
                values[r, c] = 0


@njit(cache=True, nogil=True)
def _blur_table(neighbours, base, order, new_id):
    """(d+1, L, 2) int32 blur neighbours in new ids, row r for the point order[r]. neighbours:
    (d+1, real, 2) int32, each image's own ids (-1: none), shifted by base (real,). Every missing
    neighbour, and every neighbour of the points without pixels (old ids >= real), is the first of
    those points, whose row stays 0."""
    d1, real = neighbours.shape[0], neighbours.shape[1]
    missing = new_id[real]
    out = np.empty((d1, order.size, 2), np.int32)
    for j in range(d1):
        for r in range(order.size):
            o = order[r]
            for c in range(2):
                v = neighbours[j, o, c] if o < real else -1
                out[j, r, c] = new_id[v + base[o]] if v >= 0 else missing
    return out


@njit(cache=True, nogil=True)
def _renumber(offsets, base, new_id):
    """(N, d+1) int32 new ids of the lattice points offsets + base."""
    out = np.empty(offsets.shape, np.int32)
    for i in range(offsets.shape[0]):
        for j in range(offsets.shape[1]):
            out[i, j] = new_id[offsets[i, j] + base]
    return out


@dataclass
class GraphCRF:
    """The mean-field graph of one iteration count, in an onnxruntime session on one device."""

    session: object  # onnxruntime.InferenceSession

    def run(self, probs, feeds: dict[str, np.ndarray], pos_w: float, bi_w: float,
            outputs: Sequence[str] = ("marginals",)) -> dict[str, np.ndarray]:
        """Run on `probs`: (N, C, H, W) float32, a numpy array or an onnxruntime OrtValue already on this
        session's device (the network's output, kept there). Returns the named outputs on the host."""
        binding = self.session.io_binding()
        if isinstance(probs, np.ndarray):
            binding.bind_cpu_input("probs", np.ascontiguousarray(probs, np.float32))
        else:
            binding.bind_ortvalue_input("probs", probs)
        binding.bind_cpu_input("pos_w", np.array(pos_w, np.float32))
        binding.bind_cpu_input("bi_w", np.array(bi_w, np.float32))
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.copy_outputs_to_cpu()))


_sessions: dict[tuple[str, int, int | None], GraphCRF] = {}
_sessions_lock = threading.Lock()


def graph_session(device: str, iters: int, threads: int | None = None) -> GraphCRF:
    """This process's session of the `iters`-iteration graph on `device` (cpu, cuda, cuda:N), made once.
    threads: onnxruntime's threads on the CPU (None: its default, every core)."""
    from deeplab_cli.model.runtime import start_session

    key = (device, int(iters), threads)
    with _sessions_lock:
        if key not in _sessions:
            session, _, _ = start_session(build_graph(iters).SerializeToString(), device, threads, what="the CRF graph")
            _sessions[key] = GraphCRF(session)
        return _sessions[key]


def dense_crf(image: np.ndarray, probs: np.ndarray, params, device: str = "cpu", threads: int = 1) -> np.ndarray:
    """`deeplab_cli.crf.dense_crf` computed by the graph on `device`: (H, W, 3) uint8 RGB and (C, H, W)
    float32 probabilities -> (C, H, W) float32 marginals, a view of pixel-major memory as the other backends
    give. The lattices, and on the CPU the graph, use `threads` threads."""
    from deeplab_cli.crf import meanfield

    kernels = meanfield.prepare(image, params, threads)
    crf = graph_session(device, params.iters, threads)
    out = crf.run(probs[None], pack([(kernels.gaussian, kernels.bilateral)]), params.pos_w, params.bi_w)
    return out["marginals"][0].transpose(2, 0, 1)


def warm() -> None:
    """Compile (or load from numba's cache) the lattice builder and the packing kernels once per process."""
    from deeplab_cli.crf import meanfield

    meanfield.warm()
    image = np.zeros((3, 4, 3), np.uint8)
    kernels = meanfield.prepare(image, CRFParams())
    pack([(kernels.gaussian, kernels.bilateral)])
