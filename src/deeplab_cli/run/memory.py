"""How much memory this process may still use, and how many lanes (worker processes) fit in it.

A lane holds an onnxruntime session and takes whole images through every stage, so the number of
lanes a machine can run is bounded by memory as well as by cores: a batch job given 4 GB must not
start eight 600 MB lanes and meet the OOM killer on its first large image.

Every reader takes the roots of /proc and /sys/fs/cgroup as parameters, so tests can hand it fake files.
"""

from __future__ import annotations

import math
from pathlib import Path

# cgroup v1 writes "no limit" as 2^63 minus a page (9223372036854771712); v2 writes "max".
_NO_LIMIT = 1 << 60

# A lane's footprint, measured on the 2-core Xeon these numbers were taken on (onnxruntime 1.32,
# random weights of the real LargeFOV shapes, one thread; peak RSS from /proc/self/status VmHWM):
# - Python with deeplab's imports ~100 MB; onnxruntime session of the 82 MB graph: 357 MB resident,
#   388 MB at its peak while loading -> SESSION_BYTES.
# - the network's activations (onnxruntime keeps its arena afterwards): +99 MB for a 342x513 working
#   image, +187 MB for 513x513 -> ~0.72 KB per working pixel.
# - the numba CRF: +105-125 MB of compiled code once per process, then +41 MB (342x513) to +110 MB
#   (513x513) while it runs -> ~0.42 KB per working pixel.
# - at the image's own size, with banded upsampling: the decoded image (3 B/pixel), the labels (1),
#   a colour or overlay output (6, transient) and the encoders' buffers: a 8000x8000 JPEG peaked
#   575 MB above a 513x513 one, 9.0 B/pixel; decoding a 20000x20000 PNG (740 MB file) peaked 3.0 GB
#   above the interpreter, 7.5 B/pixel. 12 B/pixel covers either.
# 24 MP photo with the CRF: 886 MB measured, 968 MB estimated.
SESSION_BYTES = 400 << 20
NETWORK_BYTES_PER_WORK_PIXEL = 720
CRF_BYTES = 125 << 20
CRF_BYTES_PER_WORK_PIXEL = 420
IMAGE_BYTES_PER_PIXEL = 12


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup/proc file; None when missing, unreadable, "max" or unlimited."""
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if not text.isdigit():
        return None  # "max" (v2 without a limit) or junk
    value = int(text)
    return None if value >= _NO_LIMIT else value


def _stat_field(path: Path, name: str) -> int:
    """A field of a memory.stat file, 0 when absent."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _own_cgroups(proc: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory-controller path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _inside(root: Path, path: str) -> list[Path]:
    """The cgroup directory of `path` under `root` and its ancestors up to `root`, innermost first.
    In a container the path is often the host's, absent from the container's mount (or outside it,
    "/../.."): then only `root`, which is the container's own cgroup."""
    own = root / path.lstrip("/")
    if ".." in Path(path).parts or not own.is_dir():
        return [root]
    chain = [own]
    while chain[-1] != root:
        chain.append(chain[-1].parent)
    return chain


def cgroup_headroom(proc: str | Path = "/proc", cgroup: str | Path = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's cgroup may still take before its memory limit: the least, over its own
    cgroup and every ancestor that has a limit, of limit - usage; None when no limit applies.

    cgroup v2: memory.max - memory.current. cgroup v1 (or a hybrid setup, where memory is a v1
    controller): memory.limit_in_bytes, and hierarchical_memory_limit in memory.stat for the
    ancestors', minus memory.usage_in_bytes. The inactive page cache (inactive_file) counts as free,
    as the kernel reclaims it before it kills anything.
    """
    proc, cgroup = Path(proc), Path(cgroup)
    v2, v1 = _own_cgroups(proc)
    headrooms = []
    for directory in _inside(cgroup, v2) if v2 is not None else []:
        limit, usage = _read_int(directory / "memory.max"), _read_int(directory / "memory.current")
        if limit is not None and usage is not None:
            headrooms.append(limit - usage + _stat_field(directory / "memory.stat", "inactive_file"))
    if not headrooms and v1 is not None:
        directory = _inside(cgroup / "memory", v1)[0]
        stat = directory / "memory.stat"
        limits = [value for value in (_read_int(directory / "memory.limit_in_bytes"),
                                      _stat_field(stat, "hierarchical_memory_limit") or None)
                  if value is not None and value < _NO_LIMIT]
        usage = _read_int(directory / "memory.usage_in_bytes")
        if limits and usage is not None:
            headrooms.append(min(limits) - usage + _stat_field(stat, "total_inactive_file"))
    return max(0, min(headrooms)) if headrooms else None


def meminfo_available(proc: str | Path = "/proc") -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable), in bytes."""
    try:
        for line in (Path(proc) / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file says kB and means KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(proc: str | Path = "/proc", cgroup: str | Path = "/sys/fs/cgroup") -> int | None:
    """Bytes this process may still allocate: the lesser of its cgroup's headroom and the machine's
    MemAvailable (a container's limit can exceed what the host has free); None when neither is known."""
    known = [value for value in (cgroup_headroom(proc, cgroup), meminfo_available(proc)) if value is not None]
    return min(known) if known else None


def lane_bytes(image_size: tuple[int, int], work_size: tuple[int, int], crf: bool = True) -> int:
    """Estimated peak memory of one lane taking an image of `image_size` (H, W) through the network at
    `work_size` (h, w), the CRF if `crf`, banded upsampling and the outputs (measured, see above)."""
    return SESSION_BYTES + (CRF_BYTES if crf else 0) + image_bytes(image_size, work_size, crf)


def image_bytes(image_size: tuple[int, int], work_size: tuple[int, int], crf: bool = True) -> int:
    """The part of `lane_bytes` that one image adds to a lane that has its session (and CRF code) already."""
    work_pixels = work_size[0] * work_size[1]
    total = NETWORK_BYTES_PER_WORK_PIXEL * work_pixels + IMAGE_BYTES_PER_PIXEL * image_size[0] * image_size[1]
    return total + (CRF_BYTES_PER_WORK_PIXEL * work_pixels if crf else 0)


def lanes_for(memory_bytes: int | None, per_lane_bytes: int, wanted: int) -> int:
    """How many of `wanted` lanes fit in `memory_bytes`, each taking `per_lane_bytes`: between 1 (one
    lane always runs; if even that does not fit, the image fails alone) and `wanted`. Unknown memory
    (None) gives `wanted`."""
    if wanted < 1:
        raise ValueError(f"wanted must be at least 1, got {wanted}")
    if per_lane_bytes < 1:
        raise ValueError(f"per_lane_bytes must be positive, got {per_lane_bytes}")
    if memory_bytes is None:
        return wanted
    return max(1, min(wanted, math.floor(memory_bytes / per_lane_bytes)))
