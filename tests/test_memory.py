from pathlib import Path

import pytest

from deeplab_cli.run.memory import (
    available_memory,
    cgroup_headroom,
    lane_bytes,
    lanes_for,
    meminfo_available,
)

GB = 1 << 30
V1_UNLIMITED = "9223372036854771712"


def fake_system(root: Path, cgroup_lines: list[str], files: dict[str, str], mem_available_kb: int | None = None):
    """(proc, cgroup) roots holding /proc/self/cgroup, /proc/meminfo and the given cgroup files."""
    proc, cgroup = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    cgroup.mkdir()
    (proc / "self" / "cgroup").write_text("".join(line + "\n" for line in cgroup_lines))
    if mem_available_kb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       65000000 kB\nMemFree:  100 kB\n"
                                      f"MemAvailable:   {mem_available_kb} kB\n")
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text + "\n")
    return proc, cgroup


def test_cgroup_v2_limit_minus_usage_plus_reclaimable_cache(tmp_path):
    proc, cgroup = fake_system(tmp_path, ["0::/job/step"], {
        "job/step/memory.max": str(4 * GB),
        "job/step/memory.current": str(1 * GB),
        "job/step/memory.stat": f"anon 100\ninactive_file {GB // 4}\nactive_file 5",
        "job/memory.max": "max",
        "job/memory.current": str(1 * GB),
    }, mem_available_kb=30 * GB // 1024)
    assert cgroup_headroom(proc, cgroup) == 3 * GB + GB // 4
    assert available_memory(proc, cgroup) == 3 * GB + GB // 4


def test_cgroup_v2_a_tighter_ancestor_wins(tmp_path):
    proc, cgroup = fake_system(tmp_path, ["0::/job/step"], {
        "job/step/memory.max": str(8 * GB),
        "job/step/memory.current": str(1 * GB),
        "job/memory.max": str(2 * GB),
        "job/memory.current": str(GB + GB // 2),
    })
    assert cgroup_headroom(proc, cgroup) == GB // 2


def test_cgroup_v2_in_a_container_uses_its_root(tmp_path):
    # The path is the host's; the container sees its own cgroup at the mount's root.
    proc, cgroup = fake_system(tmp_path, ["0::/../../kubepods/pod1"], {
        "memory.max": str(6 * GB), "memory.current": str(2 * GB)})
    assert cgroup_headroom(proc, cgroup) == 4 * GB


def test_cgroup_v2_without_a_limit_falls_back_to_meminfo(tmp_path):
    proc, cgroup = fake_system(tmp_path, ["0::/user.slice"], {
        "user.slice/memory.max": "max", "user.slice/memory.current": str(GB)}, mem_available_kb=12_000_000)
    assert cgroup_headroom(proc, cgroup) is None
    assert available_memory(proc, cgroup) == 12_000_000 * 1024


def test_cgroup_v1_limit(tmp_path):
    proc, cgroup = fake_system(tmp_path, ["4:memory:/slurm/job7", "3:cpu,cpuacct:/slurm/job7", "0::/"], {
        "memory/slurm/job7/memory.limit_in_bytes": str(16 * GB),
        "memory/slurm/job7/memory.usage_in_bytes": str(4 * GB),
        "memory/slurm/job7/memory.stat": f"cache 9\ntotal_inactive_file {GB}\n"
                                         f"hierarchical_memory_limit {V1_UNLIMITED}",
    }, mem_available_kb=100 * GB // 1024)
    assert cgroup_headroom(proc, cgroup) == 13 * GB
    assert available_memory(proc, cgroup) == 13 * GB


def test_cgroup_v1_hierarchical_limit_of_an_ancestor(tmp_path):
    proc, cgroup = fake_system(tmp_path, ["9:memory:/a/b"], {
        "memory/a/b/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/a/b/memory.usage_in_bytes": str(GB),
        "memory/a/b/memory.stat": f"hierarchical_memory_limit {3 * GB}",
    })
    assert cgroup_headroom(proc, cgroup) == 2 * GB


def test_cgroup_v1_unlimited_and_a_host_path_missing_from_the_mount(tmp_path):
    # This machine's case: the process's path is absent under the mount, whose root has no limit.
    proc, cgroup = fake_system(tmp_path, ["4:memory:/process_api/abc"], {
        "memory/memory.limit_in_bytes": V1_UNLIMITED, "memory/memory.usage_in_bytes": str(GB)},
        mem_available_kb=22_000_000)
    assert cgroup_headroom(proc, cgroup) is None
    assert available_memory(proc, cgroup) == 22_000_000 * 1024


def test_usage_over_the_limit_leaves_nothing(tmp_path):
    proc, cgroup = fake_system(tmp_path, ["0::/"], {"memory.max": str(GB), "memory.current": str(2 * GB)})
    assert cgroup_headroom(proc, cgroup) == 0


def test_nothing_readable(tmp_path):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    assert cgroup_headroom(proc, cgroup) is None
    assert meminfo_available(proc) is None
    assert available_memory(proc, cgroup) is None


def test_this_machine_reports_something_plausible():
    available = available_memory()
    assert available is None or 0 <= available < 1 << 50


def test_lanes_for():
    assert lanes_for(10 * GB, 2 * GB, 8) == 5
    assert lanes_for(10 * GB, 2 * GB, 3) == 3
    assert lanes_for(GB, 2 * GB, 8) == 1  # one lane always runs
    assert lanes_for(0, 2 * GB, 8) == 1
    assert lanes_for(None, 2 * GB, 8) == 8  # unknown memory: as many as wanted
    with pytest.raises(ValueError):
        lanes_for(GB, 0, 2)
    with pytest.raises(ValueError):
        lanes_for(GB, GB, 0)


def test_lane_bytes_grows_with_both_sizes_and_matches_the_measurements():
    photo = lane_bytes((4000, 6000), (342, 513))
    assert 850 << 20 < photo < 1100 << 20  # 886 MB measured for a 24 MP JPEG with the CRF
    assert lane_bytes((4000, 6000), (342, 513), crf=False) < photo
    assert lane_bytes((8000, 8000), (513, 513)) > lane_bytes((4000, 6000), (513, 513)) > photo
    scan = lane_bytes((20000, 20000), (513, 513))
    assert 4 * GB < scan < 7 * GB
