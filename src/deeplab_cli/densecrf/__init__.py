"""pydensecrf's Python API on deeplab_cli's own CRF engine: a program written for pydensecrf runs with
`import deeplab_cli.densecrf as dcrf` (and `deeplab_cli.densecrf.utils`) in place of pydensecrf's, and
gets pydensecrf2 1.1's results bit for bit, without a compiler, on any CPython the package supports.

    d = dcrf.DenseCRF2D(width, height, n_labels, threads=4)
    d.setUnaryEnergy(U)                          # (n_labels, width*height) float32
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
    Q = d.inference(5)                           # (n_labels, width*height) float32 ndarray

What is computed, what is exact and what raises: docs/crf.md ("The pydensecrf API"). In short: the
unary, any number of Gaussian, bilateral or `addPairwiseEnergy` terms (features of 1 to 6 dimensions),
every kernel type and normalisation, Potts, diagonal and matrix compatibilities, `inference` and the
`startInference` / `stepInference` pair, and `klDivergence`. A CRF of DeepLab's form (a Gaussian then a bilateral term,
Potts, NORMALIZE_AFTER) runs on the engine's fastest kernels (`deeplab_cli.crf.meanfield`); any other
on its general mean field (`deeplab_cli.crf.general`). Both are exact. Arguments pydensecrf refuses
raise `DenseCRFError`, a ValueError, as do CRFs the engine cannot compute exactly (features of more
than 6 dimensions, a logistic unary).

`threads` (a keyword of the constructors, or `setThreads`) sets how many threads one CRF uses;
results never depend on it. Unlike pydensecrf, Q's are numpy arrays, and `stepInference` ignores its
`tmp1` and `tmp2` (it needs no scratch of the caller's).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from numbers import Number
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from deeplab_cli.errors import DenseCRFError

MAX_FEATURES = 6  # the lattice's keys hold up to 6 coordinates (deeplab_cli.crf.lattice.MAX_DIMS)


class KernelType(enum.IntEnum):
    """pydensecrf's kernel types. They differ only when learning kernel parameters, which pydensecrf does
    not expose: inference gives the same result with each."""

    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


class NormalizationType(enum.IntEnum):
    """pydensecrf's normalisations of a kernel: none, of Q before filtering, of the messages after
    (DeepLab's), or both with the square root (pydensecrf's default)."""

    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = KernelType
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = NormalizationType

__all__ = ["CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "NORMALIZE_AFTER", "NORMALIZE_BEFORE",
           "NORMALIZE_SYMMETRIC", "NO_NORMALIZATION", "DenseCRF", "DenseCRF2D", "DenseCRFError", "KernelType",
           "NormalizationType"]


@dataclass(frozen=True)
class _Pairwise:
    """One term as added: (N, d) float32 features, compatibility (a float32-rounded Potts weight, an (M,)
    or an (M, M) float32 array), normalisation, and, for the engine's own terms, `engine`: ("gaussian",
    std) or ("bilateral", xy std, rgb std) when one std serves every axis."""

    features: np.ndarray
    compat: float | np.ndarray
    normalization: int
    engine: tuple[Any, ...] | None = None


class DenseCRF:
    """A fully connected CRF over `nvar` points and `nlabels` labels, as pydensecrf's `DenseCRF`.

    threads: threads one inference uses (default 1, as pydensecrf); `setThreads` changes it.
    """

    def __init__(self, nvar: int, nlabels: int, threads: int = 1) -> None:
        self._n, self._m = _count(nvar, "nvar"), _count(nlabels, "nlabels")
        self._pairwise: list[_Pairwise] = []
        self._terms: list[Any] = []  # deeplab_cli.crf.general.Term of each pairwise term, built when first needed
        self._neg_unary: np.ndarray | None = None  # (M, N) float32 -U
        self._threads = 1
        self.setThreads(threads)

    def setThreads(self, threads: int) -> None:
        """Use `threads` threads (>= 1) from now on; results do not depend on it."""
        self._threads = _count(threads, "threads")

    def setUnaryEnergy(self, u: np.ndarray, f: np.ndarray | None = None) -> None:
        """The unary: u, (nlabels, nvar) float32 energies (-log p). A logistic unary (f given) is not
        supported."""
        if f is not None:
            raise DenseCRFError("setUnaryEnergy(u, f): the logistic unary is not supported; pass energies "
                                "u alone")
        u = _float32(u, "unary energy", 2)
        if u.shape != (self._m, self._n):
            raise DenseCRFError(f"Bad shape for unary energy (Need {(self._m, self._n)}, got {u.shape})")
        self._neg_unary = np.ascontiguousarray(-u)

    def addPairwiseEnergy(self, features: np.ndarray, compat: Any, kernel: int = DIAG_KERNEL,
                          normalization: int = NORMALIZE_SYMMETRIC) -> None:
        """A term over (d, nvar) float32 features (1 <= d <= 6): the kernel exp(-|f_i - f_j|^2 / 2)."""
        features = _float32(features, "pairwise energy features", 2)
        if features.shape[1] != self._n:
            raise DenseCRFError(f"Bad shape for pairwise energy (Need (?, {self._n}), got {features.shape})")
        if not 1 <= features.shape[0] <= MAX_FEATURES:
            raise DenseCRFError(f"addPairwiseEnergy: features of dimension {features.shape[0]} are not "
                                f"supported (1 to {MAX_FEATURES}: the lattice's keys hold up to {MAX_FEATURES})")
        self._add(np.ascontiguousarray(features.T), compat, kernel, normalization)

    def inference(self, niter: int) -> np.ndarray:
        """Q after `niter` mean-field iterations from softmax(-unary): (nlabels, nvar) float32."""
        niter = _count(niter, "niter", minimum=0)
        settings = self._engine_settings(niter)
        if settings is not None:
            return self._engine_inference(settings)
        terms = self._built()
        rows = _general().mean_field(self._unary_rows(), self._m, terms, niter, threads=self._threads)
        return np.ascontiguousarray(rows[:, :self._m].T)

    def startInference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Q, tmp1, tmp2) for `stepInference`: Q = softmax(-unary), (nlabels, nvar) float32 (zeros
        without a unary, as pydensecrf's); tmp1 and tmp2 are empty placeholders."""
        empty = np.zeros((0, 0), np.float32)
        if self._neg_unary is None:
            return np.zeros((self._m, self._n), np.float32), empty, empty.copy()
        return self.inference(0), empty, empty.copy()

    def stepInference(self, Q: np.ndarray, tmp1: Any = None, tmp2: Any = None) -> None:
        """One mean-field iteration on Q, (nlabels, nvar) float32, in place. tmp1, tmp2: ignored."""
        self._check_q(Q, "stepInference")
        terms = self._built()
        rows = _general().mean_field(self._unary_rows(), self._m, terms, 1, _to_rows(Q), self._threads)
        Q[...] = rows[:, :self._m].T

    def klDivergence(self, Q: np.ndarray) -> float:
        """The KL divergence of marginals Q, (nlabels, nvar) float32, from the CRF's distribution (up to
        its constant), as pydensecrf's `DenseCRF::klDivergence`: sum Q log Q and sum unary * Q in double,
        each term's sum of Q * compat(K Q) in float32 in Eigen's order (`general.eigen_sum`). The
        double sums are numpy's (pairwise), pydensecrf's run in order: equal to about 1e-12 relative."""
        self._check_q(Q, "klDivergence")
        q = Q.astype(np.float64)
        kl = float(np.sum(q * np.log(np.maximum(Q, np.float32(1e-20)).astype(np.float64))))
        if self._neg_unary is not None:
            kl += float(np.sum(-self._neg_unary * Q, dtype=np.float64))  # float32 products, as there
        general = _general()
        rows = _to_rows(Q)
        for term in self._built():
            # Q and the message in Eigen's column-major order: pixel by pixel, labels within.
            products = general.pairwise(rows, self._m, term, self._threads)[:, :self._m] * rows[:, :self._m]
            kl += float(general.eigen_sum(products.reshape(-1)))
        return kl

    def _check_q(self, Q: Any, method: str) -> None:
        """Refuse a Q that is not an (nlabels, nvar) float32 array."""
        if not isinstance(Q, np.ndarray) or Q.shape != (self._m, self._n) or Q.dtype != np.float32:
            raise DenseCRFError(f"{method}: Q must be a ({self._m}, {self._n}) float32 array, got "
                                f"{getattr(Q, 'shape', type(Q).__name__)} {getattr(Q, 'dtype', '')}".rstrip())

    def _add(self, features: np.ndarray, compat: Any, kernel: int, normalization: int,
             engine: tuple[Any, ...] | None = None) -> None:
        """Add a term over (N, d) float32 features, after checking its arguments."""
        if not np.isfinite(features).all():
            raise DenseCRFError("pairwise features must be finite (check the stds: a zero std divides by zero)")
        _enum(KernelType, kernel, "kernel")
        normalization = _enum(NormalizationType, normalization, "normalization")
        self._pairwise.append(_Pairwise(features, _compat(compat, self._m), normalization, engine))

    def _built(self) -> list[Any]:
        """Each pairwise term as a `deeplab_cli.crf.general.Term`, its lattice built once."""
        general = _general()
        from deeplab_cli.crf import meanfield

        for term in self._pairwise[len(self._terms):]:
            self._terms.append(general.make_term(term.features, term.normalization, term.compat, self._m,
                                                 self._threads, meanfield.compiled()))
        return self._terms

    def _unary_rows(self) -> np.ndarray:
        """(N, W) float32 rows of -unary (zeros without a unary, as pydensecrf), padding 0."""
        return _to_rows(np.zeros((self._m, self._n), np.float32) if self._neg_unary is None else self._neg_unary)

    def _engine_settings(self, niter: int) -> SimpleNamespace | None:
        """The engine's settings when this CRF is of DeepLab's form (see `DenseCRF2D`), else None."""
        return None

    def _engine_inference(self, settings: SimpleNamespace) -> np.ndarray:
        """`inference` on the engine's fast kernels (`deeplab_cli.crf.meanfield`), bit for bit the same."""
        raise NotImplementedError  # only DenseCRF2D has terms of DeepLab's form


