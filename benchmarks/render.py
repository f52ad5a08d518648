"""Benchmark measurements as markdown, put in their place in BENCHMARKS.md.

    python benchmarks/render.py run.json                            # its sections, markers included, on stdout
    python benchmarks/render.py run.json --markdown BENCHMARKS.md   # each section between its markers there
    python benchmarks/render.py crf.json --section crf --markdown BENCHMARKS.md

The measuring scripts (benchmarks/run.py, crf.py, bigimage.py, memory_cap.py, int8.py, densecrf.py)
write their measurements with `--json FILE` ('-': stdout); this turns them into markdown. Their own
`--markdown FILE` renders through this module too. A section lies between two lines of the file,

    <!-- begin: NAME -->
    <!-- end: NAME -->

and rendering replaces only what lies between them: every other byte of the file stays as it is. A
file without a section's pair is refused (nothing written, one line on stderr): add the markers where
the table belongs first. The sections, by the data that fills them:

    run             benchmarks/run.py              run-gpu         benchmarks/run.py --gpu-only
    crf             benchmarks/crf.py              crf-graph-DEV   benchmarks/crf.py --device DEV (cpu, cuda)
    bigimage        benchmarks/bigimage.py         memory-cap      benchmarks/memory_cap.py
    int8            benchmarks/int8.py             densecrf        benchmarks/densecrf.py

The standard library only: the tests render without measuring anything, and rendering needs neither
deeplab_cli nor numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

TARGETS = {"serial": 1.5, "pytorch": 1.6, "matmul": 0.85, "outside": 0.05, "labels": 0.999,
           "gpu fp16": 300.0, "crf bound": 0.9, "tune": 3.0, "crf 1 thread": 2.5, "crf 2 threads": 3.0,
           "crf labels": 0.9999, "crf dq": 1e-5, "compile": 10.0,
           "graph dq": 1e-3, "gpu crf ms": 10.0, "gpu segment": 100.0, "gpu vs cores": 5.0,
           "int8 segment": 1.6, "int8 labels": 0.96}
LABEL_CHECKS = {  # pipeline -> the check comparing its labels with the serial baseline's
    "segment": "labels: segment == serial, CRF on",
    "segment pydensecrf": "labels: segment --crf-backend pydensecrf == serial",
    "no-crf": "labels: segment --no-crf == serial argmax",
    "gpu segment": "labels: segment --device cuda == serial (CPU), CRF on",
    "gpu segment numba": "labels: segment --device cuda --crf-backend numba == serial (CPU)",
    "gpu no-crf": "labels: segment --device cuda --no-crf == serial (CPU) argmax",
}
RUN_ORDER = ("segment", "segment raw", "segment pydensecrf", "segment pydensecrf raw", "no-crf", "no-crf raw",
             "serial", "torch", "network", "tune before", "tune after", "tune small before", "tune small after",
             "gpu fp32", "gpu fp16", "crf cores", "gpu segment", "gpu segment raw", "gpu segment numba",
             "gpu segment numba raw", "gpu no-crf", "gpu no-crf raw", "blas", "mlas")
# benchmarks/crf.py's rows that the checks read, by name.
CRF_REFERENCE = "pydensecrf2 1.1 (1 thread)"
CRF_ONE_THREAD, CRF_TWO_THREADS = "numba, 1 thread", "numba, 2 threads"
CRF_GRAPH_CPU = "onnx graph, CPU provider, all cores"
OUTPUT_OPTIONS = ("--json", "--markdown")  # where results go, not what is measured


class MarkerError(Exception):
    """A file lacks a section's markers, or has them twice or in the wrong order."""


class DataError(Exception):
    """Measurements this module cannot render."""


# ---------------------------------------------------------------- markers


def begin_marker(name: str) -> str:
    return f"<!-- begin: {name} -->"


def end_marker(name: str) -> str:
    return f"<!-- end: {name} -->"


