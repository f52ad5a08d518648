"""Numba's settings for the project's kernels: `configure_numba()`, called before a kernel module is imported
(`deeplab_cli.crf.meanfield.compiled`, `deeplab_cli.crf.lattice`, `deeplab_cli.model.upsample`).

Compiled kernels are cached under `<cache_dir()>/numba` (so a CLI run does not compile them again), and
LLVM's SLP vectoriser is on for straight-line float code; a user's NUMBA_CACHE_DIR or
NUMBA_SLP_VECTORIZE wins. Neither changes a result: without fast-math, LLVM neither reorders float
operations nor fuses a multiply and an add.
"""

import os
import sys


def configure_numba() -> None:
    """Set numba's cache folder and vectoriser; re-read its configuration if it was imported already."""
    from deeplab_cli.home import cache_dir

    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))
    os.environ.setdefault("NUMBA_SLP_VECTORIZE", "1")
    if "numba" in sys.modules:
        sys.modules["numba"].core.config.reload_config()
