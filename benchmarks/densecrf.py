"""`deeplab_cli.densecrf` against pydensecrf, side by side in one run, on one photo-sized image: the same
program with each module, timed, and its Q compared bit for bit.

    PYTHONPATH=src python benchmarks/densecrf.py --markdown BENCHMARKS.md     # about 1 minute

Two programs, 375x500, 21 labels, 10 iterations, a Gaussian (sxy 3, compat 3) and a bilateral kernel
(sxy 121, srgb 5, compat 4): with DeepLab's NORMALIZE_AFTER, which runs on the engine's fused kernels,
and with pydensecrf's default NORMALIZE_SYMMETRIC, which runs on its general mean field. Each row is the
fastest of --rounds runs after a warm-up one, lattices included, the modules taking turns to go first.
Needs pydensecrf (`pip install ".[crosscheck]"`).

The report goes to stdout. `--json FILE` keeps the measurements ('-': on stdout, the report then on
stderr); `--markdown FILE` writes them between the `densecrf` markers of FILE and refuses at once,
before measuring, a file without them.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import render  # benchmarks/render.py, beside this script
from run import machine_lines  # benchmarks/run.py

SIZE = (375, 500)


def program(module, image: np.ndarray, unary: np.ndarray, normalization: str, threads: int):
    """The CRF both modules run: DenseCRF2D with a Gaussian and a bilateral kernel."""
    height, width = image.shape[:2]
    extra = {"threads": threads} if module.__name__.startswith("deeplab_cli") else {}
    crf = module.DenseCRF2D(width, height, len(unary), **extra)
    crf.setUnaryEnergy(unary)
    norm = getattr(module, normalization)
    crf.addPairwiseGaussian(sxy=3, compat=3, normalization=norm)
    crf.addPairwiseBilateral(sxy=121, srgb=5, rgbim=image, compat=4, normalization=norm)
    return crf


def timed(module, image, unary, normalization: str, threads: int, rounds: int) -> tuple[float, np.ndarray]:
    best, q = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        q = np.asarray(program(module, image, unary, normalization, threads).inference(10))
        best = min(best, time.perf_counter() - start)
    return best, q


def measure(rounds: int, threads: int) -> list[dict]:
    import pydensecrf.densecrf as reference

    import deeplab_cli.densecrf as api
    from deeplab_cli.crf.meanfield import log_probs
    from deeplab_cli.synthetic import natural_image, probabilities

    image = np.ascontiguousarray(natural_image(*SIZE, seed=875)[..., ::-1])
    unary = -log_probs(probabilities(image, 21))
    rows = []
    for normalization, path in (("NORMALIZE_AFTER", "fused kernels"), ("NORMALIZE_SYMMETRIC", "general mean field")):
        for module in (reference, api):  # warm-up: numba loads or compiles its kernels
            program(module, image, unary, normalization, 1).inference(1)
        ours = {}
        for k in (1, threads):
            ours[k] = timed(api, image, unary, normalization, k, rounds)
        seconds, q = timed(reference, image, unary, normalization, 1, rounds)
        rows.append({"normalization": normalization, "path": path, "pydensecrf": seconds,
                     "ours": {str(k): t for k, (t, _) in ours.items()},
                     "identical": all(bool(np.array_equal(q, q_ours)) for _, q_ours in ours.values())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each row, the fastest kept [3]")
    render.output_arguments(parser, "also write the table between the `densecrf` markers of FILE, which must have them")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds takes at least 1")
    render.refuse_without_sections(parser, args.markdown, ["densecrf"])
    from deeplab_cli.run.scheduling import usable_cores

    threads = usable_cores()
    data = {"benchmark": "densecrf", "command": render.measuring_command(sys.argv), "machine": machine_lines(threads),
            "threads": threads, "rows": measure(args.rounds, threads)}
    print(render.densecrf_sections(data)["densecrf"], file=sys.stderr if args.json == "-" else sys.stdout)
    render.deliver(parser, data, args.json, args.markdown)


if __name__ == "__main__":
    main()
