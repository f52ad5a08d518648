"""Throughput of `deeplab segment` side by side with a serial baseline, a PyTorch eager port, and the
machine's own matrix-multiply rate (issue 5). Random weights of the real shapes, VOC-sized images.

    PYTHONPATH=src python benchmarks/run.py --images 16 --markdown BENCHMARKS.md

Rows, all over the same N images, warm-up excluded:
- `deeplab segment` as a subprocess (CRF on, and --no-crf). Start-up and model load are measured by a
  1-image run; steady state is (N - 1) / (t_N - t_1), which for a pipelined runner is its period.
- the serial baseline: one process, one onnxruntime session, upsampling, softmax, pydensecrf, argmax, PNG.
- a PyTorch eager pipeline of the same network and the same CRF (torch is a benchmark-only dependency).
- the network alone, as GFLOP/s from the analytic FLOP count, against numpy's float32 matmul rate.
- on a machine where onnxruntime has CUDA: the network in float32 and float16, and `segment --device cuda`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np

import deeplab_cli
from deeplab_cli.crf import CRFParams, dense_crf
from deeplab_cli.model import VOC_MEAN_BGR, Conv, Pool, build_onnx, check_weights, largefov_layers
from deeplab_cli.outputs import VOC_CLASSES, read_index_png, voc_palette, write_index_png
from deeplab_cli.runtime import CUDA, open_session
from deeplab_cli.upsample import caffe_interp, labels_from_scores, softmax

LANDSCAPE, PORTRAIT = (375, 500), (500, 375)  # (H, W) of VOC's usual photos
TARGETS = {"serial": 1.3, "pytorch": 1.6, "matmul": 0.85, "outside": 0.05, "labels": 0.999}
# Variables that change BLAS or OpenMP behaviour: printed, never changed.
THREAD_ENV_PREFIXES = ("OPENBLAS_", "OMP_", "MKL_", "GOTO", "NVPL_", "ORT_")


# ---------------------------------------------------------------- inputs: model and images


def random_weights(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """He-initialised LargeFOV weights, OIHW float32: activations keep a sane scale through 16 layers,
    so the scores (and so the CRF's work) look like a trained net's rather than all-zero or all-inf."""
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in largefov_layers():
        if isinstance(layer, Conv):
            fan_in = layer.in_ch * layer.kernel * layer.kernel
            w = rng.standard_normal(layer.weight_shape, dtype=np.float32) * np.float32(math.sqrt(2 / fan_in))
            weights[layer.name] = (w, rng.standard_normal(layer.out_ch, dtype=np.float32) * np.float32(0.1))
    return weights


def export_model(weights, path: Path, float16: bool = False) -> Path:
    import onnx

    model = build_onnx(check_weights(weights, "benchmark"), classes=list(VOC_CLASSES),
                       model_name="benchmark-random", source_sha256="0" * 64, float16=float16)
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


def make_images(folder: Path, count: int, seed: int) -> list[Path]:
    """`count` JPEGs (quality 90), mostly 500x375 landscape with every sixth 375x500 portrait."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        height, width = PORTRAIT if i % 6 == 5 else LANDSCAPE
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


def measured(function, *args):
    """`function(*args)`, setting `others` on the Runs it returns: the share of the machine's core time
    that processes other than this one and its children used meanwhile. A shared machine slows every
    row; this says by how much, so a reader can tell a slow result from a busy machine."""
    own_start, busy_start, start = sum(os.times()[:4]), busy_core_seconds(), time.perf_counter()
    result = function(*args)
    own, busy = sum(os.times()[:4]) - own_start, busy_core_seconds() - busy_start
    share = max(0.0, busy - own) / ((time.perf_counter() - start) * (os.cpu_count() or 1))
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


def measure_segment(name: str, folder: Path, paths: list[Path], model: Path, work: Path,
                    extra: list[str]) -> tuple[Run, Run]:
    """(steady-state, raw) rows for `deeplab segment` over `folder`, start-up from a 1-image run."""
    t_one, _ = run_segment(paths[:1], 1, work / f"{name}-one", model, extra)
    t_all, stages = run_segment([folder], len(paths), work / name, model, extra)
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
    session.logits(cv2.imread(str(paths[0]))[None])  # warm-up: ORT allocates its arenas on the first run
    out.mkdir(parents=True)
    stages = dict.fromkeys(("decode", "network", "upsample+softmax", "crf", "argmax", "write"), 0.0)
    labels: dict[str, np.ndarray] = {}
    for path in paths:
        t0 = time.perf_counter()
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        t1 = time.perf_counter()
        logits = session.logits(image[None])[0]
        t2 = time.perf_counter()
        probs = softmax(caffe_interp(logits, *image.shape[:2]))
        t3 = time.perf_counter()
        # RGB, as DeepLab's CRF binary read its PPM files (and as deeplab_cli.runner passes it).
        marginals = dense_crf(image[..., ::-1], probs, params)
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
            marginals = dense_crf(image[..., ::-1], probs, params)
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
        session.logits(next(im for im in images if im.shape == shape)[None])
    start = time.perf_counter()
    for image in images:
        session.logits(image[None])
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
        session.logits(b)  # warm-up: cuDNN algorithm choice per shape, arena growth
    passes = max(1, math.ceil(min_images / len(images)))
    start = time.perf_counter()
    for _ in range(passes):
        for b in batches:
            session.logits(b)
    seconds = time.perf_counter() - start
    count = passes * len(images)
    flops = passes * sum(network_flops(*im.shape[:2]) for im in images)
    return Run(f"GPU network alone, {label}, batch {batch}", count, seconds, gflops=flops / seconds / 1e9,
               note=f"{passes} passes over the images")


# ---------------------------------------------------------------- report


def machine_lines(threads: int) -> list[str]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
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


def ratio_row(name: str, value: float | None, target: float, higher: bool, percent: bool = False) -> list[str]:
    if value is None:
        return [name, "-", "", "SKIP"]
    shown = f"{100 * value:.2f}%" if percent else f"{value:.2f}"
    goal = f"{100 * target:g}%" if percent else f"{target:g}"
    ok = value >= target if higher else value < target
    return [name, shown, f"{'>=' if higher else '<'} {goal}", "PASS" if ok else "FAIL"]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.strip() for c in r) + " |" for r in rows])


