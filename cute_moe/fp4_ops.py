"""Public GEMM ops with MXFP4 weights (FP8 x FP4 and BF16 x FP4), DeepGEMM names and arguments.

B is a ``(b, sfb)`` pair: ``b`` int8 (or uint8) ``[(G,) N, K/2]``, two E2M1 codes per byte (element
2i in the low nibble, as ``per_token_cast_to_fp4`` returns it or ``from_gpt_oss_mxfp4`` imports
it), and ``sfb`` uint8 UE8M0 exponents ``[(G,) N, K/32]`` (``float_to_ue8m0`` of the cast's scales,
or a gpt-oss ``*_scales`` tensor). ``sfb`` is read in the layout of
``transform_sf_into_required_layout(sfb, N, K, (1, 32), G)`` (K contiguous, rows 16-byte aligned);
another layout is copied into it on every call. K must be a multiple of 32. FP8 activations are
``(a, sfa)`` with FP32 scales per row per 128 K, as for ``m_grouped_fp8_gemm_nt_*``.

Each op is one problem kind's launcher signature (cute_moe.launcher) with the FP4 operand's
handling below; the kernels are kernels/sm90/fp4_swap_gemm.py (masked, contiguous, psum) and
kernels/sm90/fp4_grouped_gemm.py (dense), see docs/fp4.md. Each is also a ``torch.library`` custom op
(cute_moe/library.py, pairs split into tensors) that the public functions call while torch.compile
traces; the recipe arguments are checked at trace time and not passed (only one recipe exists).
"""

from typing import Optional

import torch

from .launcher import ContiguousOp, DenseOp, MaskedOp
from .layouts.scale_factors import transform_sf_into_required_layout
from .operand_io import OperandIO
from .operands import PRECISIONS
from .validation import check_contiguous, check_int_arg, check_multiple, check_placement, check_shape, check_tensor

MX_BLOCK = 32  # K elements per UE8M0 exponent
PACKED_DTYPES = (torch.int8, torch.uint8)
EXPONENT_DTYPES = (torch.uint8,)
ROW_ALIGN_BYTES = 16  # the kernel reads exponent rows from 16-byte aligned strides
RECIPE_A = (1, 128)  # FP8 activations: one FP32 scale per row per 128 K
RECIPE_B = (1, MX_BLOCK)  # MXFP4 weights: one UE8M0 exponent per row per 32 K


