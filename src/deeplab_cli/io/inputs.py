"""Which files a batch processes, in which order, and where each one's outputs go.

Every input gets a `key`: its path relative to the deepest folder that holds all the inputs, without
its extension. Output trees mirror the input folders under that key, so two `img.png` files in
different folders never collide, and a rerun with the same inputs finds the same names (resume).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from deeplab_cli.errors import UsageError

# What a folder walk picks up; files named explicitly are tried whatever their extension.
IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .png .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm .jp2 .sr .ras .exr .hdr .pic".split()
)


@dataclass(frozen=True)
class Job:
    source: Path
    key: str  # posix relative path without extension, e.g. "cats/img_001"


def expand(paths: Iterable[str], recursive: bool = False) -> list[Path]:
    """Files named and image files inside folders named, de-duplicated, sorted by path.

    Hidden files and folders are skipped in walks (a killed run's temporary files start with '.').
    Files of any kind are listed (a FIFO or socket fails when loaded, with the reason).
    Paths that do not exist are kept: loading them fails with the reason, for that input alone.
    """
    found: set[Path] = set()
    for raw in paths:
        path = Path(os.path.abspath(raw))
        if not path.is_dir():
            found.add(path)
            continue
        # Symlinked folders are followed (datasets are often assembled from links); each real folder is
        # walked once, so a link back up the tree cannot loop.
        seen: set[tuple[int, int]] = set()
        _first_visit(path, seen)
        for root, dirs, files in os.walk(path, followlinks=True):
            wanted = [d for d in sorted(dirs) if not d.startswith(".")] if recursive else []
            dirs[:] = [d for d in wanted if _first_visit(Path(root, d), seen)]
            found.update(Path(root, f) for f in files
                         if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found)


def _first_visit(folder: Path, seen: set[tuple[int, int]]) -> bool:
    try:
        info = folder.stat()
    except OSError:  # a dangling link, or a loop of links: nothing to walk
        return False
    key = (info.st_dev, info.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def read_list(data: bytes, null: bool = False) -> list[str]:
    """Paths from a list as `find` prints it: one a line (CR LF too), or NUL-separated with `null`
    (`find -print0`), so that names holding newlines survive. Empty entries, and blank lines, are
    ignored. Bytes that are not UTF-8 keep the file's name as the OS has it (os.fsdecode)."""
    if null:
        entries = data.split(b"\0")
    else:
        entries = [line.removesuffix(b"\r") for line in data.split(b"\n") if line.strip()]
    return [os.fsdecode(entry) for entry in entries if entry]


def make_jobs(files: list[Path], roots: list[Path]) -> list[Job]:
    """Give each file its output key relative to the common folder of `roots`.

    `roots` are the folders named on the command line and the parents of the files named, so a
    single folder input maps `img/a/b.jpg` to `a/b`. Where dropping the extension would give two files
    one key (`a.jpg`, `a.png`; or `a.jpg.png` beside `a.jpg`), they keep it (`a.jpg`, `a.png`).
    """
    if not files:
        return []
    base = Path(os.path.commonpath([str(r) for r in roots]))
    rels = [f.relative_to(base) for f in files]
    stripped = Counter(rel.with_suffix("") for rel in rels)
    whole = set(rels)
    jobs = []
    for f, rel in zip(files, rels):
        short = rel.with_suffix("")
        # A short key is safe only if no other file strips to it and no file keeps it as its whole name.
        key = short if stripped[short] == 1 and short not in whole else rel
        jobs.append(Job(f, key.as_posix()))
    return jobs


def collect(paths: list[str], recursive: bool = False) -> list[Job]:
    files = expand(paths, recursive)
    named = [Path(os.path.abspath(raw)) for raw in paths]
    roots = [p if p.is_dir() else p.parent for p in named]
    return make_jobs(files, roots)


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' with 0 <= K < N -> (K, N). K counts from 0, as array task indices usually do."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, e.g. 0/4") from None
    if not 0 <= k < n:
        raise UsageError(f"--shard {text!r}: need 0 <= K < N (K counts from 0)")
    return k, n


def shard(jobs: list[Job], k: int, n: int) -> list[Job]:
    """The K-th of N disjoint slices of the sorted job list, dealt round-robin so slices stay even."""
    return jobs[k::n]


def gather(items: Iterable[str], recursive: bool = False, shard_text: str | None = None, null: bool = False,
           stdin: BinaryIO | None = None) -> list[Job]:
    """Jobs from paths and `-` (a list of paths read from `stdin`, NUL-separated with `null`), sharded
    as `shard_text` ("K/N") says."""
    paths: list[str] = []
    for item in items:
        paths.extend(read_list(stdin.read(), null) if item == "-" and stdin is not None else [item])
    jobs = collect(paths, recursive)
    if shard_text:
        jobs = shard(jobs, *parse_shard(shard_text))
    return jobs
