"""The fully connected CRF's mean field, bit-identical to pydensecrf2 1.1 with DeepLab's settings.

Same model as `deeplab_cli.crf.dense_crf`: unary -log max(p, float32 tiny) (`log_probs`), a Gaussian kernel
(sxy = pos_xy_std, Potts weight pos_w) and a bilateral kernel (sxy = bi_xy_std, srgb = bi_rgb_std,
Potts weight bi_w) on the RGB image, DIAG_KERNEL, NORMALIZE_AFTER, `iters` iterations. Every float32
operation is pydensecrf's, in its order: the lattices come from `deeplab_cli.crf.lattice`, splat, blur and
slice round as `Permutohedral::sseCompute` (or `seqCompute` for one or two labels), and the softmax
is `expAndNormalize` as compiled with Eigen 3.3.9 on SSE2: the cephes `pexp` on 4-float packets,
glibc's expf on the labels after the last full packet, and Eigen's packet order for the sum.

Layout: label-minor rows padded to a multiple of 8 floats. Working buffers start on a cache line, so
that no vector of a 96-byte row straddles two.

The compiled kernels are one of two sets that give the same float32 bits (tests/test_plain.py):
`deeplab_cli.crf.simd`, whose hand-written LLVM IR leans on numba's and llvmlite's internals, and
`deeplab_cli.crf.plain`, ordinary numba code, slower. `compiled()` chooses one per process, at first
use: the SIMD set where it compiles; where it does not (a numba or llvmlite whose internals it does
not know), the plain set, and one warning line says so. DEEPLAB_CRF_KERNELS=plain chooses the plain
set outright (`ir`, or unset: the SIMD set where it compiles); worker processes inherit it, and a
process that fell back passes `plain` on to the processes it starts, so a run warns once: the CLI
makes the choice before it starts workers.

An iteration is: splat, blur (one pass per lattice axis), then one fused pass over the pixels (both
slices, norms, compatibility, unary, softmax). On one thread and a large image the pass also splats
each pixel's Q as it goes, in pixel order as pydensecrf does; otherwise the pass writes Q and the
splat is a gather over the lattice's pixel-ordered CSR, which sums in the same order, so the result
never depends on the thread count. Threads are Python threads running numba
`nogil` kernels on slices of the pixels or lattice points (`threads.parallel_for`); each gather or
blur step covers both kernels' lattices at once. Working buffers live in a per-thread workspace
reused across iterations and images.

A grid of settings on one image (`grid`, for `deeplab crf tune`) computes the unary once and, per
distinct kernel widths, the lattices and the first iteration's splat and blur of the initial Q once.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from importlib.metadata import version
from types import ModuleType
from typing import Iterator, Protocol, Sequence

import numpy as np

from deeplab_cli.crf.lattice import Lattice, bilateral_features, build_lattice, gaussian_features
from deeplab_cli.crf.params import MIN_PROB
from deeplab_cli.crf.threads import Workspace, parallel_for, start_beside, workspace
from deeplab_cli import jit
from deeplab_cli.errors import UsageError

# Arrays of rows up to this many bytes are taken to stay in cache from one step to the next. Then
# one thread gathers Q (see `_filter`) rather than splat it in the pass: the gather writes each
# lattice row once instead of adding to it once per pixel (measured on one thread, 21 labels: 12%
# faster at 160x120, 1.8 MB of Q; as fast at 320x240, 7 MB; 12% slower at 500x375, 18 MB). And the
# gather and the blur do not prefetch the rows they read (measured: prefetching Q's rows makes the
# gather 5-50% slower at 160x120 and 4-9% faster at 500x375; prefetching the lattice's, the blur 7%
# slower with 3 MB of rows and 40% faster with 12.5 MB).
_CACHED_BYTES = 4 << 20
_MIN_PROB = np.float32(MIN_PROB)  # -log p only where p underflowed


# The compiled kernels, one set per process.
ENV = "DEEPLAB_CRF_KERNELS"
CHOICES = ("ir", "plain")

_log = logging.getLogger(__name__)
_lock = threading.RLock()  # reentrant: compiling the chosen set runs the engine, which asks for it
_chosen: ModuleType | None = None


def compiled() -> ModuleType:
    """The kernel set of this process (`simd` or `plain`), compiled: chosen, and
    each kernel compiled or loaded from numba's cache, on the first call.

    Raises UsageError when DEEPLAB_CRF_KERNELS is set to something other than `ir` or `plain`.
    """
    global _chosen
    with _lock:
        if _chosen is None:
            jit.configure_numba()  # before the kernels are imported: where numba caches them
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
                from deeplab_cli.crf import plain

                _chosen = plain
                run_every_kernel()
        return _chosen


def _load_ir() -> ModuleType:
    """The IR set, imported and compiled: raises whatever importing or compiling it raises."""
    global _chosen
    from deeplab_cli.crf import simd

    _chosen = simd  # for the engine that compiles it here, on this thread (the lock is held)
    run_every_kernel()
    return simd


def _fallback_message(error: Exception) -> str:
    """The one line that says the plain kernels replace the IR ones that failed with `error`."""
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"deeplab: the CRF's IR kernels do not compile on numba {version('numba')} / llvmlite "
            f"{version('llvmlite')} ({type(error).__name__}: {reason}); using its plain kernels: same "
            f"results, about 2x slower (set {ENV}=plain to choose them without trying)")


class CRFSettings(Protocol):
    """What the engine reads of `deeplab_cli.crf.CRFParams`."""

    bi_w: float
    bi_xy_std: float
    bi_rgb_std: float
    pos_w: float
    pos_xy_std: float
    iters: int


@dataclass(frozen=True)
class Kernels:
    """The two lattices of one image; they depend on the image and the three stds only."""

    height: int
    width: int
    gaussian: Lattice  # features (x, y) / pos_xy_std
    bilateral: Lattice  # features (x, y) / bi_xy_std, (r, g, b) / bi_rgb_std


_gaussian_memo: dict[tuple[int, int, float], Lattice] = {}  # the last image size's Gaussian lattice
_memo_lock = threading.Lock()


def prepare(image_rgb: np.ndarray, params: CRFSettings, threads: int = 1) -> Kernels:
    """Both lattices of an (H, W, 3) uint8 RGB image (the weights and iterations are not used).

    The Gaussian lattice depends only on (H, W, pos_xy_std): the last one is kept and reused.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image_rgb.shape} {image_rgb.dtype}")
    code = compiled()  # chosen before any buffer is in use: choosing runs a mean field of its own
    height, width = image_rgb.shape[:2]
    key = (height, width, float(np.float32(params.pos_xy_std)))
    with _memo_lock:
        gaussian = _gaussian_memo.get(key)
    if gaussian is None:
        gaussian = build_lattice(gaussian_features(height, width, params.pos_xy_std), threads, code)
        with _memo_lock:
            _gaussian_memo.clear()
            _gaussian_memo[key] = gaussian
    bilateral = build_lattice(bilateral_features(image_rgb, params.bi_xy_std, params.bi_rgb_std), threads, code)
    return Kernels(height, width, gaussian, bilateral)


