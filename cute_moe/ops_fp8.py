"""Public FP8 block-scaled GEMM operations (DeepGEMM names and semantics, SM90 recipe).

Operands are ``(tensor, scales)`` pairs: A is E4M3 [.., M, K] with FP32 scales per row per 128 K
(``sfa`` [.., M, ceil(K/128)]), B is E4M3 [.., N, K] with FP32 scales per 128 x 128 block (``sfb``
[.., ceil(N/128), ceil(K/128)]). ``sfa`` may be given row-major (as ``per_token_cast_to_fp8``
returns it): it is then moved once into the MN-major, TMA-aligned layout the kernel reads (pass it
already transformed with ``transform_sf_into_required_layout`` to avoid that copy on every call).
"""

from typing import Optional

import torch

from .dispatch import forced_config
from .launch import _launches, build_launch, run_launch
from .layouts.alignment import get_mk_alignment_for_contiguous_layout
from .layouts.scale_factors import get_mn_major_tma_aligned_tensor
from .ops import _validate_contiguous, _validate_dense, _validate_masked, on_device, static_key
from .validation import check_multiple, check_placement, check_shape, check_tensor

_FP8 = (torch.float8_e4m3fn,)
_FP32 = (torch.float32,)
FP8 = "fp8_e4m3"


def _k_blocks(k: int) -> int:
    return (k + 127) // 128


def _pair(name: str, sf_name: str, operand) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an FP8 operand into (tensor, scales), both torch tensors."""
    if not isinstance(operand, (tuple, list)) or len(operand) != 2:
        raise TypeError(f"{name}: expected a (tensor, scale_factors) pair, got {type(operand).__name__}")
    for label, t in ((name, operand[0]), (sf_name, operand[1])):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label}: expected a torch.Tensor, got {type(t).__name__}")
    return operand[0], operand[1]


def _sfa_for_kernel(sfa: torch.Tensor) -> torch.Tensor:
    """sfa in the MN-major, TMA-aligned layout (returned as is when it already is)."""
    if sfa.dim() >= 2 and sfa.stride(-2) == 1 and sfa.stride(-1) % 4 == 0 and sfa.data_ptr() % 16 == 0:
        return sfa
    check_tensor("sfa", sfa, _FP32, sfa.dim())
    return get_mn_major_tma_aligned_tensor(sfa)


def _check_scales(sfa: torch.Tensor, sfa_shape: tuple, sfb: torch.Tensor, sfb_shape: tuple, k: int) -> None:
    check_tensor("sfa", sfa, _FP32, len(sfa_shape))
    check_tensor("sfb", sfb, _FP32, len(sfb_shape))
    check_shape("sfa", sfa, sfa_shape)
    check_shape("sfb", sfb, sfb_shape)
    if not sfb.is_contiguous():
        raise ValueError(f"sfb: expected contiguous [(G,) N/128, K/128] scales, got strides {sfb.stride()}")
    check_multiple("a", k, 16, "K (16-byte FP8 rows)")


def fp8_gemm_nt(a: tuple, b: tuple, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + (a * sfa) @ (b * sfb).T: a (E4M3 [M, K], sfa [M, K/128]), b (E4M3 [N, K], sfb
    [N/128, K/128]); d and c [M, N] bf16 or fp32 (same dtype); c optional, may be d itself."""
    a, sfa = _pair("a", "sfa", a)
    b, sfb = _pair("b", "sfb", b)
    def validate() -> None:
        _validate_dense(a, b, d, c, _FP8)
        m, (n, k) = a.shape[0], b.shape
        _check_scales(sfa, (m, _k_blocks(k)), sfb, (_k_blocks(n), _k_blocks(k)), k)
        check_placement(sfa=sfa, sfb=sfb)

    key = static_key(validate, lambda: ("fp8_dense", b.shape, a.shape[0].bit_length(), d.dtype, c is None,
                                        a.get_device(), forced_config()))
    launch = _launches.get(key)
    m = a.shape[0]
    if launch is None or m == 0 or not on_device(key[5], b, d, c, sfa, sfb):
        validate()
        if m == 0:
            return
        launch = launch or build_launch(key, "dense", b.shape[0], b.shape[1], d.dtype, c is not None, 1, m,
                                        a.device, FP8)
    run_launch(launch, validate, a.view(torch.uint8), b.view(torch.uint8), d, c, _sfa_for_kernel(sfa), sfb, None)


