"""Big images and bounded memory: the way back to the image's size, today's full map against bands.

    PYTHONPATH=src python benchmarks/bigimage.py             # 24 MP JPEG and 400 MP PNG: ~3 min on 2 cores
    PYTHONPATH=src python benchmarks/bigimage.py --cli       # plus `deeplab segment -j 0` (CRF on) on each
    PYTHONPATH=src python benchmarks/bigimage.py --small     # 24 MP only

Inputs, generated in a temporary folder: a 6000x4000 JPEG and a 20000x20000 PNG ("dead leaves" photos
from benchmarks/run.py, upscaled, with fresh noise), and a LargeFOV graph with random weights of the
real shapes. One process per row, so each row's peak memory is its own (VmHWM from /proc/self/status,
"rise" over the process's footprint before the measured step):
- decode: `load_image` of the file.
- probabilities: the network at the working size (longer side 513) and softmax, as `segment` computes
  them without the CRF; saved for the rows below, which all start from them.
- labels, full map: labels_from_scores(resize_probs(probs, H, W)), what stages.refine does today.
- labels, banded: upsample.labels_at_size(probs, H, W).
- labels, cv2.resize: OpenCV's own bilinear resize instead of the project's kernel, class by class over
  slices of columns (with (C, 513, W) float32 held): how far labels move with OpenCV's rounding.
- probs.npz (24 MP only; 400 MP would write 17 GB): write_npz of resize_probs(...).astype(float16)
  against write_npz_streamed of upsample.prob_chunks(...).
A row that cannot allocate its memory (its address space is capped at what the machine has free, so
it fails with MemoryError rather than meeting the OOM killer) reports the error instead of a time.
"Agree" is the share of pixels whose labels equal the full map's (where it could not be made, the
column reference's), or of equal values in the two probs.npz files.

`--json FILE` keeps the measurements ('-': on stdout, the table then on stderr); `--markdown FILE`
writes the table between the `bigimage` markers of FILE, leaving the rest of it as it is
(benchmarks/render.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import render  # benchmarks/render.py, beside this script

HERE = Path(__file__).resolve().parent
IMAGES = {"24 MP JPEG": ("photo.jpg", (4000, 6000)), "400 MP PNG": ("scan.png", (20000, 20000))}
LABEL_ROWS = {"full": "labels, full map", "banded": "labels, banded", "cv2": "labels, cv2.resize"}


def status_mb(field: str) -> float:
    """A Vm* field of /proc/self/status in MB (VmHWM: peak resident set)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- child: one measured step


def cap_address_space() -> None:
    """Fail allocations beyond what the machine has free with MemoryError, instead of an OOM kill."""
    from deeplab_cli.run.memory import available_memory

    free = available_memory()
    if free is not None:
        limit = int(status_mb("VmSize") * 2**20 + 0.8 * free)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def child(step: str, args: list[str]) -> dict:
    import cv2  # noqa: F401  (imported before the baseline, as deeplab_cli.run.stages has it)

    from deeplab_cli.io import outputs
    from deeplab_cli.io.images import load_image, resize_for_network
    from deeplab_cli.model.upsample import caffe_interp, labels_at_size, labels_from_scores, prob_chunks, resize_probs, softmax

    cap_address_space()
    if step == "decode":
        baseline = status_mb("VmHWM")
        start = time.perf_counter()
        image = load_image(args[0])
        return {"seconds": time.perf_counter() - start, "baseline": baseline, "shape": list(image.shape)}
    if step == "probs":
        from deeplab_cli.model.runtime import open_session

        image_path, model, out = args
        small = resize_for_network(load_image(image_path), 513)
        session = open_session(model, "cpu", threads=os.cpu_count())
        baseline = status_mb("VmHWM")
        start = time.perf_counter()
        logits = session.run(small[None], None, ("logits",))["logits"][0]
        probs = softmax(caffe_interp(logits, *small.shape[:2]))
        seconds = time.perf_counter() - start
        np.save(out, probs)
        return {"seconds": seconds, "baseline": baseline, "shape": list(probs.shape)}
    probs_path, height, width, out = args[0], int(args[1]), int(args[2]), Path(args[3])
    probs = np.load(probs_path)
    baseline = status_mb("VmHWM")
    start = time.perf_counter()
    if step == "full":
        labels = labels_from_scores(resize_probs(probs, height, width))
    elif step == "banded":
        labels = labels_at_size(probs, height, width)
    elif step == "cv2":
        labels = cv2_labels(probs, height, width)
    elif step == "npz-full":
        outputs.write_npz(out, probs=resize_probs(probs, height, width).astype(np.float16))
    elif step == "npz-streamed":
        outputs.write_npz_streamed(out, "probs", (probs.shape[0], height, width), np.float16,
                                   prob_chunks(probs, height, width))
    else:
        raise SystemExit(f"unknown step {step}")
    seconds = time.perf_counter() - start
    if step in LABEL_ROWS:
        np.save(out, labels)
    return {"seconds": seconds, "baseline": baseline}