def mean_field(kernels: Kernels, probs: np.ndarray, params: CRFSettings, threads: int = 1,
               unary_given: bool = False) -> np.ndarray:
    """Mean-field marginals Q, (C, H, W) float32, a view of a fresh (H*W, C) array (class fastest).

    probs: (C, H, W) float32 probabilities of the image `kernels` were prepared from. Uses
    params.pos_w, params.bi_w and params.iters (the stds are the kernels'). threads: threads used
    inside this one image; the result does not depend on it. iters == 0 returns probs renormalised.
    unary_given: probs holds -unary itself (pydensecrf's -U, C-contiguous), used as is instead of
    log max(p, tiny) (`deeplab_cli.densecrf`'s case).
    """
    _check_probs(probs, kernels.height, kernels.width)
    compiled()  # chosen before this thread's workspace is in use: choosing runs a mean field
    start = _Start(probs, threads, workspace(), unary_given)
    start.run(threads, initial_q=False)
    return _iterate(kernels, start, params, threads)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFSettings | None = None,
              threads: int = 1) -> np.ndarray:
    """`deeplab_cli.crf.dense_crf` computed by this engine: same arguments and (C, H, W) float32
    result, bit-identical, plus `threads`. params None means DeepLab-LargeFOV's (`CRFParams()`)."""
    if params is None:
        from deeplab_cli.crf.params import CRFParams

        params = CRFParams()
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    if threads <= 1 or int(params.iters) < 1:
        return mean_field(prepare(image, params, threads), probs, params, threads)
    # The unary and the initial Q need no lattice: a pool thread computes them while this one builds
    # the lattices, whose serial steps (hash insertion, norm) would leave it idle.
    _check_probs(probs, *image.shape[:2])
    compiled()  # chosen before this thread's workspace is in use: choosing runs a mean field
    start = _Start(probs, threads, workspace())
    started = start_beside(threads, start.run, 1, True)
    try:
        kernels = prepare(image, params, threads)
    finally:
        started()  # never leave it writing to this thread's workspace
    return _iterate(kernels, start, params, threads)


