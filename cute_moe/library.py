"""The public GEMM ops as ``torch.library`` custom ops (``torch.ops.cute_moe.<name>``).

Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces a function
that calls the public functions of ``cute_moe.ops`` and ``cute_moe.fp4_ops``: while torch.compile
traces, those functions call the custom op; eagerly they call the launcher directly (no dispatcher
on the warm path). The ops that write an output tensor declare it in ``mutates_args`` and return
nothing; ``grouped_mm`` returns a new tensor. Scaled operands (FP8, MXFP4) are passed as separate
tensors and scales (custom-op schemas take no tuples). Each implementation looks its op up in the
op table at call time. Importing this module registers the ops (``import cute_moe`` does); the
other modules with kernels (``fp8_backward``, ``hc``, ``moe_gemms``) register theirs with
``_register`` or ``torch.library.custom_op`` directly (docs/training.md lists every op).
"""

from typing import Callable, Optional

import torch
from torch import Tensor

from .fp4_ops import FP4_OPS
from .launcher import GemmOp
from .ops import OPS

NAMESPACE = "cute_moe"
MUTATED = ("d",)


def _register(name: str, impl: Callable, fake: Optional[Callable] = None, mutates: tuple = MUTATED):
    """Register ``impl`` as ``cute_moe::<name>`` with its fake implementation (default: no output)."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=mutates)
    op.register_fake(fake or _writes_only)
    return op


def _writes_only(*args, **kwargs) -> None:
    """Fake implementation of an op that only writes into its ``d`` argument."""
    return None


OpTable = dict[str, GemmOp]


def _dense(name: str):
    def impl(a: Tensor, b: Tensor, d: Tensor, c: Optional[Tensor] = None) -> None:
        OPS[name](a, b, d, c)
    return _register(name, impl)


def _scaled_dense(name: str, table: OpTable = OPS):
    """Both operands (tensor, scales) pairs: FP8 x FP8, FP8 x FP4."""
    def impl(a: Tensor, sfa: Tensor, b: Tensor, sfb: Tensor, d: Tensor, c: Optional[Tensor] = None) -> None:
        table[name]((a, sfa), (b, sfb), d, c)
    return _register(name, impl)


def _contiguous(name: str):
    def impl(a: Tensor, b: Tensor, d: Tensor, grouped_layout: Tensor, use_psum_layout: bool = False) -> None:
        OPS[name](a, b, d, grouped_layout, use_psum_layout)
    return _register(name, impl)


def _scaled_contiguous(name: str, table: OpTable = OPS):
    def impl(a: Tensor, sfa: Tensor, b: Tensor, sfb: Tensor, d: Tensor, grouped_layout: Tensor,
             use_psum_layout: bool = False) -> None:
        table[name]((a, sfa), (b, sfb), d, grouped_layout, use_psum_layout)
    return _register(name, impl)


def _b_scaled_contiguous(name: str, table: OpTable):
    """A plain, B a (tensor, scales) pair: BF16 x FP4."""
    def impl(a: Tensor, b: Tensor, sfb: Tensor, d: Tensor, grouped_layout: Tensor,
             use_psum_layout: bool = False) -> None:
        table[name](a, (b, sfb), d, grouped_layout, use_psum_layout)
    return _register(name, impl)


def _masked(name: str):
    def impl(a: Tensor, b: Tensor, d: Tensor, masked_m: Tensor, expected_m: int) -> None:
        OPS[name](a, b, d, masked_m, expected_m)
    return _register(name, impl)


def _scaled_masked(name: str, table: OpTable = OPS):
    def impl(a: Tensor, sfa: Tensor, b: Tensor, sfb: Tensor, d: Tensor, masked_m: Tensor, expected_m: int) -> None:
        table[name]((a, sfa), (b, sfb), d, masked_m, expected_m)
    return _register(name, impl)


def _b_scaled_masked(name: str, table: OpTable):
    """A plain, B a (tensor, scales) pair: BF16 x FP4."""
    def impl(a: Tensor, b: Tensor, sfb: Tensor, d: Tensor, masked_m: Tensor, expected_m: int) -> None:
        table[name](a, (b, sfb), d, masked_m, expected_m)
    return _register(name, impl)


def _k_grouped(name: str):
    def impl(a: Tensor, b: Tensor, d: Tensor, ks: Optional[list[int]], ks_tensor: Tensor,
             c: Optional[Tensor] = None) -> None:
        OPS[name](a, b, d, ks, ks_tensor, c)
    return _register(name, impl)


def _grouped_mm_impl(a: Tensor, b: Tensor, offs: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    from .ops import grouped_mm

    return grouped_mm(a, b, offs, out_dtype)


def _grouped_mm_fake(a: Tensor, b: Tensor, offs: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """2-D x 3-D: [M, N]; 2-D x 2-D (groups along K): [G, M, N]."""
    dtype = torch.bfloat16 if out_dtype is None else out_dtype
    if b.dim() == 2:
        return a.new_empty((offs.shape[0], a.shape[0], b.shape[1]), dtype=dtype)
    return a.new_empty((a.shape[0], b.shape[-1]), dtype=dtype)


CUSTOM_OPS = {
    **{name: _dense(name) for name in ("bf16_gemm_nt", "bf16_gemm_nn", "bf16_gemm_tn", "bf16_gemm_tt")},
    "fp8_gemm_nt": _scaled_dense("fp8_gemm_nt"),
    **{name: _contiguous(name) for name in ("m_grouped_bf16_gemm_nt_contiguous",
                                            "m_grouped_bf16_gemm_nn_contiguous")},
    "m_grouped_fp8_gemm_nt_contiguous": _scaled_contiguous("m_grouped_fp8_gemm_nt_contiguous"),
    "m_grouped_bf16_gemm_nt_masked": _masked("m_grouped_bf16_gemm_nt_masked"),
    "m_grouped_fp8_gemm_nt_masked": _scaled_masked("m_grouped_fp8_gemm_nt_masked"),
    "k_grouped_bf16_gemm_tn_contiguous": _k_grouped("k_grouped_bf16_gemm_tn_contiguous"),
    "grouped_mm": _register("grouped_mm", _grouped_mm_impl, _grouped_mm_fake, mutates=()),
    # MXFP4 weights (cute_moe/fp4_ops.py): B is always (packed codes, UE8M0 exponents)
    **{name: build(name, FP4_OPS) for name, build in (
        ("fp8_fp4_gemm_nt", _scaled_dense),
        ("m_grouped_fp8_fp4_gemm_nt_contiguous", _scaled_contiguous),
        ("m_grouped_fp8_fp4_gemm_nt_masked", _scaled_masked),
        ("m_grouped_bf16_fp4_gemm_nt_contiguous", _b_scaled_contiguous),
        ("m_grouped_bf16_fp4_gemm_nt_masked", _b_scaled_masked),
    )},
}