def _marker_span(text: str, name: str, where: str) -> tuple[int, int]:
    """(end of the begin line's marker, start of the end line) of section `name` in `text`."""
    found = {}
    for marker in (begin_marker(name), end_marker(name)):
        matches = list(re.finditer(rf"^{re.escape(marker)}[ \t]*\r?$", text, re.MULTILINE))
        if not matches:
            raise MarkerError(f"{where} has no '{marker}' line: add the pair '{begin_marker(name)}' ... "
                              f"'{end_marker(name)}' where the {name} section belongs (nothing was written)")
        if len(matches) > 1:
            raise MarkerError(f"{where} has {len(matches)} '{marker}' lines: keep one pair (nothing was written)")
        found[marker] = matches[0]
    begin, end = found[begin_marker(name)], found[end_marker(name)]
    if end.start() < begin.end():
        raise MarkerError(f"{where}: '{end_marker(name)}' comes before '{begin_marker(name)}' (nothing was written)")
    return begin.end(), end.start()


def replace_sections(text: str, bodies: dict[str, str], where: str = "the file") -> str:
    """`text` with each section's lines between its markers replaced by its body; every other character
    kept. Raises MarkerError (and changes nothing) when a section's markers are missing or ambiguous."""
    spans = sorted((_marker_span(text, name, where), name) for name in bodies)
    for ((_, end), _), ((start, _), name) in zip(spans, spans[1:]):
        if start < end:
            raise MarkerError(f"{where}: the {name} section starts inside another one (nothing was written)")
    pieces, done = [], 0
    for (start, end), name in spans:
        body = bodies[name].strip("\n")
        pieces += [text[done:start], "\n", body + "\n" if body else ""]
        done = end
    return "".join(pieces + [text[done:]])


def read_markdown(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise MarkerError(f"{path} does not exist: rendering fills the sections of an existing file "
                          "(without --markdown, the sections go to stdout)") from None
    except UnicodeDecodeError as e:
        raise MarkerError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): nothing was written") from None


def require_sections(path: Path, names) -> None:
    """Raise MarkerError unless `path` has one marker pair for each of `names`: checked before a
    benchmark spends minutes measuring what it could not write."""
    replace_sections(read_markdown(path), dict.fromkeys(names, ""), str(path))


def write_sections(path: Path, bodies: dict[str, str]) -> None:
    """Each section of `bodies` between its markers in `path`, the rest of the file byte for byte; the
    file is replaced whole (a temporary file renamed over it), or not at all."""
    text = replace_sections(read_markdown(path), bodies, str(path))
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(text.encode("utf-8"))
        os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def with_markers(name: str, body: str) -> str:
    return "\n".join([begin_marker(name), *([body.strip("\n")] if body.strip("\n") else []), end_marker(name)])


# ---------------------------------------------------------------- data in and out


def measuring_command(argv: list[str]) -> str:
    """`python benchmarks/SCRIPT ARGS` of this run, less the options that only say where results go."""
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in OUTPUT_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in OUTPUT_OPTIONS)):
            kept.append(arg)
    return shlex.join(["python", f"benchmarks/{Path(argv[0]).name}", *kept])


def save(target: str | Path, data: dict) -> None:
    """The measurements as JSON to `target` ('-': stdout)."""
    text = json.dumps(data, indent=1) + "\n"
    if str(target) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(target).write_text(text)


def load(source: str | Path) -> dict:
    try:
        data = json.loads(sys.stdin.read() if str(source) == "-" else Path(source).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{source}: {e}") from None
    if not isinstance(data, dict) or data.get("benchmark") not in RENDERERS:
        raise DataError(f"{source}: not a benchmark's measurements (no 'benchmark' key among "
                        f"{', '.join(RENDERERS)})")
    return data


def sections(data: dict) -> dict[str, str]:
    """{section name: markdown} of one benchmark's measurements."""
    return RENDERERS[data["benchmark"]](data)


def command_line(data: dict, prefix: str = "PYTHONPATH=src ") -> str:
    return f"{prefix}{data['command']}"


def output_arguments(parser: argparse.ArgumentParser, markdown_help: str) -> None:
    """The two options every measuring script takes: --json FILE and --markdown FILE (what it writes there
    in `markdown_help`); `deliver` acts on them."""
    parser.add_argument("--json", metavar="FILE", help="also write the measurements as JSON to FILE ('-': stdout)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help=markdown_help)


def refuse_without_sections(parser: argparse.ArgumentParser, path: Path | None, names) -> None:
    """A measuring script's first step with --markdown: exit (one line, status 2) unless `path` has a
    marker pair for each of `names`, before any minute is spent measuring."""
    if path is not None:
        try:
            require_sections(path, names)
        except MarkerError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")


def deliver(parser: argparse.ArgumentParser, data: dict, json_target: str | None, markdown: Path | None) -> None:
    """A measuring script's last step: the measurements to --json, their sections to --markdown. Should
    the markers have gone meanwhile, the measurements are kept in a file that the error names."""
    if json_target:
        save(json_target, data)
    if markdown is not None:
        try:
            write_sections(markdown, sections(data))
        except MarkerError as e:
            handle, kept = tempfile.mkstemp(prefix=f"{data['benchmark']}-", suffix=".json")
            os.close(handle)
            save(kept, data)
            parser.exit(2, f"{parser.prog}: error: {e}; the measurements are in {kept} (benchmarks/render.py)\n")


# ---------------------------------------------------------------- tables and checks


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.strip() for c in r) + " |" for r in rows])


