"""Launch signature of the SM90 gathered-SwiGLU GEMM1 (``gathered_swiglu_gemm.py``) and its compilation
with fake tensors (any machine).

The compiled TVM-FFI function takes torch tensors ``fn(x, w13, act, h, row_index, ends, max_clusters)``
(``h`` only for the ``gathered_swiglu_h`` kind): x ``[T, H]``, w13 ``[E, 2I, H]``, act ``[S, I]`` and
h ``[S, 2I]`` bf16 row-major, row_index int32 ``[S]``, ends int32 ``[E]``. H (the spec's ``k``) and
2I (the spec's ``n``) are static; T, S and E symbolic.
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_stream

from cute_moe.specs import GemmSpec

from .config import Sm90Config
from .gathered_swiglu_gemm import Sm90GatheredSwigluGemm
from .signature import _index_table, _row_major

STORES_H = {"gathered_swiglu": False, "gathered_swiglu_h": True}  # kind -> whether h is written


def fake_arguments(spec: GemmSpec) -> tuple:
    """Fake operands of the kernel's __call__ for ``spec`` (n = 2I, k = H)."""
    inter2, hidden = spec.n, spec.k
    tokens, slots, experts = cute.sym_int(), cute.sym_int(), cute.sym_int()
    bf16 = cutlass.BFloat16
    h = _row_major(bf16, (slots, inter2)) if STORES_H[spec.kind] else None
    return (_row_major(bf16, (tokens, hidden)), _row_major(bf16, (experts, inter2, hidden)),
            _row_major(bf16, (slots, inter2 // 2)), h, _index_table(slots), _index_table(experts),
            cutlass.Int32(1), make_fake_stream(use_tvm_ffi_env_stream=True))


def compile_gathered_swiglu_gemm(spec: GemmSpec, config: Sm90Config):
    """Compile GEMM1 for ``spec`` with ``config``; returns the TVM-FFI function."""
    kernel = Sm90GatheredSwigluGemm(config.tile_m, config.tile_n, config.cluster_m, config.stages, config.panel,
                                    spec.n // 2, spec.k, STORES_H[spec.kind])
    return cute.compile(kernel, *fake_arguments(spec), options=f"--enable-tvm-ffi --gpu-arch {spec.arch}")