def cv2_labels(probs: np.ndarray, height: int, width: int, step: int = 1024) -> np.ndarray:
    """(C, h, w) float32 -> (height, width) uint8 labels from cv2.resize(INTER_LINEAR): the horizontal
    pass of every class kept whole, the vertical pass over slices of columns (resizes are separable)."""
    import cv2

    across = np.stack([cv2.resize(channel, (width, probs.shape[1]), interpolation=cv2.INTER_LINEAR)
                       for channel in probs])
    labels = np.empty((height, width), np.uint8)
    for x0 in range(0, width, step):
        x1 = min(width, x0 + step)
        best = winner = None
        for c, channel in enumerate(across):
            value = cv2.resize(np.ascontiguousarray(channel[:, x0:x1]), (x1 - x0, height),
                               interpolation=cv2.INTER_LINEAR)
            if best is None:
                best, winner = value, np.zeros(value.shape, np.uint8)
            else:
                better = value > best
                np.copyto(best, value, where=better)
                winner[better] = c
        labels[:, x0:x1] = winner
    return labels


def child_main(step: str, args: list[str]) -> None:
    try:
        result = child(step, args)
    except MemoryError as e:
        result = {"error": f"MemoryError: {e}"}
    result["peak"] = status_mb("VmHWM")
    print(json.dumps(result))


# ---------------------------------------------------------------- parent: inputs, rows, report