def grid(image: np.ndarray, probs: np.ndarray, settings: Sequence[CRFSettings],
         threads: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(index, `dense_crf(image, probs, settings[index], threads)`) for every setting, bit-identical,
    grouped by kernel widths (sigma_alpha, sigma_beta, sigma_gamma) in order of first appearance.

    The unary is computed once. The lattices depend on the image and the widths only, so each group
    builds them once (the paper's 288-setting grid has 48 groups) and only one group's are alive at a
    time. Every setting starts from the same Q = softmax(-unary), so a group also splats and blurs it
    once, for all its settings' first iteration. The buffers are the generator's own: other mean
    fields may run on this thread between two results.
    """
    _check_probs(probs, *image.shape[:2])
    compiled()  # chosen before the buffers are in use, as in dense_crf
    start = _Start(probs, threads, Workspace())
    start.run(threads, initial_q=False)
    groups: dict[tuple[float, float, float], list[int]] = {}
    for index, params in enumerate(settings):
        groups.setdefault((params.bi_xy_std, params.bi_rgb_std, params.pos_xy_std), []).append(index)
    for members in groups.values():
        kernels = prepare(image, settings[members[0]], threads)
        primed = None
        if any(int(settings[index].iters) > 0 for index in members):
            # Copied out of the buffers that each setting's iterations splat and blur in.
            primed = tuple(_copy(start.ws, f"primed{k}", blurred)
                           for k, blurred in enumerate(_prime(kernels, start, threads)))
        for index in members:
            yield index, _iterate(kernels, start, settings[index], threads, primed)


def _copy(ws: Workspace, name: str, array: np.ndarray) -> np.ndarray:
    """A copy of `array` in ws's buffer `name` (aligned, as the kernels' rows need to be fast)."""
    copy = ws.take(name, array.shape, array.dtype)
    np.copyto(copy, array)
    return copy


def _check_probs(probs: np.ndarray, height: int, width: int) -> None:
    """Refuse probs that are not (C >= 1, height, width) float32."""
    n_labels, h, w = probs.shape if probs.ndim == 3 else (0, -1, -1)
    if (h, w) != (height, width) or probs.dtype != np.float32:
        raise ValueError(f"probs must be (C, {height}, {width}) float32, got {probs.shape} {probs.dtype}")
    if n_labels < 1:
        raise ValueError("probs must have at least one class")


def _readonly(array: np.ndarray) -> np.ndarray:
    """array, made read-only (as a Lattice's arrays are: numba types them apart)."""
    array.flags.writeable = False
    return array


# Stand-ins for a lattice's arrays in the passes that use none (same numba types: no new compile).
_NO_OFFSETS = _readonly(np.zeros((0, 1), np.int32))
_NO_WEIGHTS = _readonly(np.zeros((0, 1), np.float32))
_NO_NORM = _readonly(np.zeros(0, np.float32))


class _Start:
    """What the mean fields of one image share whatever the settings: -unary, and Q's buffer, from
    the workspace `ws` (a thread's or a grid's own)."""

    def __init__(self, probs: np.ndarray, threads: int, ws: Workspace, unary_given: bool = False) -> None:
        self.probs = probs
        self.n_labels, self.height, self.width = probs.shape
        n = self.height * self.width
        code = compiled()
        self.row_width = -(-self.n_labels // code.LANES) * code.LANES
        self.seq = self.n_labels <= 2  # pydensecrf filters one or two labels with seqCompute
        self.ws = ws
        self.unary_given = unary_given
        if unary_given:
            self.log_p = probs.reshape(self.n_labels, n)
        else:
            self.p_floor = ws.take("p_floor", (self.n_labels, n))  # max(p, tiny)
            self.log_p = ws.take("log_p", (self.n_labels, n))  # its log: out of place, which vectorises
        self.neg_unary = ws.take("neg_unary", (n, self.row_width))
        # Rows of all pixels to gather from, or a chunk's rows that the pass splats as it goes.
        self.gather = threads > 1 or n * self.row_width * 4 <= _CACHED_BYTES
        self.rows = ws.take("q", (n, self.row_width) if self.gather else (code.CHUNK, self.row_width))
        self.no_out = np.empty((0, self.n_labels), np.float32)  # `mean_field_pass`'s out when not final
        self.has_initial_q = False

    def run(self, threads: int, initial_q: bool) -> None:
        """neg_unary = log max(p, tiny) (or the -unary given) in padded rows (`log_probs`' numbers) and, if `initial_q`
        (rows of all pixels), rows = softmax(-unary)."""
        n = self.height * self.width
        if not self.unary_given:
            np.maximum(self.probs.reshape(self.n_labels, n), _MIN_PROB, out=self.p_floor)
            parallel_for(compiled().log_columns, n, threads, self.p_floor, self.log_p)
        parallel_for(compiled().pad_rows, n, threads, self.log_p, self.neg_unary)
        if initial_q:
            _run_pass(self, threads, self.no_out, False)
            self.has_initial_q = True


def _run_pass(start: _Start, threads: int, out: np.ndarray, final: bool, kernels: Kernels | None = None,
              compat: tuple[np.float32, np.float32] = (np.float32(0), np.float32(0)),
              blurred: tuple[np.ndarray, np.ndarray] | None = None,
              splat: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """`mean_field_pass` over all pixels: Q = softmax(-unary) without `blurred`, else the mean-field
    update from the kernels' (Gaussian, bilateral) `blurred` lattices and Potts `compat`. Q goes to
    out if `final`, else to start.rows and, as the pass goes, onto the (Gaussian, bilateral) `splat`
    lattices if given. `kernels` None: no lattice is used."""
    rows = start.rows
    none = rows[:0]
    blurred = blurred or (none, none)
    splat = splat or (none, none)
    if kernels is None:
        args = [(_NO_OFFSETS, _NO_WEIGHTS, _NO_NORM, none, np.float32(0), np.float32(0), none)] * 2
    else:
        args = [(k.offsets, k.weights, k.norm, blurred[i], k.alpha, compat[i], splat[i])
                for i, k in enumerate((kernels.gaussian, kernels.bilateral))]
    parallel_for(compiled().mean_field_pass, start.height * start.width, threads, rows, rows.reshape(-1),
                 start.neg_unary, out, final, len(blurred[0]) > 0, start.seq, *args[0], *args[1])


def _splat_buffers(start: _Start, kernels: Kernels) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Each kernel's two (M+1, W) buffers in start's workspace, to splat and blur in turn; row 0
    (the missing neighbour) zero."""
    pairs = tuple(tuple(start.ws.take(f"{name}{k}", (lattice.n_points + 1, start.row_width)) for k in (0, 1))
                  for name, lattice in (("g", kernels.gaussian), ("b", kernels.bilateral)))
    for pair in pairs:
        for buffer in pair:
            buffer[0] = 0
    return pairs


def _splat_targets(start: _Start, pairs: tuple[tuple[np.ndarray, np.ndarray], ...],
                   busy: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Where the next pass splats Q as it goes: zeroed buffers that are not `busy` being sliced, or
    none when Q is gathered after the pass."""
    if start.gather:
        return None
    targets = tuple(_other(pair, blurred) for pair, blurred in zip(pairs, busy))
    for target in targets:
        target[1:] = 0
    return targets


def _prime(kernels: Kernels, start: _Start, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Iteration -1 of every setting: Q = softmax(-unary) (unless start has it), splatted and blurred
    on both lattices. Returns the (Gaussian, bilateral) blurred (M+1, W) lattices, which iteration 0
    slices, in buffers of `_splat_buffers`."""
    pairs = _splat_buffers(start, kernels)
    none = start.rows[:0]
    splat = _splat_targets(start, pairs, (none, none))
    if not start.has_initial_q:
        _run_pass(start, threads, start.no_out, False, kernels, splat=splat)
    start.has_initial_q = False  # the iterations overwrite it
    return _filter(start.rows, kernels, pairs, splat, start.seq, threads)


def _iterate(kernels: Kernels, start: _Start, params: CRFSettings, threads: int,
             primed: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Q after params.iters iterations, returned as `mean_field` does. primed: `_prime`'s result in
    buffers of their own, when several settings start from it; computed here if None."""
    out = np.empty((start.height * start.width, start.n_labels), np.float32)
    iters = int(params.iters)
    if iters == 0:
        _run_pass(start, threads, out, True)
    else:
        blurred = primed or _prime(kernels, start, threads)
        pairs = _splat_buffers(start, kernels)
        compat = (np.float32(-params.pos_w), np.float32(-params.bi_w))
        for it in range(iters):
            final = it == iters - 1
            splat = None if final else _splat_targets(start, pairs, blurred)
            _run_pass(start, threads, out if final else start.no_out, final, kernels, compat, blurred, splat)
            if not final:
                blurred = _filter(start.rows, kernels, pairs, splat, start.seq, threads)
    return out.T.reshape(start.n_labels, start.height, start.width)


def warm() -> None:
    """Choose the kernels and compile (or load from numba's cache) each once (`compiled`); call in
    worker initialisers."""
    compiled()


def run_every_kernel() -> None:
    """A mean field on a tiny image, which runs every kernel of the chosen set: compiles them (or loads
    them from numba's cache)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    params = SimpleNamespace(bi_w=4.0, bi_xy_std=121.0, bi_rgb_std=5.0, pos_w=3.0, pos_xy_std=3.0, iters=1)
    # One mean field runs every kernel: the pass's splat, used on large images, is a branch of its own.
    mean_field(prepare(image, params), rng.random((3, 5, 7), dtype=np.float32), params)


def _other(buffers: tuple[np.ndarray, np.ndarray], busy: np.ndarray) -> np.ndarray:
    """The buffer of the pair that `busy` (the lattice being sliced, if any, maybe neither) is not."""
    return buffers[1] if len(busy) and busy.ctypes.data == buffers[0].ctypes.data else buffers[0]


def _filter(q: np.ndarray, kernels: Kernels, pairs: tuple[tuple[np.ndarray, np.ndarray], ...],
            splat: tuple[np.ndarray, np.ndarray] | None, seq: bool, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Splat Q (unless `splat` holds both kernels' splats already) and blur both kernels; returns
    their (M+1, W) blurred lattices. Each step covers both lattices' points, so that threads meet
    once per step (gather, then blur axis by axis), not once per kernel and step.

    q: (N, W) Q when gathering; pairs: each kernel's two (M+1, W) buffers, row 0 zero.
    """
    code = compiled()
    g, b = kernels.gaussian, kernels.bilateral
    g_points, b_points = g.n_points, b.n_points
    if splat is None:
        splat = (pairs[0][0], pairs[1][0])
        parallel_for(code.gather_pair, g_points + b_points, threads, q, g_points, g.csr_start, g.csr_pixel,
                     g.csr_weight, splat[0], b.csr_start, b.csr_pixel, b.csr_weight, splat[1],
                     q.nbytes > _CACHED_BYTES)
    g_source, b_source = splat
    g_target, b_target = _other(pairs[0], g_source), _other(pairs[1], b_source)
    for axis in range(max(g.dims, b.dims) + 1):
        g_on, b_on = axis <= g.dims, axis <= b.dims
        split = g_points if g_on else 0
        parallel_for(code.blur_pair, split + (b_points if b_on else 0), threads, axis, split, g_source, g_target,
                     g.neighbours, b_source, b_target, b.neighbours, seq,
                     g_source.nbytes > _CACHED_BYTES, b_source.nbytes > _CACHED_BYTES)
        if g_on:
            g_source, g_target = g_target, g_source
        if b_on:
            b_source, b_target = b_target, b_source
    return g_source, b_source


def log_probs(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) probabilities -> (C, H*W) float32 log max(p, float32 tiny): the CRF's -unary.

    The log is cephes' logf (as Eigen's plog has it) in float32 operations of a fixed order, so the
    unary, and with it the CRF, is the same on every CPU and numpy release; numpy's float32 log is
    not (its SIMD code differs by instruction set, by up to 4 ulp here, against 0.8 for this one).
    NaN stays NaN and +inf stays inf.
    """
    values = np.maximum(probs.reshape(probs.shape[0], -1), _MIN_PROB, dtype=np.float32, order="C")
    out = np.empty_like(values)
    compiled().log_columns(0, values.shape[1], values, out)
    return out
