"""EP combine: one persistent kernel that reduces expert outputs back into their tokens.

Phases (every CTA runs all of them; grid <= SM count, all CTAs co-resident):
  1. partial  one warp per received (source rank, token, chunk of the row): FP32 sum over the
              token's slots routed to this rank of weight * y[slot_row] (rows from the dispatch
              handle), rounded once to BF16 and written with 16-byte stores into the source rank's
              combine staging [parity][this rank][token]. A token with no slot here sends nothing.
  2. signal   CTA barrier, fence.acq_rel.sys, +1 on every peer's combine arrival word for this rank.
  3. wait     warp 0 spins (acquire.sys, %globaltimer timeout) until every rank's word reaches
              (call + 1) * num_ctas; a timeout fills the host-mapped error record.
  4. reduce   one warp per (local token, chunk): out[t] = sum, in FP32 over ranks in ascending order, of the
              partials of the ranks that own one of t's experts (known locally from topk_idx), BF16;
              zeros for a token with no valid slot.
Dispatch staging is read at the parity of the latest dispatch (its call counter minus one). Rows
are split into chunks (``num_chunks``) so that a few tokens still keep every warp busy.
"""

from typing import Callable

import cutlass
import cutlass.cute as cute
from cutlass.cute.typing import Float32, Int32, Int64

from cute_moe.ep_layout import PARITIES, VECTOR_BYTES, EPGeometry, num_chunks

from .ep_ptx import (bits_to_f32, chunk_vector, exchange_arrivals, ld_b32, ld_b64, ld_v4_pred, load_expert_id,
                     pack_bf16x2, source_tokens, st_b32, st_v4_pred, unpack_bf16x2, vector_inside, warp_or)

THREADS = 256
WARPS = THREADS // 32
OP_COMBINE = 3  # error record op code (cute_moe/ep.py names it)
WORDS = 4  # b32 words per 16-byte vector = 8 BF16
LOADS_IN_FLIGHT = 32  # 16-byte loads a lane issues before using them (partial: K per vector; reduce: R)
MAX_PER_LANE = 8  # vectors per lane per chunk (registers: 8 FP32 accumulators each)