def stage_line(run: Run) -> str:
    total = sum(run.stages.values())
    return f"{run.name}: " + ", ".join(f"{k} {v / run.images:.3f} s ({100 * v / total:.1f}%)"
                                       for k, v in run.stages.items())


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Fraction of pixels with equal labels over the keys both hold."""
    keys = sorted(set(a) & set(b))
    equal = sum(int((a[k] == b[k]).sum()) for k in keys)
    return equal / sum(a[k].size for k in keys)


def read_masks(folder: Path, stems: list[str], suffix: str = "") -> dict[str, np.ndarray]:
    return {f"{s}{suffix}": read_index_png(folder / f"{s}.png") for s in stems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="number of images (>= 2) [16]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-batch", type=int, default=8, help="batch of equal-size images on the GPU [8]")
    parser.add_argument("--markdown", type=Path, help="also write the report as markdown to this file")
    args = parser.parse_args()
    if args.images < 2:
        parser.error("--images must be at least 2 (steady state needs t_N - t_1)")
    threads = os.cpu_count() or 1
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    machine = machine_lines(threads)
    print("\n".join(machine), flush=True)

    with tempfile.TemporaryDirectory(prefix="deeplab-bench-") as tmp:
        work = Path(tmp)
        weights = random_weights(args.seed)
        model = export_model(weights, work / "largefov.onnx")
        folder = work / "images"
        paths = make_images(folder, args.images, args.seed)
        stems = [p.stem for p in paths]
        print(f"{args.images} images ({sum(p.stat().st_size for p in paths) / len(paths) / 1024:.0f} KiB JPEG "
              f"on average) in {folder}", flush=True)

        def progress(what: str) -> None:
            print(f"... {what}", file=sys.stderr, flush=True)

        progress("float32 matmul rates")
        blas = max(matmul_gflops(2048), matmul_gflops(3072))
        mlas = ort_matmul_gflops(2048, threads)

        # Subprocesses first, while this process holds no onnxruntime or torch threads that could spin.
        progress("deeplab segment warm-up (page cache, imports)")
        run_segment(paths[:1], 1, work / "warm", model, [])
        progress(f"deeplab segment, CRF on, 1 then {args.images} images")
        seg, seg_raw = measured(measure_segment, "seg-crf", folder, paths, model, work, [])
        progress(f"deeplab segment --no-crf, 1 then {args.images} images")
        seg_nocrf, seg_nocrf_raw = measured(measure_segment, "seg-nocrf", folder, paths, model, work, ["--no-crf"])
        progress("serial baseline")
        serial, serial_labels = measured(serial_baseline, paths, model, work / "serial", threads)
        progress("network alone")
        net = measured(network_alone, paths, model, threads)
        try:
            progress("PyTorch eager pipeline")
            torch_run, torch_labels = measured(pytorch_pipeline, paths, weights, work / "torch", threads)
        except ImportError as e:
            torch_run, torch_labels = None, {}
            print(f"PyTorch row skipped: {e} (pip install torch to add it)")

        gpu_runs: list[Run] = []
        gpu_note = ""
        import onnxruntime as ort

        if CUDA in ort.get_available_providers():
            progress("GPU: network alone float32 / float16, segment --device cuda")
            gpu_runs.append(measured(gpu_network, paths, model, "float32", args.gpu_batch))
            model16 = export_model(weights, work / "largefov-fp16.onnx", float16=True)
            gpu_runs.append(measured(gpu_network, paths, model16, "float16", args.gpu_batch))
            gpu_seg, _ = measured(measure_segment, "seg-cuda", folder, paths, model, work, ["--device", "cuda"])
            gpu_runs.append(gpu_seg)
        else:
            gpu_note = (f"GPU rows skipped: onnxruntime has no CUDAExecutionProvider here "
                        f"(providers: {', '.join(ort.get_available_providers())})")

        seg_labels = read_masks(work / "seg-crf", stems)
        seg_nocrf_labels = read_masks(work / "seg-nocrf", stems, "/no-crf")

    # ------------------------------------------------------------ tables
    runs = [seg, seg_raw, seg_nocrf, seg_nocrf_raw, serial, *([torch_run] if torch_run else []), net, *gpu_runs]
    rows = [[r.name, f"{r.rate:.3f}", f"{1 / r.rate:.3f}", "" if r.gflops is None else f"{r.gflops:.1f}", r.note]
            for r in runs]
    rows.append([f"numpy float32 matmul (best of 2048², 3072²)", "", "", f"{blas:.1f}", "BLAS reference rate"])
    rows.append([f"onnxruntime MatMul 2048² (MLAS)", "", "", f"{mlas:.1f}", "info: the GEMM ORT's Conv uses"])
    header = ["run", "images/s", "s/image", "GFLOP/s", "note"]

    outside = sum(v for k, v in serial.stages.items() if k not in ("network", "crf")) / sum(serial.stages.values())
    ratios = [
        ratio_row("segment / serial baseline (steady state)", seg.rate / serial.rate, TARGETS["serial"], True),
        ratio_row("segment / PyTorch eager (steady state)", seg.rate / torch_run.rate if torch_run else None,
                  TARGETS["pytorch"], True),
        ratio_row("network GFLOP/s / numpy matmul GFLOP/s", net.gflops / blas, TARGETS["matmul"], True),
        ratio_row("time outside network + CRF (serial baseline)", outside, TARGETS["outside"], False, percent=True),
        ratio_row("labels: segment == serial, CRF on", agreement(seg_labels, serial_labels), TARGETS["labels"], True,
                  percent=True),
        ratio_row("labels: segment --no-crf == serial argmax", agreement(seg_nocrf_labels, serial_labels),
                  TARGETS["labels"], True, percent=True),
    ]
    ratio_header = ["check", "value", "target", "result"]
    info = [
        f"segment / serial, raw (start-up included): {seg_raw.rate / serial.rate:.2f}",
        stage_line(serial),
        *([stage_line(torch_run)] if torch_run else []),
        f"deeplab segment --json timings, summed: " + ", ".join(f"{k} {v / args.images:.3f} s/img"
                                                                for k, v in seg.stages.items()),
    ]
    if torch_labels:
        info.append(f"labels: PyTorch == serial on {100 * agreement(torch_labels, serial_labels):.3f}% of pixels "
                    "(different convolution kernels, so not bit-identical)")
    if gpu_note:
        info.append(gpu_note)

    print()
    print(text_table(header, rows))
    print()
    print(text_table(ratio_header, ratios))
    print()
    print("\n".join(info))
    print(f"\ncommand: {command}")

    if args.markdown:
        portrait = args.images // 6
        counts = f"{args.images} JPEGs (quality 90): {args.images - portrait} at 500x375, {portrait} at 375x500"
        args.markdown.write_text("\n".join([
            "# Benchmarks",
            "",
            "Throughput of `deeplab segment` against a serial baseline and a PyTorch eager port, on the full-size",
            "DeepLab-LargeFOV with random weights and synthetic photo-like images (1/f spectrum, soft-edged objects).",
            "Each row is measured once over the same images, warm-up excluded. `deeplab segment` runs as a",
            "subprocess; its steady-state rate is (N-1)/(t_N - t_1) with t_1 a 1-image run (start-up and model",
            "load), and the ratios use that rate. GFLOP/s come from the analytic count of convolution FLOPs.",
            "",
            "```sh",
            f"PYTHONPATH=src {command}",
            "```",
            "",
            *[f"- {line}" for line in machine],
            f"- {counts}",
            "",
            markdown_table(header, rows),
            "",
            markdown_table(ratio_header, ratios),
            "",
            *[f"- {line}" for line in info],
            "",
        ]))


if __name__ == "__main__":
    main()
