"""Byte-permute recipes that widen eight packed E2M1 codes (one 32-bit word) to E4M3 or BF16 bits.

The FP4 kernels widen B on the CUDA cores; these recipes do it a whole 32-bit word at a time with
``prmt`` (byte permute) lookups of per-32-block tables, about 1.1 (E4M3) / 1.9 (BF16) integer
instructions per weight instead of ~9 for the per-nibble FP32 path (per word: the magnitude split,
the lookups, one shift and two ``prmt`` that put the eight sign bits at bit 7 of their bytes, and one
LOP3 per output word to merge them). They are written once, in plain
integer arithmetic plus a ``prmt(a, b, selector)`` callable, so that the kernel runs them on DSL
``Int32`` values with the PTX instruction and the CPU tests run the same functions on Python ints
with an emulated ``prmt`` (tests/test_fp4_widen_bits.py checks every code and exponent).

``prmt(a, b, s)``: output byte i is byte ``s`` nibble i (0..7) of the 8-byte value ``b:a`` (a holds
bytes 0..3); selector nibbles here are always <= 7 (bit 3 would select sign replication).

Fast-path domains (outside them the kernel keeps the exact FP32 path, which gives the same values):
- E4M3 ``value(code) * 2^d`` for a block shift ``d = e - e_ref`` in ``[E4M3_MIN_SHIFT, E4M3_MAX_SHIFT]``
  (the kernels' reference exponent is at least the block's, so ``d <= 0`` there): the table holds the
  E4M3 bytes of the eight magnitudes with ``d`` added to their exponent field, which stays normal
  (>= 1) for ``d >= -5`` and finite (<= 15 with mantissa 100 at most) for ``d <= 6``.
- BF16 ``value(code) * 2^(e - 127)`` for a UE8M0 exponent ``e`` in ``[BF16_MIN_EXP, BF16_MAX_EXP]``:
  every non-zero magnitude's BF16 exponent field ``e - 1 .. e + 2`` stays in 1..254 (normal, finite).
Zero codes map to the zero byte/half-word, and the code's sign bit becomes the result's sign bit, so
-0 (code 0x8) widens to -0 as in the FP32 path.
"""

E4M3_MIN_SHIFT = -5  # 0.5 (exponent field 6) times 2^d stays an E4M3 normal down to d = -5
E4M3_MAX_SHIFT = 6  # 6 * 2^6 = 384: exponent field 15, mantissa 100, still finite (and no byte carries)
BF16_MIN_EXP = 2  # 0.5 * 2^(e - 127) is a BF16 normal from e = 2
BF16_MAX_EXP = 252  # 6 * 2^(e - 127) has BF16 exponent field e + 2 <= 254

MAGNITUDE_MASK = 0x77777777  # the three magnitude bits of each nibble (prmt selectors 0..7)
_HIGH_BIT_OF_EACH_BYTE = 0x80808080 - (1 << 32)
# E4M3 bytes of the magnitudes 0, 0.5, 1, 1.5 (table word 0) and 2, 3, 4, 6 (word 1); exponent field
# in bits 6..3 (bias 7), so adding d << 3 to a non-zero byte multiplies it by 2^d.
E4M3_TABLE_LOW = 0x3C383000
E4M3_TABLE_HIGH = 0x4C484440
EXPONENT_STEP_NONZERO_LOW = 0x01010100  # byte 0 (magnitude 0) keeps its zero
EXPONENT_STEP_ALL = 0x01010101
E4M3_EXPONENT_SHIFT = 3
BF16_EXPONENT_SHIFT = 7
BF16_MANTISSA_HALF = 0x40  # the top mantissa bit: 1.5x
BF16_BINADE = 1 << BF16_EXPONENT_SHIFT
NIBBLE_BITS = 4
# prmt selectors
EVEN_BYTES = 0x6420  # the low bytes of four 16-bit lanes of (a, b)
ODD_BYTES = 0x7531  # their high bytes
INTERLEAVE_LOW = 0x5140  # [a0, b0, a1, b1]
INTERLEAVE_HIGH = 0x7362  # [a2, b2, a3, b3]
NIBBLES_PER_HALF_WORD = 16  # bits of four nibbles