def m_grouped_fp8_gemm_nt_contiguous(a: tuple, b: tuple, d: torch.Tensor, grouped_layout: torch.Tensor,
                                     use_psum_layout: bool = False) -> None:
    """M-grouped contiguous FP8 GEMM: like ``m_grouped_bf16_gemm_nt_contiguous`` with (tensor, scales)
    operands: a (E4M3 [M, K], sfa [M, K/128]), b (E4M3 [G, N, K], sfb [G, N/128, K/128]); d [M, N] bf16
    or fp32."""
    a, sfa = _pair("a", "sfa", a)
    b, sfb = _pair("b", "sfb", b)
    alignment = get_mk_alignment_for_contiguous_layout()
    kind = "psum" if use_psum_layout else "contiguous"

    def validate() -> None:
        _validate_contiguous(a, b, d, grouped_layout, use_psum_layout, _FP8)
        g, n, k = b.shape
        _check_scales(sfa, (a.shape[0], _k_blocks(k)), sfb, (g, _k_blocks(n), _k_blocks(k)), k)
        check_placement(sfa=sfa, sfb=sfb)

    key = static_key(validate, lambda: ("fp8_" + kind, b.shape, d.dtype, alignment, a.get_device(),
                                        forced_config()))
    launch = _launches.get(key)
    m = a.shape[0]
    if (launch is None or m % alignment != 0 or m == 0
            or not on_device(key[4], b, d, grouped_layout, sfa, sfb)):
        validate()
        if m == 0:
            return
        launch = launch or build_launch(key, kind, b.shape[1], b.shape[2], d.dtype, False, b.shape[0], 0,
                                        a.device, FP8)
    run_launch(launch, validate, a.view(torch.uint8), b.view(torch.uint8), d, None, _sfa_for_kernel(sfa), sfb,
               grouped_layout)


def m_grouped_fp8_gemm_nt_masked(a: tuple, b: tuple, d: torch.Tensor, masked_m: torch.Tensor,
                                 expected_m: int) -> None:
    """M-grouped masked FP8 GEMM: like ``m_grouped_bf16_gemm_nt_masked`` with (tensor, scales)
    operands: a (E4M3 [G, Mmax, K], sfa [G, Mmax, K/128]), b (E4M3 [G, N, K], sfb [G, N/128, K/128]);
    d [G, Mmax, N] bf16 or fp32. The host never reads masked_m."""
    a, sfa = _pair("a", "sfa", a)
    b, sfb = _pair("b", "sfb", b)
    def validate() -> None:
        _validate_masked(a, b, d, masked_m, expected_m, _FP8)
        g, max_m, k = a.shape
        _check_scales(sfa, (g, max_m, _k_blocks(k)), sfb, (g, _k_blocks(b.shape[1]), _k_blocks(k)), k)
        check_placement(sfa=sfa, sfb=sfb)

    key = static_key(validate, lambda: ("fp8_masked", b.shape, d.dtype, expected_m, a.get_device(),
                                        forced_config()))
    launch = _launches.get(key)
    if (launch is None or type(expected_m) is not int or a.numel() == 0
            or not on_device(key[4], b, d, masked_m, sfa, sfb)):
        validate()
        if a.numel() == 0:
            return
        launch = launch or build_launch(key, "masked", b.shape[1], b.shape[2], d.dtype, False, b.shape[0],
                                        expected_m, a.device, FP8)
    run_launch(launch, validate, a.view(torch.uint8), b.view(torch.uint8), d, None, _sfa_for_kernel(sfa), sfb,
               masked_m)
