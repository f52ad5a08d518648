"""Stopping a batch early without losing work: SIGTERM, Ctrl-C, or an output that can no longer be written.

SLURM, Kubernetes and systemd send SIGTERM some seconds before SIGKILL; a terminal sends SIGINT. While
`graceful()` is active, the first such signal only asks the batch to stop: it takes no new images,
lets the images in flight finish for up to `grace` seconds, and then abandons them by raising
`Abandoned` in the main thread (a second signal abandons at once). Outputs are written atomically, so
either way nothing half-written is left, and a rerun resumes where the batch stopped.

The state is per process, as signal handlers are: the pipeline and the worker pool ask
`requested()` before each new image.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Abandoned(BaseException):
    """The grace period ran out (or a second signal came): work in flight is dropped.

    A BaseException, like KeyboardInterrupt, so that no per-image `except Exception` turns it into one
    image's failure; `atomic_write` removes its temporary file on the way out."""


class _State:
    reason: str | None = None  # "SIGTERM", "SIGINT", or why the output cannot be written
    signum: int | None = None
    grace: float = 0.0


_state = _State()


def requested() -> bool:
    """Whether the current batch should take no new images."""
    return _state.reason is not None


def reason() -> str | None:
    return _state.reason


def exit_code() -> int | None:
    """128 + the signal number after a signal (143 for SIGTERM, 130 for Ctrl-C), as shells report a
    process killed by it; None when no signal stopped the batch."""
    return None if _state.signum is None else 128 + _state.signum


def request(why: str, signum: int | None = None) -> None:
    """Stop taking new images (the first reason given is kept)."""
    if _state.reason is None:
        _state.reason, _state.signum = why, signum


def _on_signal(signum, frame) -> None:
    if requested():
        raise Abandoned(f"{signal.Signals(signum).name} again")
    request(signal.Signals(signum).name, signum)
    # After the grace period, interrupt whatever the main thread waits on; timers run in their own thread,
    # and only the main thread may be interrupted, so the timer sends the signal that SIGALRM handles.
    if _state.grace > 0:
        signal.setitimer(signal.ITIMER_REAL, _state.grace)
    else:
        raise Abandoned(signal.Signals(signum).name)


def _on_alarm(signum, frame) -> None:
    raise Abandoned(f"grace period of {_state.grace:g} s over")


@contextmanager
def graceful(grace: float) -> Iterator[None]:
    """Handle SIGTERM and SIGINT as described above while the block runs (main thread only; elsewhere,
    and for library callers who do not use it, signals keep their usual effect)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, _on_alarm)
    _state.reason, _state.signum, _state.grace = None, None, grace
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)