class Fp4WeightIO(OperandIO):
    """The MXFP4 B operand: packed codes and their UE8M0 exponents."""

    def __init__(self, operand, name: str = "b", sf_name: str = "sfb"):
        super().__init__(operand, name, sf_name)
        self.dtypes = PACKED_DTYPES

    def check_packed(self, b: torch.Tensor, ndim: int) -> int:
        """Checks b; returns the unpacked K (``2 * b.shape[-1]``)."""
        check_tensor(self.name, b, PACKED_DTYPES, ndim)
        k = 2 * b.shape[-1]
        if k == 0 or k % MX_BLOCK != 0:
            raise ValueError(f"{self.name}: expected packed K/2 = b.shape[-1] with K a positive multiple of "
                             f"{MX_BLOCK} (whole MXFP4 blocks), got b.shape[-1]={b.shape[-1]} (K={k})")
        check_contiguous(self.name, b)
        return k

    def check_exponents(self, sfb: torch.Tensor, lead: tuple, n: int, k: int, device: torch.device) -> None:
        """sfb: uint8 ``lead + [N, K/32]`` on b's device."""
        if isinstance(sfb, torch.Tensor) and sfb.dtype == torch.float32:
            raise TypeError(f"{self.sf_name}: expected dtype uint8 (UE8M0 exponents), got float32; convert "
                            f"power-of-two scales with cute_moe.float_to_ue8m0 (and "
                            f"transform_sf_into_required_layout(sf, n, k, (1, 32), num_groups))")
        shape = lead + (n, k // MX_BLOCK)
        check_tensor(self.sf_name, sfb, EXPONENT_DTYPES, len(shape))
        check_shape(self.sf_name, sfb, shape)
        if sfb.device != device:
            raise ValueError(f"{self.sf_name}: expected device {device} (same as {self.name}), got {sfb.device}")

    @staticmethod
    def kernel_exponents(sfb: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """sfb as the kernel reads it: K contiguous, 16-byte aligned base and row strides."""
        strides_ok = sfb.stride(-1) == 1 and all(s % ROW_ALIGN_BYTES == 0 for s in sfb.stride()[:-1])
        if strides_ok and sfb.data_ptr() % ROW_ALIGN_BYTES == 0:
            return sfb
        groups = sfb.shape[0] if sfb.dim() == 3 else None
        return transform_sf_into_required_layout(sfb, n, k, RECIPE_B, groups)


def check_recipes(recipe, recipe_a, recipe_b) -> None:
    """DeepGEMM's recipe arguments: only the granularities these kernels implement are accepted."""
    if recipe is not None:
        why = " (per-32 activation scales are not implemented on sm_90a)" if recipe in ((1, 1, 32), [1, 1, 32]) else ""
        raise ValueError(f"recipe: the sm_90a FP8 x FP4 kernels take sfa per (1, 128) and sfb per (1, 32); "
                         f"give recipe_a={RECIPE_A} / recipe_b={RECIPE_B} or leave recipes out, got "
                         f"recipe={recipe!r}{why}")
    for name, value, expected in (("recipe_a", recipe_a, RECIPE_A), ("recipe_b", recipe_b, RECIPE_B)):
        if value is not None and value not in (expected, list(expected)):
            raise ValueError(f"{name}: expected None or {expected}, got {value!r}")


def _check_activation(op, a: torch.Tensor, ndim: int, k: int, b_shape: tuple) -> None:
    op.a.check(a, ndim)
    if a.shape[-1] != k:
        raise ValueError(f"a: expected K={k} (2 * b.shape[-1], b of shape {tuple(b_shape)}), got a of shape "
                         f"{tuple(a.shape)}")
    check_contiguous("a", a)


class Fp4DenseOp(DenseOp):
    """d = c + a @ dequant(b).T: a [M, K], b packed [N, K/2] with sfb [N, K/32]."""

    def __init__(self, name: str, a, b):
        super().__init__(name, a, b)
        self.b = Fp4WeightIO(b)

    def facts(self, a, sfa, b, sfb, d, c) -> dict:
        return {**super().facts(a, sfa, b, sfb, d, c), "k": 2 * b.shape[1]}

    def kernel_args(self, a, sfa, b, sfb, d, c) -> tuple:
        return (self.a.kernel(a), b.view(torch.uint8), d, c, self.a.kernel_scales(sfa),
                self.b.kernel_exponents(sfb, b.shape[0], 2 * b.shape[1]), None)

    def validate(self, a, sfa, b, sfb, d, c) -> None:
        k = self.b.check_packed(b, 2)
        n = b.shape[0]
        _check_activation(self, a, 2, k, b.shape)
        m = a.shape[0]
        check_tensor("d", d, (torch.bfloat16, torch.float32), 2)
        check_shape("d", d, (m, n))
        check_multiple("b", n, 8, "N")
        check_contiguous("d", d)
        if c is not None:
            check_tensor("c", c, (d.dtype,), 2)
            check_shape("c", c, (m, n))
            check_contiguous("c", c)
        self.a.check_scales(sfa, (m,), k)
        self.b.check_exponents(sfb, (), n, k, b.device)
        check_placement(a=a, b=b, d=d, c=c, sfa=sfa)


class Fp4ContiguousOp(ContiguousOp):
    """M-grouped contiguous with FP4 weights: a [M, K], b packed [G, N, K/2], sfb [G, N, K/32]."""

    def __init__(self, name: str, a, b):
        super().__init__(name, a, b)
        self.b = Fp4WeightIO(b)

    def facts(self, *args) -> dict:
        return {**super().facts(*args), "k": 2 * args[2].shape[2]}

    def kernel_args(self, a, sfa, b, sfb, d, grouped_layout, use_psum_layout, alignment) -> tuple:
        return (self.a.kernel(a), b.view(torch.uint8), d, None, self.a.kernel_scales(sfa),
                self.b.kernel_exponents(sfb, b.shape[1], 2 * b.shape[2]), grouped_layout)

    def validate(self, a, sfa, b, sfb, d, grouped_layout, use_psum_layout, alignment) -> None:
        if not isinstance(use_psum_layout, bool):
            raise TypeError(f"use_psum_layout: expected bool, got {type(use_psum_layout).__name__}")
        k = self.b.check_packed(b, 3)
        num_groups, n = b.shape[0], b.shape[1]
        _check_activation(self, a, 2, k, b.shape)
        m = a.shape[0]
        check_tensor("d", d, (torch.bfloat16, torch.float32), 2)
        check_tensor("grouped_layout", grouped_layout, (torch.int32,), 1)
        check_shape("d", d, (m, n))
        check_shape("grouped_layout", grouped_layout, (num_groups,) if use_psum_layout else (m,))
        check_multiple("b", n, 8, "N")
        self.check_groups("b", num_groups, b.device)
        check_contiguous("d", d)
        check_contiguous("grouped_layout", grouped_layout)
        check_multiple("a", m, alignment, "the row count (aligned expert segments)")
        self.a.check_scales(sfa, (m,), k)
        self.b.check_exponents(sfb, (num_groups,), n, k, b.device)
        check_placement(a=a, b=b, d=d, grouped_layout=grouped_layout, sfa=sfa)


class Fp4MaskedOp(MaskedOp):
    """M-grouped masked with FP4 weights: a [G, Mmax, K], b packed [G, N, K/2], sfb [G, N, K/32]."""

    def __init__(self, name: str, a, b):
        super().__init__(name, a, b)
        self.b = Fp4WeightIO(b)

    def facts(self, *args) -> dict:
        return {**super().facts(*args), "k": 2 * args[2].shape[2]}

    def kernel_args(self, a, sfa, b, sfb, d, masked_m, expected_m) -> tuple:
        return (self.a.kernel(a), b.view(torch.uint8), d, None, self.a.kernel_scales(sfa),
                self.b.kernel_exponents(sfb, b.shape[1], 2 * b.shape[2]), masked_m)

    def validate(self, a, sfa, b, sfb, d, masked_m, expected_m) -> None:
        k = self.b.check_packed(b, 3)
        _check_activation(self, a, 3, k, b.shape)
        check_tensor("d", d, (torch.bfloat16, torch.float32), 3)
        check_tensor("masked_m", masked_m, (torch.int32,), 1)
        check_int_arg("expected_m", expected_m, 0)
        num_groups, max_m, _ = a.shape
        n = b.shape[1]
        check_shape("b", b, (num_groups, n, k // 2))
        check_shape("d", d, (num_groups, max_m, n))
        check_shape("masked_m", masked_m, (num_groups,))
        check_multiple("b", n, 8, "N")
        self.check_groups("a", num_groups, a.device)
        check_contiguous("d", d)
        check_contiguous("masked_m", masked_m)
        self.a.check_scales(sfa, (num_groups, max_m), k)
        self.b.check_exponents(sfb, (num_groups,), n, k, b.device)
        check_placement(a=a, b=b, d=d, masked_m=masked_m, sfa=sfa)


FP8XFP4, BF16XFP4 = PRECISIONS["fp8xfp4"], PRECISIONS["bf16xfp4"]
FP4_OPS = {op.name: op for op in (
    Fp4DenseOp("fp8_fp4_gemm_nt", *FP8XFP4),
    Fp4ContiguousOp("m_grouped_fp8_fp4_gemm_nt_contiguous", *FP8XFP4),
    Fp4MaskedOp("m_grouped_fp8_fp4_gemm_nt_masked", *FP8XFP4),
    Fp4ContiguousOp("m_grouped_bf16_fp4_gemm_nt_contiguous", *BF16XFP4),
    Fp4MaskedOp("m_grouped_bf16_fp4_gemm_nt_masked", *BF16XFP4),
)}


def fp8_fp4_gemm_nt(a: tuple, b: tuple, d: torch.Tensor, c: Optional[torch.Tensor] = None, recipe=None,
                    recipe_a=None, recipe_b=None) -> None:
    """d = c + (a * sfa) @ dequant(b, sfb).T: a (E4M3 [M, K], sfa FP32 [M, K/128]), b (packed E2M1 int8
    [N, K/2], sfb uint8 UE8M0 [N, K/32]); d and c [M, N] bf16 or fp32 (same dtype), c optional."""
    check_recipes(recipe, recipe_a, recipe_b)
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.fp8_fp4_gemm_nt(a[0], a[1], b[0], b[1], d, c)
    FP4_OPS["fp8_fp4_gemm_nt"](a, b, d, c)


def m_grouped_fp8_fp4_gemm_nt_contiguous(a: tuple, b: tuple, d: torch.Tensor, grouped_layout: torch.Tensor,
                                         use_psum_layout: bool = False, recipe=None, recipe_a=None,
                                         recipe_b=None) -> None:
    """M-grouped contiguous FP8 x FP4: like ``m_grouped_fp8_gemm_nt_contiguous`` with b (packed E2M1
    int8 [G, N, K/2], sfb uint8 UE8M0 [G, N, K/32]); grouped_layout per row, or psum ends. Each tile
    takes its expert from its first row (as DeepGEMM): padding rows inside an expert's last tile
    receive unspecified values (psum: left unwritten); rows of tiles whose expert id lies outside
    [0, G) are left unwritten."""
    check_recipes(recipe, recipe_a, recipe_b)
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.m_grouped_fp8_fp4_gemm_nt_contiguous(a[0], a[1], b[0], b[1], d, grouped_layout,
                                                                       use_psum_layout)
    FP4_OPS["m_grouped_fp8_fp4_gemm_nt_contiguous"](a, b, d, grouped_layout, use_psum_layout)


def m_grouped_fp8_fp4_gemm_nt_masked(a: tuple, b: tuple, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int,
                                     recipe=None, recipe_a=None, recipe_b=None) -> None:
    """M-grouped masked FP8 x FP4: d[g, :masked_m[g]] = (a[g] * sfa[g]) @ dequant(b[g], sfb[g]).T with a
    (E4M3 [G, Mmax, K], sfa [G, Mmax, K/128]), b (int8 [G, N, K/2], sfb uint8 [G, N, K/32]); rows past
    masked_m[g] are not written; the host never reads masked_m (CUDA-graph safe)."""
    check_recipes(recipe, recipe_a, recipe_b)
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.m_grouped_fp8_fp4_gemm_nt_masked(a[0], a[1], b[0], b[1], d, masked_m, expected_m)
    FP4_OPS["m_grouped_fp8_fp4_gemm_nt_masked"](a, b, d, masked_m, expected_m)


def m_grouped_bf16_fp4_gemm_nt_contiguous(a: torch.Tensor, b: tuple, d: torch.Tensor, grouped_layout: torch.Tensor,
                                          use_psum_layout: bool = False) -> None:
    """M-grouped contiguous BF16 x FP4: a bf16 [M, K] (aligned expert segments), b (int8 [G, N, K/2],
    sfb uint8 [G, N, K/32]), d [M, N] bf16 or fp32; grouped_layout as ``m_grouped_bf16_gemm_nt_contiguous``.
    Padding rows inside an expert's last tile receive unspecified values (psum: left unwritten); rows
    of tiles whose expert id lies outside [0, G) are left unwritten."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.m_grouped_bf16_fp4_gemm_nt_contiguous(a, b[0], b[1], d, grouped_layout,
                                                                        use_psum_layout)
    FP4_OPS["m_grouped_bf16_fp4_gemm_nt_contiguous"](a, b, d, grouped_layout, use_psum_layout)


def m_grouped_bf16_fp4_gemm_nt_masked(a: torch.Tensor, b: tuple, d: torch.Tensor, masked_m: torch.Tensor,
                                      expected_m: int) -> None:
    """M-grouped masked BF16 x FP4: a bf16 [G, Mmax, K], b (int8 [G, N, K/2], sfb uint8 [G, N, K/32]),
    d [G, Mmax, N] bf16 or fp32; masked_m as ``m_grouped_bf16_gemm_nt_masked``."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op (cute_moe/library.py)
        return torch.ops.cute_moe.m_grouped_bf16_fp4_gemm_nt_masked(a, b[0], b[1], d, masked_m, expected_m)
    FP4_OPS["m_grouped_bf16_fp4_gemm_nt_masked"](a, b, d, masked_m, expected_m)
