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

from .launcher import ContiguousOp, DenseOp, GemmOp, KGroupedOp, MaskedOp, RaggedKOp, RaggedOp
from .operands import PRECISIONS, Operand

BF16, FP8 = PRECISIONS["bf16"], PRECISIONS["fp8"]
BF16_K, BF16_MN = BF16[0], Operand("bf16", "mn")  # K-major / MN-major (given as [.., K, MN]) BF16

OPS: dict[str, GemmOp] = {op.name: op for op in (
    DenseOp("bf16_gemm_nt", *BF16),
    ContiguousOp("m_grouped_bf16_gemm_nt_contiguous", *BF16),
    MaskedOp("m_grouped_bf16_gemm_nt_masked", *BF16),
    RaggedOp("grouped_mm", *BF16),
    DenseOp("fp8_gemm_nt", *FP8),
    ContiguousOp("m_grouped_fp8_gemm_nt_contiguous", *FP8),
    MaskedOp("m_grouped_fp8_gemm_nt_masked", *FP8),
    # Training (backward) GEMMs: DeepGEMM's nn / tn / tt suffixes give the operands' majors.
    DenseOp("bf16_gemm_nn", BF16_K, BF16_MN),
    DenseOp("bf16_gemm_tn", BF16_MN, BF16_MN),
    DenseOp("bf16_gemm_tt", BF16_MN, BF16_K),
    ContiguousOp("m_grouped_bf16_gemm_nn_contiguous", BF16_K, BF16_MN),
    KGroupedOp("k_grouped_bf16_gemm_tn_contiguous", BF16_MN, BF16_MN),
    # grouped_mm's other operand forms: B N-major (row-major [G, K, N]); 2-D x 2-D with offs along K.
    RaggedOp("grouped_mm_n_major_b", BF16_K, BF16_MN),
    RaggedKOp("grouped_mm_k_offs", BF16_K, BF16_MN),
)}


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + a @ b.T (c optional, may be d itself): a [M, K] bf16, b [N, K] bf16, d and c [M, N]
    bf16 or fp32 (same dtype)."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.bf16_gemm_nt(a, b, d, c)
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
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, b, d, grouped_layout, use_psum_layout)
    OPS["m_grouped_bf16_gemm_nt_contiguous"](a, b, d, grouped_layout, use_psum_layout)


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int) -> None:
    """d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T; rows >= masked_m[g] of d are not written.

    a [G, Mmax, K] bf16, b [G, N, K] bf16, d [G, Mmax, N] bf16 or fp32, masked_m int32 [G] on the GPU
    (never read by the host, so CUDA graphs stay valid when it changes); expected_m: a tuning hint
    (typical rows per expert). masked_m[g] > Mmax is treated as Mmax, a negative one as 0.
    """
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)
    OPS["m_grouped_bf16_gemm_nt_masked"](a, b, d, masked_m, expected_m)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch._grouped_mm with offs, for 2-D a and 3-D b, or 2-D a and 2-D b.

    2-D x 3-D: out[offs[g-1]:offs[g]] = a[offs[g-1]:offs[g]] @ b[g]. a [M, K] bf16; b [G, K, N] bf16
    with K contiguous (e.g. ``w.transpose(-2, -1)`` of a row-major [G, N, K] weight) or N contiguous
    (row-major [G, K, N]); offs int32 [G] cumulative group ends (unaligned, empty groups allowed,
    offs[-1] <= M); returns out [M, N]. Rows past offs[-1] are left unwritten, as in torch. Ends past
    M are clamped to M; an end below an earlier one leaves its group empty.

    2-D x 2-D (weight gradients, groups along K): out[g] = a[:, offs[g-1]:offs[g]] @ b[offs[g-1]:offs[g]].
    a [M, sum K] and b [sum K, N] row-major bf16 (sum K a multiple of 8), offs int32 [G] cumulative
    ends along K; returns out [G, M, N]; an empty group gives zeros; rows past offs[-1] are ignored;
    ends past sum K are clamped and a decreasing end gives an empty group (later groups then start
    after the sum of the earlier non-negative sizes).

    out_dtype: bf16 (default) or fp32.
    """
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.grouped_mm(a, b, offs, out_dtype)
    if isinstance(b, torch.Tensor) and b.dim() == 2:
        return OPS["grouped_mm_k_offs"](a, b, offs, out_dtype)
    if isinstance(b, torch.Tensor) and b.dim() == 3 and b.is_contiguous() and b.shape[1] > 1 and b.shape[2] > 1:
        return OPS["grouped_mm_n_major_b"](a, b, offs, out_dtype)
    return OPS["grouped_mm"](a, b, offs, out_dtype)


def bf16_gemm_nn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + a @ b: a [M, K], b [K, N] (N contiguous), d and c [M, N] bf16 or fp32 (same dtype);
    c optional, may be d itself."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.bf16_gemm_nn(a, b, d, c)
    OPS["bf16_gemm_nn"](a, b, d, c)


def bf16_gemm_tn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + a.T @ b: a [K, M] (M contiguous, M a multiple of 8), b [K, N] (N contiguous, a multiple
    of 8); d and c [M, N]. DeepGEMM's letters: A 't' = MN-major, B 'n' = MN-major."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.bf16_gemm_tn(a, b, d, c)
    OPS["bf16_gemm_tn"](a, b, d, c)


def bf16_gemm_tt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + a.T @ b.T: a [K, M] (M contiguous, a multiple of 8), b [N, K]; d and c [M, N].
    DeepGEMM's letters: A 't' = MN-major, B 't' = K-major."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.bf16_gemm_tt(a, b, d, c)
    OPS["bf16_gemm_tt"](a, b, d, c)


def m_grouped_bf16_gemm_nn_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                                      grouped_layout: torch.Tensor, use_psum_layout: bool = False) -> None:
    """dX = dY . W per expert: d[r] = a[r] @ b[expert(r)] with b [G, K, N] (N contiguous, e.g. the
    row-major [E, H, I] weight for the down projection's input gradient); otherwise as
    ``m_grouped_bf16_gemm_nt_contiguous`` (a [M, K], d [M, N], grouped_layout, use_psum_layout)."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.m_grouped_bf16_gemm_nn_contiguous(a, b, d, grouped_layout, use_psum_layout)
    OPS["m_grouped_bf16_gemm_nn_contiguous"](a, b, d, grouped_layout, use_psum_layout)


def k_grouped_bf16_gemm_tn_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, ks: Optional[list],
                                      ks_tensor: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """Weight gradients, K grouped along tokens: d[g] = c[g] + a[rows of g].T @ b[rows of g].

    a [sum K, M] and b [sum K, N] bf16 row-major (M, N multiples of 8); group g owns rows
    [sum(ks[:g]), sum(ks[:g+1])); d and c [G, M, N] fp32 (c optional, may be d itself: accumulate),
    or bf16 (an extension of DeepGEMM's API: the FP32 sum rounded once, c in bf16 too);
    ks: the groups' row counts (host list of non-negative ints summing to sum K; 0 allowed: d[g] = c[g]
    or 0); ks_tensor: the same counts as int32 [G] on the GPU (the kernel reads only it; any value of
    it stays inside a and b, ``CUTE_MOE_DEBUG=1`` checks it equals ks). ``ks=None`` (an extension of
    DeepGEMM's API, for callers that know the counts only on the GPU, e.g. under CUDA graphs): the
    groups are ks_tensor's sizes and rows past their sum are ignored."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, ks_tensor, c)
    OPS["k_grouped_bf16_gemm_tn_contiguous"](a, b, d, ks, ks_tensor, c)


def fp8_gemm_nt(a: tuple, b: tuple, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + (a * sfa) @ (b * sfb).T: a (E4M3 [M, K], sfa [M, K/128]), b (E4M3 [N, K], sfb
    [N/128, K/128]); d and c [M, N] bf16 or fp32 (same dtype); c optional, may be d itself."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.fp8_gemm_nt(a[0], a[1], b[0], b[1], d, c)
    OPS["fp8_gemm_nt"](a, b, d, c)


def m_grouped_fp8_gemm_nt_contiguous(a: tuple, b: tuple, d: torch.Tensor, grouped_layout: torch.Tensor,
                                     use_psum_layout: bool = False) -> None:
    """M-grouped contiguous FP8 GEMM: like ``m_grouped_bf16_gemm_nt_contiguous`` with (tensor, scales)
    operands: a (E4M3 [M, K], sfa [M, K/128]), b (E4M3 [G, N, K], sfb [G, N/128, K/128]); d [M, N] bf16
    or fp32."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.m_grouped_fp8_gemm_nt_contiguous(a[0], a[1], b[0], b[1], d, grouped_layout,
                                                                   use_psum_layout)
    OPS["m_grouped_fp8_gemm_nt_contiguous"](a, b, d, grouped_layout, use_psum_layout)


def m_grouped_fp8_gemm_nt_masked(a: tuple, b: tuple, d: torch.Tensor, masked_m: torch.Tensor,
                                 expected_m: int) -> None:
    """M-grouped masked FP8 GEMM: like ``m_grouped_bf16_gemm_nt_masked`` with (tensor, scales)
    operands: a (E4M3 [G, Mmax, K], sfa [G, Mmax, K/128]), b (E4M3 [G, N, K], sfb [G, N/128, K/128]);
    d [G, Mmax, N] bf16 or fp32. The host never reads masked_m."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.m_grouped_fp8_gemm_nt_masked(a[0], a[1], b[0], b[1], d, masked_m, expected_m)
    OPS["m_grouped_fp8_gemm_nt_masked"](a, b, d, masked_m, expected_m)