class DenseCRF2D(DenseCRF):
    """A fully connected CRF over the pixels of a `w` x `h` image (row-major: pixel = y * w + x), as
    pydensecrf's `DenseCRF2D`. threads: as `DenseCRF`."""

    def __init__(self, w: int, h: int, nlabels: int, threads: int = 1) -> None:
        self._w, self._h = _count(w, "w"), _count(h, "h")
        super().__init__(self._w * self._h, nlabels, threads)

    def addPairwiseGaussian(self, sxy: Any, compat: Any, kernel: int = DIAG_KERNEL,
                            normalization: int = NORMALIZE_SYMMETRIC) -> None:
        """A term over positions: features (x / sx, y / sy); sxy is one std or (sx, sy)."""
        from deeplab_cli.crf.lattice import gaussian_features

        sx, sy = _stds(sxy, 2, "sxy")
        engine = ("gaussian", sx) if sx == sy else None
        self._add(gaussian_features(self._h, self._w, (sx, sy)), compat, kernel, normalization, engine)

    def addPairwiseBilateral(self, sxy: Any, srgb: Any, rgbim: np.ndarray, compat: Any,
                             kernel: int = DIAG_KERNEL, normalization: int = NORMALIZE_SYMMETRIC) -> None:
        """A term over positions and colours: features (x / sx, y / sy, r / sr, g / sg, b / sb) of rgbim,
        an (h, w, 3) uint8 image; sxy is one std or (sx, sy), srgb one or (sr, sg, sb)."""
        from deeplab_cli.crf.lattice import bilateral_features

        if not isinstance(rgbim, np.ndarray) or rgbim.dtype != np.uint8 or rgbim.ndim != 3:
            raise DenseCRFError(f"rgbim must be an (h, w, 3) uint8 array, got "
                                f"{getattr(rgbim, 'shape', type(rgbim).__name__)} {getattr(rgbim, 'dtype', '')}")
        if rgbim.shape[:2] != (self._h, self._w):
            raise DenseCRFError(f"Bad shape for pairwise bilateral (Need {(self._h, self._w, 3)}, got {rgbim.shape})")
        if rgbim.shape[2] != 3:
            raise DenseCRFError("addPairwiseBilateral only works for RGB images (h, w, 3); for other images "
                                "pass your own features to addPairwiseEnergy")
        sxy, srgb = _stds(sxy, 2, "sxy"), _stds(srgb, 3, "srgb")
        engine = ("bilateral", sxy[0], srgb[0]) if sxy[0] == sxy[1] and srgb[0] == srgb[1] == srgb[2] else None
        self._add(bilateral_features(rgbim, sxy, srgb), compat, kernel, normalization, engine)

    def _engine_settings(self, niter: int) -> SimpleNamespace | None:
        """DeepLab's form: a Gaussian term then a bilateral one (each with one std for x and y, and one
        for the colours), both Potts and NORMALIZE_AFTER. Then `deeplab_cli.crf.meanfield` computes it."""
        if len(self._pairwise) != 2 or self._neg_unary is None:
            return None
        gaussian, bilateral = self._pairwise
        if (gaussian.engine is None or gaussian.engine[0] != "gaussian" or bilateral.engine is None
                or bilateral.engine[0] != "bilateral"):
            return None
        if any(not isinstance(term.compat, float) or term.normalization != NORMALIZE_AFTER
               for term in self._pairwise):
            return None
        return SimpleNamespace(pos_w=gaussian.compat, pos_xy_std=gaussian.engine[1], bi_w=bilateral.compat,
                               bi_xy_std=bilateral.engine[1], bi_rgb_std=bilateral.engine[2], iters=niter)

    def _engine_inference(self, settings: SimpleNamespace) -> np.ndarray:
        from deeplab_cli.crf import meanfield

        gaussian, bilateral = self._built()
        kernels = meanfield.Kernels(self._h, self._w, gaussian.lattice, bilateral.lattice)
        q = meanfield.mean_field(kernels, self._neg_unary.reshape(self._m, self._h, self._w), settings,
                                 self._threads, unary_given=True)
        return np.ascontiguousarray(q.reshape(self._m, self._n))