def run_child(step: str, *args) -> dict:
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", step, *map(str, args)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", "wall": wall}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def make_image(path: Path, size: tuple[int, int], seed: int) -> None:
    """A photo-like image of `size` (H, W): a dead-leaves picture upscaled, plus fresh noise band by band."""
    import cv2

    sys.path.insert(0, str(HERE))
    from run import natural_image  # noqa: PLC0415  (benchmarks/run.py, imported only here)

    rng = np.random.default_rng(seed)
    height, width = size
    base = natural_image(max(64, height // 8), max(64, width // 8), rng)
    image = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-6, 7, (512, width, 3), dtype=np.int16)
    for y0 in range(0, height, 512):
        band = image[y0:y0 + 512]
        band[:] = np.clip(band + noise[:len(band)], 0, 255).astype(np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if path.suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    if not cv2.imwrite(str(path), image, params):
        raise RuntimeError(f"cannot write {path}")


def make_model(path: Path) -> None:
    sys.path.insert(0, str(HERE))
    from run import export_model, random_weights  # noqa: PLC0415

    export_model(random_weights(0), path)


def agreement(a: Path, b: Path) -> float:
    """Share of equal labels of two saved (H, W) maps, compared in bands (they may be 400 MB each)."""
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    if x.shape != y.shape:
        return 0.0
    equal = sum(int((x[i:i + 1024] == y[i:i + 1024]).sum()) for i in range(0, x.shape[0], 1024))
    return equal / x.size


def same_npz(a: Path, b: Path) -> float:
    """1.0 when np.load gives identical `probs` arrays (compared one class at a time), else the share equal."""
    with np.load(a, mmap_mode="r") as x, np.load(b, mmap_mode="r") as y:
        p, q = x["probs"], y["probs"]
        if p.shape != q.shape:
            return 0.0
        equal = sum(int((p[c] == q[c]).sum()) for c in range(p.shape[0]))
        return equal / p.size


# Runs the CLI and, at exit, writes the process's own peak (VmHWM): ru_maxrss would also count the
# parent's resident size at the fork, which a process that just made a 400 MP image has plenty of.
_PEAK_WRAPPER = ("import atexit, os, runpy, sys\n"
                 "def peak():\n"
                 "    with open('/proc/self/status') as f, open(os.environ['DEEPLAB_BENCH_PEAK'], 'w') as out:\n"
                 "        out.write(next(line for line in f if line.startswith('VmHWM')).split()[1])\n"
                 "atexit.register(peak)\n"
                 "sys.argv[0] = 'deeplab'\n"
                 "runpy.run_module('deeplab_cli', run_name='__main__')\n")


def cli_row(image: Path, model: Path, out: Path) -> dict:
    """`deeplab segment IMAGE -j 0` (CRF on): wall clock and that process's own peak RSS (VmHWM at exit)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent / "src"), env.get("PYTHONPATH")) if p)
    env["DEEPLAB_BENCH_PEAK"] = str(out.with_name("segment.peak"))
    command = [sys.executable, "-c", _PEAK_WRAPPER, "segment", str(image), "--out", str(out), "-m", str(model),
               "-j", "0", "-q", "--json", "--overwrite"]
    stdout_path, stderr_path = out.with_name("segment.stdout"), out.with_name("segment.stderr")
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        start = time.perf_counter()
        subprocess.run(command, stdout=stdout, stderr=stderr, env=env)
        wall = time.perf_counter() - start
    results = [json.loads(line) for line in stdout_path.read_text().splitlines() if line.strip()]
    if results and results[0]["status"] == "ok":
        error = None
    else:
        error = results[0].get("error") if results else stderr_path.read_text().strip()[-300:]
    return {"wall": wall, "peak": int(Path(env["DEEPLAB_BENCH_PEAK"]).read_text()) / 1024, "error": error,
            "timings": results[0].get("timings", {}) if results else {}}


def measured_row(image: str, step: str, result: dict, agree: float | None = None, note: str = "") -> dict:
    """A row's data for benchmarks/render.py: seconds, peak and baseline resident MB (or the error)."""
    return {"image": image, "step": step, "seconds": result.get("seconds"), "peak": result.get("peak"),
            "baseline": result.get("baseline"), "agree": agree, "note": note, "error": result.get("error")}


def label_rows(name: str, image: Path, size: tuple[int, int], model: Path, work: Path) -> list[dict]:
    """Decode, probabilities, then the three ways to labels, each checked against the first one made."""
    file_size = f"{image.stat().st_size / 1e6:,.0f} MB file"
    rows = [measured_row(name, "decode", run_child("decode", image), note=file_size)]
    probs = work / f"{image.stem}.probs.npy"
    result = run_child("probs", image, model, probs)
    rows.append(measured_row(name, "network + softmax (513)", result, note=f"probs {tuple(result.get('shape', ()))}"))
    saved = {}
    for step in LABEL_ROWS:
        print(f"{name}: labels, {step}", file=sys.stderr)
        path = work / f"{image.stem}.{step}.npy"
        result = run_child(step, probs, *size, path)
        reference = next(iter(saved.values()), None)  # the full map where it was made, else the bands
        agree = None if result.get("error") or reference is None else agreement(reference, path)
        if not result.get("error"):
            saved[step] = path
        rows.append(measured_row(name, LABEL_ROWS[step], result, agree))
    for path in saved.values():
        path.unlink()
    return rows


def npz_rows(name: str, image: Path, size: tuple[int, int], work: Path) -> list[dict]:
    """probs.npz written from the full map and streamed from bands; both files compared, then deleted."""
    probs, rows, written = work / f"{image.stem}.probs.npy", [], []
    for step in ("npz-full", "npz-streamed"):
        print(f"{name}: {step}", file=sys.stderr)
        path = work / f"{image.stem}.{step}.npz"
        result = run_child(step, probs, *size, path)
        agree = same_npz(written[0], path) if written and path.exists() and not result.get("error") else None
        note = f"{path.stat().st_size / 1e9:.2f} GB file" if path.exists() else ""
        if path.exists():
            written.append(path)
        rows.append(measured_row(name, f"probs.npz, {step.split('-')[1]}", result, agree, note))
    for path in written:
        path.unlink()
    return rows


def inputs(work: Path, small: bool) -> tuple[Path, list[tuple[str, Path, tuple[int, int]]]]:
    """The random-weights model and the images, made in `work` unless they are there already."""
    model = work / "random.onnx"
    if not model.exists():
        print("building the random-weights model", file=sys.stderr)
        make_model(model)
    images = []
    for seed, (name, (filename, size)) in enumerate(IMAGES.items()):
        if small and name != "24 MP JPEG":
            continue
        image = work / filename
        if not image.exists():
            print(f"making {image.name} {size[1]}x{size[0]}", file=sys.stderr)
            make_image(image, size, seed)
        images.append((name, image, size))
    return model, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the 24 MP JPEG only")
    parser.add_argument("--cli", action="store_true", help="also time `deeplab segment -j 0` (CRF on) per image")
    parser.add_argument("--workdir", type=Path, help="keep inputs here between runs (default: a temporary folder)")
    render.output_arguments(parser, "also write the table between the `bigimage` markers of FILE, which must have them")
    options = parser.parse_args()
    render.refuse_without_sections(parser, options.markdown, ["bigimage"])

    with tempfile.TemporaryDirectory(prefix="deeplab-bigimage-") as temporary:
        work = options.workdir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        model, images = inputs(work, options.small)
        rows: list[dict] = []
        for name, image, _ in images if options.cli else []:
            print(f"{name}: deeplab segment", file=sys.stderr)
            result = cli_row(image, model, work / "segment-out")
            rows.append({"image": name, "step": "deeplab segment -j 0", "seconds": result["wall"],
                         "peak": result["peak"], "error": result["error"], "timings": result["timings"]})
        for name, image, size in images:
            rows += label_rows(name, image, size, model, work)
            if name == "24 MP JPEG":  # 400 MP would write 17 GB
                rows += npz_rows(name, image, size, work)
    data = {"benchmark": "bigimage", "command": render.measuring_command(sys.argv), "rows": rows}
    print(render.bigimage_table(data), file=sys.stderr if options.json == "-" else sys.stdout)
    render.deliver(parser, data, options.json, options.markdown)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3:])
    else:
        main()
