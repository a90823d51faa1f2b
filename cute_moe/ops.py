"""Public BF16 GEMM operations (DeepGEMM names and semantics) on torch tensors.

Warm path: validate the arguments, one dict lookup, one TVM-FFI launch on the current CUDA stream.
"""

from typing import Callable, Optional

import torch

from . import runtime
from .dispatch import check_config_fits, choose_config, forced_config
from .kernels.tile_scheduler import MAX_GROUPS
from .layouts.alignment import get_mk_alignment_for_contiguous_layout
from .specs import GemmSpec
from .validation import (check_contiguous, check_int_arg, check_multiple, check_placement, check_shape,
                         check_tensor, dtype_name)

_BF16 = (torch.bfloat16,)
_OUT = (torch.bfloat16, torch.float32)
_INT32 = (torch.int32,)

# (kind, n, k, d dtype, has_c, groups, expected_m, alignment, device, forced config) -> (fn, max clusters)
_launchers: dict[tuple, tuple[Callable, int]] = {}


def _launcher(kind: str, n: int, k: int, d_dtype: torch.dtype, has_c: bool, num_groups: int, expected_m: int,
              device: torch.device) -> tuple[Callable, int]:
    alignment = get_mk_alignment_for_contiguous_layout() if kind == "contiguous" else 0
    forced = forced_config()
    key = (kind, n, k, d_dtype, has_c, num_groups, expected_m, alignment, device.index, forced)
    hit = _launchers.get(key)
    if hit is None:
        config = forced or choose_config(kind, n, k, num_groups, expected_m, alignment)
        check_config_fits(kind, config, alignment)
        spec = GemmSpec(kind=kind, n=n, k=k, d_dtype=dtype_name(d_dtype), has_c=has_c)
        hit = (runtime.get_kernel(spec, config), runtime.max_clusters(device, config.cluster_size))
        _launchers[key] = hit
    return hit


def _check_nk(n: int, k: int) -> None:
    check_multiple("b", k, 8, "K")
    check_multiple("b", n, 8, "N")
    if k == 0 or n == 0:
        raise ValueError(f"b: expected non-empty N and K, got N={n}, K={k}")


def _check_groups(name: str, num_groups: int) -> None:
    if not 1 <= num_groups <= MAX_GROUPS:
        raise ValueError(f"{name}: expected between 1 and {MAX_GROUPS} groups, got {num_groups}")


def bf16_gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: Optional[torch.Tensor] = None) -> None:
    """d = c + a @ b.T (c optional): a [M, K] bf16, b [N, K] bf16, d and c [M, N] bf16 or fp32."""
    check_tensor("a", a, _BF16, 2)
    check_tensor("b", b, _BF16, 2)
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
    if m == 0:
        return
    fn, clusters = _launcher("dense", n, k, d.dtype, c is not None, 1, m, a.device)
    fn(a, b, d, c, None, clusters)


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                                      grouped_layout: torch.Tensor) -> None:
    """d[r] = a[r] @ b[grouped_layout[r]].T for each row r with grouped_layout[r] >= 0.

    a [M, K] bf16 holds every expert's rows, each expert's segment starting at a multiple of
    ``get_mk_alignment_for_contiguous_layout()``; grouped_layout int32 [M] is -1 on padding rows
    (their d rows are left unspecified); b [G, N, K] bf16; d [M, N] bf16 or fp32.
    """
    check_tensor("a", a, _BF16, 2)
    check_tensor("b", b, _BF16, 3)
    check_tensor("d", d, _OUT, 2)
    check_tensor("grouped_layout", grouped_layout, _INT32, 1)
    m, k = a.shape
    num_groups, n = b.shape[0], b.shape[1]
    check_shape("b", b, (num_groups, n, k))
    check_shape("d", d, (m, n))
    check_shape("grouped_layout", grouped_layout, (m,))
    _check_nk(n, k)
    _check_groups("b", num_groups)
    for name, t in (("a", a), ("b", b), ("d", d), ("grouped_layout", grouped_layout)):
        check_contiguous(name, t)
    check_multiple("a", m, get_mk_alignment_for_contiguous_layout(), "the row count (aligned expert segments)")
    check_placement(a=a, b=b, d=d, grouped_layout=grouped_layout)
    if m == 0:
        return
    fn, clusters = _launcher("contiguous", n, k, d.dtype, False, num_groups, 0, a.device)
    fn(a, b, d, None, grouped_layout, clusters)


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int) -> None:
    """d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T; rows >= masked_m[g] of d are not written.

    a [G, Mmax, K] bf16, b [G, N, K] bf16, d [G, Mmax, N] bf16 or fp32, masked_m int32 [G] on the GPU
    (never read by the host, so CUDA graphs stay valid when it changes); expected_m: a tuning hint
    (typical rows per expert). masked_m[g] > Mmax is treated as Mmax.
    """
    check_tensor("a", a, _BF16, 3)
    check_tensor("b", b, _BF16, 3)
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
    if max_m == 0:
        return
    fn, clusters = _launcher("masked", n, k, d.dtype, False, num_groups, expected_m, a.device)
    fn(a, b, d, None, masked_m, clusters)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch._grouped_mm for 2-D a and 3-D b: out[offs[g-1]:offs[g]] = a[offs[g-1]:offs[g]] @ b[g].

    a [M, K] bf16; b [G, K, N] bf16 whose K is the contiguous dimension (e.g. ``w.transpose(-2, -1)``
    of a row-major [G, N, K] weight); offs int32 [G] cumulative group ends (unaligned, empty groups
    allowed, offs[-1] <= M); returns out [M, N] in out_dtype (bf16 default, or fp32). Rows past
    offs[-1] are left unwritten, as in torch.
    """
    check_tensor("a", a, _BF16, 2)
    check_tensor("b", b, _BF16, 3)
    check_tensor("offs", offs, _INT32, 1)
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
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
    weights = b.transpose(1, 2)
    if not weights.is_contiguous():
        raise ValueError(f"b: expected K-contiguous [G, K, N] (strides (N*K, 1, K) = {(n * k, 1, k)}), "
                         f"got strides {b.stride()}")
    check_placement(a=a, b=b, offs=offs)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    fn, clusters = _launcher("ragged", n, k, out_dtype, False, num_groups, 0, a.device)
    fn(a, weights, out, None, offs, clusters)
    return out