def padded_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with its columns padded to one width, for reading as text too."""
    widths = [max(len(str(r[i])) for r in [*rows, header]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def check_row(name: str, value: float | None, target: float, higher: bool, percent: bool = False) -> list[str]:
    if value is None:
        return [name, "-", "", "SKIP"]
    shown = f"{100 * value:.2f}%" if percent else (f"{value:.1e}" if 0 < abs(value) < 0.01 else f"{value:.2f}")
    goal = f"{100 * target:g}%" if percent else f"{target:g}"
    ok = value >= target if higher else value < target
    return [name, shown, f"{'>=' if higher else '<'} {goal}", "PASS" if ok else "FAIL"]


# ---------------------------------------------------------------- benchmarks/crf.py


def crf_table(rows: list[dict]) -> list[str]:
    header = ["backend", "setup ms", "per iteration ms", "per image ms", "speed-up", "labels identical (least)",
              "max abs dQ"]
    cells = [[r["name"], f"{r['setup'] * 1e3:.0f}", f"{r['per_iteration'] * 1e3:.1f}", f"{r['per_image'] * 1e3:.0f}",
              f"{r['speedup']:.2f}x", f"{r['labels']:.4%}", f"{r['max_dq']:.1e}"] for r in rows]
    return markdown_table(header, cells).split("\n")


def crf_lines(crf: dict) -> list[str]:
    """The CRF alone per backend: what was measured, the table, the compile times."""
    count, rounds = len(crf["images"]), crf["rounds"]
    lines = [f"Dense CRF alone, {count} image{'s' * (count != 1)} {crf['width']}x{crf['height']} "
             f"({', '.join(crf['images'])}), {crf['labels']} labels, {crf['iters']} iterations, DeepLab-LargeFOV "
             f"settings; {f'best of {rounds} rounds' if rounds != 1 else 'one round'}, mean per image.", "",
             *crf_table(crf["rows"])]
    if crf.get("compile"):
        c = crf["compile"]
        lines += ["", f"numba compile, cold (empty cache): import {c['cold_import']:.2f} s + warm() "
                      f"{c['cold_warm']:.2f} s; cached: import {c['cached_import']:.2f} s + warm() "
                      f"{c['cached_warm']:.2f} s"]
    return lines


def graph_lines(r: dict) -> list[str]:
    """The onnx backend on one device (benchmarks/crf.py graph_rows)."""
    return [f"| onnx graph on {r['device']}, batches of {r['batch']}, {r['threads']} host threads | per image ms |",
            "|---|---|",
            f"| everything: lattices and packing on the host threads, overlapped with the graph | "
            f"{r['per_image'] * 1e3:.1f} |",
            f"| the graph alone, probabilities sent from the host | {r['graph'] * 1e3:.1f} |",
            f"| host work of one image on one thread (lattices, packing) | {r['host'] * 1e3:.1f} |",
            "",
            f"labels equal to {r['reference']}'s (least over the photos): {r['labels']:.4%}; max abs dQ "
            f"{r['max_dq']:.1e}; the same bits when run again: {'yes' if r['deterministic'] else 'NO'}"]


def crf_checks(crf: dict | None) -> list[list[str]]:
    """Speed-ups on one and two threads, labels and max |dQ| against pydensecrf, compile time."""
    if not crf:
        return []
    by_name = {row["name"]: row for row in crf["rows"]}
    exact = [row for row in crf["rows"] if row["name"] != CRF_GRAPH_CPU]
    checks = [
        check_row("CRF alone, 1 thread / pydensecrf", by_name[CRF_ONE_THREAD]["speedup"], TARGETS["crf 1 thread"],
                  True),
        check_row("CRF alone, 2 threads on one image / pydensecrf", by_name[CRF_TWO_THREADS]["speedup"],
                  TARGETS["crf 2 threads"], True),
        check_row("CRF labels == pydensecrf, least over the photos", min(r["labels"] for r in exact),
                  TARGETS["crf labels"], True, percent=True),
        check_row("CRF max abs dQ against pydensecrf (lower is better)", max(r["max_dq"] for r in exact),
                  TARGETS["crf dq"], False),
    ]
    if CRF_GRAPH_CPU in by_name:
        graph = by_name[CRF_GRAPH_CPU]
        checks += [check_row("onnx graph (CPU provider): labels == pydensecrf", graph["labels"],
                             TARGETS["crf labels"], True, percent=True),
                   check_row("onnx graph (CPU provider): max abs dQ (lower is better)", graph["max_dq"],
                             TARGETS["graph dq"], False)]
    if crf.get("compile"):
        checks.append(check_row("numba cold compile, s (lower is better)",
                                crf["compile"]["cold_import"] + crf["compile"]["cold_warm"], TARGETS["compile"], False))
    return checks


def gpu_crf_checks(graph: dict | None) -> list[list[str]]:
    if not graph:
        return []
    return [
        check_row("CRF on the GPU, ms per image, host work included (lower is better)", graph["per_image"] * 1e3,
                  TARGETS["gpu crf ms"], False),
        check_row("CRF on the GPU: labels == pydensecrf", graph["labels"], TARGETS["crf labels"], True, percent=True),
        check_row("CRF on the GPU: max abs dQ (lower is better)", graph["max_dq"], TARGETS["graph dq"], False),
    ]


def graph_section(data: dict) -> str:
    return "\n".join([f"Measured by `{command_line(data)}`:", "", *graph_lines(data["graph"])])


def crf_sections(data: dict) -> dict[str, str]:
    bodies = {"crf": "\n".join([f"Measured by `{command_line(data)}`:", "", *crf_lines(data)])}
    if data.get("graph"):
        bodies[f"crf-graph-{data['graph']['device'].split(':')[0]}"] = graph_section(data)
    return bodies


# ---------------------------------------------------------------- benchmarks/run.py


def rate(run: dict) -> float:
    return run["images"] / run["seconds"]


def ordered_runs(data: dict) -> dict[str, dict]:
    return {key: data["runs"][key] for key in RUN_ORDER if key in data["runs"]}


def run_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of every measured row."""
    rows = [[r["name"], f"{rate(r):.3f}" if r["images"] else "", f"{1 / rate(r):.3f}" if r["images"] else "",
             "" if r["gflops"] is None else f"{r['gflops']:.1f}",
             "" if r["others"] is None else f"{100 * r['others']:.0f}%", r["note"]]
            for r in ordered_runs(data).values()]
    return ["run", "images/s", "s/image", "GFLOP/s", "others", "note"], rows


