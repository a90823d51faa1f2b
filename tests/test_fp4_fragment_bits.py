"""The swap-AB FP4 kernel's fragment gather (kernels/sm90/fp4_fragment_bits.py), run on the CPU with an
emulated ``prmt``: every thread of a warpgroup builds its register-sourced WGMMA A fragment of one
k-block from 16-byte row loads, and each value must be the weight that the PTX ISA's A layout puts
there (written out here), for both pairs."""

import random

import pytest
import torch

from cute_moe.kernels.sm90 import fp4_fragment_bits as frag
from cute_moe.kernels.sm90 import fp4_widen_bits as bits
from cute_moe.layouts.fp4 import e2m1_decode

from test_fp4_widen_bits import WORD_MASK, prmt

ROWS = 64  # one warpgroup's weight rows
THREADS = 128


def expected_position(thread: int, word: int, value: int, fp8: bool) -> tuple[int, int]:
    """(row, k) of value ``value`` of 32-bit fragment word ``word`` (wgmma A in registers, PTX ISA)."""
    instruction, slot = divmod(word, frag.WORDS_PER_INSTRUCTION)
    row = 16 * (thread // 32) + (thread % 32) // 4 + 8 * (slot % 2)
    k_half = slot // 2
    q = thread % 4
    if fp8:
        return row, 32 * instruction + 16 * k_half + 4 * q + value
    return row, 16 * instruction + 8 * k_half + 2 * q + value


@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
def test_every_fragment_value_is_the_weight_of_its_layout_position(fp8):
    rng = random.Random(7)
    tile_k = 128  # the swap-AB kernel's k-block for both pairs
    blocks = tile_k // 32
    packed = [[rng.getrandbits(8) for _ in range(tile_k // 2)] for _ in range(ROWS)]
    codes = [[(row[k // 2] >> (4 * (k % 2))) & 0xF for k in range(tile_k)] for row in packed]
    decoded = e2m1_decode(torch.tensor(codes, dtype=torch.uint8))
    if fp8:
        tables = tuple(t & WORD_MASK for t in bits.e4m3_tables(0))
        want_bytes = decoded.to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        tables = bits.bf16_tables(127, prmt)
        want_bits = decoded.to(torch.bfloat16).view(torch.int16)
    words_per_thread = frag.WORDS_PER_INSTRUCTION * (tile_k // (32 if fp8 else 16))
    for thread in range(THREADS):
        selector = frag.gather_selector(thread % 4, fp8)
        fragment = [None] * words_per_thread
        r = 16 * (thread // 32) + (thread % 32) // 4
        for row_half in range(2):
            row = packed[r + 8 * row_half]
            for block in range(blocks):
                chunk = row[frag.MX_BLOCK_BYTES * block:frag.MX_BLOCK_BYTES * (block + 1)]
                words = [int.from_bytes(bytes(chunk[4 * i:4 * i + 4]), "little") for i in range(4)]
                x = frag.gather(words, selector, prmt)
                if fp8:  # the kernel loads only the lane's two halfwords: the same word
                    low, high = (int.from_bytes(bytes(chunk[o:o + 2]), "little")
                                 for o in frag.e4m3_halfword_offsets(thread % 4))
                    assert frag.combine_halfwords(low, high, prmt) == x
                out = bits.e4m3_words(x, tables, prmt) if fp8 else bits.bf16_words(x, tables, prmt)
                for i, w in enumerate(out):
                    index = frag.fragment_word(block, i, row_half, fp8)
                    assert fragment[index] is None, "two widened words map to one register"
                    fragment[index] = w & WORD_MASK
        assert None not in fragment
        for index, w in enumerate(fragment):
            for value in range(4 if fp8 else 2):
                row, k = expected_position(thread, index, value, fp8)
                if fp8:
                    got, want = (w >> (8 * value)) & 0xFF, int(want_bytes[row, k])
                else:
                    got, want = (w >> (16 * value)) & 0xFFFF, int(want_bits[row, k]) & 0xFFFF
                assert got == want, f"thread {thread} word {index} value {value}: row {row} k {k}"
