"""MXFP4 (OCP Microscaling): E2M1 elements packed two per byte with one UE8M0 scale per 32 K elements.

E2M1 codes are 4 bits, sign in bit 3 and magnitude index in bits 0-2 over {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
Packed tensors are int8 [..., K/2] holding element 2i in the low nibble and element 2i+1 in the high
nibble of byte i. Scales are float32 (powers of two with use_ue8m0) like DeepGEMM's; UE8M0 bytes are
the biased exponents e of 2^(e - 127). Functions that inspect values (non-finite inputs, invalid codes
or exponents) synchronize the host once (load-time work); unpack_e2m1 and per_token_dequant_fp4 are
sync-free.
See docs/fp4.md.
"""

import torch

from ._checks import FLOAT_DTYPES, check_int, check_shape, check_tensor
from .quantization import _MIN_AMAX, ceil_to_ue8m0

FP4_E2M1_MAX = 6.0
MXFP4_BLOCK_SIZE = 32
UE8M0_BIAS = 127

# DeepGEMM's `amax / 6.0` runs on CUDA, where PyTorch divides by a Python scalar as a multiplication by
# its float32 reciprocal; multiplying explicitly gives those scales bit for bit on every device.
_INV_E2M1_MAX = 1.0 / FP4_E2M1_MAX
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_SIGN_SHIFT = 3
_E2M1_SIGN_BIT = 1 << _E2M1_SIGN_SHIFT
_E2M1_EXPONENT_MASK = 0x3
_E2M1_NUM_CODES = 16
_NIBBLE_BITS = 4
_NIBBLE_MASK = 0xF
_UE8M0_NAN = 255
_UE8M0_MIN_VALUE = 2.0 ** -UE8M0_BIAS  # exponent byte 0: a float32 subnormal
_FLOAT32_MANTISSA_BITS = 23
_GPT_OSS_BLOCK_BYTES = MXFP4_BLOCK_SIZE // 2


def _raise_at_first(name: str, bad: torch.Tensor, values: torch.Tensor, expected: str) -> None:
    """Raise ValueError naming the first (row-major) position where bad holds, with its value."""
    if bool(bad.any()):
        position = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name}: expected {expected}, got {values[position].item()} at position {position}")


def _check_finite(name: str, x: torch.Tensor) -> None:
    _raise_at_first(name, ~torch.isfinite(x), x, "finite values")


def _check_codes(name: str, codes: torch.Tensor) -> None:
    check_tensor(name, codes, (torch.uint8,))
    _raise_at_first(name, codes >= _E2M1_NUM_CODES, codes, f"E2M1 codes in [0, {_E2M1_NUM_CODES - 1}]")


def _encode(x: torch.Tensor) -> torch.Tensor:
    """Finite x -> uint8 codes: round to nearest, ties to the even code, saturate at 6, keep the sign."""
    magnitude = x.abs()
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for lower, (low, high) in enumerate(zip(_E2M1_MAGNITUDES, _E2M1_MAGNITUDES[1:])):
        midpoint = (low + high) / 2
        crossed = magnitude >= midpoint if (lower + 1) % 2 == 0 else magnitude > midpoint
        codes += crossed.to(torch.uint8)
    return codes | (torch.signbit(x).to(torch.uint8) << _E2M1_SIGN_SHIFT)


def _decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] -> float32 (code 8 is -0.0) from the bit fields, without a host copy.

    Twice the magnitude is the integer m for exponent field e = 0, else (2 + m) << (e - 1).
    """
    fields = codes.to(torch.int32)
    exponent, mantissa = (fields >> 1) & _E2M1_EXPONENT_MASK, fields & 1
    doubled = torch.where(exponent == 0, mantissa, (2 + mantissa) << (exponent - 1).clamp(min=0))
    magnitude = doubled.float() * 0.5
    return torch.where((fields & _E2M1_SIGN_BIT) != 0, -magnitude, magnitude)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[..., 0::2] | (codes[..., 1::2] << _NIBBLE_BITS)).view(torch.int8)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Float x (already scaled) -> uint8 E2M1 codes of the same shape, one per byte.

    Round to nearest, ties to even (the code with a 0 mantissa bit); |x| > 6 saturates to code 7 (6);
    signs are kept, including for zeros and values that round to zero (-0.0 -> 0x8).
    Non-finite x raises ValueError.
    """
    check_tensor("x", x, FLOAT_DTYPES)
    _check_finite("x", x)
    return _encode(x)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes in [0, 15] -> float32 values (exact)."""
    _check_codes("codes", codes)
    return _decode(codes)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (K even) -> int8 [..., K/2], code 2i in the low nibble of byte i."""
    _check_codes("codes", codes)
    if codes.dim() == 0 or codes.size(-1) % 2 != 0:
        raise ValueError(f"codes: expected an even last dimension, got shape {tuple(codes.shape)}")
    return _pack(codes)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """int8 [..., K/2] -> uint8 codes [..., K], the inverse of pack_e2m1."""
    check_tensor("packed", packed, (torch.int8,))
    if packed.dim() == 0:
        raise ValueError("packed: expected at least 1 dimension, got a 0-D tensor")
    nibbles = packed.view(torch.uint8)
    low, high = nibbles & _NIBBLE_MASK, nibbles >> _NIBBLE_BITS
    return torch.stack([low, high], dim=-1).flatten(-2)


def float_to_ue8m0(sf: torch.Tensor) -> torch.Tensor:
    """Float32 powers of two in [2^-127, 2^127] -> uint8 biased exponents (UE8M0); others raise ValueError."""
    check_tensor("sf", sf, (torch.float32,))
    mantissa, exponent = torch.frexp(sf)
    biased = exponent + (UE8M0_BIAS - 1)
    representable = (mantissa == 0.5) & (biased >= 0) & (biased < _UE8M0_NAN)
    _raise_at_first("sf", ~representable, sf, "powers of two in [2^-127, 2^127] (UE8M0)")
    return biased.to(torch.uint8)