def _ratio(runs: dict, a: str, b: str, gflops: bool = False) -> float | None:
    if a not in runs or b not in runs:
        return None
    return runs[a]["gflops"] / runs[b]["gflops"] if gflops else rate(runs[a]) / rate(runs[b])


def run_checks(data: dict) -> tuple[list[str], list[list[str]]]:
    """(header, checks) against the targets; a check whose rows were not measured (no GPU, or
    --gpu-only) reads SKIP."""
    runs = ordered_runs(data)
    stages = runs["serial"]["stages"]
    outside = sum(v for k, v in stages.items() if k not in ("network", "crf")) / sum(stages.values())
    sizes = data.get("tune_sizes") or ["-"]
    checks = [
        check_row("segment / serial baseline (steady state)", _ratio(runs, "segment", "serial"), TARGETS["serial"],
                  True),
        check_row("segment / PyTorch eager (steady state)", _ratio(runs, "segment", "torch"), TARGETS["pytorch"], True),
        check_row(f"crf tune, default grid, {sizes[0]}: numba / pydensecrf", _ratio(runs, "tune after", "tune before"),
                  TARGETS["tune"], True),
        *(check_row(f"crf tune, {size}: the same table with either backend", float(same), 1.0, True, percent=True)
          for size, same in data.get("tune_same", {}).items()),
        check_row("network GFLOP/s / numpy matmul GFLOP/s", _ratio(runs, "network", "blas", gflops=True),
                  TARGETS["matmul"], True),
        check_row("time outside network + CRF (serial baseline)", outside, TARGETS["outside"], False, percent=True),
        check_row("GPU network float16, images/s", rate(runs["gpu fp16"]) if "gpu fp16" in runs else None,
                  TARGETS["gpu fp16"], True),
        check_row("segment --device cuda, CRF on the GPU, images/s",
                  rate(runs["gpu segment"]) if "gpu segment" in runs else None, TARGETS["gpu segment"], True),
        check_row("segment --device cuda / the same with the CRF on every CPU core",
                  _ratio(runs, "gpu segment", "gpu segment numba"), TARGETS["gpu vs cores"], True),
        check_row("segment --device cuda --crf-backend numba / CRF alone on every core",
                  _ratio(runs, "gpu segment numba", "crf cores"), TARGETS["crf bound"], True),
        *(check_row(name, data["agreement"].get(key), TARGETS["labels"], True, percent=True)
          for key, name in LABEL_CHECKS.items()),
        *crf_checks(data.get("crf")),
        *gpu_crf_checks(data.get("gpu_crf")),
    ]
    return ["check", "value", "target", "result"], checks


