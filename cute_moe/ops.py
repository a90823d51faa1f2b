"""Public BF16 GEMM operations (DeepGEMM names and semantics) on torch tensors.

First call of a shape: full Python validation, dispatch, compile or load, then launch.
Warm call: one dict lookup keyed by the static shape, then the TVM-FFI launch on the current CUDA
stream; TVM-FFI itself checks dtypes, shapes, strides, device type and 16-byte alignment before it
launches, and when it refuses an argument the Python validation runs to raise an error that names
the public argument with expected vs actual.
"""

from typing import Callable, Optional

import torch

from .dispatch import forced_config
from .kernels.tile_scheduler import MAX_GROUPS
from .launch import _launches, build_launch, run_launch
from .layouts.alignment import get_mk_alignment_for_contiguous_layout
from .validation import (check_contiguous, check_int_arg, check_multiple, check_placement, check_shape,
                         check_tensor)

_BF16 = (torch.bfloat16,)
_OUT = (torch.bfloat16, torch.float32)
_INT32 = (torch.int32,)


def on_device(device: int, *tensors) -> bool:
    """Whether every given tensor (None skipped) lives on CUDA device ``device`` (the warm path's
    placement check; TVM-FFI checks only the device type)."""
    return all(t is None or t.get_device() == device for t in tensors)


def static_key(validate: Callable[[], None], make_key: Callable[[], tuple]) -> tuple:
    """The launch key; a non-tensor argument (no .shape) gets the full validation's TypeError."""
    try:
        return make_key()
    except AttributeError:
        validate()
        raise


def _check_nk(n: int, k: int) -> None:
    check_multiple("b", k, 8, "K")
    check_multiple("b", n, 8, "N")
    if k == 0 or n == 0:
        raise ValueError(f"b: expected non-empty N and K, got N={n}, K={k}")


def _check_groups(name: str, num_groups: int) -> None:
    if not 1 <= num_groups <= MAX_GROUPS:
        raise ValueError(f"{name}: expected between 1 and {MAX_GROUPS} groups, got {num_groups}")


