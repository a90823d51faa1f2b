"""Launch signature of the SM90 K-grouped FP8 GEMM (``fp8_k_grouped_gemm.py``) and its compilation
with fake tensors (any machine).

The compiled TVM-FFI function takes torch tensors ``fn(a, b, d, c, sfa, sfb, ks, max_clusters)``:
a ``[M, sum K]`` and b ``[N, sum K]`` uint8 (E4M3 bits) row-major with sum K a multiple of 16,
d and c ``[G, M, N]`` FP32, sfa ``[M, sum K / 128]`` and sfb ``[N, sum K / 128]`` FP32 MN-major
with a 16-byte aligned K-block stride, ks int32 ``[G]``. M (the spec's ``k``) and N are static;
sum K, its block count and G symbolic.
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_stream

from cute_moe.specs import GemmSpec

from .config import Sm90Config
from .fp8_k_grouped_gemm import Sm90Fp8KGroupedGemm
from .signature import ALIGN_BYTES, _index_table, _mn_major_scales, _row_major


def fake_arguments(spec: GemmSpec) -> tuple:
    """Fake operands of the kernel's __call__ for a K-grouped FP8 ``spec`` (k holds M)."""
    m, n = spec.k, spec.n
    sum_k, k_blocks, groups = cute.sym_int(divisibility=ALIGN_BYTES), cute.sym_int(), cute.sym_int()
    a = _row_major(cutlass.Uint8, (m, sum_k))
    b = _row_major(cutlass.Uint8, (n, sum_k))
    d = _row_major(cutlass.Float32, (groups, m, n))
    c = _row_major(cutlass.Float32, (groups, m, n)) if spec.has_c else None
    return (a, b, d, c, _mn_major_scales((m, k_blocks)), _mn_major_scales((n, k_blocks)), _index_table(groups),
            cutlass.Int32(1), make_fake_stream(use_tvm_ffi_env_stream=True))


def compile_fp8_k_grouped_gemm(spec: GemmSpec, config: Sm90Config):
    """Compile the K-grouped FP8 kernel for ``spec`` with ``config``; returns the TVM-FFI function."""
    kernel = Sm90Fp8KGroupedGemm(config.tile_m, config.tile_n, config.cluster_m, config.cluster_n, config.stages,
                                 config.panel, spec.k, spec.n, spec.has_c)
    return cute.compile(kernel, *fake_arguments(spec), options=f"--enable-tvm-ffi --gpu-arch {spec.arch}")