def nibble_signs(word, prmt):
    """Two words whose byte i has, at bit 7, the sign (bit 3) of nibble i (first word) / 4 + i (second
    word) of ``word``; other bits are junk (callers keep 0x80808080). Byte j of ``word`` holds nibble
    2j (sign at bit 3, i.e. bit 7 of byte j of ``word << 4``) and nibble 2j + 1 (sign at its bit 7):
    interleaving the bytes of ``word << 4`` and ``word`` puts every sign at bit 7."""
    shifted = word << NIBBLE_BITS
    return prmt(shifted, word, INTERLEAVE_LOW), prmt(shifted, word, INTERLEAVE_HIGH)


def with_signs(values, signs):
    """``values`` (bytes with bit 7 clear) with the sign bits of ``signs`` (from ``nibble_signs``)."""
    return values | (signs & _HIGH_BIT_OF_EACH_BYTE)


def e4m3_tables(shift):
    """The two prmt table words for a block shifted by ``2^shift`` (E4M3_MIN_SHIFT <= shift <= 0)."""
    step = shift << E4M3_EXPONENT_SHIFT
    return E4M3_TABLE_LOW + step * EXPONENT_STEP_NONZERO_LOW, E4M3_TABLE_HIGH + step * EXPONENT_STEP_ALL


def e4m3_words(word, tables, prmt):
    """Eight codes (element 8j + i in nibble i) -> two words of E4M3 bytes (elements in byte order)."""
    low, high = tables
    magnitudes = word & MAGNITUDE_MASK
    first = prmt(low, high, magnitudes)
    second = prmt(low, high, magnitudes >> NIBBLES_PER_HALF_WORD)
    signs_low, signs_high = nibble_signs(word, prmt)
    return with_signs(first, signs_low), with_signs(second, signs_high)


def bf16_tables(exponent, prmt):
    """Four prmt table words (low bytes of magnitudes 0-3, 4-7; high bytes of 0-3, 4-7) of the BF16
    values ``value(k) * 2^(exponent - 127)`` (BF16_MIN_EXP <= exponent <= BF16_MAX_EXP)."""
    one = exponent << BF16_EXPONENT_SHIFT  # BF16 bits of 2^(exponent - 127); value(2) = 1
    two, four = one + BF16_BINADE, one + 2 * BF16_BINADE
    lanes01 = (one - BF16_BINADE) << 16  # 0, 0.5
    lanes23 = one | (one + BF16_MANTISSA_HALF) << 16  # 1, 1.5
    lanes45 = two | (two + BF16_MANTISSA_HALF) << 16  # 2, 3
    lanes67 = four | (four + BF16_MANTISSA_HALF) << 16  # 4, 6
    return (prmt(lanes01, lanes23, EVEN_BYTES), prmt(lanes45, lanes67, EVEN_BYTES),
            prmt(lanes01, lanes23, ODD_BYTES), prmt(lanes45, lanes67, ODD_BYTES))


# ``bf16_tables(UE8M0_UNIT, prmt)``: the BF16 values 0, 0.5, .. 6 themselves (scale 2^0), as constants.
# The swap-AB kernel widens with them and then multiplies each BF16x2 word by the block's scale
# 2^(e - 127) (``bf16x2_scale``), exact for BF16_MIN_EXP <= e <= BF16_MAX_EXP (normal, finite results).
UE8M0_UNIT = 127
BF16_UNIT_TABLES = (0xC0800000 - (1 << 32), 0xC0804000 - (1 << 32), 0x3F3F3F00, 0x40404040)


def bf16x2_scale(exponent):
    """The BF16x2 word holding 2^(exponent - 127) in both halves (1 <= exponent <= 254)."""
    return (exponent << BF16_EXPONENT_SHIFT) * 0x10001


def bf16_words(word, tables, prmt):
    """Eight codes -> four words of two BF16 values each (elements 2i, 2i+1 in word i)."""
    low0, low1, high0, high1 = tables
    magnitudes = word & MAGNITUDE_MASK
    upper = magnitudes >> NIBBLES_PER_HALF_WORD
    out = []
    for selector, signs in zip((magnitudes, upper), nibble_signs(word, prmt)):
        low = prmt(low0, low1, selector)
        high = with_signs(prmt(high0, high1, selector), signs)
        out += [prmt(low, high, INTERLEAVE_LOW), prmt(low, high, INTERLEAVE_HIGH)]
    return tuple(out)
