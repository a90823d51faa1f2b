"""cute-moe: Mixture-of-Experts GEMM kernels written in the CuTe DSL (DeepGEMM-compatible API)."""

from . import layouts
from .layouts import *  # noqa: F401,F403  (DeepGEMM exposes its layout helpers at the top level)
from .ops import bf16_gemm_nt, grouped_mm, m_grouped_bf16_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_masked
from .ops_fp8 import fp8_gemm_nt, m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked
from .specs import GemmSpec, KernelConfig

__all__ = [
    "GemmSpec", "KernelConfig", "bf16_gemm_nt", "fp8_gemm_nt", "grouped_mm", "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
    *layouts.__all__,
]