def _per_lane(loads_per_vector: int) -> int:
    """Vectors per lane per chunk so that about LOADS_IN_FLIGHT loads are in flight, 1..MAX_PER_LANE."""
    return max(1, min(MAX_PER_LANE, LOADS_IN_FLIGHT // loads_per_vector))


def _store_bf16(addr: Int64, acc: list, inside: Int32) -> None:
    """Round acc[0:8] to BF16 and store the 16 bytes at ``addr`` if ``inside`` (traced inline)."""
    st_v4_pred(addr, inside, pack_bf16x2(acc[0], acc[1]), pack_bf16x2(acc[2], acc[3]), pack_bf16x2(acc[4], acc[5]),
               pack_bf16x2(acc[6], acc[7]))


def _sum_chunk(num_sources: int, source_row: Callable, source_pred: Callable, weight: Callable, dst_row: Int64,
               row_vecs: int, lane: Int32, chunk: Int32, per_lane: int) -> None:
    """This lane's vectors of chunk ``chunk`` of ``dst_row`` = BF16 of the FP32 sum over sources s
    of weight(s) x row s (``source_row(s)``: its address; a source whose ``source_pred(s)`` is 0
    reads zeros). Every load is issued before the first use (traced inline into the kernel)."""
    loaded, inside, offsets = [], [], []
    for j in range(per_lane):
        index = chunk_vector(lane, chunk, j, per_lane)
        inside.append(vector_inside(index, row_vecs))
        offsets.append(Int64(index) * VECTOR_BYTES)
        for s in range(num_sources):
            loaded.append(ld_v4_pred(source_row(s) + offsets[j], source_pred(s) & inside[j]))
    for j in range(per_lane):
        acc = [Float32(0.0)] * (2 * WORDS)
        for s in range(num_sources):
            _accumulate(acc, loaded[j * num_sources + s], weight(s))
        _store_bf16(dst_row + offsets[j], acc, inside[j])


def _accumulate(acc: list, words: tuple, w: Float32) -> None:
    """acc[0:8] += w * the 8 BF16 of ``words`` (traced inline into the calling kernel)."""
    for q in range(WORDS):
        lo, hi = unpack_bf16x2(words[q])
        acc[2 * q] = acc[2 * q] + w * lo
        acc[2 * q + 1] = acc[2 * q + 1] + w * hi


class EPCombineKernel:
    """Compiled per (geometry, index width); every tensor is passed as a 64-bit address."""

    def __init__(self, geom: EPGeometry, idx_bytes: int):
        self.g = geom
        self.idx_bytes = idx_bytes
        self.off = geom.offsets()

    @cute.jit
    def __call__(self, y: Int64, topk_idx: Int64, num_tokens: Int32, peers: Int64, rank: Int32,
                 calls_tensor: cute.Tensor, dispatch_calls: Int64, slot_row: Int64, err: Int64, out: Int64,
                 timeout_ns: Int64, stream):
        # calls_tensor (int32 [num_ctas], on the launch device) tells TVM-FFI the device and stream.
        calls = Int64(calls_tensor.iterator.toint())
        self.kernel(y, topk_idx, num_tokens, peers, rank, calls, dispatch_calls, slot_row, err, out,
                    timeout_ns).launch(grid=(self.g.num_ctas, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, y: Int64, topk_idx: Int64, num_tokens: Int32, peers: Int64, rank: Int32, calls: Int64,
               dispatch_calls: Int64, slot_row: Int64, err: Int64, out: Int64, timeout_ns: Int64):
        g = self.g
        R, G = g.num_ranks, g.num_ctas
        tid, _, _ = cute.arch.thread_idx()
        cta, _, _ = cute.arch.block_idx()
        lane = tid % 32
        warp = tid // 32
        gwarp = cta * WARPS + warp
        call = ld_b32(calls + Int64(cta) * 4)
        parity = call % PARITIES
        dispatch_parity = (ld_b32(dispatch_calls + Int64(cta) * 4) + (PARITIES - 1)) % PARITIES
        target = Int64(call + 1) * G
        home = ld_b64(peers + Int64(rank) * 8)

        self.partial(y, peers, rank, home, slot_row, parity, dispatch_parity, gwarp, lane)
        cute.arch.sync_threads()
        ok = exchange_arrivals(peers, home, self.off["combine_arrive"], rank, R, target, timeout_ns, err,
                               OP_COMBINE, tid, warp, lane)
        if ok != 0:
            self.reduce(topk_idx, num_tokens, home, parity, gwarp, lane, out)
        cute.arch.sync_threads()
        if tid == 0:
            st_b32(calls + Int64(cta) * 4, call + 1)

    @cute.jit
    def partial(self, y: Int64, peers: Int64, rank: Int32, home: Int64, slot_row: Int64, parity: Int32,
                dispatch_parity: Int32, gwarp: Int32, lane: Int32):
        """Phase 1: warp per (source rank, token, chunk) received by the last dispatch."""
        g = self.g
        R, K, TM, H = g.num_ranks, g.num_topk, g.max_tokens, g.hidden
        row_bytes = H * 2
        row_vecs = row_bytes // VECTOR_BYTES
        tmax = Int32(0)  # loop over the tokens received, not over the buffer's maximum
        for r in cutlass.range_constexpr(R):
            tmax = cutlass.max(tmax, source_tokens(home + self.off["dispatch_tokens"], dispatch_parity, R, r))
        per_lane = _per_lane(K)
        C = num_chunks(row_vecs, per_lane)
        for u in cutlass.range(gwarp, R * tmax * C, g.num_ctas * WARPS):
            c = u % C
            src = u // C % R  # sources interleaved: local and NVLink stores overlap
            t = u // C // R
            ntok = source_tokens(home + self.off["dispatch_tokens"], dispatch_parity, R, src)
            if t < ntok:
                local = Int32(-1)
                row = Int32(-1)
                wbits = Int32(0)
                if lane < K:
                    entry = Int64(src * TM + t) * K + lane
                    meta = Int64(dispatch_parity) * g.entries + entry
                    local = ld_b32(home + self.off["meta_idx"] + meta * 4)
                    row = ld_b32(slot_row + entry * 4)
                    if local >= 0:
                        if row >= 0:
                            wbits = ld_b32(home + self.off["meta_weight"] + meta * 4)
                if cute.arch.vote_any_sync(local >= 0):
                    peer = ld_b64(peers + Int64(src) * 8)
                    dst = peer + self.off["combine_rows"] + Int64((parity * R + rank) * TM + t) * row_bytes
                    w_k = [cute.arch.shuffle_sync(wbits, k) for k in range(K)]
                    row_k = [cute.arch.shuffle_sync(row, k) for k in range(K)]
                    _sum_chunk(K, lambda k: y + Int64(row_k[k]) * row_bytes, lambda k: Int32(w_k[k] != 0),
                               lambda k: bits_to_f32(w_k[k]), dst, row_vecs, lane, c, per_lane)

    @cute.jit
    def reduce(self, topk_idx: Int64, num_tokens: Int32, home: Int64, parity: Int32, gwarp: Int32, lane: Int32,
               out: Int64):
        """Phase 4: warp per (local token, chunk); sum of the partials of the ranks owning its experts."""
        g = self.g
        R, K, TM, H, L, E = g.num_ranks, g.num_topk, g.max_tokens, g.hidden, g.local_experts, g.num_experts
        row_bytes = H * 2
        row_vecs = row_bytes // VECTOR_BYTES
        per_lane = _per_lane(R)
        C = num_chunks(row_vecs, per_lane)
        for u in cutlass.range(gwarp, num_tokens * C, g.num_ctas * WARPS):
            c = u % C
            t = u // C
            bit = Int32(0)
            if lane < K:
                expert = load_expert_id(topk_idx, t * K + lane, self.idx_bytes, E)
                if expert >= 0:
                    bit = Int32(1) << (expert // L)
            ranks = warp_or(bit)
            _sum_chunk(R, lambda r: home + self.off["combine_rows"] + Int64((parity * R + r) * TM + t) * row_bytes,
                       lambda r: (ranks >> r) & 1, lambda r: Float32(1.0), out + Int64(t) * row_bytes, row_vecs,
                       lane, c, per_lane)
