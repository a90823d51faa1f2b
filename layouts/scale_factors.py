"""Scale-factor layouts the GEMM kernels load through TMA (DeepGEMM semantics).

Kernels read scale factors MN-major: element (mn, k) of a [(G,) MN, SFK] tensor lives at
mn + k * tma_aligned_mn (+ g * SFK * tma_aligned_mn), with tma_aligned_mn = MN rounded up to 16 bytes.
SM90 reads float32 scales; SM100 reads UE8M0 exponents packed four along K per int32. The SM90 MXFP4
recipe (1, 32) is the exception: uint8 UE8M0 exponents read K-major (docs/fp4.md).
All functions are sync-free.
"""

import re

import torch

from ._checks import check_int, check_tensor
from .alignment import align
from .token_layout import psum_to_grouped_layout

_TMA_ALIGNMENT_BYTES = 16
_SM100_GRAN_K = (32, 128)
_MXFP4_GRAN_K = 32


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """Round x elements of element_size bytes up to a multiple of 16 bytes."""
    check_int("x", x, minimum=0)
    check_int("element_size", element_size)
    if _TMA_ALIGNMENT_BYTES % element_size != 0:
        raise ValueError(f"element_size: expected a divisor of {_TMA_ALIGNMENT_BYTES}, got {element_size}")
    return align(x, _TMA_ALIGNMENT_BYTES // element_size)


def _batched(sf: torch.Tensor) -> torch.Tensor:
    check_tensor("sf", sf, (torch.float32,), (2, 3))
    return sf if sf.dim() == 3 else sf.unsqueeze(0)


def _mn_major_buffer(like: torch.Tensor, mn: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeroed [B, mn, cols] view with strides (cols * aligned_mn, 1, aligned_mn)."""
    aligned_mn = get_tma_aligned_size(mn, dtype.itemsize)
    storage = torch.zeros(like.size(0), cols, aligned_mn, dtype=dtype, device=like.device)
    return storage.transpose(1, 2)[:, :mn]


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """Float32 sf [(G,) MN, SFK] with the same values, stored MN-major with a TMA-aligned MN stride.

    Returns sf itself when it already has that layout.
    """
    batched = _batched(sf)
    num_batches, mn, sf_k = batched.shape
    aligned_mn = get_tma_aligned_size(mn, sf.element_size())
    if ((sf.dim() == 2 or batched.stride(0) == aligned_mn * sf_k)
            and batched.stride(1) == 1 and batched.stride(2) == aligned_mn):
        return sf
    out = _mn_major_buffer(batched, mn, sf_k, torch.float32).copy_(batched)
    return out if sf.dim() == 3 else out.squeeze(0)


def get_mn_major_tma_aligned_packed_ue8m0_tensor(sf: torch.Tensor,
                                                 psum_layout: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 power-of-two sf [(G,) MN, SFK] -> int32 [(G,) MN, ceil(SFK/4)], MN-major and TMA-aligned.

    Byte b of int32 j holds the biased exponent (UE8M0) of sf[..., 4j + b]; missing K tail bytes are 0.
    Mantissa bits are dropped, so pass scales from ceil_to_ue8m0 / use_ue8m0=True. With psum_layout
    (int32 [num_groups], psum form, 2-D sf only), rows outside every group are packed as zeros.
    """
    batched = _batched(sf)
    num_batches, mn, sf_k = batched.shape
    exponents = ((batched.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    if psum_layout is not None:
        check_tensor("psum_layout", psum_layout, (torch.int32,), (1,))
        if sf.dim() != 2:
            raise ValueError(f"sf: expected a 2-D tensor with psum_layout, got shape {tuple(sf.shape)}")
        in_group = psum_to_grouped_layout(psum_layout, mn) >= 0
        exponents = torch.where(in_group[None, :, None], exponents, 0)
    packed_k = align(sf_k, 4) // 4
    packed_bytes = torch.zeros(num_batches, mn, packed_k * 4, dtype=torch.uint8, device=sf.device)
    packed_bytes[..., :sf_k] = exponents
    out = _mn_major_buffer(batched, mn, packed_k, torch.int32).copy_(packed_bytes.view(torch.int32))
    return out if sf.dim() == 3 else out.squeeze(0)


def _k_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """sf [(G,) MN, SFK] with the same values, K-major with the SFK (row) stride rounded up to 16 bytes
    and groups stacked densely; returns sf itself when it already has that layout."""
    mn, sf_k = sf.shape[-2:]
    aligned_k = get_tma_aligned_size(sf_k, sf.element_size())
    if sf.stride(-1) == 1 and sf.stride(-2) == aligned_k and (sf.dim() == 2 or sf.stride(0) == mn * aligned_k):
        return sf
    storage = torch.zeros(*sf.shape[:-1], aligned_k, dtype=sf.dtype, device=sf.device)
    return storage[..., :sf_k].copy_(sf)


def _arch_major(arch: object) -> int:
    match = re.fullmatch(r"sm_(\d+)[af]?", arch) if isinstance(arch, str) else None
    major = int(match.group(1)) // 10 if match else None
    if major not in (9, 10):
        raise ValueError(f"arch: expected an SM90 or SM100 name such as 'sm_90a' or 'sm_100a', got {arch!r}")
    return major


def _granularity(recipe: object, is_sfa: bool | None) -> tuple[int, int]:
    """(gran_mn, gran_k) from a (gran_m, gran_n, gran_k) recipe plus is_sfa, or a (gran_mn, gran_k) recipe."""
    if not isinstance(recipe, tuple) or len(recipe) not in (2, 3) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in recipe):
        raise ValueError(f"recipe: expected a tuple of 2 or 3 positive ints, got {recipe!r}")
    if len(recipe) == 3:
        if not isinstance(is_sfa, bool):
            raise ValueError(f"is_sfa: expected a bool with a 3-element recipe, got {is_sfa!r}")
        return recipe[0] if is_sfa else recipe[1], recipe[2]
    if is_sfa is not None:
        raise ValueError(f"is_sfa: expected None with a 2-element recipe, got {is_sfa!r}")
    return recipe[0], recipe[1]


def _check_sf_shape(sf: torch.Tensor, mn: int, k: int, gran_mn: int, gran_k: int, num_groups: int | None) -> None:
    check_tensor("sf", sf, (torch.float32, torch.int32, torch.uint8), (2,) if num_groups is None else (3,))
    check_int("mn", mn)
    check_int("k", k)
    k_per_column = gran_k * (4 if sf.dtype == torch.int32 else 1)
    expected = (align(mn, gran_mn) // gran_mn, align(k, k_per_column) // k_per_column)
    if num_groups is not None:
        expected = (check_int("num_groups", num_groups), *expected)
    if tuple(sf.shape) != expected:
        raise ValueError(f"sf: expected shape {expected} for mn={mn}, k={k}, granularity ({gran_mn}, {gran_k}), "
                         f"num_groups={num_groups}, got {tuple(sf.shape)}")


def _check_packed_strides(sf: torch.Tensor, mn: int) -> None:
    """The int32 packed layout: MN-major, MN stride TMA-aligned, groups stacked densely."""
    aligned_mn = get_tma_aligned_size(mn, sf.element_size())
    ok = (sf.stride(-2) == 1 or mn == 1) and sf.stride(-1) == aligned_mn
    if sf.dim() == 3:
        ok = ok and sf.stride(0) == sf.stride(-1) * sf.size(-1)
    if not ok:
        raise ValueError(f"sf: expected MN-major strides with MN stride {aligned_mn}, got {sf.stride()}")


def _check_dense_strides(sf: torch.Tensor) -> None:
    """SM90 128x128 SFB: contiguous, or contiguous after swapping the last two dimensions."""
    rows, cols = sf.shape[-2:]
    ok = (sf.stride(-1) == 1 and sf.stride(-2) == cols) or (sf.stride(-1) == rows and sf.stride(-2) == 1)
    if sf.dim() == 3:
        ok = ok and sf.stride(0) == rows * cols
    if not ok:
        raise ValueError(f"sf: expected K-major or MN-major dense strides, got {sf.stride()}")


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe: tuple[int, ...],
                                      num_groups: int | None = None, is_sfa: bool | None = None,
                                      disable_ue8m0_cast: bool = False, psum_layout: torch.Tensor | None = None,
                                      arch: str = "sm_90a") -> torch.Tensor:
    """Put scale factors for an [mn, k] operand into the layout the arch's kernels read.

    recipe is (gran_m, gran_n, gran_k) with is_sfa picking gran_m or gran_n, or (gran_mn, gran_k).
    sf is [(num_groups,) ceil(mn/gran_mn), ceil(k/gran_k)] float32, int32 already packed for SM100, or
    uint8 UE8M0 exponents for the SM90 MXFP4 recipe.
    sm_90a (or disable_ue8m0_cast): (1, 128) float32 -> MN-major TMA-aligned; (128, 128) float32 is
    checked and returned as is. sm_90a: (1, 32) uint8 exponents (float_to_ue8m0 of power-of-two
    scales, or gpt-oss `*_scales`) -> K-major uint8 with a 16-byte-aligned row stride.
    sm_100a: float32 with gran_k 32/128 -> rows broadcast to gran_mn 1,
    packed UE8M0 (psum_layout as in get_mn_major_tma_aligned_packed_ue8m0_tensor); packed int32 with
    gran_mn 1 is checked and returned as is.
    """
    major = _arch_major(arch)
    gran_mn, gran_k = _granularity(recipe, is_sfa)
    _check_sf_shape(sf, mn, k, gran_mn, gran_k, num_groups)
    sm90_like = major == 9 or disable_ue8m0_cast
    if sf.dtype == torch.float32 and gran_k == 128 and sm90_like and gran_mn == 1:
        return get_mn_major_tma_aligned_tensor(sf)
    if sf.dtype == torch.float32 and gran_k == 128 and sm90_like and gran_mn == 128:
        _check_dense_strides(sf)
        return sf
    if sf.dtype == torch.uint8 and gran_k == _MXFP4_GRAN_K and major == 9 and gran_mn == 1:
        return _k_major_tma_aligned_tensor(sf)
    if major == 10 and gran_k in _SM100_GRAN_K and sf.dtype == torch.float32:
        if disable_ue8m0_cast:
            raise ValueError("disable_ue8m0_cast: expected False for SM100 float32 scales, got True")
        rows = torch.arange(mn, device=sf.device) // gran_mn
        per_row = sf if gran_mn == 1 else sf.index_select(-2, rows)
        return get_mn_major_tma_aligned_packed_ue8m0_tensor(per_row, psum_layout)
    if major == 10 and gran_k in _SM100_GRAN_K and sf.dtype == torch.int32 and gran_mn == 1:
        _check_packed_strides(sf, mn)
        return sf
    hint = ("; the sm_90a MXFP4 recipe takes uint8 UE8M0 exponents (float_to_ue8m0)"
            if major == 9 and gran_k == _MXFP4_GRAN_K and sf.dtype == torch.float32 else "")
    raise ValueError(f"recipe: no {arch} layout for {sf.dtype} scale factors with granularity "
                     f"(mn={gran_mn}, k={gran_k}) and disable_ue8m0_cast={disable_ue8m0_cast}{hint}")