def stage_line(run: dict) -> str:
    total = sum(run["stages"].values())
    return f"{run['name']}: " + ", ".join(f"{k} {v / run['images']:.3f} s ({100 * v / total:.1f}%)"
                                          for k, v in run["stages"].items())


def run_notes(data: dict) -> list[str]:
    runs = ordered_runs(data)
    notes = [stage_line(runs["serial"]), *([stage_line(runs["torch"])] if "torch" in runs else [])]
    if "segment" in runs:
        notes.insert(0, f"segment / serial, raw (start-up included): {_ratio(runs, 'segment raw', 'serial'):.2f}")
    if "tune small after" in runs:
        notes.append(f"crf tune, default grid, {data['tune_sizes'][1]}: numba / pydensecrf "
                     f"{_ratio(runs, 'tune small after', 'tune small before'):.2f} (no target: the start-up of numba "
                     "in each worker weighs on a run this short)")
    for key in ("segment", "gpu segment", "gpu segment numba"):
        if key in runs:
            images = runs[f"{key} raw"]["images"]
            notes.append(f"{runs[key]['name']} --json timings, summed: "
                         + ", ".join(f"{k} {v / images:.3f} s/img" for k, v in runs[key]["stages"].items()))
    notes += data.get("notes", [])
    if "torch" in data["agreement"]:
        notes.append(f"labels: PyTorch == serial on {100 * data['agreement']['torch']:.3f}% of pixels (other "
                     "convolution kernels, so not bit-identical)")
    notes.append("others: share of the machine's core time used by other processes during that row; the "
                 "reference rates are the best of many short products, so contention shows less in them")
    busiest = max((r["others"] or 0.0 for r in runs.values() if r["images"]), default=0.0)
    if busiest > 0.05:
        notes.append(f"WARNING: other processes used up to {100 * busiest:.0f}% of the cores during a row: the "
                     "machine was shared; rerun on a quiet one (or with more --rounds) before trusting the ratios")
    return notes


