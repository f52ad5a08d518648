"""Throughput of `deeplab segment` side by side with a serial baseline, a PyTorch eager port, and the
machine's own matrix-multiply rate. Random weights of the real shapes, VOC-sized images. Needs the
references (`pip install ".[cpu,test,crosscheck]"`: PyTorch and pydensecrf) beside the package.

    PYTHONPATH=src python benchmarks/run.py --markdown BENCHMARKS.md     # 8 images, 3 rounds: 15-25 min on 2 cores

Rows, all over the same N images, warm-up excluded (with --rounds R: each row R times, the fastest kept):
- `deeplab segment` as a subprocess (CRF on, and --no-crf). Start-up and model load are measured by a
  1-image run; steady state is (N - 1) / (t_N - t_1), which for a pipelined runner is its period.
- the serial baseline: one process, one onnxruntime session, upsampling, softmax, pydensecrf, argmax, PNG.
- a PyTorch eager pipeline of the same network and the same CRF.
- the network alone, as GFLOP/s from the analytic FLOP count, against numpy's float32 matmul rate.
- `deeplab crf tune` over its default grid with pydensecrf and numba, on 2 images at 500x375 (the
  target's) and at 160x120 (reported only), the fastest of 2 runs each (--tune-rounds), the backends
  taking turns to go first: pydensecrf takes 2-5 minutes a run.
- on a machine where onnxruntime has CUDA: the network in float32 and float16; the CRF alone on every core,
  the ceiling of a GPU machine; and `segment --device cuda` (CRF on, and --no-crf) over enough images to
  keep every CRF worker busy. `--gpu-only` leaves out the CPU rows but the serial baseline (the labels'
  reference).

The report goes to stdout. `--json FILE` keeps the measurements ('-': on stdout, the report then on
stderr); `--markdown FILE` writes them between the `run` markers of FILE (`run-gpu` with --gpu-only),
every other line of it left as it is, and refuses at once, before measuring, a file without them.
benchmarks/render.py renders kept measurements, and holds the targets the checks compare with.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np

import deeplab_cli
from deeplab_cli.crf import CRFParams, dense_crf
from deeplab_cli.model.network import VOC_MEAN_BGR, Pool, build_onnx, check_weights, largefov_layers
from deeplab_cli.io.outputs import VOC_CLASSES, read_index_png, voc_palette, write_index_png
from deeplab_cli.model.runtime import CUDA, open_session
from deeplab_cli.run.scheduling import usable_cores
from deeplab_cli.run.stages import apply_crf
from deeplab_cli.synthetic import random_weights
from deeplab_cli.model.upsample import caffe_interp, labels_at_size, labels_from_scores, softmax

import render  # benchmarks/render.py, beside this script

VOC_SIZE = (375, 500)  # (H, W) of VOC's usual landscape photo; portraits are (500, 375)
# Variables that change BLAS or OpenMP behaviour: printed, never changed.
THREAD_ENV_PREFIXES = ("OPENBLAS_", "OMP_", "MKL_", "GOTO", "NVPL_", "ORT_")


# ---------------------------------------------------------------- inputs: model and images


def export_model(weights, path: Path, float16: bool = False, with_probs: bool = False) -> Path:
    """The graph as `deeplab export` writes it; `with_probs` is the GPU variant `segment` picks on CUDA."""
    import onnx

    model = build_onnx(check_weights(weights, "benchmark"), classes=list(VOC_CLASSES),
                       model_name="benchmark-random", source_sha256="0" * 64, float16=float16,
                       with_probs=with_probs)
    onnx.save(model, path)
    return path


def pink_noise(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32, zero mean, unit std, amplitude spectrum 1/f like natural images."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freq = np.hypot(fy, fx)
    freq[0, 0] = 1.0
    spectrum = (rng.standard_normal(freq.shape) + 1j * rng.standard_normal(freq.shape)) / freq
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(height, width))
    return ((field - field.mean()) / field.std()).astype(np.float32)


def natural_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 BGR, a "dead leaves" photo: a shaded backdrop and soft-edged objects over it, each
    a colour whose brightness carries 1/f texture, plus a little sensor noise.

    The CRF's bilateral lattice is indexed by colour, so its cost follows the image's colour structure.
    Photos hold a few surface colours that vary mostly in brightness; independent 1/f noise in every
    channel fills far more of the colour space and made the CRF 2-3x dearer than on real photos."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    ramp = (yy / height)[..., None]
    image = (top * (1 - ramp) + bottom * ramp) * (1 + 0.12 * pink_noise(height, width, rng)[..., None])
    for _ in range(rng.integers(4, 9)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(15, height / 2.5), rng.uniform(15, width / 2.5)
        angle = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / rx
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ry
        radius = np.maximum(np.hypot(u, v), 1e-6)
        # (r - 1) / |grad r| is the distance to the outline in pixels; a logistic of it gives an edge
        # about 2 px wide all round: photographed boundaries are blurred, never one-pixel steps.
        distance = (radius - 1) * radius / np.hypot(u / rx, v / ry).clip(1e-6)
        inside = 1 / (1 + np.exp(np.clip(distance / 0.7, -50, 50)))[..., None]
        shading = 1 + 0.2 * u[..., None] + rng.uniform(0.05, 0.25) * pink_noise(height, width, rng)[..., None]
        image = image * (1 - inside) + rng.uniform(20, 235, 3) * shading * inside
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_images(folder: Path, count: int, seed: int, size: tuple[int, int] = VOC_SIZE) -> list[Path]:
    """`count` JPEGs (quality 90) of landscape `size` (H, W), every sixth one a portrait (W, H)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        height, width = size[::-1] if i % 6 == 5 else size
        path = folder / f"img_{i:03d}.jpg"
        cv2.imwrite(str(path), natural_image(height, width, rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


# ---------------------------------------------------------------- measurements


@dataclass
class Run:
    """One measured row: `seconds` for `images` images, and per-stage seconds where known."""

    name: str
    images: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    note: str = ""
    gflops: float | None = None
    others: float | None = None  # share of the machine's core time other processes used meanwhile

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def busy_core_seconds() -> float:
    """Core-seconds every process on the machine has spent busy since boot, steal included (/proc/stat)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def with_others(function, *args):
    """(function(*args), share of the machine's core time that processes other than this one and its
    children used meanwhile). A shared machine slows every row; this says by how much, so that a slow
    result can be told from a busy machine."""
    own_start, busy_start, start = sum(os.times()[:4]), busy_core_seconds(), time.perf_counter()
    result = function(*args)
    own, busy = sum(os.times()[:4]) - own_start, busy_core_seconds() - busy_start
    return result, max(0.0, busy - own) / ((time.perf_counter() - start) * (os.cpu_count() or 1))


def measured(function, *args):
    """`function(*args)`, with `others` set on the Runs it returns (see with_others)."""
    result, share = with_others(function, *args)
    for item in result if isinstance(result, tuple) else (result,):
        if isinstance(item, Run):
            item.others = share
    return result


def network_flops(height: int, width: int) -> int:
    """Multiply-adds x 2 of every convolution of LargeFOV on an H x W image, padding taps included.
    Each stride-2 pooling maps n -> n // 2 + 1 (Caffe rounds up); stride-1 poolings keep the size."""
    flops, h, w = 0, height, width
    for layer in largefov_layers():
        if isinstance(layer, Pool):
            if layer.stride == 2:
                h, w = h // 2 + 1, w // 2 + 1
        else:
            flops += 2 * layer.out_ch * layer.in_ch * layer.kernel ** 2 * h * w
    return flops


def matmul_gflops(size: int, repeats: int = 5) -> float:
    """Best-of-`repeats` numpy float32 (size x size) @ (size x size) rate, all BLAS threads."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out = a @ b  # warm-up: thread pool start, page faults on `out`
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def ort_matmul_gflops(size: int, threads: int, repeats: int = 5) -> float:
    """The same product through onnxruntime's own GEMM (MLAS), the kernels its convolutions use."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((size, size), dtype=np.float32) for n in "ab"}
    session.run(None, feeds)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def child_env() -> dict[str, str]:
    """The environment for `deeplab` subprocesses: the same deeplab_cli this script imported."""
    env = dict(os.environ)
    package_root = str(Path(deeplab_cli.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def run_segment(inputs: list[Path], expected: int, out: Path, model: Path,
                extra: list[str]) -> tuple[float, dict[str, float]]:
    """Wall clock of one `deeplab segment` process, start-up and model load included, and its summed
    --json stage timings. Raises if any image failed: a failed image would be a free one."""
    command = [sys.executable, "-m", "deeplab_cli", "segment", *map(str, inputs), "--out", str(out),
               "-m", str(model), "-q", "--json", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=child_env())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    stages: dict[str, float] = {}
    results = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    bad = [r for r in results if r["status"] != "ok"]
    if bad or len(results) != expected:
        raise RuntimeError(f"deeplab segment gave {len(results)} results for {expected} images: {bad[:3]}")
    for result in results:
        for stage, value in result.get("timings", {}).items():
            stages[stage] = stages.get(stage, 0.0) + value
    return seconds, stages


def measure_segment(name: str, paths: list[Path], model: Path, work: Path,
                    extra: list[str]) -> tuple[Run, Run]:
    """(steady-state, raw) rows for `deeplab segment` over the folder of `paths` (nothing else in it), start-up
    from a 1-image run."""
    t_one, _ = run_segment(paths[:1], 1, work / f"{name}-one", model, extra)
    t_all, stages = run_segment([paths[0].parent], len(paths), work / name, model, extra)
    n = len(paths)
    steady = Run(f"deeplab segment {' '.join(extra)}".strip(), n - 1, t_all - t_one, stages,
                 note=f"steady state (N-1)/(t_N - t_1); 1 image: {t_one:.2f} s")
    raw = Run("  same, raw (incl. start-up)", n, t_all, note=f"{n} images in {t_all:.1f} s, one process")
    return steady, raw


def serial_baseline(paths: list[Path], model: Path, out: Path, threads: int) -> tuple[Run, dict[str, np.ndarray]]:
    """One image after another in this process: cv2.imread, onnxruntime, Caffe Interp + softmax,
    pydensecrf, argmax, palette PNG. Returns the row and the labels (with and without the CRF)."""
    session = open_session(model, "cpu", threads)
    params, palette = CRFParams(), voc_palette()
    session.run(cv2.imread(str(paths[0]))[None])  # warm-up: ORT allocates its arenas on the first run
    out.mkdir(parents=True)
    stages = dict.fromkeys(("decode", "network", "upsample+softmax", "crf", "argmax", "write"), 0.0)
    labels: dict[str, np.ndarray] = {}
    for path in paths:
        t0 = time.perf_counter()
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        t1 = time.perf_counter()
        logits = session.run(image[None])["logits"][0]
        t2 = time.perf_counter()
        probs = softmax(caffe_interp(logits, *image.shape[:2]))
        t3 = time.perf_counter()
        # RGB, as DeepLab's CRF binary read its PPM files (and as deeplab_cli.run.stages passes it).
        marginals = dense_crf(image[..., ::-1], probs, params, backend="pydensecrf")
        t4 = time.perf_counter()
        mask = labels_from_scores(marginals)
        t5 = time.perf_counter()
        write_index_png(out / f"{path.stem}.png", mask, palette)
        t6 = time.perf_counter()
        for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            stages[stage] += seconds
        labels[path.stem] = mask
        labels[f"{path.stem}/no-crf"] = labels_from_scores(probs)  # outside the timed stages
    run = Run("serial baseline (ORT + pydensecrf)", len(paths), sum(stages.values()), stages,
              note=f"one process, ORT {threads} threads, CRF on the same thread")
    return run, labels


def pytorch_pipeline(paths: list[Path], weights, out: Path, threads: int) -> tuple[Run, dict[str, np.ndarray]]:
    """The usual DeepLab port: nn.Conv2d / pooling in eager mode, F.interpolate(align_corners=True),
    softmax in torch, then the same CRF, argmax and PNG writer."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(threads)
    modules: list[nn.Module] = []
    for layer in largefov_layers():
        if isinstance(layer, Pool):
            modules.append(nn.AvgPool2d(3, layer.stride, 1, ceil_mode=True, count_include_pad=True) if layer.average
                           else nn.MaxPool2d(3, layer.stride, 1, ceil_mode=True))
            continue
        conv = nn.Conv2d(layer.in_ch, layer.out_ch, layer.kernel, padding=layer.pad, dilation=layer.dilation)
        w, b = weights[layer.name]
        conv.weight.data.copy_(torch.from_numpy(w))
        conv.bias.data.copy_(torch.from_numpy(b))
        modules.append(conv)
        if layer.relu:
            modules.append(nn.ReLU(inplace=True))
    net = nn.Sequential(*modules).eval()
    mean = torch.tensor(VOC_MEAN_BGR, dtype=torch.float32)

    def scores(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        x = (torch.from_numpy(image).float() - mean).permute(2, 0, 1)[None].contiguous()
        logits = net(x)
        h, w = logits.shape[2:]
        up = F.interpolate(logits, size=((h - 1) * 8 + 1, (w - 1) * 8 + 1), mode="bilinear", align_corners=True)
        return torch.softmax(up[0, :, :height, :width], dim=0).contiguous().numpy()

    params, palette = CRFParams(), voc_palette()
    out.mkdir(parents=True)
    stages = dict.fromkeys(("decode", "network+upsample+softmax", "crf", "argmax+write"), 0.0)
    labels = {}
    with torch.inference_mode():
        scores(cv2.imread(str(paths[0])))  # warm-up: oneDNN primitive creation, allocator
        for path in paths:
            t0 = time.perf_counter()
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            t1 = time.perf_counter()
            probs = scores(image)
            t2 = time.perf_counter()
            marginals = dense_crf(image[..., ::-1], probs, params, backend="pydensecrf")
            t3 = time.perf_counter()
            mask = labels_from_scores(marginals)
            write_index_png(out / f"{path.stem}.png", mask, palette)
            t4 = time.perf_counter()
            for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stages[stage] += seconds
            labels[path.stem] = mask
    run = Run(f"PyTorch {torch.__version__} eager + pydensecrf", len(paths), sum(stages.values()), stages,
              note=f"torch threads {threads}, inference_mode")
    return run, labels


def network_alone(paths: list[Path], model: Path, threads: int) -> Run:
    """onnxruntime on pre-decoded images, one at a time, as GFLOP/s of the analytic count."""
    session = open_session(model, "cpu", threads)
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    for shape in {im.shape for im in images}:  # warm-up per input shape
        session.run(next(im for im in images if im.shape == shape)[None])
    start = time.perf_counter()
    for image in images:
        session.run(image[None])
    seconds = time.perf_counter() - start
    flops = sum(network_flops(*im.shape[:2]) for im in images)
    return Run(f"network alone (ORT CPU, {threads} threads)", len(images), seconds, gflops=flops / seconds / 1e9,
               note=f"{flops / len(images) / 1e9:.1f} GFLOP per image")


def gpu_network(paths: list[Path], model: Path, label: str, batch: int, min_images: int = 256) -> Run:
    """Images/s of the network alone on CUDA, equal-size images batched, repeated to >= `min_images`."""
    session = open_session(model, "cuda")
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    batches = []
    for shape in sorted({im.shape for im in images}):
        same = [im for im in images if im.shape == shape]
        batches += [np.stack(same[i:i + batch]) for i in range(0, len(same), batch)]
    for b in batches[:3]:
        session.run(b)  # warm-up: cuDNN algorithm choice per shape, arena growth
    passes = max(1, math.ceil(min_images / len(images)))
    start = time.perf_counter()
    for _ in range(passes):
        for b in batches:
            session.run(b)
    seconds = time.perf_counter() - start
    count = passes * len(images)
    flops = passes * sum(network_flops(*im.shape[:2]) for im in images)
    return Run(f"GPU network alone, {label}, batch {batch}", count, seconds, gflops=flops / seconds / 1e9,
               note=f"{passes} passes over the images")


def crf_task(item: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A CRF worker's share of an image, by the code `segment`'s workers run: (H, W, 3) uint8 BGR and
    (C, H, W) float32 probabilities in, (H, W) uint8 labels out."""
    image, probs = item
    return labels_at_size(apply_crf(image, probs, CRFParams()), *image.shape[:2])


def crf_alone(paths: list[Path], model: Path, cores: int, count: int) -> Run:
    """Images/s of the CRF alone in `cores` spawned worker processes over `count` images (`paths` cycled),
    the probabilities shipped to them as `segment` ships them: once the network costs nothing (a GPU),
    no pipeline can beat this. The workers are started and warmed before the clock starts."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    session = open_session(model, "cpu")
    items = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        probs = softmax(caffe_interp(session.run(image[None])["logits"][0], *image.shape[:2]))
        items.append((image, probs))
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        tiny = (items[0][0][:16, :16].copy(), items[0][1][:, :16, :16].copy())
        list(pool.map(crf_task, [tiny] * cores))  # every worker spawned, pydensecrf imported
        start = time.perf_counter()
        for _ in pool.map(crf_task, (items[i % len(items)] for i in range(count))):
            pass
        seconds = time.perf_counter() - start
    return Run(f"CRF alone, {cores} worker processes", count, seconds, note="the ceiling once the network is free")


def crf_tune(images: Path, logits: Path, truth: Path, out: Path, backend: str) -> tuple[float, str]:
    """Wall clock of one `deeplab crf tune` on its default grid (288 settings) with `backend`, and its table."""
    command = [sys.executable, "-m", "deeplab_cli", "crf", "tune", str(images), str(logits), "--gt", str(truth),
               "-o", str(out), "-q", "--crf-backend", backend]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=child_env())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def tune_rows(paths: list[Path], model: Path, work: Path, count: int, size: tuple[int, int],
              rounds: int) -> tuple[Run, Run, bool]:
    """`deeplab crf tune` over its default grid on `count` images of `size` (H, W), before (pydensecrf: one
    CRF per setting, lattices built 288 times) and after (the numba engine: 48 lattices, shared by the
    weights), each the fastest of `rounds` runs. The backends take turns leading a round (pydensecrf,
    numba, numba, pydensecrf, ...): this machine's speed drifts over minutes, and a run of each minutes
    long, one after the other, can straddle a change. Returns the two rows and whether every run printed
    the same table (bit-identical CRFs)."""
    work = work / f"tune-{size[1]}x{size[0]}"
    images = work / "images"
    images.mkdir(parents=True)
    for path in paths[:count]:
        small = cv2.resize(cv2.imread(str(path)), size[::-1], interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(images / f"{path.stem}.png"), small)
    # Logits from the network; the masks of the same run serve as ground truth (any label map times the same).
    run_segment([images], count, work / "logits", model, ["-f", "logits", "-f", "index", "--no-crf"])
    backends = ("pydensecrf", "numba")
    seconds: dict[str, list[float]] = {backend: [] for backend in backends}
    tables = set()
    for k in range(rounds):
        for backend in backends[::-1] if k % 2 else backends:
            elapsed, table = crf_tune(images, work / "logits", work / "logits", work / f"{backend}.json", backend)
            seconds[backend].append(elapsed)
            tables.add(table)
    rows = [Run(f"deeplab crf tune --crf-backend {backend}", count, min(seconds[backend]),
                note=f"288 settings x {count} images of {size[1]}x{size[0]}, all cores"
                     + (f"; fastest of {', '.join(f'{s:.1f}' for s in seconds[backend])} s" if rounds > 1 else ""))
            for backend in backends]
    return rows[0], rows[1], len(tables) == 1


def copies(paths: list[Path], folder: Path, count: int) -> list[Path]:
    """At least `count` images in `folder`: `paths` under their own names, then hard links to them."""
    folder.mkdir()
    linked = []
    for i in range(max(count, len(paths))):
        source = paths[i % len(paths)]
        rank = i // len(paths)
        target = folder / (source.name if rank == 0 else f"{source.stem}_copy{rank}{source.suffix}")
        os.link(source, target)
        linked.append(target)
    return linked


# ---------------------------------------------------------------- report


def machine_lines(threads: int) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    versions = []
    for dist in ("onnxruntime", "onnxruntime-gpu", "numpy", "torch", "opencv-python-headless", "pydensecrf2"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(THREAD_ENV_PREFIXES)]
    lines = [f"CPU: {model}, {os.cpu_count()} logical cores ({' '.join(simd) or 'no AVX'}); threads used: {threads}",
             f"Python {platform.python_version()}, {platform.system()} {platform.release()}; {', '.join(versions)}"]
    if env:
        lines.append(f"environment (left as found): {' '.join(env)}")
    return lines


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Fraction of pixels with equal labels over the keys both hold."""
    keys = sorted(set(a) & set(b))
    equal = sum(int((a[k] == b[k]).sum()) for k in keys)
    return equal / sum(a[k].size for k in keys)


def read_masks(folder: Path, stems: list[str], suffix: str = "") -> dict[str, np.ndarray]:
    return {f"{s}{suffix}": read_index_png(folder / f"{s}.png") for s in stems}


def progress(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)


def reference_rates(threads: int) -> tuple[Run, Run]:
    blas = max(matmul_gflops(2048), matmul_gflops(3072))
    return (Run("numpy float32 matmul (best of 2048², 3072²)", 0, 0.0, gflops=blas, note="the reference rate"),
            Run("onnxruntime MatMul 2048² (MLAS)", 0, 0.0, gflops=ort_matmul_gflops(2048, threads),
                note="info: the GEMM library ORT's Conv uses"))


@dataclass(frozen=True)
class TunePlan:
    """The `crf tune` rows: `images` images at each of `sizes` ((H, W), the target's first), each
    backend run `rounds` times."""

    images: int
    sizes: list[tuple[int, int]]
    rounds: int


@dataclass
class Plan:
    """What each round measures, and over what."""

    paths: list[Path]  # the N images, alone in their folder
    weights: dict
    models: dict[str, Path]  # "cpu": the exported graph; with CUDA also "fp16" and "cuda" (probs inside)
    work: Path
    threads: int
    gpu_batch: int
    cpu_rows: bool  # False with --gpu-only: the serial baseline stays, as the labels' reference
    with_torch: bool
    gpu_paths: list[Path]  # with CUDA: the N and copies of them, enough to keep every CRF worker busy


def one_round(k: int, rounds: int, plan: Plan) -> tuple[dict[str, Run], dict[str, dict]]:
    """Every row measured once over all images: ({row: Run}, {pipeline: labels by image})."""
    runs, labels, tag = {}, {}, f"round {k + 1}/{rounds}"
    stems, cpu = [p.stem for p in plan.paths], plan.models["cpu"]

    def segment_rows(key: str, name: str, paths: list[Path], model: Path, extra: list[str], suffix: str = ""):
        progress(f"{tag}: {' '.join(['deeplab segment', *extra])}, 1 then {len(paths)} images")
        runs[key], runs[f"{key} raw"] = measured(measure_segment, f"{name}-{k}", paths, model, plan.work, extra)
        labels[key] = read_masks(plan.work / f"{name}-{k}", stems, suffix)

    if plan.cpu_rows:
        runs["blas"], runs["mlas"] = measured(reference_rates, plan.threads)
        # Subprocesses first, before this process has onnxruntime or torch threads that might still spin.
        segment_rows("segment", "seg-crf", plan.paths, cpu, [])
        segment_rows("no-crf", "seg-nocrf", plan.paths, cpu, ["--no-crf"], "/no-crf")
        segment_rows("segment pydensecrf", "seg-pydensecrf", plan.paths, cpu, ["--crf-backend", "pydensecrf"])
    progress(f"{tag}: serial baseline")
    runs["serial"], labels["serial"] = measured(serial_baseline, plan.paths, cpu, plan.work / f"serial-{k}",
                                                plan.threads)
    if plan.cpu_rows:
        progress(f"{tag}: network alone")
        runs["network"] = measured(network_alone, plan.paths, cpu, plan.threads)
        # The reference rates again, next to the network row they are compared with; the faster pair is kept.
        for key, run in zip(("blas", "mlas"), measured(reference_rates, plan.threads)):
            runs[key] = max(runs[key], run, key=lambda r: r.gflops)
    if plan.with_torch:
        progress(f"{tag}: PyTorch eager pipeline")
        runs["torch"], labels["torch"] = measured(pytorch_pipeline, plan.paths, plan.weights,
                                                  plan.work / f"torch-{k}", plan.threads)
    if "cuda" in plan.models:
        progress(f"{tag}: GPU network alone in float32 and float16, CRF alone on {plan.threads} cores")
        runs["gpu fp32"] = measured(gpu_network, plan.paths, cpu, "float32", plan.gpu_batch)
        runs["gpu fp16"] = measured(gpu_network, plan.paths, plan.models["fp16"], "float16", plan.gpu_batch)
        runs["crf cores"] = measured(crf_alone, plan.paths, cpu, plan.threads, len(plan.gpu_paths))
        segment_rows("gpu segment", "seg-cuda", plan.gpu_paths, plan.models["cuda"], ["--device", "cuda"])
        segment_rows("gpu segment numba", "seg-cuda-numba", plan.gpu_paths, plan.models["cuda"],
                     ["--device", "cuda", "--crf-backend", "numba"])
        segment_rows("gpu no-crf", "seg-cuda-nocrf", plan.gpu_paths, plan.models["cuda"],
                     ["--device", "cuda", "--no-crf"], "/no-crf")
    return runs, labels


@dataclass
class Measurements:
    """What a run measured, as benchmarks/render.py reads it (through dataclasses.asdict)."""

    runs: dict[str, Run]  # the fastest of the rounds, row by row
    agreement: dict[str, float]  # pipeline -> share of its labels equal to the serial baseline's
    notes: list[str]
    tune_sizes: list[str] = field(default_factory=list)  # "WxH" of the crf tune rows, the target's first
    tune_same: dict[str, bool] = field(default_factory=dict)  # "WxH" -> every crf tune run printed one table
    crf: dict | None = None  # the CRF alone per backend (benchmarks/crf.py's measurement)
    gpu_crf: dict | None = None  # the onnx graph on the GPU (benchmarks/crf.py's graph_rows)


def measure(paths: list[Path], weights, work: Path, threads: int, gpu_batch: int, rounds: int,
            cpu_rows: bool = True, tune: TunePlan | None = None) -> Measurements:
    import onnxruntime as ort

    notes = []
    models = {"cpu": export_model(weights, work / "largefov.onnx")}
    with_torch = cpu_rows and importlib.util.find_spec("torch") is not None
    if cpu_rows and not with_torch:
        notes.append("PyTorch row skipped: torch is not installed (pip install torch to add it)")
    gpu_paths = []
    if CUDA in ort.get_available_providers():
        models["fp16"] = export_model(weights, work / "largefov-fp16.onnx", float16=True)
        # A registry model on CUDA gets the graph with upsampling and softmax inside; a file gets what it is.
        models["cuda"] = export_model(weights, work / "largefov-gpu.onnx", with_probs=True)
        gpu_paths = copies(paths, work / "gpu-images", max(4 * threads, 128))  # ~1 s at the GPU target
    else:
        notes.append("GPU rows skipped: onnxruntime has no CUDAExecutionProvider here "
                     f"(providers: {', '.join(ort.get_available_providers())})")
    plan = Plan(paths, weights, models, work, threads, gpu_batch, cpu_rows, with_torch, gpu_paths)

    progress("deeplab segment warm-up (page cache, imports)")
    run_segment(paths[:1], 1, work / "warm", models["cpu"], [])
    results = [one_round(k, rounds, plan) for k in range(rounds)]
    # The fastest round of each row: contention only ever slows a run down.
    runs = {key: max((r[key] for r, _ in results), key=lambda run: run.rate if run.images else run.gflops)
            for key in results[0][0]}
    labels = results[-1][1]
    m = Measurements(runs, {key: agreement(labels[key], labels["serial"])
                            for key in (*render.LABEL_CHECKS, "torch") if key in labels}, notes)
    # benchmarks/crf.py (beside this script) imported only now: no numba in this process during the rounds.
    if cpu_rows:
        import crf as crf_bench

        progress("the CRF alone per backend, on 500x375 photos")
        m.crf = crf_bench.measurement(rounds=rounds)
    for key, size in zip(("tune", "tune small"), tune.sizes if cpu_rows and tune else ()):
        m.tune_sizes.append(f"{size[1]}x{size[0]}")
        progress(f"crf tune on the default grid, {tune.images} images of {m.tune_sizes[-1]}, {tune.rounds} round(s) "
                 "of pydensecrf and numba in turn")
        runs[f"{key} before"], runs[f"{key} after"], m.tune_same[m.tune_sizes[-1]] = measured(
            tune_rows, paths, models["cpu"], work, tune.images, size, tune.rounds)
    if "cuda" in models:
        import crf as crf_bench

        progress("the CRF alone as an ONNX graph on the GPU")
        m.gpu_crf = asdict(crf_bench.graph_rows("cuda", rounds=rounds))
    return m


def size_argument(text: str) -> tuple[int, int]:
    """'WxH' -> (H, W)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 500x375") from None
    if min(width, height) < 48:
        raise argparse.ArgumentTypeError(f"{text}: images need at least 48 pixels a side")
    return height, width


def sizes_argument(text: str) -> list[tuple[int, int]]:
    """'WxH,WxH,...' -> [(H, W), ...]."""
    return [size_argument(part) for part in text.split(",")]


def parse_arguments() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="number of images (>= 2) [8]")
    parser.add_argument("--size", type=size_argument, default=VOC_SIZE, metavar="WxH",
                        help="landscape image size; every sixth image is its portrait [500x375]")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every row this many times and keep the fastest: contention only slows [3]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-batch", type=int, default=8, help="batch of equal-size images on the GPU [8]")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the GPU rows, and the serial baseline their labels are checked against")
    parser.add_argument("--tune-images", type=int, default=2,
                        help="images for the `crf tune` rows, default grid (288 settings) each; 0 leaves them out [2]")
    parser.add_argument("--tune-sizes", type=sizes_argument, default=[VOC_SIZE, (120, 160)], metavar="WxH,...",
                        help="their size, checked against the target, then optionally one more, only reported; "
                             "pydensecrf takes the grid 288 times per image, 5 minutes at 500x375 [500x375,160x120]")
    parser.add_argument("--tune-rounds", type=int, default=2,
                        help="runs of each backend's `crf tune`, the backends going first in turn, the fastest "
                             "kept: fewer than --rounds, as a pydensecrf run takes minutes [2]")
    render.output_arguments(parser, "also write the report between the `run` markers of FILE (`run-gpu` with "
                                    "--gpu-only), which must have them; the rest of FILE is kept as it is")
    args = parser.parse_args()
    if args.images < 2:
        parser.error("--images must be at least 2 (steady state needs t_N - t_1)")
    if args.rounds < 1 or args.tune_rounds < 1:
        parser.error("--rounds and --tune-rounds must be at least 1")
    if len(args.tune_sizes) > 2:
        parser.error("--tune-sizes takes one or two sizes")
    if args.gpu_only:
        import onnxruntime as ort

        if CUDA not in ort.get_available_providers():
            parser.error(f"--gpu-only: onnxruntime has no CUDAExecutionProvider here "
                         f"(providers: {', '.join(ort.get_available_providers())})")
    render.refuse_without_sections(parser, args.markdown, ["run-gpu" if args.gpu_only else "run"])
    return parser, args


def images_line(paths: list[Path], size: tuple[int, int]) -> str:
    portrait, (height, width) = len(paths) // 6, size
    return (f"{len(paths)} JPEGs (quality 90, {sum(p.stat().st_size for p in paths) / len(paths) / 1024:.0f} KiB "
            f"on average): {len(paths) - portrait} at {width}x{height}, {portrait} at {height}x{width}")


def main() -> None:
    parser, args = parse_arguments()
    report = sys.stderr if args.json == "-" else sys.stdout
    threads = usable_cores()  # what `deeplab segment` budgets for too
    machine = machine_lines(threads)
    print("\n".join(machine), file=report, flush=True)
    with tempfile.TemporaryDirectory(prefix="deeplab-bench-") as tmp:
        work = Path(tmp)
        paths = make_images(work / "images", args.images, args.seed, args.size)
        images = images_line(paths, args.size)
        print(images, file=report, flush=True)
        tune = TunePlan(min(args.tune_images, args.images), args.tune_sizes, args.tune_rounds)
        m = measure(paths, random_weights(args.seed), work, threads, args.gpu_batch, args.rounds,
                    cpu_rows=not args.gpu_only, tune=tune if args.tune_images else None)
    data = {"benchmark": "run", "command": render.measuring_command(sys.argv), "gpu_only": args.gpu_only,
            "machine": machine, "images": images, "rounds": args.rounds,
            "tune_rounds": args.tune_rounds if m.tune_sizes else None, **asdict(m)}
    print(f"\n{render.run_text(data)}", file=report)
    render.deliver(parser, data, args.json, args.markdown)


if __name__ == "__main__":
    main()
