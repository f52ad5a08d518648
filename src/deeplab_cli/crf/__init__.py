"""The fully connected CRF with DeepLab-LargeFOV's settings, exact to pydensecrf.

The stages, from the definition to the fast paths:
- `params`: the settings (`CRFParams`) and input checks;
- `reference`: the whole algorithm in plain numpy, the definition the engine is tested against;
- `lattice`: the permutohedral lattices, built as pydensecrf builds them;
- `meanfield`: the engine's iterations over those lattices, on `threads`;
- `plain` and `simd`: its two compiled kernel sets (plain numba, and hand-written SIMD IR), equal
  bit for bit; `meanfield.compiled()` picks one per process;
- `general` and its numpy definition `reference_terms`: pydensecrf's mean field for any list of
  pairwise terms (normalisations, Potts / diagonal / matrix compatibilities), behind
  `deeplab_cli.densecrf`, pydensecrf's API;
- `graph`: the iterations as an ONNX graph, for onnxruntime's providers (GPUs);
- `tune`: DeepLab's cross-validation of the settings on one image;
- `backends`: one call (`dense_crf`) over the engine, pydensecrf and the graph, and `dense_crf_on_unary`
  for energies given instead of probabilities.

Importing this package is cheap: numba and onnxruntime load on first use.
"""

from deeplab_cli.crf.backends import check_backend, dense_crf, dense_crf_grid, dense_crf_on_unary, warm
from deeplab_cli.crf.params import BACKENDS, DEFAULT_BACKEND, MIN_PROB, CRFParams

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "MIN_PROB", "CRFParams", "check_backend", "dense_crf",
           "dense_crf_grid", "dense_crf_on_unary", "warm"]
