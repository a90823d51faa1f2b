"""Byte layout and sizes of a Mega MoE buffer (pure Python: no torch, no cutlass).

One ``MegaMoEGeometry`` fixes everything the compiled Mega MoE kernel depends on (docs/mega_moe.md).
Per rank, the symmetric buffer (peers read or write it over NVLink) holds, 128-byte aligned:

    input_arrive   u64[R]        (call + 1) << 32 | tokens: source rank r's inputs of that call are ready
    combine_arrive u64[R]        +1 per CTA of expert rank r once its expert outputs for this rank are stored
    x              [Tm, H]       FP8 E4M3 (1 byte) or BF16 (2 bytes): the caller's token rows
    x_sf           f32[Tm, H/128]  FP8 only: one scale per token per 128 channels
    topk_idx       i64[Tm, K]    expert of each slot; outside [0, E) = dropped
    topk_weights   f32[Tm, K]
    combine        bf16[Tm, K, H]  expert output of each (token, slot), written by the owning rank

Local work memory (only this rank reads and writes it) is described by ``work_offsets`` (counters and
tables, one int32 tensor) and by the pool / intermediate shapes (separate tensors: the TMA loads of
the two expert GEMMs read them).
"""

from dataclasses import dataclass

# Shared with the EP buffers: region alignment, FP8 scale block, per-call parities, the top-k limit.
from .ep_layout import ALIGN, MAX_TOPK, PARITIES, SCALE_BLOCK, align_up, pack_regions  # noqa: F401

BLOCK_M = 128  # the largest GEMM tile height: the pool is sized for segments aligned to it
MIN_BLOCK_M = 64  # the smallest (few rows per expert: less padding); counters exist per such block
BLOCK_SIZES = (MIN_BLOCK_M, BLOCK_M)
TILE_N = 256  # output columns of a GEMM tile: two 128-wide parts (GEMM 1: gate block, up block)
# FP8 x FP4: the exponent words ``[L, K/128 + ROW_EXPONENT_ROWS, N]`` end with one row holding each weight
# row's largest UE8M0 exponent over K (byte 0), the reference the kernel widens every block against.
ROW_EXPONENT_ROWS = 1
MAX_LOCAL_EXPERTS = 1024  # the kernel's segment table lives in shared memory
MMA_TYPES = {"fp8": "fp8", "fp8xfp8": "fp8", "bf16": "bf16", "bf16xbf16": "bf16", "fp8xfp4": "fp8xfp4"}
ENTRY_POSITION_BITS = 20  # entry_slot = local expert << 20 | position inside the expert (< R * Tm <= 2^20)
GRID_BARRIERS_PER_CALL = 2  # after routing (counts final) and after the layout (row table final)


@dataclass(frozen=True)
class MegaMoEGeometry:
    """Static facts of one Mega MoE buffer: sizes, dtypes, region offsets, tile counts."""

    num_ranks: int
    num_experts: int
    max_tokens: int  # per rank (Tm)
    num_topk: int
    hidden: int
    intermediate: int
    fp8: bool
    num_ctas: int  # persistent grid (the group's smallest SM count): every CTA is co-resident
    fp4: bool = False  # MXFP4 expert weights (with FP8 activations)

    def __post_init__(self):
        if self.fp4 and not self.fp8:
            raise ValueError("fp4: MXFP4 expert weights need FP8 activations (fp8=True)")

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation value (x, pool, intermediate)."""
        return 1 if self.fp8 else 2

    @property
    def entries(self) -> int:
        """(source rank, token, slot) triples this rank can receive."""
        return self.num_ranks * self.max_tokens * self.num_topk

    @property
    def pool_rows(self) -> int:
        """Rows of the received-token pool: every entry (a token reaches one expert at most once per
        slot, so at most ``min(K, L)`` of one rank's experts) plus each expert segment's alignment
        padding; no routing can overflow it."""
        rows = self.num_ranks * self.max_tokens * min(self.num_topk, self.local_experts)
        return align_up(rows + self.local_experts * (BLOCK_M - 1), BLOCK_M)

    @property
    def pool_blocks(self) -> int:
        """Blocks of the pool at the smallest tile height (the size of the per-block counters)."""
        return self.pool_rows // MIN_BLOCK_M

    @property
    def scale_pitch(self) -> int:
        """MN-major scales of the pool and the intermediate: elements between two K blocks."""
        return align_up(self.pool_rows, 4)

    @property
    def hidden_blocks(self) -> int:
        return self.hidden // SCALE_BLOCK

    @property
    def inter_blocks(self) -> int:
        return self.intermediate // SCALE_BLOCK

    @property
    def l1_tiles(self) -> int:
        """GEMM-1 N tiles per block: 2I / TILE_N (each a gate block and its up block)."""
        return 2 * self.intermediate // TILE_N

    @property
    def l2_tiles(self) -> int:
        """GEMM-2 N tiles per block: H / TILE_N."""
        return self.hidden // TILE_N

    def symmetric_offsets(self) -> dict[str, int]:
        """Byte offset of each region of the symmetric buffer, plus 'total'."""
        r, tm, k, h = self.num_ranks, self.max_tokens, self.num_topk, self.hidden
        sizes = [
            ("input_arrive", 8 * r),
            ("combine_arrive", 8 * r),
            ("x", tm * h * self.act_bytes),
            ("x_sf", tm * self.hidden_blocks * 4 if self.fp8 else 0),
            ("topk_idx", tm * k * 8),
            ("topk_weights", tm * k * 4),
            ("combine", tm * k * h * 2),
        ]
        return pack_regions(sizes)

    def work_offsets(self) -> dict[str, int]:
        """Byte offset of each local int32 table, plus 'total':

        counts [P][L] (rows per local expert), block_rows [P][pool_blocks] (rows of a block pulled),
        l1_done [P][pool_blocks] (GEMM-1 tiles of a block finished), grid_barrier u64 (monotonic),
        abort (set by a failed wait), entry_slot [entries] (local expert << 20 | position, -1),
        row_src [pool_rows] (entry of each pool row, -1 for padding)."""
        p, nb = PARITIES, self.pool_blocks
        sizes = [
            ("counts", 4 * p * self.local_experts),
            ("block_rows", 4 * p * nb),
            ("l1_done", 4 * p * nb),
            ("grid_barrier", 8),
            ("abort", 4),
            ("entry_slot", 4 * self.entries),
            ("row_src", 4 * self.pool_rows),
        ]
        return pack_regions(sizes)


