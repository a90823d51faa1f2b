"""CPU tests of the MXFP4 layouts (cute_moe.layouts.fp4) against table-based references in this file."""

import math

import pytest
import torch

from cute_moe.layouts import (
    FP4_E2M1_MAX,
    e2m1_decode,
    e2m1_encode,
    float_to_ue8m0,
    from_gpt_oss_mxfp4,
    pack_e2m1,
    per_token_cast_to_fp4,
    per_token_dequant_fp4,
    to_gpt_oss_mxfp4,
    transform_sf_into_required_layout,
    ue8m0_to_float,
    unpack_e2m1,
)

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
SIGN = 0x8
INV_SIX = torch.tensor(1.0, dtype=torch.float32) / 6.0  # float32(1/6)


def e2m1_reference(value: float) -> int:
    """Nearest grid magnitude (ties to the even code, saturating at 6) with the sign bit of value."""
    nearest = min(range(len(GRID)), key=lambda i: (abs(abs(value) - GRID[i]), i % 2))
    return nearest | (SIGN if math.copysign(1.0, value) < 0 else 0)


def decode_reference(code: int) -> float:
    return math.copysign(GRID[code & 7], -1.0 if code & SIGN else 1.0)


def cast_reference(x: torch.Tensor, use_ue8m0: bool, gran_k: int) -> tuple[list[list[int]], torch.Tensor]:
    """Loop over the gran_k-blocks of a 2-D x: DeepGEMM's scale from the block amax, then per-element codes.

    DeepGEMM's `amax / 6.0` runs on CUDA as amax * float32(1/6) (PyTorch multiplies by a scalar divisor's
    reciprocal there); the reference spells that out so that it does not depend on the device."""
    rows, cols = x.shape
    sf = torch.empty(rows, cols // gran_k)
    codes = [[0] * cols for _ in range(rows)]
    for r in range(rows):
        for b in range(cols // gran_k):
            block = x[r, b * gran_k:(b + 1) * gran_k].float()
            scale = torch.tensor(max(block.abs().max().item(), 1e-4), dtype=torch.float32) * INV_SIX
            if use_ue8m0:
                scale = torch.tensor(2.0 ** math.ceil(math.log2(scale.item())), dtype=torch.float32)
            sf[r, b] = scale
            for i, value in enumerate((block * (1.0 / scale)).tolist()):
                codes[r][b * gran_k + i] = e2m1_reference(value)
    return codes, sf


def pack_reference(codes: list[int]) -> list[int]:
    """Byte i = code 2i | code 2i+1 << 4, as signed int8."""
    return [((codes[2 * i] | codes[2 * i + 1] << 4) ^ 0x80) - 0x80 for i in range(len(codes) // 2)]


def gpt_oss_dequant_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The checkpoint's meaning: low nibble of byte j is element 2j of its 32-block, times 2^(scale - 127),
    rounded to float32 (2^127 times 2 or more overflows to inf)."""
    out = torch.empty(*blocks.shape[:-1], 32, dtype=torch.float64)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in blocks.shape[:-1])).view(-1, blocks.dim() - 1):
        position = tuple(index.tolist())
        scale = 2.0 ** (scales[position].item() - 127)
        for j, byte in enumerate(blocks[position].tolist()):
            out[position + (2 * j,)] = decode_reference(byte & 0xF) * scale
            out[position + (2 * j + 1,)] = decode_reference(byte >> 4) * scale
    return out.flatten(-2).float()


def blocks_of_varied_scale(rows: int, cols: int, dtype=torch.bfloat16, gran_k: int = 32) -> torch.Tensor:
    magnitudes = 10.0 ** torch.empty(rows, cols // gran_k, 1).uniform_(-3, 3)
    return (torch.randn(rows, cols // gran_k, gran_k) * magnitudes).view(rows, cols).to(dtype)


def codes_of(x_fp4: torch.Tensor) -> list[list[int]]:
    return unpack_e2m1(x_fp4).tolist()


# ---------------------------------------------------------------- E2M1 codes

def test_all_16_codes_decode():
    values = e2m1_decode(torch.arange(16, dtype=torch.uint8))
    assert values.dtype == torch.float32
    assert values.tolist() == [decode_reference(c) for c in range(16)]
    assert values.tolist() == GRID + [-v for v in GRID]
    assert torch.signbit(values).tolist() == [False] * 8 + [True] * 8  # code 8 is -0.0


def test_encode_of_every_code_value_is_that_code():
    values = torch.tensor([decode_reference(c) for c in range(16)])
    assert e2m1_encode(values).tolist() == list(range(16))


def test_every_midpoint_tie_rounds_to_the_even_code():
    midpoints = [(low + high) / 2 for low, high in zip(GRID, GRID[1:])]
    assert midpoints == [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0, 2, 2, 4, 4, 6, 6]  # 0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.tensor(midpoints + [-m for m in midpoints], dtype=dtype)
        assert e2m1_encode(x).tolist() == expected + [c | SIGN for c in expected]
    assert [e2m1_reference(m) for m in midpoints] == expected


def test_values_next_to_midpoints_round_to_the_nearer_code():
    midpoints = torch.tensor([(low + high) / 2 for low, high in zip(GRID, GRID[1:])])
    above = torch.nextafter(midpoints, torch.tensor(math.inf))
    below = torch.nextafter(midpoints, torch.tensor(0.0))
    assert e2m1_encode(above).tolist() == list(range(1, 8))
    assert e2m1_encode(below).tolist() == list(range(0, 7))


def test_values_between_codes_match_the_table_reference():
    torch.manual_seed(0)
    x = torch.cat([torch.empty(2000).uniform_(-7, 7), torch.randn(500) * 0.3])
    assert e2m1_encode(x).tolist() == [e2m1_reference(v) for v in x.tolist()]


def test_encode_saturates_beyond_six():
    big = torch.tensor([5.0001, 6.0, 6.5, 100.0, 1e30, torch.finfo(torch.float32).max])
    assert e2m1_encode(big).tolist() == [7] * 6
    assert e2m1_encode(-big).tolist() == [15] * 6
    assert e2m1_encode(torch.tensor([65504.0], dtype=torch.float16)).tolist() == [7]


def test_zeros_and_values_rounding_to_zero_keep_their_sign():
    x = torch.tensor([0.0, -0.0, 0.1, -0.1, 0.25, -0.25, 1e-40, -1e-40])
    assert e2m1_encode(x).tolist() == [0, SIGN, 0, SIGN, 0, SIGN, 0, SIGN]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_refused_at_their_first_position(bad):
    x = torch.zeros(3, 64)
    x[1, 37], x[2, 5] = bad, bad
    message = rf"^x: expected finite values, got {bad} at position \(1, 37\)$"
    with pytest.raises(ValueError, match=message):
        e2m1_encode(x)
    with pytest.raises(ValueError, match=message):
        per_token_cast_to_fp4(x)
    with pytest.raises(ValueError, match=message):
        per_token_cast_to_fp4(x.to(torch.bfloat16), use_ue8m0=False)
    with pytest.raises(ValueError, match=r"at position \(0, 1, 37\)$"):
        per_token_cast_to_fp4(x[None])


def test_pack_puts_element_2i_in_the_low_nibble():
    packed = pack_e2m1(torch.tensor([[1, 2, 15, 8], [7, 0, 0, 9]], dtype=torch.uint8))
    assert packed.dtype == torch.int8
    assert packed.view(torch.uint8).tolist() == [[0x21, 0x8F], [0x07, 0x90]]
    assert unpack_e2m1(packed).tolist() == [[1, 2, 15, 8], [7, 0, 0, 9]]
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_e2m1(pack_e2m1(codes)), codes)
    assert pack_e2m1(codes).view(torch.uint8).tolist() == [
        [[b & 0xFF for b in pack_reference(row)] for row in group] for group in codes.tolist()]


def test_code_helpers_refuse_bad_codes():
    with pytest.raises(ValueError, match=r"^codes: expected E2M1 codes in \[0, 15\], got 16 at position \(2,\)$"):
        e2m1_decode(torch.tensor([0, 15, 16, 255], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"codes: expected E2M1 codes in \[0, 15\], got 200"):
        pack_e2m1(torch.tensor([200, 0], dtype=torch.uint8))
    with pytest.raises(ValueError, match="codes: expected an even last dimension"):
        pack_e2m1(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="codes: expected dtype"):
        e2m1_decode(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(TypeError, match="packed: expected dtype"):
        unpack_e2m1(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="x: expected dtype"):
        e2m1_encode(torch.zeros(4, dtype=torch.int32))


# ---------------------------------------------------------------- casts

@pytest.mark.parametrize("use_ue8m0", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("gran_k", [32, 128])
def test_cast_matches_the_loop_reference(use_ue8m0, dtype, gran_k):
    torch.manual_seed(1)
    x = blocks_of_varied_scale(6, 256, dtype, gran_k)
    x[2, :gran_k] = 0  # an all-zero block exercises the amax clamp
    x[3, :gran_k] = -0.0
    x[4, :gran_k] = torch.tensor([6.0, 0.75, -1.75, 3.5, 0.25, -5.0, 2.5, 1.25] * (gran_k // 8))  # ties
    x_fp4, sf = per_token_cast_to_fp4(x, use_ue8m0=use_ue8m0, gran_k=gran_k)
    ref_codes, ref_sf = cast_reference(x, use_ue8m0, gran_k)
    assert sf.dtype == torch.float32 and sf.shape == (6, 256 // gran_k)
    assert torch.equal(sf, ref_sf)
    assert x_fp4.dtype == torch.int8 and x_fp4.shape == (6, 128)
    assert codes_of(x_fp4) == ref_codes
    assert x_fp4.tolist() == [pack_reference(row) for row in ref_codes]


def test_cast_defaults_are_mxfp4():
    x = blocks_of_varied_scale(4, 64)
    x_fp4, sf = per_token_cast_to_fp4(x)
    assert sf.shape == (4, 2) and bool(((sf.view(torch.int32) & 0x7FFFFF) == 0).all())
    assert torch.equal(per_token_dequant_fp4(x_fp4, sf), per_token_dequant_fp4(x_fp4, sf, 32))


def test_ue8m0_scales_are_powers_of_two_mapping_amax_into_3_to_6():
    torch.manual_seed(2)
    x = blocks_of_varied_scale(64, 512)
    x_fp4, sf = per_token_cast_to_fp4(x, use_ue8m0=True)
    amax = x.float().view(64, 16, 32).abs().amax(-1)
    assert bool(((sf.view(torch.int32) & 0x7FFFFF) == 0).all())
    assert bool((amax / sf <= FP4_E2M1_MAX).all()) and bool((amax / sf > FP4_E2M1_MAX / 2).all())
    block_max = e2m1_decode(unpack_e2m1(x_fp4)).abs().view(64, 16, 32).amax(-1)
    assert set(block_max.unique().tolist()) <= {3.0, 4.0, 6.0}


def test_float_scales_map_amax_to_six():
    torch.manual_seed(3)
    x = blocks_of_varied_scale(64, 256, torch.float32)
    x_fp4, sf = per_token_cast_to_fp4(x, use_ue8m0=False)
    amax = x.view(64, 8, 32).abs().amax(-1)
    assert torch.equal(sf, amax * INV_SIX)
    block_max = e2m1_decode(unpack_e2m1(x_fp4)).abs().view(64, 8, 32).amax(-1)
    assert bool((block_max == FP4_E2M1_MAX).all())


def test_dequant_never_exceeds_six_times_the_scale():
    torch.manual_seed(4)
    x = blocks_of_varied_scale(32, 256)
    for use_ue8m0 in (True, False):
        x_fp4, sf = per_token_cast_to_fp4(x, use_ue8m0=use_ue8m0)
        y = per_token_dequant_fp4(x_fp4, sf).view(32, 8, 32).abs()
        assert bool((y <= FP4_E2M1_MAX * sf[..., None]).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_is_exact_for_values_on_the_grid(dtype):
    torch.manual_seed(5)
    codes = torch.randint(0, 16, (2, 8, 256), dtype=torch.uint8)
    codes[..., ::32] = torch.tensor([7, 15], dtype=torch.uint8)[torch.randint(0, 2, (2, 8, 8))]  # a +-6 per block
    exponents = torch.randint(-12, 20, (2, 8, 8, 1)).float()  # keeps 6 * 2^e above the 1e-4 amax clamp
    x = (e2m1_decode(codes).view(2, 8, 8, 32) * 2.0 ** exponents).view(2, 8, 256).to(dtype)
    x_fp4, sf = per_token_cast_to_fp4(x)
    assert torch.equal(sf, 2.0 ** exponents[..., 0])
    assert torch.equal(unpack_e2m1(x_fp4), codes)
    y = per_token_dequant_fp4(x_fp4, sf)
    assert torch.equal(y, x.float()) and torch.equal(torch.signbit(y), torch.signbit(x))


def test_dequant_matches_the_loop_reference():
    torch.manual_seed(6)
    x_fp4 = torch.randint(-128, 128, (5, 64), dtype=torch.int8)
    sf = torch.rand(5, 4) * 10
    # The double product of two float32 values is exact, so rounding it once gives the float32 product.
    expected = torch.tensor([[decode_reference(c) * sf[r, i // 32].item() for i, c in enumerate(row)]
                             for r, row in enumerate(codes_of(x_fp4))], dtype=torch.float32)
    y = per_token_dequant_fp4(x_fp4, sf)
    assert y.dtype == torch.float32 and torch.equal(y, expected)


def test_cast_of_3d_tensor_equals_per_slice_casts():
    torch.manual_seed(7)
    x = torch.randn(3, 40, 96, dtype=torch.bfloat16)
    x_fp4, sf = per_token_cast_to_fp4(x)
    for g in range(3):
        x_g, sf_g = per_token_cast_to_fp4(x[g])
        assert torch.equal(x_fp4[g], x_g) and torch.equal(sf[g], sf_g)
    assert torch.equal(per_token_dequant_fp4(x_fp4, sf)[1], per_token_dequant_fp4(x_fp4[1], sf[1]))
    assert torch.equal(per_token_cast_to_fp4(x.mT.contiguous().mT)[0], x_fp4)  # non-contiguous input


def test_cast_argument_validation():
    with pytest.raises(ValueError, match=r"^x: expected K \(last dimension\) a multiple of gran_k=32, got 48$"):
        per_token_cast_to_fp4(torch.ones(4, 48))
    with pytest.raises(ValueError, match="x: expected K .* a multiple of gran_k=128, got 96"):
        per_token_cast_to_fp4(torch.ones(4, 96), gran_k=128)
    with pytest.raises(ValueError, match="gran_k: expected an even int, got 3"):
        per_token_cast_to_fp4(torch.ones(4, 96), gran_k=3)
    with pytest.raises(ValueError, match="gran_k: expected an int >= 1, got 0"):
        per_token_cast_to_fp4(torch.ones(4, 96), gran_k=0)
    with pytest.raises(TypeError, match="x: expected dtype"):
        per_token_cast_to_fp4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="x: expected dtype"):
        per_token_cast_to_fp4(torch.ones(4, 64, dtype=torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"x: expected a 2 or 3-D tensor, got shape \(64,\)"):
        per_token_cast_to_fp4(torch.ones(64))
    with pytest.raises(TypeError, match="use_ue8m0: expected bool"):
        per_token_cast_to_fp4(torch.ones(4, 64), use_ue8m0=1)
    x_fp4, sf = per_token_cast_to_fp4(torch.ones(4, 64))
    with pytest.raises(ValueError, match=r"^x_fp4: expected K = 2 \* 24 a multiple of gran_k=32, got 48$"):
        per_token_dequant_fp4(x_fp4[:, :24], sf)
    with pytest.raises(ValueError, match=r"sf: expected shape \(4, 2\), got \(4, 3\)"):
        per_token_dequant_fp4(x_fp4, torch.ones(4, 3))
    with pytest.raises(TypeError, match="x_fp4: expected dtype"):
        per_token_dequant_fp4(x_fp4.view(torch.uint8), sf)
    with pytest.raises(TypeError, match="sf: expected dtype"):
        per_token_dequant_fp4(x_fp4, sf.double())


# ---------------------------------------------------------------- UE8M0 and gpt-oss checkpoints

def test_ue8m0_conversions_cover_every_exponent():
    exponents = torch.arange(255, dtype=torch.uint8)
    values = ue8m0_to_float(exponents)
    assert values.tolist() == [2.0 ** (e - 127) for e in range(255)]  # e = 0 is the subnormal 2^-127
    assert torch.equal(float_to_ue8m0(values), exponents)


def test_ue8m0_conversions_refuse_values_they_cannot_represent():
    with pytest.raises(ValueError, match=r"^scales: expected UE8M0 exponents in \[0, 254\], got 255 "
                                         r"at position \(1, 0\)$"):
        ue8m0_to_float(torch.tensor([[127, 3], [255, 255]], dtype=torch.uint8))
    for bad in (0.75, 3.0, 0.0, -1.0, math.inf, math.nan, 2.0 ** -128):
        with pytest.raises(ValueError, match=r"^sf: expected powers of two in \[2\^-127, 2\^127\] \(UE8M0\), "
                                             r"got .* at position \(1,\)$"):
            float_to_ue8m0(torch.tensor([1.0, bad, 0.5]))
    with pytest.raises(TypeError, match="sf: expected dtype"):
        float_to_ue8m0(torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="scales: expected dtype"):
        ue8m0_to_float(torch.ones(2, dtype=torch.int8))


def synthetic_gpt_oss(num_experts: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (num_experts, n, k // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 135, (num_experts, n, k // 32), dtype=torch.uint8, generator=gen)
    scales[0, 0, 0], scales[-1, -1, -1] = 0, 254
    return blocks, scales


def test_gpt_oss_import_matches_the_checkpoint_meaning_and_round_trips():
    blocks, scales = synthetic_gpt_oss(3, 5, 128, seed=8)
    x_fp4, sf = from_gpt_oss_mxfp4(blocks, scales)
    assert x_fp4.dtype == torch.int8 and x_fp4.shape == (3, 5, 64)
    assert sf.dtype == torch.float32 and sf.shape == (3, 5, 4)
    assert x_fp4.data_ptr() == blocks.data_ptr()  # contiguous blocks import without a copy
    assert torch.equal(per_token_dequant_fp4(x_fp4, sf), gpt_oss_dequant_reference(blocks, scales))
    blocks_back, scales_back = to_gpt_oss_mxfp4(x_fp4, sf)
    assert torch.equal(blocks_back, blocks) and torch.equal(scales_back, scales)
    assert torch.equal(from_gpt_oss_mxfp4(blocks[1], scales[1])[0], x_fp4[1])
    x_strided, _ = from_gpt_oss_mxfp4(blocks.transpose(0, 1), scales.transpose(0, 1))
    assert torch.equal(x_strided, x_fp4.transpose(0, 1))


def test_our_cast_exports_to_the_gpt_oss_layout():
    torch.manual_seed(9)
    w = torch.randn(2, 6, 96, dtype=torch.bfloat16)
    x_fp4, sf = per_token_cast_to_fp4(w)
    blocks, scales = to_gpt_oss_mxfp4(x_fp4, sf)
    assert blocks.shape == (2, 6, 3, 16) and scales.shape == (2, 6, 3) and scales.dtype == torch.uint8
    assert torch.equal(gpt_oss_dequant_reference(blocks, scales), per_token_dequant_fp4(x_fp4, sf))


def test_gpt_oss_argument_validation():
    blocks, scales = synthetic_gpt_oss(2, 3, 64, seed=10)
    with pytest.raises(ValueError, match=r"blocks: expected a last dimension of 16 bytes, got shape \(2, 3, 4, 8\)"):
        from_gpt_oss_mxfp4(blocks.view(2, 3, 4, 8), scales)
    with pytest.raises(ValueError, match=r"scales: expected shape \(2, 3, 2\), got \(2, 3, 1\)"):
        from_gpt_oss_mxfp4(blocks, scales[..., :1])
    with pytest.raises(TypeError, match="blocks: expected dtype"):
        from_gpt_oss_mxfp4(blocks.view(torch.int8), scales)
    with pytest.raises(TypeError, match="scales: expected dtype"):
        from_gpt_oss_mxfp4(blocks, scales.float())
    scales[1, 2, 0] = 255
    with pytest.raises(ValueError, match=r"scales: expected UE8M0 exponents in \[0, 254\], got 255 "
                                         r"at position \(1, 2, 0\)"):
        from_gpt_oss_mxfp4(blocks, scales)
    x_fp4, sf = per_token_cast_to_fp4(torch.randn(4, 64), use_ue8m0=False)
    with pytest.raises(ValueError, match="sf: expected powers of two"):
        to_gpt_oss_mxfp4(x_fp4, sf)
    with pytest.raises(ValueError, match=r"x_fp4: expected K = 2 \* 24 a multiple of 32, got 48"):
        to_gpt_oss_mxfp4(x_fp4[:, :24], sf)


# ---------------------------------------------------------------- SM90 scale-factor layout

def test_transform_mxfp4_sf_is_k_major_uint8_with_aligned_rows():
    torch.manual_seed(11)
    sf = per_token_cast_to_fp4(torch.randn(3, 37, 320))[1]
    exponents = float_to_ue8m0(sf)
    out = transform_sf_into_required_layout(exponents, 37, 320, (1, 32), num_groups=3)
    assert out.dtype == torch.uint8 and out.shape == (3, 37, 10)
    assert out.stride() == (37 * 16, 16, 1)
    assert torch.equal(out, exponents) and torch.equal(ue8m0_to_float(out), sf)
    padding = torch.as_strided(out, (3, 37, 6), out.stride(), out.storage_offset() + 10)
    assert bool((padding == 0).all())
    assert transform_sf_into_required_layout(out, 37, 320, (1, 32), num_groups=3) is out
    out_b = transform_sf_into_required_layout(exponents, 37, 320, (1, 1, 32), 3, is_sfa=False)
    assert torch.equal(out_b, out) and out_b.stride() == out.stride()
    out2d = transform_sf_into_required_layout(exponents[0], 37, 320, (1, 32))
    assert torch.equal(out2d, exponents[0]) and out2d.stride() == (16, 1)


def test_transform_keeps_gpt_oss_scales_whose_rows_are_already_aligned():
    blocks, scales = synthetic_gpt_oss(2, 4, 512, seed=12)  # K/32 = 16 exponents = 16 bytes per row
    assert transform_sf_into_required_layout(scales, 4, 512, (1, 32), num_groups=2) is scales
    out = transform_sf_into_required_layout(scales[:, :, :9], 4, 288, (1, 32), num_groups=2)
    assert out.stride() == (4 * 16, 16, 1) and torch.equal(out, scales[:, :, :9])


def test_transform_mxfp4_argument_validation():
    exponents = torch.full((10, 8), 127, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"recipe: no sm_90a layout for torch.float32 .* \(mn=1, k=32\).*"
                                         r"float_to_ue8m0"):
        transform_sf_into_required_layout(torch.ones(10, 8), 10, 256, (1, 32))
    with pytest.raises(ValueError, match=r"sf: expected shape \(10, 9\)"):
        transform_sf_into_required_layout(exponents, 10, 288, (1, 32))
    with pytest.raises(ValueError, match=r"recipe: no sm_90a layout for torch.uint8 .* \(mn=1, k=128\)"):
        transform_sf_into_required_layout(exponents[:, :2], 10, 256, (1, 128))
    with pytest.raises(ValueError, match="recipe: no sm_100a layout for torch.uint8"):
        transform_sf_into_required_layout(exponents, 10, 256, (1, 32), arch="sm_100a")


# ---------------------------------------------------------------- GPU: same results as on the CPU

@pytest.mark.gpu
def test_fp4_functions_match_cpu_on_cuda():
    torch.manual_seed(13)
    x = blocks_of_varied_scale(64, 512)
    x[1, :32] = -0.0
    x[2, :8] = torch.tensor([0.75, 1.75, 3.5, 5.0, -0.25, -2.5, 6.0, 0.0])
    blocks, scales = synthetic_gpt_oss(2, 8, 320, seed=14)
    for use_ue8m0 in (True, False):
        x_fp4, sf = per_token_cast_to_fp4(x.cuda(), use_ue8m0=use_ue8m0)
        x_fp4_cpu, sf_cpu = per_token_cast_to_fp4(x, use_ue8m0=use_ue8m0)
        assert torch.equal(x_fp4.cpu(), x_fp4_cpu) and torch.equal(sf.cpu(), sf_cpu)
    amax = x.float().view(64, 16, 32).abs().amax(-1).clamp(min=1e-4)
    assert torch.equal((amax.cuda() / 6.0).cpu(), sf_cpu)  # DeepGEMM's expression, as CUDA evaluates it
    values = torch.randn(4096) * 4
    assert torch.equal(e2m1_encode(values.cuda()).cpu(), e2m1_encode(values))
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(e2m1_decode(codes.cuda()).cpu(), e2m1_decode(codes))
    exponents = torch.arange(255, dtype=torch.uint8)
    assert torch.equal(float_to_ue8m0(ue8m0_to_float(exponents.cuda())).cpu(), exponents)
    scales_cuda = scales.cuda()
    w_fp4, w_sf = from_gpt_oss_mxfp4(blocks.cuda(), scales_cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = per_token_dequant_fp4(x_fp4, sf)
        w = per_token_dequant_fp4(w_fp4, w_sf)
        sfb = transform_sf_into_required_layout(scales_cuda, 8, 320, (1, 32), num_groups=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y.cpu(), per_token_dequant_fp4(x_fp4_cpu, sf_cpu))
    assert torch.equal(w.cpu(), gpt_oss_dequant_reference(blocks, scales))
    assert torch.equal(to_gpt_oss_mxfp4(w_fp4, w_sf)[1].cpu(), scales)
    assert torch.equal(sfb.cpu(), scales) and sfb.stride() == (8 * 16, 16, 1)
