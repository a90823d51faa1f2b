"""The FP4 kernels' byte-permute widening recipes (kernels/sm90/fp4_widen_bits.py), run on the CPU
with an emulated ``prmt``, against torch's own E4M3 / BF16 rounding of the decoded values."""

import random

import pytest
import torch

from cute_moe.kernels.sm90 import fp4_widen_bits as bits
from cute_moe.layouts.fp4 import e2m1_decode

WORD_MASK = 0xFFFFFFFF


def prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode) for selector nibbles 0..7."""
    source = ((b & WORD_MASK) << 32) | (a & WORD_MASK)
    out = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        assert nibble < 8, "the recipes never use sign-replication selectors"
        out |= ((source >> (8 * nibble)) & 0xFF) << (8 * i)
    return out


def words_with_every_code(rng: random.Random, count: int = 64) -> list:
    """Words whose nibbles cover all 16 codes in every position, plus random words."""
    words = [sum(((code + position) % 16) << (4 * position) for position in range(8)) for code in range(16)]
    return words + [rng.getrandbits(32) for _ in range(count)]


def codes_of(word: int) -> torch.Tensor:
    return torch.tensor([(word >> (4 * i)) & 0xF for i in range(8)], dtype=torch.uint8)


def unpack_bytes(words, per_word: int) -> list:
    return [(w >> (8 * i)) & 0xFF for w in words for i in range(per_word)]


@pytest.mark.parametrize("shift", range(bits.E4M3_MIN_SHIFT, bits.E4M3_MAX_SHIFT + 1))
def test_e4m3_words_equal_the_rounded_values(shift):
    rng = random.Random(shift)
    tables = tuple(t & WORD_MASK for t in bits.e4m3_tables(shift))
    for word in words_with_every_code(rng):
        got = unpack_bytes(bits.e4m3_words(word, tables, prmt), 4)
        values = e2m1_decode(codes_of(word)) * 2.0 ** shift
        want = values.to(torch.float8_e4m3fn).view(torch.uint8).tolist()
        assert got == want, f"word {word:#010x} shift {shift}"


def test_e4m3_fast_path_ends_where_the_exponent_field_would_leave_the_normals():
    low, _ = bits.e4m3_tables(bits.E4M3_MIN_SHIFT)
    assert (low >> 8) & 0xFF == 0x08  # 0.5 * 2^-5 = 2^-6: exponent field 1, the smallest normal
    _, high = bits.e4m3_tables(bits.E4M3_MAX_SHIFT)
    assert (high >> 24) & 0xFF == 0x7C  # 6 * 2^6 = 384: exponent field 15, mantissa 100 (0x7F is NaN)


@pytest.mark.parametrize("exponent", [bits.BF16_MIN_EXP, 3, 60, 120, 127, 128, 200, bits.BF16_MAX_EXP])
def test_bf16_words_equal_the_exact_values(exponent):
    rng = random.Random(exponent)
    tables = bits.bf16_tables(exponent, prmt)
    for word in words_with_every_code(rng):
        got = [(w >> (16 * i)) & 0xFFFF for w in bits.bf16_words(word, tables, prmt) for i in range(2)]
        values = e2m1_decode(codes_of(word)).double() * 2.0 ** (exponent - 127)
        want = values.to(torch.bfloat16).view(torch.int16).tolist()
        assert got == [v & 0xFFFF for v in want], f"word {word:#010x} exponent {exponent}"
        assert values.to(torch.bfloat16).double().equal(values), "the fast path's values are exact"


def test_signed_zero_widens_to_negative_zero():
    word = 0x88888888
    tables = tuple(t & WORD_MASK for t in bits.e4m3_tables(0))
    assert bits.e4m3_words(word, tables, prmt) == (0x80808080, 0x80808080)
    assert bits.bf16_words(word, bits.bf16_tables(127, prmt), prmt) == (0x80008000,) * 4


def test_bf16_unit_tables_times_the_block_scale_give_the_exact_values():
    """The swap-AB kernel's BF16 path: constant tables (exponent 127), then a BF16x2 multiply by
    2^(e - 127) (emulated here with torch's BF16 multiply, which rounds to nearest as mul.rn.bf16x2)."""
    assert tuple(t & WORD_MASK for t in bits.BF16_UNIT_TABLES) == tuple(
        t & WORD_MASK for t in bits.bf16_tables(bits.UE8M0_UNIT, prmt))
    rng = random.Random(3)
    for exponent in (bits.BF16_MIN_EXP, 3, 64, 126, 127, 128, 200, bits.BF16_MAX_EXP):
        scale_word = bits.bf16x2_scale(exponent)
        assert scale_word & 0xFFFF == scale_word >> 16
        scale = torch.tensor([scale_word & 0xFFFF], dtype=torch.int16).view(torch.bfloat16)
        assert scale.double().item() == 2.0 ** (exponent - 127)
        for word in words_with_every_code(rng, 8):
            unit = [(w >> (16 * i)) & 0xFFFF for w in bits.bf16_words(word, bits.BF16_UNIT_TABLES, prmt)
                    for i in range(2)]
            unit = torch.tensor([u - (1 << 16) if u >= 1 << 15 else u for u in unit], dtype=torch.int16)
            got = unit.view(torch.bfloat16) * scale
            values = e2m1_decode(codes_of(word)).double() * 2.0 ** (exponent - 127)
            assert got.double().equal(values), f"word {word:#010x} exponent {exponent}"
            assert (got.view(torch.int16) == values.to(torch.bfloat16).view(torch.int16)).all()  # signed zeros too