def run_markdown(data: dict) -> str:
    rounds = "measured once" if data["rounds"] == 1 else f"the fastest of {data['rounds']} rounds"
    tune = data.get("tune_rounds")
    lines = [f"Each row is {rounds}."
             + (f" The `crf tune` rows keep the fastest of {tune} runs, the backends going first in turn."
                if tune and tune != data["rounds"] else ""),
             "Measured by the command below (with the package installed, drop `PYTHONPATH=src`):",
             "", "```sh", command_line(data), "```", "",
             *[f"- {line}" for line in [*data["machine"], data["images"]]], "",
             markdown_table(*run_rows(data)), "", markdown_table(*run_checks(data)), ""]
    if data.get("crf"):
        lines += ["The CRF alone per backend:", "", *crf_lines(data["crf"]), ""]
    if data.get("gpu_crf"):
        lines += ["The CRF alone as an ONNX graph on the GPU:", "", *graph_lines(data["gpu_crf"]), ""]
    return "\n".join(lines + [f"- {line}" for line in run_notes(data)])


def run_text(data: dict) -> str:
    """The report as text, for the terminal."""
    lines = [text_table(*run_rows(data)), "", text_table(*run_checks(data)), ""]
    if data.get("crf"):
        lines += ["The CRF alone per backend:", *crf_lines(data["crf"]), ""]
    if data.get("gpu_crf"):
        lines += ["The CRF alone as an ONNX graph on the GPU:", *graph_lines(data["gpu_crf"]), ""]
    return "\n".join([*lines, *run_notes(data), "", f"command: {data['command']}"])


def run_sections(data: dict) -> dict[str, str]:
    return {"run-gpu" if data.get("gpu_only") else "run": run_markdown(data)}


# ---------------------------------------------------------------- benchmarks/bigimage.py and memory_cap.py


BIGIMAGE_HEADER = ["image", "step", "time", "peak RSS", "rise", "agree", "note"]


def bigimage_row(row: dict) -> list[str]:
    """One measured step: seconds, peak and baseline resident MB, agreement, a note or the error. A
    `deeplab segment` row (with its --json `timings`) notes its stages instead."""
    peak = f"{row['peak']:,.0f} MB" if row.get("peak") is not None else ""
    if "timings" in row:
        timings = row["timings"]
        outside = sum(timings.values()) - timings.get("network", 0) - timings.get("crf", 0)
        note = str(row["error"])[:90] if row.get("error") else (
            ", ".join(f"{k} {v:.2f}" for k, v in timings.items()) + f"; outside network + CRF {outside:.2f} s")
        return [row["image"], row["step"], f"{row['seconds']:.2f} s", peak, "", "", note]
    if row.get("error"):
        return [row["image"], row["step"], "failed", peak, "", "", str(row["error"])[:90]]
    rise = "" if row.get("baseline") is None else f"{row['peak'] - row['baseline']:,.0f} MB"
    agree = "" if row.get("agree") is None else f"{100 * row['agree']:.4f} %"
    return [row["image"], row["step"], f"{row['seconds']:.2f} s", peak, rise, agree, row.get("note", "")]


def bigimage_table(data: dict) -> str:
    return padded_table(BIGIMAGE_HEADER, [bigimage_row(row) for row in data["rows"]])


def bigimage_sections(data: dict) -> dict[str, str]:
    return {"bigimage": f"Measured by `{command_line(data)}`:\n\n{bigimage_table(data)}"}


def memory_cap_table(data: dict) -> str:
    rows = [[r["limit"], r["workers"], f"{r['masks']}/{data['images']}", str(r["exit"]), f"{r['wall']:.1f}",
             f"{r['peak'] / 2**30:.2f}", str(r["oom_kills"])] for r in data["rows"]]
    return markdown_table(["limit", "workers", "masks", "exit", "wall s", "peak GiB", "OOM kills"], rows)


def memory_cap_sections(data: dict) -> dict[str, str]:
    return {"memory-cap": f"Measured by `{command_line(data, 'sudo PYTHONPATH=src ')}` (cgroup {data['cgroup']}, "
                          f"{data['cores']} cores):\n\n{memory_cap_table(data)}"}


# ---------------------------------------------------------------- benchmarks/int8.py


