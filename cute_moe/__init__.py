"""cute-moe: Mixture-of-Experts GEMM kernels written in the CuTe DSL (DeepGEMM-compatible API).

Importing the package does not import cutlass: the DSL loads at the first compile or cache load.
"""

from importlib.metadata import PackageNotFoundError, version

from . import layouts
from .layouts import *  # noqa: F401,F403  (DeepGEMM exposes its layout helpers at the top level)
from . import library  # noqa: F401  (registers the GEMMs as torch.library custom ops)
from .ep import EPBuffer
from .fp8_backward import (fp8_gemm_nn, fp8_gemm_tn, fp8_gemm_tt, k_grouped_fp8_gemm_nt_contiguous,
                           k_grouped_fp8_gemm_tn_contiguous, m_grouped_fp8_gemm_nn_contiguous)
from .fp4_ops import (fp8_fp4_gemm_nt, m_grouped_bf16_fp4_gemm_nt_contiguous, m_grouped_bf16_fp4_gemm_nt_masked,
                      m_grouped_fp8_fp4_gemm_nt_contiguous, m_grouped_fp8_fp4_gemm_nt_masked)
from .hc import hc_post, hc_pre, tf32_hc_prenorm_gemm
from .mega_moe import (MegaMoEBuffer, bf16_mega_moe, fp8_fp4_mega_moe, fp8_mega_moe, get_symm_buffer_for_mega_moe,
                       transform_weights_for_mega_moe)
from .moe_layer import moe
from .ops import (bf16_gemm_nn, bf16_gemm_nt, bf16_gemm_tn, bf16_gemm_tt, fp8_gemm_nt, grouped_mm,
                  k_grouped_bf16_gemm_tn_contiguous, m_grouped_bf16_gemm_nn_contiguous,
                  m_grouped_bf16_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_masked, m_grouped_fp8_gemm_nt_contiguous,
                  m_grouped_fp8_gemm_nt_masked)
from .specs import GemmSpec
from . import nn  # cute_moe.nn.MoE, cute_moe.nn.HyperConnection

try:
    __version__ = version("cute-moe")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "EPBuffer", "GemmSpec", "KernelConfig", "nn",
    # GEMMs (DeepGEMM names)
    "bf16_gemm_nt", "bf16_gemm_nn", "bf16_gemm_tn", "bf16_gemm_tt", "fp8_gemm_nt", "grouped_mm",
    "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked", "m_grouped_bf16_gemm_nn_contiguous",
    "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked", "k_grouped_bf16_gemm_tn_contiguous",
    "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt", "m_grouped_fp8_gemm_nn_contiguous",
    "k_grouped_fp8_gemm_nt_contiguous", "k_grouped_fp8_gemm_tn_contiguous",
    "fp8_fp4_gemm_nt", "m_grouped_fp8_fp4_gemm_nt_contiguous", "m_grouped_fp8_fp4_gemm_nt_masked",
    "m_grouped_bf16_fp4_gemm_nt_contiguous", "m_grouped_bf16_fp4_gemm_nt_masked",
    # HyperConnection, the MoE layer
    "tf32_hc_prenorm_gemm", "hc_pre", "hc_post", "moe",
    # Mega MoE (DeepGEMM names)
    "MegaMoEBuffer", "get_symm_buffer_for_mega_moe", "transform_weights_for_mega_moe", "fp8_mega_moe",
    "fp8_fp4_mega_moe", "bf16_mega_moe",
    *layouts.__all__,
]


def __getattr__(name: str):
    """``KernelConfig``: the config type of the default arch's backend (``force_config`` takes it)."""
    if name == "KernelConfig":
        from .arch import backend_for

        return backend_for(None).config_type
    raise AttributeError(f"module 'cute_moe' has no attribute {name!r}")
