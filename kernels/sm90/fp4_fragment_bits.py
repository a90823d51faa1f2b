"""Where a thread's packed E2M1 codes go in a register-sourced WGMMA A fragment (swap-AB FP4 kernel).

The swap-AB kernel (``fp4_swap_gemm.py``) multiplies the weights as WGMMA's A operand (M = weight rows,
K-major) from registers. In a warpgroup, thread ``t`` holds rows ``r = 16 * (t // 32) + (t % 32) // 4``
and ``r + 8`` and, per MMA instruction (K = 16 BF16 / 32 E4M3 values), four 32-bit registers:
``a0`` (row r, low K half), ``a1`` (row r + 8, low half), ``a2`` (row r, high half), ``a3`` (row r + 8,
high half); inside a half its values start at K ``2 * q`` (BF16, 2 values) or ``4 * q`` (E4M3, 4
values) with ``q = t % 4`` (the lane in its quad). This is the PTX ISA's A layout of
``wgmma.mma_async ... m64nNk16 / k32`` with A in registers, and what CuTe's RMEM A fragment of
``make_trivial_tiled_mma(..., a_source=OperandSource.RMEM)`` orders as ``(a0, a1, a2, a3)`` per
instruction (checked on the CPU by tests/test_fp4_fragment_bits.py against those layouts).

A 32-element MXFP4 block of one row is 16 packed bytes (byte j: elements 2j, 2j + 1), read as four
words ``w0..w3`` with one 16-byte shared load. The thread's codes of that block are four bytes:
- BF16 (two 16-K instructions per block): byte ``q`` of each word -> ``gather(w0..w3)`` is
  ``[w0.q, w1.q, w2.q, w3.q]``; widened by ``fp4_widen_bits.bf16_words`` to four BF16x2 words, word i
  for instruction ``2 * block + i // 2``, K half ``i % 2``;
- E4M3 (one 32-K instruction per block): bytes ``2q, 2q + 1`` of ``w1:w0`` (low K half) and of
  ``w3:w2`` (high half) -> ``gather`` gives both halves; ``fp4_widen_bits.e4m3_words`` widens them to
  the two E4M3x4 words of the block's instruction, low half then high half. Those four bytes are the
  two 16-bit halfwords at byte offsets ``E4M3_HALFWORD_OFFSETS(q)`` of the block, so the kernel loads
  just them (two 2-byte shared loads) and ``combine_halfwords`` puts them together: the same word as
  ``gather`` of the whole block.
Written on plain integers and a ``prmt`` callable, like ``fp4_widen_bits``.
"""

COMBINE_LOW_HALVES = 0x5410  # prmt selector: bytes 0, 1 of a then bytes 0, 1 of b
WORDS_PER_INSTRUCTION = 4  # a0..a3
MX_BLOCK_BYTES = 16


def gather_selector(quad_lane, fp8: bool):
    """prmt selector that picks the two bytes of this quad lane out of two consecutive words ``(a, b)``:
    BF16 byte ``q`` of each word; E4M3 the pair ``2q, 2q + 1`` of the 8-byte ``b:a``."""
    if fp8:
        return (2 * quad_lane) | (2 * quad_lane + 1) << 4
    return quad_lane | (quad_lane + 4) << 4


def gather(words, selector, prmt):
    """The lane's four code bytes of one 16-byte block (see the module docstring)."""
    low = prmt(words[0], words[1], selector)
    high = prmt(words[2], words[3], selector)
    return prmt(low, high, COMBINE_LOW_HALVES)


def e4m3_halfword_offsets(quad_lane) -> tuple:
    """Byte offsets, inside a 16-byte block, of the two halfwords E4M3 quad lane ``quad_lane`` widens:
    elements 4q .. 4q + 3 (low K half) and 16 + 4q .. 16 + 4q + 3 (high half)."""
    return 2 * quad_lane, HIGH_HALF_BYTES + 2 * quad_lane


HIGH_HALF_BYTES = 8  # packed bytes of a block's low K half (16 elements)


def combine_halfwords(low, high, prmt):
    """The word ``gather`` makes for E4M3, from the lane's two halfwords (zero-extended or not)."""
    return prmt(low, high, COMBINE_LOW_HALVES)


def fragment_word(block: int, i: int, row_half: int, fp8: bool) -> int:
    """Index (in 32-bit words of the k-block's A fragment) of widened word ``i`` of MX block ``block``
    for row ``r + 8 * row_half``: E4M3 ``i`` in {0, 1} (K half), BF16 ``i`` in 0..3."""
    if fp8:
        instruction, k_half = block, i
    else:
        instruction, k_half = 2 * block + i // 2, i % 2
    return WORDS_PER_INSTRUCTION * instruction + 2 * k_half + row_half