def _validate_dense(a, b, d, c, operand_dtypes: tuple = _BF16) -> None:
    check_tensor("a", a, operand_dtypes, 2)
    check_tensor("b", b, operand_dtypes, 2)
    check_tensor("d", d, _OUT, 2)
    m, k = a.shape
    n = b.shape[0]
    check_shape("b", b, (n, k))
    check_shape("d", d, (m, n))
    _check_nk(n, k)
    for name, t in (("a", a), ("b", b), ("d", d)):
        check_contiguous(name, t)
    if c is not None:
        check_tensor("c", c, (d.dtype,), 2)
        check_shape("c", c, (m, n))
        check_contiguous("c", c)
    check_placement(a=a, b=b, d=d, c=c)


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + a @ b.T (c optional, may be d itself): a [M, K] bf16, b [N, K] bf16, d and c [M, N]
    bf16 or fp32 (same dtype)."""
    def validate() -> None:
        _validate_dense(a, b, d, c)

    key = static_key(validate, lambda: ("dense", b.shape, a.shape[0].bit_length(), d.dtype, c is None,
                                        a.get_device(), forced_config()))
    launch = _launches.get(key)
    m = a.shape[0]
    if launch is None or m == 0 or not on_device(key[5], b, d, c):
        validate()
        if m == 0:
            return
        launch = launch or build_launch(key, "dense", b.shape[0], b.shape[1], d.dtype, c is not None, 1, m,
                                        a.device)
    run_launch(launch, validate, a, b, d, c, None, None, None)


def _validate_contiguous(a, b, d, grouped_layout, use_psum_layout: bool, operand_dtypes: tuple = _BF16) -> None:
    check_tensor("a", a, operand_dtypes, 2)
    check_tensor("b", b, operand_dtypes, 3)
    check_tensor("d", d, _OUT, 2)
    check_tensor("grouped_layout", grouped_layout, _INT32, 1)
    m, k = a.shape
    num_groups, n = b.shape[0], b.shape[1]
    check_shape("b", b, (num_groups, n, k))
    check_shape("d", d, (m, n))
    check_shape("grouped_layout", grouped_layout, (num_groups,) if use_psum_layout else (m,))
    _check_nk(n, k)
    _check_groups("b", num_groups)
    for name, t in (("a", a), ("b", b), ("d", d), ("grouped_layout", grouped_layout)):
        check_contiguous(name, t)
    check_multiple("a", m, get_mk_alignment_for_contiguous_layout(), "the row count (aligned expert segments)")
    check_placement(a=a, b=b, d=d, grouped_layout=grouped_layout)


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                                      grouped_layout: torch.Tensor, use_psum_layout: bool = False) -> None:
    """d[r] = a[r] @ b[expert(r)].T for every row r that belongs to an expert.

    a [M, K] bf16 holds every expert's rows, each expert's segment starting at a multiple of
    ``get_mk_alignment_for_contiguous_layout()`` (M a multiple of it too); b [G, N, K] bf16; d [M, N]
    bf16 or fp32. grouped_layout is int32 [M], each row's expert and -1 on padding rows, or with
    ``use_psum_layout`` int32 [G] of cumulative unaligned ends (expert g owns rows
    [align(ends[g-1]), ends[g])). Padding rows of d are left unspecified. Expert ids >= G are not
    detected on the device: their rows come out as zeros.
    """
    def validate() -> None:
        _validate_contiguous(a, b, d, grouped_layout, use_psum_layout)

    alignment = get_mk_alignment_for_contiguous_layout()
    kind = "psum" if use_psum_layout else "contiguous"
    key = static_key(validate, lambda: (kind, b.shape, d.dtype, alignment, a.get_device(), forced_config()))
    launch = _launches.get(key)
    m = a.shape[0]
    if launch is None or m % alignment != 0 or m == 0 or not on_device(key[4], b, d, grouped_layout):
        validate()
        if m == 0:
            return
        launch = launch or build_launch(key, kind, b.shape[1], b.shape[2], d.dtype, False, b.shape[0], 0,
                                        a.device)
    run_launch(launch, validate, a, b, d, None, None, None, grouped_layout)


def _validate_masked(a, b, d, masked_m, expected_m, operand_dtypes: tuple = _BF16) -> None:
    check_tensor("a", a, operand_dtypes, 3)
    check_tensor("b", b, operand_dtypes, 3)
    check_tensor("d", d, _OUT, 3)
    check_tensor("masked_m", masked_m, _INT32, 1)
    check_int_arg("expected_m", expected_m, 0)
    num_groups, max_m, k = a.shape
    n = b.shape[1]
    check_shape("b", b, (num_groups, n, k))
    check_shape("d", d, (num_groups, max_m, n))
    check_shape("masked_m", masked_m, (num_groups,))
    _check_nk(n, k)
    _check_groups("a", num_groups)
    for name, t in (("a", a), ("b", b), ("d", d), ("masked_m", masked_m)):
        check_contiguous(name, t)
    check_placement(a=a, b=b, d=d, masked_m=masked_m)


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int) -> None:
    """d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T; rows >= masked_m[g] of d are not written.

    a [G, Mmax, K] bf16, b [G, N, K] bf16, d [G, Mmax, N] bf16 or fp32, masked_m int32 [G] on the GPU
    (never read by the host, so CUDA graphs stay valid when it changes); expected_m: a tuning hint
    (typical rows per expert). masked_m[g] > Mmax is treated as Mmax.
    """
    def validate() -> None:
        _validate_masked(a, b, d, masked_m, expected_m)

    key = static_key(validate, lambda: ("masked", b.shape, d.dtype, expected_m, a.get_device(), forced_config()))
    launch = _launches.get(key)
    if (launch is None or type(expected_m) is not int or a.numel() == 0
            or not on_device(key[4], b, d, masked_m)):
        validate()
        if a.numel() == 0:
            return
        launch = launch or build_launch(key, "masked", b.shape[1], b.shape[2], d.dtype, False, b.shape[0],
                                        expected_m, a.device)
    run_launch(launch, validate, a, b, d, None, None, None, masked_m)


def _validate_grouped_mm(a, b, offs, out_dtype) -> None:
    check_tensor("a", a, _BF16, 2)
    check_tensor("b", b, _BF16, 3)
    check_tensor("offs", offs, _INT32, 1)
    if out_dtype not in _OUT:
        raise TypeError(f"out_dtype: expected bfloat16 or float32, got {out_dtype}")
    m, k = a.shape
    num_groups, n = b.shape[0], b.shape[2]
    check_shape("b", b, (num_groups, k, n))
    check_shape("offs", offs, (num_groups,))
    _check_nk(n, k)
    _check_groups("b", num_groups)
    check_contiguous("a", a)
    check_contiguous("offs", offs)
    if not b.transpose(1, 2).is_contiguous():
        raise ValueError(f"b: expected K-contiguous [G, K, N] (strides (N*K, 1, K) = {(n * k, 1, k)}), "
                         f"got strides {b.stride()}")
    check_placement(a=a, b=b, offs=offs)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch._grouped_mm for 2-D a and 3-D b: out[offs[g-1]:offs[g]] = a[offs[g-1]:offs[g]] @ b[g].

    a [M, K] bf16; b [G, K, N] bf16 whose K is the contiguous dimension (e.g. ``w.transpose(-2, -1)``
    of a row-major [G, N, K] weight); offs int32 [G] cumulative group ends (unaligned, empty groups
    allowed, offs[-1] <= M; ends past M are clamped); returns out [M, N] in out_dtype (bf16 default, or
    fp32). Rows past offs[-1] are left unwritten, as in torch.
    """
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype

    def validate() -> None:
        _validate_grouped_mm(a, b, offs, out_dtype)

    key = static_key(validate, lambda: ("ragged", b.shape, out_dtype, a.get_device(), forced_config()))
    launch = _launches.get(key)
    if launch is None or a.shape[0] == 0 or not on_device(key[3], b, offs):
        validate()
        if a.shape[0] == 0:
            return torch.empty((0, b.shape[2]), dtype=out_dtype, device=a.device)
        launch = launch or build_launch(key, "ragged", b.shape[2], b.shape[1], out_dtype, False, b.shape[0], 0,
                                        a.device)
    out = torch.empty((a.shape[0], b.shape[2]), dtype=out_dtype, device=a.device)
    run_launch(launch, validate, a, b.transpose(1, 2), out, None, None, None, offs)
    return out
