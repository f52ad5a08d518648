"""The CRF engine's fast kernel set: hand-written LLVM IR (`numba.extending.intrinsic`, llvmlite) on
8-float vectors, inside numba loops. `deeplab_cli.crf.plain` computes the same bits in plain
numba and is used where these do not compile (`deeplab_cli.crf.meanfield.compiled`), so the two sets expose the same
kernels with the same arguments. Import it after `deeplab_cli.jit.configure_numba()`.

`lattice`: the permutohedral lattice's simplices, hash-table inserts and neighbour lookups.
`meanfield`: the mean-field pass (messages and softmax), and the gather (splat) and blur steps.
`ir`: the LLVM IR pieces both share.
"""

from deeplab_cli.crf.plain import CHUNK, LANES, csr, log_columns, norm, pad_rows
from deeplab_cli.crf.simd.lattice import insert, neighbours, simplices
from deeplab_cli.crf.simd.meanfield import blur_pair, gather_pair, mean_field_pass

# The kernels without an IR twin are the plain set's.
__all__ = ["CHUNK", "LANES", "blur_pair", "csr", "gather_pair", "insert", "log_columns", "mean_field_pass",
           "neighbours", "norm", "pad_rows", "simplices"]
