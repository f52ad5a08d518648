"""int8 against fp32 on the CPU, side by side in one run: the network alone, and `deeplab segment` with the
CRF, with how far the labels agree after the CRF. Random weights of the real shapes (He-initialised: the
activations keep a sane scale through the 16 layers), photo-like VOC-sized images.

    PYTHONPATH=src python benchmarks/int8.py --markdown BENCHMARKS.md     # about 5 minutes on 2 cores

Steps: the weights go into a temporary DEEPLAB_HOME as `deeplab models import` puts them there, and
`deeplab models quantize` calibrates the int8 graph on 8 images; the rows are measured on N other images
(--images), so the agreement is on images the calibration never saw.
- the network alone, fp32 and int8, on 1 thread and on every core: the fastest of --rounds passes over
  the images, fp32 and int8 taking turns to go first;
- `deeplab segment` (CRF on, every core) with each graph, after an unmeasured run that compiles the CRF
  engine into the new DEEPLAB_HOME: steady state as in benchmarks/run.py, (N - 1) / (t_N - t_1), start-up
  measured by a 1-image run, the fastest of --rounds, the graphs taking turns to go first;
- the labels' agreement: the share of pixels whose int8 label is fp32's, over the N masks.

The report goes to stdout. `--json FILE` keeps the measurements ('-': on stdout, the report then on
stderr); `--markdown FILE` writes them between the `int8` markers of FILE and refuses at once, before
measuring, a file without them (benchmarks/render.py renders kept measurements).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import render  # benchmarks/render.py, beside this script
from run import (agreement, machine_lines, make_images, measure_segment, progress, read_masks,  # benchmarks/run.py
                 run_segment)

CALIBRATION_IMAGES = 8


def import_weights(home: Path) -> None:
    """Random LargeFOV weights into `home` as `deeplab models import` keeps them, under the default model."""
    from deeplab_cli.model import registry
    from deeplab_cli.synthetic import random_weights

    source = home.parent / "weights.npz"
    np.savez(source, **{f"{layer}/{kind}": array for layer, (w, b) in random_weights(0).items()
                        for kind, array in (("W", w), ("b", b))})
    registry.import_file(registry.get_model(registry.DEFAULT_MODEL), source)


def network_rows(paths: list[Path], graphs: dict[str, Path], threads: int, rounds: int) -> dict[str, float]:
    """Seconds per image of each graph alone, the fastest of `rounds` passes, the graphs taking turns."""
    import cv2

    from deeplab_cli.model.runtime import open_session

    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    sessions = {name: open_session(path, "cpu", threads) for name, path in graphs.items()}
    best = dict.fromkeys(sessions, float("inf"))
    for session in sessions.values():
        for shape in {im.shape for im in images}:  # warm-up per input shape
            session.run(next(im for im in images if im.shape == shape)[None])
    for k in range(rounds):
        for name in list(sessions)[:: 1 if k % 2 == 0 else -1]:
            start = time.perf_counter()
            for image in images:
                sessions[name].run(image[None])
            best[name] = min(best[name], (time.perf_counter() - start) / len(images))
    return best


def measure(args: argparse.Namespace, work: Path) -> dict:
    from deeplab_cli.model import quantize, registry
    from deeplab_cli.run.quantize import quantize_model
    from deeplab_cli.run.scheduling import usable_cores

    os.environ["DEEPLAB_HOME"] = str(work / "home")
    import_weights(work / "home")
    info = registry.get_model(registry.DEFAULT_MODEL)
    calibration = make_images(work / "calibration", CALIBRATION_IMAGES, seed=1000)
    paths = make_images(work / "images", args.images, seed=0)
    progress("quantizing")
    start = time.perf_counter()
    quantize_model(info, calibration[0].parent, CALIBRATION_IMAGES)
    quantize_seconds = time.perf_counter() - start
    graphs = {"fp32": registry.onnx_path(info), "int8": registry.int8_path(info)}
    cores = usable_cores()
    network = {}
    for threads in sorted({1, cores}):
        progress(f"network alone, {threads} thread(s)")
        network[str(threads)] = network_rows(paths, graphs, threads, args.rounds)
    progress("deeplab segment, warm-up")  # compiles the CRF engine into the new DEEPLAB_HOME, unmeasured
    run_segment(paths[:1], 1, work / "warm-up", graphs["fp32"], [])
    segment, masks = {}, {}
    for k in range(args.rounds):
        for name in list(graphs)[:: 1 if k % 2 == 0 else -1]:
            progress(f"deeplab segment, {name}, round {k + 1}")
            steady, raw = measure_segment(f"{name}-{k}", paths, graphs[name], work, [])
            if name not in segment or steady.rate > segment[name]["rate"]:
                segment[name] = {"rate": steady.rate, "raw_seconds": raw.seconds, "images": len(paths)}
            masks[name] = read_masks(work / f"{name}-{k}", [p.stem for p in paths])
    shares = [float((masks["int8"][k] == masks["fp32"][k]).mean()) for k in sorted(masks["fp32"])]
    return {"benchmark": "int8", "command": render.measuring_command(sys.argv), "machine": machine_lines(cores),
            "fast_int8_cpu": quantize.fast_int8_cpu(), "cores": cores, "quantize_seconds": quantize_seconds,
            "calibration_images": CALIBRATION_IMAGES, "network": network, "segment": segment,
            "agreement": agreement(masks["int8"], masks["fp32"]), "agreement_min": min(shares)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="measured images (not calibrated on) [8]")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each row, the fastest kept [3]")
    render.output_arguments(parser, "also write the table between the `int8` markers of FILE, which must have them")
    args = parser.parse_args()
    if args.images < 2 or args.rounds < 1:
        parser.error("--images takes at least 2 (steady state needs a second image), --rounds at least 1")
    render.refuse_without_sections(parser, args.markdown, ["int8"])
    with tempfile.TemporaryDirectory(prefix="deeplab-int8-") as tmp:
        data = measure(args, Path(tmp))
    print(render.int8_sections(data)["int8"], file=sys.stderr if args.json == "-" else sys.stdout)
    render.deliver(parser, data, args.json, args.markdown)


if __name__ == "__main__":
    main()