def _count(value: Any, name: str, minimum: int = 1) -> int:
    """value as an int >= minimum, or DenseCRFError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DenseCRFError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _enum(kind: type[enum.IntEnum], value: Any, name: str) -> int:
    """value as one of the IntEnum's values, or DenseCRFError."""
    try:
        return int(kind(value))
    except (ValueError, TypeError):
        raise DenseCRFError(f"{name} must be one of {', '.join(m.name for m in kind)}, got {value!r}") from None


def _float32(array: Any, name: str, ndim: int) -> np.ndarray:
    """array as an ndim-dimensional float32 numpy array (pydensecrf's type: no conversion), or DenseCRFError."""
    if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.ndim != ndim:
        raise DenseCRFError(f"{name} must be a {ndim}-D float32 array, got "
                            f"{getattr(array, 'shape', type(array).__name__)} {getattr(array, 'dtype', '')}"
                            " (convert with .astype(np.float32))")
    return array


def _stds(value: Any, count: int, name: str) -> tuple[float, ...]:
    """A std given as one number or `count` of them, each rounded to float32 (pydensecrf's C floats)."""
    values = [value] * count if isinstance(value, Number) else list(value)
    if len(values) != count or not all(isinstance(v, Number) for v in values):
        raise DenseCRFError(f"{name} must be a number or {count} numbers, got {value!r}")
    stds = tuple(float(np.float32(v)) for v in values)
    if not all(np.isfinite(s) and s != 0 for s in stds):
        raise DenseCRFError(f"{name} must be finite and non-zero (features are divided by it), got {value!r}")
    return stds


