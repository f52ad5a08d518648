"""Which compiled kernels the numba CRF engine runs: one set per process, chosen at first use.

Two sets give the same float32 bits (tests/test_meanfield_plain.py): `deeplab_cli.meanfield_ir`, whose
hand-written LLVM IR leans on numba's and llvmlite's internals, and `deeplab_cli.meanfield_plain`,
ordinary numba code, slower. The IR set is used where it compiles; where it does not (a numba or
llvmlite whose internals it does not know), the plain set is, and one warning line says so. The
environment variable DEEPLAB_CRF_KERNELS=plain chooses the plain set outright (`ir`, or unset: the IR
set where it compiles); worker processes inherit it, and a process that fell back passes `plain` on to
the processes it starts, so a run warns once: the CLI makes the choice before it starts workers.
"""

from __future__ import annotations

import logging
import os
import threading
from importlib.metadata import version
from types import ModuleType

from deeplab_cli.errors import UsageError

ENV = "DEEPLAB_CRF_KERNELS"
CHOICES = ("ir", "plain")

_log = logging.getLogger(__name__)
_lock = threading.RLock()  # reentrant: compiling the chosen set runs the engine, which asks for it
_chosen: ModuleType | None = None


def kernels() -> ModuleType:
    """The kernel set of this process (`meanfield_ir` or `meanfield_plain`), compiled: chosen, and
    each kernel compiled or loaded from numba's cache, on the first call.

    Raises UsageError when DEEPLAB_CRF_KERNELS is set to something other than `ir` or `plain`.
    """
    global _chosen
    with _lock:
        if _chosen is None:
            choice = os.environ.get(ENV, "ir").strip().lower() or "ir"
            if choice not in CHOICES:
                raise UsageError(f"{ENV} must be one of {', '.join(CHOICES)}, got {os.environ[ENV]!r}")
            if choice == "ir":
                try:
                    _chosen = _load_ir()
                except Exception as error:  # whatever numba or llvmlite raise for IR they cannot compile
                    _chosen = None
                    _log.warning(_fallback_message(error))
                    # Processes started from here on (spawned workers) inherit the choice: no retry, no
                    # second warning.
                    os.environ[ENV] = "plain"
            if _chosen is None:
                from deeplab_cli import meanfield, meanfield_plain

                _chosen = meanfield_plain
                meanfield.run_every_kernel()
        return _chosen


def _load_ir() -> ModuleType:
    """The IR set, imported and compiled: raises whatever importing or compiling it raises."""
    global _chosen
    from deeplab_cli import meanfield, meanfield_ir

    _chosen = meanfield_ir  # for the engine that compiles it here, on this thread (the lock is held)
    meanfield.run_every_kernel()
    return meanfield_ir


def _fallback_message(error: Exception) -> str:
    """The one line that says the plain kernels replace the IR ones that failed with `error`."""
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"deeplab: the CRF's IR kernels do not compile on numba {version('numba')} / llvmlite "
            f"{version('llvmlite')} ({type(error).__name__}: {reason}); using its plain kernels: same "
            f"results, about 2x slower (set {ENV}=plain to choose them without trying)")