def int8_table(data: dict) -> str:
    rows = []
    for threads, row in data["network"].items():
        rows.append([f"network alone, {threads} thread{'s' * (threads != '1')}", f"{row['fp32'] * 1e3:.0f} ms",
                     f"{row['int8'] * 1e3:.0f} ms", f"{row['fp32'] / row['int8']:.2f}x"])
    fp32, int8 = data["segment"]["fp32"], data["segment"]["int8"]
    rows.append([f"deeplab segment, CRF on, {data['cores']} cores (steady state)", f"{fp32['rate']:.2f} img/s",
                 f"{int8['rate']:.2f} img/s", f"{int8['rate'] / fp32['rate']:.2f}x"])
    rows.append([f"  same, raw ({fp32['images']} images, start-up included)", f"{fp32['raw_seconds']:.1f} s",
                 f"{int8['raw_seconds']:.1f} s", f"{fp32['raw_seconds'] / int8['raw_seconds']:.2f}x"])
    return markdown_table(["", "fp32", "int8", "int8 speed-up"], rows)


def int8_checks(data: dict) -> str:
    segment = data["segment"]
    rows = [check_row("segment with the CRF, int8 / fp32", segment["int8"]["rate"] / segment["fp32"]["rate"],
                      TARGETS["int8 segment"], higher=True),
            check_row("labels equal to fp32's after the CRF", data["agreement"], TARGETS["int8 labels"], higher=True,
                      percent=True)]
    return markdown_table(["check", "measured", "target", ""], rows)


def int8_sections(data: dict) -> dict[str, str]:
    vnni = {True: "has", False: "has no", None: "cannot tell whether it has"}[data["fast_int8_cpu"]]
    lines = [f"Measured by `{command_line(data)}`; the CPU {vnni} int8 dot products (VNNI, AMX):", "",
             *[f"- {line}" for line in data["machine"]], "", int8_table(data), "", int8_checks(data), "",
             f"- labels equal to fp32's after the CRF: {100 * data['agreement']:.2f}% of pixels, "
             f"{100 * data['agreement_min']:.2f}% on the least equal image",
             f"- `deeplab models quantize` on {data['calibration_images']} images: {data['quantize_seconds']:.0f} s, "
             "its own held-out measurement included"]
    return {"int8": "\n".join(lines)}


# ---------------------------------------------------------------- benchmarks/densecrf.py


def densecrf_sections(data: dict) -> dict[str, str]:
    threads = str(data["threads"])
    header = ["normalisation", "deeplab_cli.densecrf runs it on", "pydensecrf2, 1 thread", "ours, 1 thread",
              "speed-up", f"ours, {threads} threads", "speed-up", "Q bit-identical"]
    rows = [[r["normalization"], r["path"], f"{r['pydensecrf'] * 1e3:.0f} ms", f"{r['ours']['1'] * 1e3:.0f} ms",
             f"{r['pydensecrf'] / r['ours']['1']:.2f}x", f"{r['ours'][threads] * 1e3:.0f} ms",
             f"{r['pydensecrf'] / r['ours'][threads]:.2f}x", "yes" if r["identical"] else "NO"] for r in data["rows"]]
    lines = [f"Measured by `{command_line(data)}`:", "", *[f"- {line}" for line in data["machine"]], "",
             markdown_table(header, rows)]
    return {"densecrf": "\n".join(lines)}


RENDERERS = {"run": run_sections, "crf": crf_sections, "bigimage": bigimage_sections,
             "memory-cap": memory_cap_sections, "int8": int8_sections, "densecrf": densecrf_sections}


# ---------------------------------------------------------------- command line


def chosen_sections(sources: list[str], names: list[str] | None) -> dict[str, str]:
    bodies: dict[str, str] = {}
    for source in sources:
        bodies.update(sections(load(source)))
    if names:
        missing = [name for name in names if name not in bodies]
        if missing:
            raise DataError(f"no data for section(s) {', '.join(missing)}; the data fills {', '.join(bodies)}")
        bodies = {name: bodies[name] for name in names}
    return bodies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", help="measurements, as a benchmark's --json wrote them ('-': stdin)")
    parser.add_argument("--section", action="append", metavar="NAME",
                        help="render only this section (repeatable) [every section the data fills]")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="put each section between its markers in FILE, which must have them; without it, "
                             "the sections go to stdout with their markers")
    args = parser.parse_args(argv)
    try:
        bodies = chosen_sections(args.data, args.section)
        if args.markdown:
            write_sections(args.markdown, bodies)
        else:
            print("\n\n".join(with_markers(name, body) for name, body in bodies.items()))
    except (MarkerError, DataError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
