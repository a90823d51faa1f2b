"""cute-moe: Mixture-of-Experts GEMM kernels written in the CuTe DSL (DeepGEMM-compatible API)."""

from .layouts.alignment import (get_mk_alignment_for_contiguous_layout,
                                get_theoretical_mk_alignment_for_contiguous_layout,
                                set_mk_alignment_for_contiguous_layout)
from .ops import bf16_gemm_nt, grouped_mm, m_grouped_bf16_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_masked
from .specs import GemmSpec, KernelConfig

__all__ = [
    "GemmSpec", "KernelConfig", "bf16_gemm_nt", "get_mk_alignment_for_contiguous_layout",
    "get_theoretical_mk_alignment_for_contiguous_layout", "grouped_mm", "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked", "set_mk_alignment_for_contiguous_layout",
]
