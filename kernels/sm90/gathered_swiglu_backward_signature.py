"""Launch signature of the SM90 backward dact GEMM (``gathered_swiglu_backward_gemm.py``) and its
compilation with fake tensors (any machine).

The compiled TVM-FFI function takes torch tensors
``fn(grad_out, w2, dh, partial, h, weight, row_index, ends, max_clusters)``: grad_out ``[T, H]``,
w2 ``[E, H, I]``, dh and h ``[S, 2I]`` bf16 row-major, partial FP32 ``[S, ceil(I / tile_n)]``,
weight FP32 ``[S]``, row_index int32 ``[S]``, ends int32 ``[E]``. H (the spec's ``k``) and I (the
spec's ``n``) are static; T, S and E symbolic.
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

from cute_moe.specs import GemmSpec

from .config import Sm90Config
from .gathered_swiglu_backward_gemm import Sm90GatheredSwigluBackwardGemm
from .signature import _index_table, _row_major

FP32_ALIGN_BYTES = 4  # weight and partial are read and written one FP32 value at a time


def partial_columns(inter: int, config: Sm90Config) -> int:
    """Columns of the weight-gradient partials: one per N block of ``config``."""
    return -(-inter // config.tile_n)


def fake_arguments(spec: GemmSpec, config: Sm90Config) -> tuple:
    """Fake operands of the kernel's __call__ for ``spec`` (n = I, k = H) and ``config``."""
    inter, hidden = spec.n, spec.k
    tokens, slots, experts = cute.sym_int(), cute.sym_int(), cute.sym_int()
    bf16, fp32 = cutlass.BFloat16, cutlass.Float32
    partial = make_fake_compact_tensor(fp32, (slots, partial_columns(inter, config)), stride_order=(1, 0),
                                       assumed_align=FP32_ALIGN_BYTES)
    weight = make_fake_compact_tensor(fp32, (slots,), assumed_align=FP32_ALIGN_BYTES)
    return (_row_major(bf16, (tokens, hidden)), _row_major(bf16, (experts, hidden, inter)),
            _row_major(bf16, (slots, 2 * inter)), partial, _row_major(bf16, (slots, 2 * inter)), weight,
            _index_table(slots), _index_table(experts), cutlass.Int32(1),
            make_fake_stream(use_tvm_ffi_env_stream=True))


def compile_gathered_swiglu_backward_gemm(spec: GemmSpec, config: Sm90Config):
    """Compile the backward dact GEMM for ``spec`` with ``config``; returns the TVM-FFI function."""
    kernel = Sm90GatheredSwigluBackwardGemm(config.tile_m, config.tile_n, config.cluster_m, config.stages,
                                            config.panel, spec.n, spec.k)
    return cute.compile(kernel, *fake_arguments(spec, config), options=f"--enable-tvm-ffi --gpu-arch {spec.arch}")
