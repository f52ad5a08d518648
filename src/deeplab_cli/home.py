"""Where deeplab-cli keeps what it downloads and compiles: DEEPLAB_HOME, else the user cache folder."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "DEEPLAB_HOME"


def cache_dir() -> Path:
    """The cache folder: models under `<name>/`, compiled kernels under `numba/`."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("deeplab-cli"))