def ue8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents e -> float32 2^(e - 127), exact; e = 255 (NaN in UE8M0) raises ValueError."""
    check_tensor("scales", scales, (torch.uint8,))
    _raise_at_first("scales", scales == _UE8M0_NAN, scales, f"UE8M0 exponents in [0, {_UE8M0_NAN - 1}]")
    normal = (scales.to(torch.int32) << _FLOAT32_MANTISSA_BITS).view(torch.float32)
    return torch.where(scales == 0, _UE8M0_MIN_VALUE, normal)


def _check_gran_k(gran_k: int) -> int:
    if check_int("gran_k", gran_k) % 2 != 0:
        raise ValueError(f"gran_k: expected an even int, got {gran_k}")
    return gran_k


def per_token_cast_to_fp4(x: torch.Tensor, use_ue8m0: bool = True,
                          gran_k: int = MXFP4_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """x [(G,) M, K] -> (int8 [(G,) M, K/2] packed E2M1, float32 sf [(G,) M, K/gran_k]).

    DeepGEMM's scale: sf = max(amax, 1e-4) * float32(1/6) (its `/ 6.0` as computed on CUDA), rounded up
    to a power of two with use_ue8m0; elements
    are x * (1 / sf) encoded as in e2m1_encode. K must be a multiple of gran_k; non-finite x raises.
    """
    check_tensor("x", x, FLOAT_DTYPES, (2, 3))
    if not isinstance(use_ue8m0, bool):
        raise TypeError(f"use_ue8m0: expected bool, got {type(use_ue8m0).__name__}")
    gran_k = _check_gran_k(gran_k)
    *lead, k = x.shape
    if k % gran_k != 0:
        raise ValueError(f"x: expected K (last dimension) a multiple of gran_k={gran_k}, got {k}")
    _check_finite("x", x)
    blocks = x.reshape(*lead, k // gran_k, gran_k)
    sf = blocks.abs().float().amax(dim=-1).clamp(min=_MIN_AMAX) * _INV_E2M1_MAX
    if use_ue8m0:
        sf = ceil_to_ue8m0(sf)
    codes = _encode(blocks * (1.0 / sf)[..., None]).view(*lead, k)
    return _pack(codes), sf


def per_token_dequant_fp4(x_fp4: torch.Tensor, sf: torch.Tensor, gran_k: int = MXFP4_BLOCK_SIZE) -> torch.Tensor:
    """Float32 [(G,) M, K] reconstruction of a per_token_cast_to_fp4 result: E2M1 value * sf of its group."""
    check_tensor("x_fp4", x_fp4, (torch.int8,), (2, 3))
    check_tensor("sf", sf, (torch.float32,))
    gran_k = _check_gran_k(gran_k)
    *lead, half_k = x_fp4.shape
    k = 2 * half_k
    if k % gran_k != 0:
        raise ValueError(f"x_fp4: expected K = 2 * {half_k} a multiple of gran_k={gran_k}, got {k}")
    check_shape("sf", sf, (*lead, k // gran_k))
    values = _decode(unpack_e2m1(x_fp4)).view(*lead, k // gran_k, gran_k)
    return (values * sf[..., None]).view(*lead, k)


def from_gpt_oss_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss `*_blocks` uint8 [(E,) N, K/32, 16] and `*_scales` uint8 [(E,) N, K/32] -> (x_fp4, sf).

    x_fp4 is int8 [(E,) N, K/2] (the same bytes; a view of blocks when blocks is contiguous), sf is
    float32 [(E,) N, K/32] = 2^(scales - 127), as per_token_cast_to_fp4(w, True, 32) returns them.
    """
    check_tensor("blocks", blocks, (torch.uint8,), (3, 4))
    if blocks.size(-1) != _GPT_OSS_BLOCK_BYTES:
        raise ValueError(f"blocks: expected a last dimension of {_GPT_OSS_BLOCK_BYTES} bytes, "
                         f"got shape {tuple(blocks.shape)}")
    check_tensor("scales", scales, (torch.uint8,))
    check_shape("scales", scales, blocks.shape[:-1])
    *lead, num_blocks, block_bytes = blocks.shape
    x_fp4 = blocks.reshape(*lead, num_blocks * block_bytes).view(torch.int8)
    return x_fp4, ue8m0_to_float(scales)


def to_gpt_oss_mxfp4(x_fp4: torch.Tensor, sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of from_gpt_oss_mxfp4: (int8 [(E,) N, K/2], power-of-two float32 sf [(E,) N, K/32])
    -> (blocks uint8 [(E,) N, K/32, 16], scales uint8 [(E,) N, K/32])."""
    check_tensor("x_fp4", x_fp4, (torch.int8,), (2, 3))
    *lead, half_k = x_fp4.shape
    if half_k % _GPT_OSS_BLOCK_BYTES != 0:
        raise ValueError(f"x_fp4: expected K = 2 * {half_k} a multiple of {MXFP4_BLOCK_SIZE}, got {2 * half_k}")
    check_tensor("sf", sf, (torch.float32,))
    num_blocks = half_k // _GPT_OSS_BLOCK_BYTES
    check_shape("sf", sf, (*lead, num_blocks))
    blocks = x_fp4.view(torch.uint8).reshape(*lead, num_blocks, _GPT_OSS_BLOCK_BYTES)
    return blocks, float_to_ue8m0(sf)
