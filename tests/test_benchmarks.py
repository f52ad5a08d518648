"""The benchmarks: benchmarks/run.py, the script the throughput targets are measured with, keeps running
and its report says what it measured (small images keep it to seconds; the GPU rows run where CUDA is);
benchmarks/render.py turns measurements into markdown, and writes it only between a section's markers.
The rendering tests measure nothing: they render small hand-made measurements."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from conftest import CUDA_OFFERED, needs_cuda

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # spawned CRF workers inherit sys.path, so they find `run` too
import render  # noqa: E402
import run as bench  # noqa: E402


def needs_pydensecrf(test):
    """The baselines are pydensecrf's, as the targets are stated against it: such tests run with the
    cross-checks (`pytest -m crosscheck`) and skip where pydensecrf is not installed."""
    missing = importlib.util.find_spec("pydensecrf") is None
    return pytest.mark.crosscheck(pytest.mark.skipif(missing, reason="pydensecrf is not installed")(test))


SMALL = ["--images", "3", "--rounds", "1", "--size", "80x64", "--tune-images", "1", "--tune-sizes", "64x48,56x48",
         "--tune-rounds", "2"]


def run_script(*args, cwd, script="run.py"):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


HAND_WRITTEN = "# Notes\n\nWritten by hand, kept as it is.  \n\n"


@needs_pydensecrf
@pytest.mark.slow
def test_the_report_holds_every_row_and_check(tmp_path):
    (tmp_path / "report.md").write_text(f"{HAND_WRITTEN}<!-- begin: run -->\n<!-- end: run -->\n{HAND_WRITTEN}")
    done = run_script(*SMALL, "--json", "report.json", "--markdown", "report.md", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    # The report went between the markers; the text around them is the same.
    assert report.startswith(f"{HAND_WRITTEN}<!-- begin: run -->\n")
    assert report.endswith(f"\n<!-- end: run -->\n{HAND_WRITTEN}")
    # The measurements kept as JSON render to the same section.
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["benchmark"] == "run" and data["runs"]["serial"]["images"] == 3
    assert render.run_markdown(data) in report
    for row in ("| deeplab segment |", "| deeplab segment --no-crf |", "| serial baseline (ORT + pydensecrf) |",
                "| network alone (ORT CPU,", "| numpy float32 matmul", "eager + pydensecrf |"):
        assert row in report, row
    # The labels of every pipeline are checked against the serial path's, and agree.
    assert "| labels: segment == serial, CRF on | 100.00% | >= 99.9% | PASS |" in report
    assert "| labels: segment --no-crf == serial argmax | 100.00% | >= 99.9% | PASS |" in report
    assert "| labels: segment --crf-backend pydensecrf == serial | 100.00% | >= 99.9% | PASS |" in report
    for row in ("| deeplab segment --crf-backend pydensecrf |", "| deeplab crf tune --crf-backend pydensecrf |",
                "| deeplab crf tune --crf-backend numba |"):
        assert row in report, row
    # crf tune at each size; the first against the target, the second reported.
    for size in ("64x48", "56x48"):
        assert f"| crf tune, {size}: the same table with either backend | 100.00% | >= 100% | PASS |" in report
    assert "| crf tune, default grid, 64x48: numba / pydensecrf |" in report
    # Both backends' tune rows keep the faster of their two runs, and say so.
    for backend in ("pydensecrf", "numba"):
        line = next(line for line in report.splitlines()
                    if line.startswith(f"| deeplab crf tune --crf-backend {backend} |") and "64x48" in line)
        times = [float(t) for t in line.split("fastest of ")[1].split(" s")[0].split(", ")]
        seconds_per_image = float(line.split("|")[3])  # one image
        # The note rounds to 0.1 s, the column to 1 ms.
        assert len(times) == 2 and abs(seconds_per_image - min(times)) <= 0.0505, line
    assert "The `crf tune` rows keep the fastest of 2 runs, the backends going first in turn." in report
    assert "crf tune, default grid, 56x48: numba / pydensecrf" in report
    # The CRF alone per backend, bit-identical to pydensecrf.
    for row in ("| pydensecrf2 1.1 (1 thread) |", "| numba, 1 thread |", "| numba, 2 threads |"):
        assert row in report, row
    assert "| CRF labels == pydensecrf, least over the photos | 100.00% | >= 99.99% | PASS |" in report
    assert "| CRF max abs dQ against pydensecrf (lower is better) | 0.00 | < 1e-05 | PASS |" in report
    assert "numba compile, cold (empty cache)" in report
    assert "| onnx graph, CPU provider, all cores |" in report
    for check in ("onnx graph (CPU provider): labels == pydensecrf", "onnx graph (CPU provider): max abs dQ"):
        line = next(line for line in report.splitlines() if line.startswith(f"| {check}"))
        assert line.endswith("| PASS |"), line
    assert f"PYTHONPATH=src python benchmarks/run.py {' '.join(SMALL)}" in report
    assert "3 JPEGs" in report and "3 at 80x64, 0 at 64x80" in report
    gpu_checks = ("GPU network float16, images/s", "segment --device cuda, CRF on the GPU, images/s",
                  "segment --device cuda / the same with the CRF on every CPU core",
                  "segment --device cuda --crf-backend numba / CRF alone on every core")
    for check in gpu_checks:
        line = next(line for line in report.splitlines() if line.startswith(f"| {check}"))
        assert line.endswith("| SKIP |") != CUDA_OFFERED, line


def test_zero_tune_rounds_is_a_usage_error(tmp_path):
    done = run_script("--tune-rounds", "0", cwd=tmp_path)
    assert done.returncode == 2
    assert "--rounds and --tune-rounds must be at least 1" in done.stderr.splitlines()[-1]


def test_a_third_tune_size_is_a_usage_error(tmp_path):
    done = run_script("--tune-sizes", "500x375,160x120,80x60", cwd=tmp_path)
    assert done.returncode == 2
    assert "--tune-sizes takes one or two sizes" in done.stderr.splitlines()[-1]


@pytest.mark.skipif(CUDA_OFFERED, reason="CUDA is here")
def test_gpu_only_without_cuda_is_a_usage_error(tmp_path):
    done = run_script("--gpu-only", cwd=tmp_path)
    assert done.returncode == 2
    assert "--gpu-only: onnxruntime has no CUDAExecutionProvider here" in done.stderr.splitlines()[-1]


@needs_cuda
@needs_pydensecrf
@pytest.mark.slow
def test_gpu_only_report_on_cuda(tmp_path):
    done = run_script(*SMALL, "--gpu-only", "--json", "report.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rendered = run_script("report.json", cwd=tmp_path, script="render.py")
    assert rendered.returncode == 0, rendered.stderr
    report = rendered.stdout  # the run-gpu section, markers included, as benchmarks/gpu/device.sh keeps it
    assert report.startswith("<!-- begin: run-gpu -->\n") and report.endswith("\n<!-- end: run-gpu -->\n")
    # Other convolution kernels than the CPU's: the benchmark's own bound, not bit-identity.
    assert "| labels: segment --device cuda == serial (CPU), CRF on |" in report
    for line in report.splitlines():
        if line.startswith("| labels: segment --device cuda"):
            assert line.endswith("| >= 99.9% | PASS |"), line
    assert "| segment / serial baseline (steady state) | - |  | SKIP |" in report  # a CPU row, left out
    assert "| labels: segment --device cuda --crf-backend numba == serial (CPU) |" in report
    assert "| everything: lattices and packing on the host threads, overlapped with the graph |" in report
    for check in ("CRF on the GPU: labels == pydensecrf", "CRF on the GPU: max abs dQ"):
        line = next(line for line in report.splitlines() if line.startswith(f"| {check}"))
        assert line.endswith("| PASS |"), line


def test_crf_alone_runs_every_image_in_workers(onnx_model, tmp_path):
    paths = bench.make_images(tmp_path / "images", 2, seed=0, size=(48, 64))
    run = bench.crf_alone(paths, onnx_model, cores=2, count=5)
    assert run.images == 5 and run.seconds > 0


def test_copies_keep_the_originals_names_and_link_the_rest(tmp_path):
    paths = bench.make_images(tmp_path / "images", 3, seed=0, size=(48, 64))
    linked = bench.copies(paths, tmp_path / "more", 7)
    assert [p.name for p in linked] == ["img_000.jpg", "img_001.jpg", "img_002.jpg", "img_000_copy1.jpg",
                                        "img_001_copy1.jpg", "img_002_copy1.jpg", "img_000_copy2.jpg"]
    assert all(p.read_bytes() == paths[i % 3].read_bytes() for i, p in enumerate(linked))
    assert len(bench.copies(paths, tmp_path / "fewer", 2)) == 3  # never fewer than the originals


def test_sizes_are_width_by_height(tmp_path):
    assert bench.size_argument("500x375") == (375, 500)
    assert bench.sizes_argument("500x375,160x120") == [(375, 500), (120, 160)]
    paths = bench.make_images(tmp_path / "images", 6, seed=0, size=(48, 64))
    shapes = [cv2.imread(str(p)).shape[:2] for p in paths]
    assert shapes == [(48, 64)] * 5 + [(64, 48)]
    for bad in ("500", "axb", "40x300"):
        with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT|at least 48"):
            bench.size_argument(bad)


# ---------------------------------------------------------------- rendering: markdown from measurements


def a_run(name, images, seconds, note="", stages=None, gflops=None, others=0.0):
    return {"name": name, "images": images, "seconds": seconds, "stages": stages or {}, "note": note,
            "gflops": gflops, "others": others}


SMALL_RUN = {
    "benchmark": "run", "command": "python benchmarks/run.py --images 4", "gpu_only": False,
    "machine": ["CPU: test, 2 logical cores"], "images": "4 JPEGs", "rounds": 3, "tune_rounds": None,
    "runs": {
        # Out of the report's order on purpose: the table keeps its own.
        "blas": a_run("numpy float32 matmul (best of 2048², 3072²)", 0, 0.0, "the reference rate", gflops=200.0),
        "segment": a_run("deeplab segment", 3, 1.5, "steady state", {"network": 1.0, "crf": 0.5}),
        "segment raw": a_run("  same, raw (incl. start-up)", 4, 4.0, "4 images in 4.0 s", others=0.01),
        "serial": a_run("serial baseline (ORT + pydensecrf)", 4, 4.0, "one process",
                        {"decode": 0.05, "network": 2.0, "crf": 1.9, "write": 0.05}),
        "network": a_run("network alone (ORT CPU, 2 threads)", 4, 2.0, "185.9 GFLOP per image", gflops=180.0),
    },
    "agreement": {"segment": 1.0, "no-crf": 0.5}, "notes": ["GPU rows skipped: no CUDA here"],
    "tune_sizes": [], "tune_same": {}, "crf": None, "gpu_crf": None,
}

SMALL_CRF = {
    "benchmark": "crf", "command": "python benchmarks/crf.py --images 1 --device cpu", "images": ["chelsea"],
    "width": 500, "height": 375, "labels": 21, "iters": 10, "rounds": 2,
    "rows": [{"name": "pydensecrf2 1.1 (1 thread)", "setup": 0.1, "per_iteration": 0.045, "per_image": 0.55,
              "speedup": 1.0, "labels": 1.0, "max_dq": 0.0},
             {"name": "numba, 1 thread", "setup": 0.043, "per_iteration": 0.0171, "per_image": 0.214,
              "speedup": 2.5700, "labels": 0.99995, "max_dq": 2.5e-7}],
    "compile": {"cold_import": 0.29, "cold_warm": 8.65, "cached_import": 0.27, "cached_warm": 0.38},
    "graph": {"device": "cpu", "batch": 4, "threads": 2, "images": 8, "per_image": 2.0291, "graph": 2.4241,
              "host": 0.0972, "labels": 1.0, "max_dq": 6.3e-6, "reference": "pydensecrf", "deterministic": True},
}


def test_run_measurements_render_as_the_expected_tables():
    markdown = render.sections(SMALL_RUN)["run"]
    assert "\n".join([
        "| run | images/s | s/image | GFLOP/s | others | note |",
        "|---|---|---|---|---|---|",
        "| deeplab segment | 2.000 | 0.500 |  | 0% | steady state |",
        "| same, raw (incl. start-up) | 1.000 | 1.000 |  | 1% | 4 images in 4.0 s |",
        "| serial baseline (ORT + pydensecrf) | 1.000 | 1.000 |  | 0% | one process |",
        "| network alone (ORT CPU, 2 threads) | 2.000 | 0.500 | 180.0 | 0% | 185.9 GFLOP per image |",
        "| numpy float32 matmul (best of 2048², 3072²) |  |  | 200.0 | 0% | the reference rate |",
    ]) in markdown
    for check in ("| segment / serial baseline (steady state) | 2.00 | >= 1.5 | PASS |",
                  "| segment / PyTorch eager (steady state) | - |  | SKIP |",
                  "| network GFLOP/s / numpy matmul GFLOP/s | 0.90 | >= 0.85 | PASS |",
                  "| time outside network + CRF (serial baseline) | 2.50% | < 5% | PASS |",
                  "| GPU network float16, images/s | - |  | SKIP |",
                  "| labels: segment == serial, CRF on | 100.00% | >= 99.9% | PASS |",
                  "| labels: segment --no-crf == serial argmax | 50.00% | >= 99.9% | FAIL |",
                  "| labels: segment --crf-backend pydensecrf == serial | - |  | SKIP |"):
        assert f"\n{check}\n" in markdown, check
    assert markdown.startswith("Each row is the fastest of 3 rounds.\n")
    assert "```sh\nPYTHONPATH=src python benchmarks/run.py --images 4\n```" in markdown
    assert "- CPU: test, 2 logical cores\n- 4 JPEGs\n" in markdown
    assert "\n- segment / serial, raw (start-up included): 1.00\n" in markdown
    assert "\n- GPU rows skipped: no CUDA here\n" in markdown
    assert "WARNING" not in markdown  # no row saw other processes above 5% of the cores
    assert render.sections({**SMALL_RUN, "gpu_only": True}).keys() == {"run-gpu"}
    text = render.run_text(SMALL_RUN)  # the terminal's report, from the same rows
    assert "\ndeeplab segment" + " " * 30 + "2.000     0.500" in text
    assert text.endswith("\ncommand: python benchmarks/run.py --images 4")


def test_crf_measurements_render_as_the_expected_tables():
    bodies = render.sections(SMALL_CRF)
    assert bodies["crf"] == "\n".join([
        "Measured by `PYTHONPATH=src python benchmarks/crf.py --images 1 --device cpu`:",
        "",
        "Dense CRF alone, 1 image 500x375 (chelsea), 21 labels, 10 iterations, DeepLab-LargeFOV settings; "
        "best of 2 rounds, mean per image.",
        "",
        "| backend | setup ms | per iteration ms | per image ms | speed-up | labels identical (least) | max abs dQ |",
        "|---|---|---|---|---|---|---|",
        "| pydensecrf2 1.1 (1 thread) | 100 | 45.0 | 550 | 1.00x | 100.0000% | 0.0e+00 |",
        "| numba, 1 thread | 43 | 17.1 | 214 | 2.57x | 99.9950% | 2.5e-07 |",
        "",
        "numba compile, cold (empty cache): import 0.29 s + warm() 8.65 s; cached: import 0.27 s + warm() 0.38 s",
    ])
    assert bodies["crf-graph-cpu"] == "\n".join([
        "Measured by `PYTHONPATH=src python benchmarks/crf.py --images 1 --device cpu`:",
        "",
        "| onnx graph on cpu, batches of 4, 2 host threads | per image ms |",
        "|---|---|",
        "| everything: lattices and packing on the host threads, overlapped with the graph | 2029.1 |",
        "| the graph alone, probabilities sent from the host | 2424.1 |",
        "| host work of one image on one thread (lattices, packing) | 97.2 |",
        "",
        "labels equal to pydensecrf's (least over the photos): 100.0000%; max abs dQ 6.3e-06; the same bits when "
        "run again: yes",
    ])
    assert render.sections({**SMALL_CRF, "graph": None}).keys() == {"crf"}


def cells(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]


def test_int8_measurements_render_as_the_expected_tables():
    data = {"benchmark": "int8", "command": "python benchmarks/int8.py --images 4", "machine": ["CPU: x", "Python y"],
            "fast_int8_cpu": False, "cores": 2, "quantize_seconds": 14.6, "calibration_images": 8,
            "network": {"1": {"fp32": 1.6, "int8": 0.4}, "2": {"fp32": 0.8, "int8": 0.25}},
            "segment": {"fp32": {"rate": 0.5, "raw_seconds": 10.0, "images": 4},
                        "int8": {"rate": 0.9, "raw_seconds": 6.0, "images": 4}},
            "agreement": 0.9712, "agreement_min": 0.955}
    intro, machine, table, checks, notes = render.sections(data)["int8"].split("\n\n")
    assert intro == ("Measured by `PYTHONPATH=src python benchmarks/int8.py --images 4`; the CPU has no int8 dot "
                     "products (VNNI, AMX):")
    assert machine == "- CPU: x\n- Python y"
    assert cells(table)[2:] == [
        ["network alone, 1 thread", "1600 ms", "400 ms", "4.00x"],
        ["network alone, 2 threads", "800 ms", "250 ms", "3.20x"],
        ["deeplab segment, CRF on, 2 cores (steady state)", "0.50 img/s", "0.90 img/s", "1.80x"],
        ["same, raw (4 images, start-up included)", "10.0 s", "6.0 s", "1.67x"]]
    assert cells(checks)[2:] == [["segment with the CRF, int8 / fp32", "1.80", ">= 1.6", "PASS"],
                                 ["labels equal to fp32's after the CRF", "97.12%", ">= 96%", "PASS"]]
    assert notes.splitlines()[0] == "- labels equal to fp32's after the CRF: 97.12% of pixels, 95.50% on the least equal image"


def test_densecrf_measurements_render_as_the_expected_table():
    data = {"benchmark": "densecrf", "command": "python benchmarks/densecrf.py --rounds 2", "machine": ["CPU: x"],
            "threads": 2, "rows": [
                {"normalization": "NORMALIZE_AFTER", "path": "fused kernels", "pydensecrf": 0.9,
                 "ours": {"1": 0.45, "2": 0.3}, "identical": True},
                {"normalization": "NORMALIZE_SYMMETRIC", "path": "general mean field", "pydensecrf": 0.9,
                 "ours": {"1": 0.9, "2": 0.5}, "identical": False}]}
    intro, machine, table = render.sections(data)["densecrf"].split("\n\n")
    assert intro == "Measured by `PYTHONPATH=src python benchmarks/densecrf.py --rounds 2`:" and machine == "- CPU: x"
    assert cells(table)[2:] == [
        ["NORMALIZE_AFTER", "fused kernels", "900 ms", "450 ms", "2.00x", "300 ms", "3.00x", "yes"],
        ["NORMALIZE_SYMMETRIC", "general mean field", "900 ms", "900 ms", "1.00x", "500 ms", "1.80x", "NO"]]


def test_bigimage_and_memory_cap_measurements_render_as_the_expected_tables():
    bigimage = {"benchmark": "bigimage", "command": "python benchmarks/bigimage.py --small", "rows": [
        {"image": "24 MP JPEG", "step": "deeplab segment -j 0", "seconds": 2.9, "peak": 799.4, "error": None,
         "timings": {"load": 0.17, "network": 0.81, "crf": 0.73}},
        {"image": "24 MP JPEG", "step": "decode", "seconds": 0.12, "peak": 196.0, "baseline": 52.0, "agree": None,
         "note": "4 MB file", "error": None},
        {"image": "24 MP JPEG", "step": "labels, banded", "seconds": 0.51, "peak": 1248.0, "baseline": 66.0,
         "agree": 1.0, "note": "", "error": None},
        {"image": "400 MP PNG", "step": "labels, full map", "seconds": None, "peak": 78.0, "baseline": None,
         "agree": None, "note": "", "error": "MemoryError: Unable to allocate 31.3 GiB"},
    ]}
    body = render.sections(bigimage)["bigimage"]
    intro, table = body.split("\n\n")
    assert intro == "Measured by `PYTHONPATH=src python benchmarks/bigimage.py --small`:"
    assert len({len(line) for line in table.splitlines()}) == 1  # padded: every line as wide
    rows = cells(table)
    assert set("".join(rows.pop(1))) == {"-"}
    assert rows == [
        ["image", "step", "time", "peak RSS", "rise", "agree", "note"],
        ["24 MP JPEG", "deeplab segment -j 0", "2.90 s", "799 MB", "", "",
         "load 0.17, network 0.81, crf 0.73; outside network + CRF 0.17 s"],
        ["24 MP JPEG", "decode", "0.12 s", "196 MB", "144 MB", "", "4 MB file"],
        ["24 MP JPEG", "labels, banded", "0.51 s", "1,248 MB", "1,182 MB", "100.0000 %", ""],
        ["400 MP PNG", "labels, full map", "failed", "78 MB", "", "", "MemoryError: Unable to allocate 31.3 GiB"],
    ]
    memory = {"benchmark": "memory-cap", "command": "python benchmarks/memory_cap.py --images 2 --limits 1G",
              "images": 2, "cores": 2, "cgroup": "v2", "rows": [
                  {"limit": "1G", "workers": "1 worker instead of 2", "masks": 1, "exit": 1, "wall": 5.83,
                   "peak": 0.71 * 2**30, "oom_kills": 0}]}
    assert render.sections(memory)["memory-cap"] == "\n".join([
        "Measured by `sudo PYTHONPATH=src python benchmarks/memory_cap.py --images 2 --limits 1G` "
        "(cgroup v2, 2 cores):",
        "",
        "| limit | workers | masks | exit | wall s | peak GiB | OOM kills |",
        "|---|---|---|---|---|---|---|",
        "| 1G | 1 worker instead of 2 | 1/2 | 1 | 5.8 | 0.71 | 0 |",
    ])


def test_the_recorded_command_leaves_out_where_results_go():
    argv = ["/x/benchmarks/run.py", "--images", "3", "--json", "a.json", "--markdown=B.md", "--size", "80x64"]
    assert render.measuring_command(argv) == "python benchmarks/run.py --images 3 --size 80x64"


# ---------------------------------------------------------------- rendering: only between the markers


# Hand-written text of every awkward kind: trailing blanks, CRLF lines, non-ASCII, a marker quoted in a
# sentence (not on a line of its own), no newline at the end.
DOCUMENT = ("# Benchmarks  \r\nHand-written, ΔQ ≤ 1e-3, `<!-- begin: crf -->` quoted.\n\n"
            "<!-- begin: run -->\nold run table\n<!-- end: run -->\n"
            "between\t\n\n<!-- begin: crf -->\r\nold crf table\n\n<!-- end: crf -->\n"
            "after, with no newline at the end")


def test_rendering_replaces_only_what_lies_between_the_markers(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_bytes(DOCUMENT.encode())
    render.write_sections(path, {"crf": "| new | table |\n"})
    text = path.read_bytes().decode()
    head, tail = DOCUMENT.split("<!-- begin: crf -->\r\n")[0], DOCUMENT.split("old crf table\n\n")[1]
    assert text == f"{head}<!-- begin: crf -->\r\n| new | table |\n{tail}"  # byte for byte around it
    assert "old run table" in text  # the other section untouched
    render.write_sections(path, {"crf": "| new | table |"})
    assert path.read_bytes().decode() == text  # rendering again changes nothing
    render.write_sections(path, {"run": "", "crf": "x"})  # an empty section keeps its two markers
    assert "<!-- begin: run -->\n<!-- end: run -->\nbetween\t\n\n<!-- begin: crf -->\r\nx\n<!-- end: crf -->" \
        in path.read_bytes().decode()


@pytest.mark.parametrize("text, message", [
    ("# Benchmarks\n\nno markers at all\n", "has no '<!-- begin: crf -->' line"),
    ("<!-- begin: crf -->\ntable\n", "has no '<!-- end: crf -->' line"),
    ("<!-- end: crf -->\n<!-- begin: crf -->\n", "'<!-- end: crf -->' comes before"),
    ("<!-- begin: crf -->\n<!-- end: crf -->\n<!-- begin: crf -->\n<!-- end: crf -->\n", "has 2 '<!-- begin"),
    ("text <!-- begin: crf -->\n<!-- end: crf -->\n", "has no '<!-- begin: crf -->' line"),
    ("<!-- begin: run -->\n<!-- begin: crf -->\n<!-- end: run -->\n<!-- end: crf -->\n", "inside another"),
])
def test_missing_or_broken_markers_are_refused_and_nothing_is_written(tmp_path, text, message):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(text)
    sections = {"crf": "new", **({"run": "new"} if "begin: run" in text else {})}
    with pytest.raises(render.MarkerError, match=message.replace("(", r"\(")):
        render.write_sections(path, sections)
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no temporary file left behind


def test_render_command_writes_between_markers_or_refuses_in_one_line(tmp_path):
    (tmp_path / "crf.json").write_text(json.dumps(SMALL_CRF))
    bare = tmp_path / "bare.md"
    bare.write_text("# hand-written only\n")
    done = run_script("crf.json", "--markdown", "bare.md", cwd=tmp_path, script="render.py")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("render.py: error: bare.md has no '<!-- begin: crf")
    assert bare.read_text() == "# hand-written only\n"

    marked = tmp_path / "marked.md"
    marked.write_text("top\n<!-- begin: crf -->\n<!-- end: crf -->\nbottom\n")
    done = run_script("crf.json", "--section", "crf", "--markdown", "marked.md", cwd=tmp_path, script="render.py")
    assert done.returncode == 0, done.stderr
    crf = render.sections(SMALL_CRF)["crf"]
    assert marked.read_text() == f"top\n<!-- begin: crf -->\n{crf}\n<!-- end: crf -->\nbottom\n"

    done = run_script("crf.json", cwd=tmp_path, script="render.py")  # no file: the sections, markers and all
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("<!-- begin: crf -->\nMeasured by ")
    assert "<!-- end: crf -->\n\n<!-- begin: crf-graph-cpu -->\n" in done.stdout
    done = run_script("crf.json", "--section", "bigimage", cwd=tmp_path, script="render.py")
    assert done.returncode == 2 and "no data for section(s) bigimage" in done.stderr


@pytest.mark.parametrize("script", ["run.py", "crf.py", "bigimage.py", "memory_cap.py", "int8.py", "densecrf.py"])
def test_a_benchmark_refuses_a_file_without_its_markers_before_measuring(tmp_path, script):
    bare = tmp_path / "BENCHMARKS.md"
    bare.write_text("# hand-written only\n")
    done = run_script("--markdown", "BENCHMARKS.md", cwd=tmp_path, script=script)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"{script}: error: BENCHMARKS.md has no '<!-- begin: ")
    assert bare.read_text() == "# hand-written only\n"


def test_benchmarks_md_has_a_marker_pair_for_every_section():
    render.require_sections(BENCHMARKS.parent / "BENCHMARKS.md",
                            ["run", "run-gpu", "crf", "crf-graph-cpu", "bigimage", "memory-cap", "int8", "densecrf"])
