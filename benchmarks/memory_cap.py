"""A default `deeplab segment` over 24-megapixel photos inside a real memory cgroup: every mask
written, nothing killed, the cap reported when it bites.

    sudo PYTHONPATH=src python benchmarks/memory_cap.py [--images 4] [--limits 3G 1G]   # ~3 min on 2 cores

Needs root and a cgroup v1 memory controller (/sys/fs/cgroup/memory) or cgroup v2 with the memory
controller enabled for a child group: the run is put in a fresh cgroup limited to each --limits value,
as SLURM (--mem), Kubernetes (resources.limits.memory) and Docker (--memory) do. The photos are
6000x4000 JPEGs; the model has random weights of the real shapes; the CRF is on. Per limit: the
workers `segment` chose (its stderr note when it capped them), masks written, exit code, wall time,
the cgroup's peak usage and how many times the kernel's OOM killer ran in it.

`--json FILE` keeps the measurements ('-': on stdout, the table then on stderr); `--markdown FILE`
writes the table between the `memory-cap` markers of FILE, leaving the rest of it as it is
(benchmarks/render.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import render  # benchmarks/render.py, beside this script

HERE = Path(__file__).resolve().parent
V1, V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


class Cgroup:
    """A fresh memory cgroup (v1 or v2) with a limit; its peak usage and OOM kills once the run is over."""

    def __init__(self, limit: int):
        name = f"deeplab-bench-{os.getpid()}-{limit}"
        self.v1 = (V1 / "memory.limit_in_bytes").exists()
        self.path = (V1 if self.v1 else V2) / name
        self.path.mkdir()
        if self.v1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swapping around it
        else:
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")

    def enter(self) -> None:
        """Runs in the child between fork and exec: the child and everything it starts belong here."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        return int((self.path / ("memory.max_usage_in_bytes" if self.v1 else "memory.peak")).read_text())

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in
                      (self.path / ("memory.oom_control" if self.v1 else "memory.events")).read_text().splitlines())
        return int(fields.get("oom_kill", 0))

    def remove(self) -> None:
        self.path.rmdir()


def capped_run(work: Path, text: str, env: dict) -> dict:
    """`deeplab segment` over work/photos in a fresh cgroup limited to `text` (3G, 512M, ...)."""
    cgroup = Cgroup(parse_bytes(text))
    command = [sys.executable, "-m", "deeplab_cli", "segment", str(work / "photos"),
               "--out", str(work / f"masks-{text}"), "-m", str(work / "model.onnx")]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=cgroup.enter)
    wall = time.perf_counter() - start
    masks = len(list((work / f"masks-{text}").glob("*.png")))
    note = next((line for line in done.stderr.splitlines() if "instead of" in line), "no cap: every core")
    row = {"limit": text, "workers": note.removeprefix("deeplab: "), "masks": masks, "exit": done.returncode,
           "wall": wall, "peak": cgroup.peak(), "oom_kills": cgroup.oom_kills()}
    cgroup.remove()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--limits", nargs="+", default=["3G", "1G"], help="memory limits to run under [3G 1G]")
    render.output_arguments(parser, "also write the table between the `memory-cap` markers of FILE, which must have them")
    args = parser.parse_args()
    render.refuse_without_sections(parser, args.markdown, ["memory-cap"])
    sys.path.insert(0, str(HERE))
    from bigimage import make_image, make_model  # noqa: PLC0415  (benchmarks/bigimage.py)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent / "src"), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="deeplab-memcap-") as tmp:
        work = Path(tmp)
        (work / "photos").mkdir()
        for i in range(args.images):
            make_image(work / "photos" / f"{i}.jpg", (4000, 6000), seed=i)
        make_model(work / "model.onnx")
        rows = [capped_run(work, text, env) for text in args.limits]
    data = {"benchmark": "memory-cap", "command": render.measuring_command(sys.argv), "images": args.images,
            "cores": os.cpu_count(), "cgroup": "v1" if (V1 / "memory.limit_in_bytes").exists() else "v2",
            "rows": rows}
    print(render.memory_cap_sections(data)["memory-cap"], file=sys.stderr if args.json == "-" else sys.stdout)
    render.deliver(parser, data, args.json, args.markdown)


if __name__ == "__main__":
    main()
