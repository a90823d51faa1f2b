"""FP8 E4M3 casts with per-token, per-block and per-channel scale factors (DeepGEMM semantics).

Every cast returns (x_fp8, sf) with x ~= x_fp8 * sf broadcast over its block; sf is float32,
sf = max(block_amax, 1e-4) / 448, rounded up to a power of two when use_ue8m0 is set.
All functions run on the input's device and never synchronize the host.
"""

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_int, check_shape, check_tensor
from .alignment import align

FP8_E4M3_MAX = 448.0
_MIN_AMAX = 1e-4


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """Round each |x| (float32) up to the nearest power of two, clamped to [2^-126, 2^127]."""
    check_tensor("x", x, (torch.float32,))
    bits = x.abs().view(torch.int32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent.clamp(1, 254) << 23).view(torch.float32)


def _cast_blocks(x: torch.Tensor, use_ue8m0: bool, block_rows: int,
                 block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [(G,) R, C] in block_rows x block_cols tiles (edge tiles zero-padded)."""
    check_tensor("x", x, FLOAT_DTYPES, (2, 3))
    if not isinstance(use_ue8m0, bool):
        raise TypeError(f"use_ue8m0: expected bool, got {type(use_ue8m0).__name__}")
    *lead, rows, cols = x.shape
    padded_rows, padded_cols = align(rows, block_rows), align(cols, block_cols)
    padded = F.pad(x, (0, padded_cols - cols, 0, padded_rows - rows))
    tiles = padded.view(*lead, padded_rows // block_rows, block_rows, padded_cols // block_cols, block_cols)
    amax = tiles.abs().float().amax(dim=(-3, -1)).clamp(min=_MIN_AMAX)
    sf = amax / FP8_E4M3_MAX
    if use_ue8m0:
        sf = ceil_to_ue8m0(sf)
    scaled = tiles.float() * (1.0 / sf)[..., :, None, :, None]
    x_fp8 = scaled.to(torch.float8_e4m3fn).view(*lead, padded_rows, padded_cols)
    return x_fp8[..., :rows, :cols].contiguous(), sf


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False,
                          gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [(G,) M, K] -> (e4m3 [(G,) M, K], sf [(G,) M, ceil(K/gran_k)]): one scale per 1 x gran_k group."""
    return _cast_blocks(x, use_ue8m0, 1, check_int("gran_k", gran_k))


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False,
                          gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [(G,) N, K] -> (e4m3, sf [(G,) ceil(N/gran_k), ceil(K/gran_k)]): one scale per gran_k^2 block."""
    gran_k = check_int("gran_k", gran_k)
    return _cast_blocks(x, use_ue8m0, gran_k, gran_k)


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False,
                            gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [(G,) K, MN] (K along rows) -> (e4m3, sf [(G,) ceil(K/gran_k), MN]): one scale per gran_k x 1 group.

    DeepGEMM's K-grouped (wgrad) layout; DeepGEMM requires K % gran_k == 0, here the tail is zero-padded.
    """
    return _cast_blocks(x, use_ue8m0, check_int("gran_k", gran_k), 1)


def _dequant_blocks(x_fp8: torch.Tensor, sf: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """Inverse of _cast_blocks: float32 x_fp8 * sf expanded over its tiles."""
    check_tensor("x_fp8", x_fp8, (torch.float8_e4m3fn,), (2, 3))
    check_tensor("sf", sf, (torch.float32,))
    *lead, rows, cols = x_fp8.shape
    check_shape("sf", sf, (*lead, align(rows, block_rows) // block_rows, align(cols, block_cols) // block_cols))
    expanded = sf.repeat_interleave(block_rows, dim=-2)[..., :rows, :]
    expanded = expanded.repeat_interleave(block_cols, dim=-1)[..., :cols]
    return x_fp8.float() * expanded


def per_token_dequant(x_fp8: torch.Tensor, sf: torch.Tensor, gran_k: int = 128) -> torch.Tensor:
    """Float32 reconstruction of a per_token_cast_to_fp8 result."""
    return _dequant_blocks(x_fp8, sf, 1, check_int("gran_k", gran_k))


def per_block_dequant(x_fp8: torch.Tensor, sf: torch.Tensor, gran_k: int = 128) -> torch.Tensor:
    """Float32 reconstruction of a per_block_cast_to_fp8 result."""
    gran_k = check_int("gran_k", gran_k)
    return _dequant_blocks(x_fp8, sf, gran_k, gran_k)


def per_channel_dequant(x_fp8: torch.Tensor, sf: torch.Tensor, gran_k: int = 128) -> torch.Tensor:
    """Float32 reconstruction of a per_channel_cast_to_fp8 result."""
    return _dequant_blocks(x_fp8, sf, check_int("gran_k", gran_k), 1)