def _compat(compat: Any, n_labels: int) -> float | np.ndarray:
    """A compatibility as pydensecrf reads it: a number (Potts weight, as float32), an (M,) float32 array
    (diagonal) or an (M, M) float32 array (matrix)."""
    if isinstance(compat, Number):
        return float(np.float32(compat))
    array = compat if isinstance(compat, np.ndarray) else None
    if array is None or array.dtype != np.float32 or array.shape not in ((n_labels,), (n_labels, n_labels)):
        raise DenseCRFError(f"compat must be a number, a ({n_labels},) or a ({n_labels}, {n_labels}) float32 "
                            f"array, got {getattr(compat, 'shape', compat)!r} {getattr(compat, 'dtype', '')}".rstrip())
    return np.array(array, np.float32)


def _general() -> ModuleType:
    """`deeplab_cli.crf.general`, numba configured first (where it caches the compiled kernels)."""
    from deeplab_cli import jit

    jit.configure_numba()
    from deeplab_cli.crf import general

    return general


def _to_rows(q: np.ndarray) -> np.ndarray:
    """(M, N) float32 -> (N, W) rows, label-minor, padded with zeros to the general engine's width."""
    n_labels, n = q.shape
    rows = np.zeros((n, _general().row_width(n_labels)), np.float32)
    rows[:, :n_labels] = q.T
    return rows
