"""Public GEMM operations (DeepGEMM names and semantics) on torch tensors: the op table.

Each op is a problem kind's signature (cute_moe.launcher) with its operand descriptors; the public
functions below only document the arguments and call their entry. FP8 operands are
``(tensor, scales)`` pairs: A is E4M3 [.., M, K] with FP32 scales per row per 128 K (``sfa``
[.., M, ceil(K/128)]), B is E4M3 [.., N, K] with FP32 scales per 128 x 128 block (``sfb``
[.., ceil(N/128), ceil(K/128)]). ``sfa`` may be given row-major (as ``per_token_cast_to_fp8``
returns it): it is then moved into the MN-major, TMA-aligned layout the kernel reads on every call
(pass it transformed with ``transform_sf_into_required_layout`` to avoid that copy).

Index tensors never make a kernel fault or write outside its output (docs/architecture.md, "Index
tensors", says which rows such values produce); ``CUTE_MOE_DEBUG=1`` checks them on the host.
"""

from typing import Optional

import torch

from .launcher import ContiguousOp, DenseOp, GemmOp, MaskedOp, RaggedOp
from .operands import PRECISIONS

BF16, FP8 = PRECISIONS["bf16"], PRECISIONS["fp8"]

OPS: dict[str, GemmOp] = {op.name: op for op in (
    DenseOp("bf16_gemm_nt", *BF16),
    ContiguousOp("m_grouped_bf16_gemm_nt_contiguous", *BF16),
    MaskedOp("m_grouped_bf16_gemm_nt_masked", *BF16),
    RaggedOp("grouped_mm", *BF16),
    DenseOp("fp8_gemm_nt", *FP8),
    ContiguousOp("m_grouped_fp8_gemm_nt_contiguous", *FP8),
    MaskedOp("m_grouped_fp8_gemm_nt_masked", *FP8),
)}


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + a @ b.T (c optional, may be d itself): a [M, K] bf16, b [N, K] bf16, d and c [M, N]
    bf16 or fp32 (same dtype)."""
    OPS["bf16_gemm_nt"](a, b, d, c)


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                                      grouped_layout: torch.Tensor, use_psum_layout: bool = False) -> None:
    """d[r] = a[r] @ b[expert(r)].T for every row r that belongs to an expert.

    a [M, K] bf16 holds every expert's rows, each expert's segment starting at a multiple of
    ``get_mk_alignment_for_contiguous_layout()`` (M a multiple of it too); b [G, N, K] bf16; d [M, N]
    bf16 or fp32. grouped_layout is int32 [M], each row's expert and -1 on padding rows, or with
    ``use_psum_layout`` int32 [G] of cumulative unaligned ends (expert g owns rows
    [align(ends[g-1]), ends[g])). The kernel works in 128-row (or 64-row) tiles, each taking its
    expert from its first row (as DeepGEMM): padding rows inside an expert's last tile receive
    unspecified values (psum: left unwritten); rows of tiles whose expert id lies outside [0, G) are
    left unwritten.
    """
    OPS["m_grouped_bf16_gemm_nt_contiguous"](a, b, d, grouped_layout, use_psum_layout)


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int) -> None:
    """d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T; rows >= masked_m[g] of d are not written.

    a [G, Mmax, K] bf16, b [G, N, K] bf16, d [G, Mmax, N] bf16 or fp32, masked_m int32 [G] on the GPU
    (never read by the host, so CUDA graphs stay valid when it changes); expected_m: a tuning hint
    (typical rows per expert). masked_m[g] > Mmax is treated as Mmax, a negative one as 0.
    """
    OPS["m_grouped_bf16_gemm_nt_masked"](a, b, d, masked_m, expected_m)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch._grouped_mm for 2-D a and 3-D b: out[offs[g-1]:offs[g]] = a[offs[g-1]:offs[g]] @ b[g].

    a [M, K] bf16; b [G, K, N] bf16 whose K is the contiguous dimension (e.g. ``w.transpose(-2, -1)``
    of a row-major [G, N, K] weight); offs int32 [G] cumulative group ends (unaligned, empty groups
    allowed, offs[-1] <= M); returns out [M, N] in out_dtype (bf16 default, or fp32). Rows past
    offs[-1] are left unwritten, as in torch. Ends past M are clamped to M; an end below an earlier
    one leaves its group empty (each row is written by at most one group).
    """
    return OPS["grouped_mm"](a, b, offs, out_dtype)


def fp8_gemm_nt(a: tuple, b: tuple, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + (a * sfa) @ (b * sfb).T: a (E4M3 [M, K], sfa [M, K/128]), b (E4M3 [N, K], sfb
    [N/128, K/128]); d and c [M, N] bf16 or fp32 (same dtype); c optional, may be d itself."""
    OPS["fp8_gemm_nt"](a, b, d, c)


def m_grouped_fp8_gemm_nt_contiguous(a: tuple, b: tuple, d: torch.Tensor, grouped_layout: torch.Tensor,
                                     use_psum_layout: bool = False) -> None:
    """M-grouped contiguous FP8 GEMM: like ``m_grouped_bf16_gemm_nt_contiguous`` with (tensor, scales)
    operands: a (E4M3 [M, K], sfa [M, K/128]), b (E4M3 [G, N, K], sfb [G, N/128, K/128]); d [M, N] bf16
    or fp32."""
    OPS["m_grouped_fp8_gemm_nt_contiguous"](a, b, d, grouped_layout, use_psum_layout)


def m_grouped_fp8_gemm_nt_masked(a: tuple, b: tuple, d: torch.Tensor, masked_m: torch.Tensor,
                                 expected_m: int) -> None:
    """M-grouped masked FP8 GEMM: like ``m_grouped_bf16_gemm_nt_masked`` with (tensor, scales)
    operands: a (E4M3 [G, Mmax, K], sfa [G, Mmax, K/128]), b (E4M3 [G, N, K], sfb [G, N/128, K/128]);
    d [G, Mmax, N] bf16 or fp32. The host never reads masked_m."""
    OPS["m_grouped_fp8_gemm_nt_masked"](a, b, d, masked_m, expected_m)
