"""Byte layout of an EP buffer and the receive-side shapes (pure Python: no torch, no cutlass).

One ``EPGeometry`` fixes everything a compiled EP kernel depends on; docs/ep.md draws the layout.
Per rank, the symmetric buffer holds (offsets 128-byte aligned, ``P`` = 2 parities, ``R`` ranks,
``Tm`` = num_max_tokens_per_rank, ``K`` = num_topk):

    routing_arrive   u64[R]            arrivals of each source rank's CTAs once they routed (and, in
                                       the masked layout, sent) everything (monotonic, never reset)
    combine_arrive   u64[R]            same for combine
    dispatch_tokens  u64[P][R]         (call + 1) << 32 | tokens each source sends in the call of that
                                       parity (an epoch word: no reset)
    dispatch_flags   u32[P][R][Tm][C]  call + 1 once chunk c of (source, token) arrived (chunk 0 also
                                       carries the token's routing in the masked layout)
    expert_counters  i32[P][L]         rows of each local expert, incremented by every source rank
    meta_idx         i32[P][R][Tm][K]  local expert of (source, token, slot) on this rank, -1 if none
    meta_pos         i32[P][R][Tm][K]  its position inside that expert (the sender's atomic)
    meta_weight      f32[P][R][Tm][K]  its routing weight
    dispatch_rows    u8[P][R][Tm][row_stride]   token rows (payload, then FP32 scales if FP8)
    combine_rows     u8[P][R][Tm][hidden * 2]   BF16 partial sums sent back by each expert rank

``C`` = ``row_chunks``: a row moves in chunks of ``32 * COPY_PER_LANE`` 16-byte vectors.
"""

from dataclasses import dataclass

ALIGN = 128  # byte alignment of every region
VECTOR_BYTES = 16  # one vectorized load/store
SCALE_BLOCK = 128  # FP8 payload: one FP32 scale per 128 elements of a row
PARITIES = 2  # double-buffered staging: call n uses parity n % 2
MAX_RANKS = 8  # the missing-rank mask and the tests cover up to 8 ranks
MAX_TOPK = 32  # one lane per top-k slot
LAYOUTS = ("masked", "psum")
COPY_PER_LANE = 7  # 16-byte vectors per lane in one unit of row copying (a chunk of 32 * 7 vectors)


def num_chunks(num_vecs: int, per_lane: int) -> int:
    """Chunks of ``32 * per_lane`` vectors covering a row of ``num_vecs`` 16-byte vectors. Row work
    is split into chunks so that even a few rows keep every warp of the grid busy: a warp handles one
    (row, chunk) unit at a time and issues all its loads before their first use (the loads and stores
    are opaque inline asm that may alias, so a load->store->load loop would serialize one memory
    round trip per vector)."""
    return -(-num_vecs // (32 * per_lane))


def align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class EPGeometry:
    """Static facts of one EP buffer: sizes, dtypes, the byte offsets of every region."""

    num_ranks: int
    num_experts: int
    max_tokens: int  # per rank
    hidden: int
    num_topk: int
    fp8: bool
    num_ctas: int  # grid of every EP kernel (<= SM count so all CTAs are co-resident)
    alignment: int = 128  # psum layout: rows each expert segment starts on

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def payload_bytes(self) -> int:
        return self.hidden * (1 if self.fp8 else 2)

    @property
    def scale_blocks(self) -> int:
        return self.hidden // SCALE_BLOCK if self.fp8 else 0

    @property
    def row_stride(self) -> int:
        """Bytes of one staged token row: payload then scales, each 16-byte aligned."""
        return align_up(self.payload_bytes, VECTOR_BYTES) + align_up(self.scale_blocks * 4, VECTOR_BYTES)

    @property
    def row_chunks(self) -> int:
        """Chunks of one token row's payload (the unit of row copies and of arrival flags)."""
        return num_chunks(self.payload_bytes // VECTOR_BYTES, COPY_PER_LANE)

    @property
    def max_m(self) -> int:
        """Masked layout rows per expert: every rank may send every token to one expert."""
        return self.num_ranks * self.max_tokens

    @property
    def psum_rows(self) -> int:
        """Psum layout rows: all (token, slot) pairs plus each segment's alignment padding."""
        entries = self.num_ranks * self.max_tokens * min(self.num_topk, self.local_experts)
        return align_up(entries + self.local_experts * (self.alignment - 1), self.alignment)

    def recv_rows(self, layout: str) -> int:
        return self.local_experts * self.max_m if layout == "masked" else self.psum_rows

    def scale_row_pitch(self, layout: str) -> int:
        """MN-major scales: elements between two k-blocks of one expert (masked) / of the tensor (psum)."""
        return align_up(self.max_m if layout == "masked" else self.psum_rows, 4)

    @property
    def entries(self) -> int:
        """(source rank, token, slot) triples a rank can receive."""
        return self.num_ranks * self.max_tokens * self.num_topk

    def offsets(self) -> dict[str, int]:
        """Byte offset of each region of the symmetric buffer, plus 'total'."""
        r, tm, k, p = self.num_ranks, self.max_tokens, self.num_topk, PARITIES
        sizes = [
            ("routing_arrive", 8 * r),
            ("combine_arrive", 8 * r),
            ("dispatch_tokens", 8 * p * r),
            ("dispatch_flags", 4 * p * r * tm * self.row_chunks),
            ("expert_counters", 4 * p * self.local_experts),
            ("meta_idx", 4 * p * r * tm * k),
            ("meta_pos", 4 * p * r * tm * k),
            ("meta_weight", 4 * p * r * tm * k),
            ("dispatch_rows", p * r * tm * self.row_stride),
            ("combine_rows", p * r * tm * self.hidden * 2),
        ]
        return pack_regions(sizes)


def pack_regions(sizes: list) -> dict[str, int]:
    """Byte offsets of the regions ``(name, bytes)`` laid out in order, each ALIGN-aligned, plus 'total'."""
    out, at = {}, 0
    for name, size in sizes:
        out[name] = at
        at = align_up(at + size, ALIGN)
    out["total"] = at
    return out
