"""cute-moe: Mixture-of-Experts GEMM kernels written in the CuTe DSL (DeepGEMM-compatible API).

Importing the package does not import cutlass: the DSL loads at the first compile or cache load.
"""

from importlib.metadata import PackageNotFoundError, version

from . import layouts
from .layouts import *  # noqa: F401,F403  (DeepGEMM exposes its layout helpers at the top level)
from .ops import (bf16_gemm_nt, fp8_gemm_nt, grouped_mm, m_grouped_bf16_gemm_nt_contiguous,
                  m_grouped_bf16_gemm_nt_masked, m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked)
from .ops import (bf16_gemm_nn, bf16_gemm_tn, bf16_gemm_tt, k_grouped_bf16_gemm_tn_contiguous,
                  m_grouped_bf16_gemm_nn_contiguous)
from . import library  # noqa: F401  (registers the GEMMs as torch.library custom ops)
from .moe_layer import moe
from .fp4_ops import (fp8_fp4_gemm_nt, m_grouped_bf16_fp4_gemm_nt_contiguous, m_grouped_bf16_fp4_gemm_nt_masked,
                      m_grouped_fp8_fp4_gemm_nt_contiguous, m_grouped_fp8_fp4_gemm_nt_masked)
from .hc import hc_post, hc_pre, tf32_hc_prenorm_gemm
from .specs import GemmSpec
from .ep import EPBuffer

try:
    __version__ = version("cute-moe")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "EPBuffer", "GemmSpec", "KernelConfig", "bf16_gemm_nt", "fp8_gemm_nt", "grouped_mm", "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "fp8_fp4_gemm_nt", "m_grouped_fp8_fp4_gemm_nt_contiguous", "m_grouped_fp8_fp4_gemm_nt_masked",
    "m_grouped_bf16_fp4_gemm_nt_contiguous", "m_grouped_bf16_fp4_gemm_nt_masked",
    "tf32_hc_prenorm_gemm", "hc_pre", "hc_post",
    "bf16_gemm_nn", "bf16_gemm_tn", "bf16_gemm_tt", "m_grouped_bf16_gemm_nn_contiguous",
    "k_grouped_bf16_gemm_tn_contiguous", "moe",
    *layouts.__all__,
]


def __getattr__(name: str):
    """``KernelConfig``: the config type of the default arch's backend (``force_config`` takes it)."""
    if name == "KernelConfig":
        from .arch import backend_for

        return backend_for(None).config_type
    raise AttributeError(f"module 'cute_moe' has no attribute {name!r}")
