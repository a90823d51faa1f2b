"""EP dispatch: one persistent kernel that sends token rows to the ranks owning their experts and
lays the rows this rank receives out for the grouped GEMMs (masked or psum layout).

Roles and phases (every CTA runs all of them; the grid is <= the SM count, so all CTAs are
co-resident and the grid barrier cannot deadlock):
  1. send     one warp per (token, destination rank): writes the token's top-k slots that rank owns
              (local expert id or -1, weight) into the peer's meta staging and, if any slot is owned
              there, the whole row (16-byte stores; FP8 scales after it) into the peer's row staging,
              slot = token index (no sender-side compaction).
  2. signal   CTA barrier, fence.acq_rel.sys, then +1 on every peer's arrival word for this rank.
  3. wait     warp 0 spins (acquire.sys, %globaltimer timeout) until every source rank's word
              reaches (call + 1) * num_ctas; a timeout fills the host-mapped error record.
  4. count    one thread per received (source, token, slot): position inside its local expert from
              a per-expert atomic counter (counters of parity call % 2; the other parity is zeroed).
  5. barrier  grid barrier (monotonic counter, GPU scope, with timeout): all counts are final.
  6. publish  per expert: raw counts, masked_m = min(count, max_m) or psum ends, optional stats.
  7. copy     one warp per ENTRIES_PER_WARP received entries: staging row -> its row of the layout, scales MN-major,
              src_info, and slot_row[(source, token, slot)] (the row, -1 if dropped) for combine.
Each CTA then bumps its own call counter (no cross-CTA race: counter `cta` is touched by CTA
`cta` only). Row order inside an expert is not deterministic (atomics); src_info names each row.
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.typing import Int32, Int64

from cute_moe.ep_layout import PARITIES, VECTOR_BYTES, EPGeometry, align_up

from .ep_ptx import (atomic_add_gpu_u32, copy_vectors, exchange_arrivals, ld_b32, ld_b64, record_timeout,
                     red_release_gpu_add_u64, st_b32, sync_threads_and, wait_counter)

THREADS = 256
WARPS = THREADS // 32
ENTRIES_PER_WARP = 2  # received entries one warp lays out per step (about 1 row at top-8 on 2 ranks)
OP_DISPATCH = 1  # error record op codes (cute_moe/ep.py names them)
OP_DISPATCH_GRID = 2


class EPDispatchKernel:
    """Compiled per (geometry, layout, index width); every tensor is passed as a 64-bit address."""

    def __init__(self, geom: EPGeometry, layout: str, idx_bytes: int):
        self.g = geom
        self.layout = layout
        self.idx_bytes = idx_bytes
        self.off = geom.offsets()

    @cute.jit
    def __call__(self, x: Int64, x_scales: Int64, topk_idx: Int64, topk_w: Int64, num_tokens: Int32, peers: Int64,
                 rank: Int32, calls_tensor: cute.Tensor, counters: Int64, grid_bar: Int64, slot_pos: Int64,
                 slot_row: Int64, scan: Int64, err: Int64, out_x: Int64, out_scales: Int64, out_counts: Int64,
                 out_raw_counts: Int64, out_src_info: Int64, stats: Int64, timeout_ns: Int64, stream):
        # calls_tensor (int32 [num_ctas], on the launch device) tells TVM-FFI the device and stream.
        calls = Int64(calls_tensor.iterator.toint())
        self.kernel(x, x_scales, topk_idx, topk_w, num_tokens, peers, rank, calls, counters, grid_bar, slot_pos,
                    slot_row, scan, err, out_x, out_scales, out_counts, out_raw_counts, out_src_info, stats,
                    timeout_ns).launch(grid=(self.g.num_ctas, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, x: Int64, x_scales: Int64, topk_idx: Int64, topk_w: Int64, num_tokens: Int32, peers: Int64,
               rank: Int32, calls: Int64, counters: Int64, grid_bar: Int64, slot_pos: Int64, slot_row: Int64,
               scan: Int64, err: Int64, out_x: Int64, out_scales: Int64, out_counts: Int64, out_raw_counts: Int64,
               out_src_info: Int64, stats: Int64, timeout_ns: Int64):
        g = self.g
        R, G = g.num_ranks, g.num_ctas
        tid, _, _ = cute.arch.thread_idx()
        cta, _, _ = cute.arch.block_idx()
        lane = tid % 32
        warp = tid // 32
        gwarp = cta * WARPS + warp
        gthread = cta * THREADS + tid
        call = ld_b32(calls + Int64(cta) * 4)
        parity = call % PARITIES
        target = Int64(call + 1) * G
        home = ld_b64(peers + Int64(rank) * 8)

        self.send(x, x_scales, topk_idx, topk_w, num_tokens, peers, rank, parity, gwarp, lane)
        if cta == 0:
            if tid < R:
                peer = ld_b64(peers + Int64(tid) * 8)
                st_b32(peer + self.off["dispatch_ntok"] + Int64(parity * R + rank) * 4, num_tokens)
        cute.arch.sync_threads()
        ok = exchange_arrivals(peers, home, self.off["dispatch_arrive"], rank, R, target, timeout_ns, err,
                               OP_DISPATCH, tid, warp, lane)

        if ok != 0:
            self.count(home, counters, slot_pos, parity, gthread, cta, tid)
        cute.arch.sync_threads()
        passed = Int32(1)
        if tid == 0:
            red_release_gpu_add_u64(grid_bar)
            passed = wait_counter(grid_bar, target, timeout_ns, False)
            if passed == 0:
                record_timeout(err, Int32(OP_DISPATCH_GRID), rank, Int32(1) << rank)
        ok = sync_threads_and(passed) * ok

        if ok != 0:
            if cutlass.const_expr(self.layout == "psum"):
                if warp == 0:
                    self.scan_segments(counters, scan, parity, cta, lane)
                cute.arch.sync_threads()
            self.publish(counters, scan, parity, cta, gthread, out_counts, out_raw_counts, stats)
            self.copy(home, slot_pos, slot_row, scan, parity, cta, gwarp, lane, out_x, out_scales, out_src_info)
        cute.arch.sync_threads()
        if tid == 0:
            st_b32(calls + Int64(cta) * 4, call + 1)

    @cute.jit
    def send(self, x: Int64, x_scales: Int64, topk_idx: Int64, topk_w: Int64, num_tokens: Int32, peers: Int64,
             rank: Int32, parity: Int32, gwarp: Int32, lane: Int32):
        """Phase 1: warp per (token, destination rank); meta for every token, the row if owned there."""
        g = self.g
        R, L, K, TM, E = g.num_ranks, g.local_experts, g.num_topk, g.max_tokens, g.num_experts
        payload_vecs = g.payload_bytes // VECTOR_BYTES
        scale_at = align_up(g.payload_bytes, VECTOR_BYTES)
        for u in cutlass.range(gwarp, num_tokens * R, (g.num_ctas * WARPS)):
            t = u // R
            r = u % R
            expert = Int32(-1)
            wbits = Int32(0)
            if lane < K:
                at = topk_idx + Int64(t * K + lane) * self.idx_bytes
                if cutlass.const_expr(self.idx_bytes == 8):
                    raw = ld_b64(at)
                    if raw >= 0:
                        if raw < E:
                            expert = Int32(raw)
                else:
                    raw32 = ld_b32(at)
                    if raw32 >= 0:
                        if raw32 < E:
                            expert = raw32
                wbits = ld_b32(topk_w + Int64(t * K + lane) * 4)
            local = Int32(-1)
            if expert >= 0:
                if expert // L == r:
                    local = expert - r * L
            peer = ld_b64(peers + Int64(r) * 8)
            entry = Int64((parity * R + rank) * TM + t) * K + lane
            if lane < K:
                st_b32(peer + self.off["meta_idx"] + entry * 4, local)
                st_b32(peer + self.off["meta_weight"] + entry * 4, wbits)
            if cute.arch.vote_any_sync(local >= 0):
                src_row = x + Int64(t) * g.payload_bytes
                dst_row = peer + self.off["dispatch_rows"] + Int64((parity * R + rank) * TM + t) * g.row_stride
                copy_vectors(src_row, dst_row, lane, payload_vecs)
                if cutlass.const_expr(g.fp8):
                    for j in cutlass.range(lane, g.scale_blocks, 32):
                        s = ld_b32(x_scales + Int64(t * g.scale_blocks + j) * 4)
                        st_b32(dst_row + scale_at + Int64(j) * 4, s)

    @cute.jit
    def received_tokens(self, home: Int64, parity: Int32) -> Int32:
        """Most tokens any source rank sent in this call (its staged count; read after the arrival wait)."""
        R = self.g.num_ranks
        tmax = Int32(0)
        for src in cutlass.range_constexpr(R):
            tmax = cutlass.max(tmax, ld_b32(home + self.off["dispatch_ntok"] + Int64(parity * R + src) * 4))
        return tmax

    @cute.jit
    def entry(self, j: Int32, tmax: Int32):
        """Active entry ``j`` of [R][tmax][K] -> (entry index of [R][Tm][K], source rank, token). The
        count and copy phases loop over the received tokens only, not over the buffer's maximum."""
        K, TM = self.g.num_topk, self.g.max_tokens
        span = tmax * K
        src = j // span
        t = (j % span) // K
        return (src * TM + t) * K + j % K, src, t

    @cute.jit
    def count(self, home: Int64, counters: Int64, slot_pos: Int64, parity: Int32, gthread: Int32, cta: Int32,
              tid: Int32):
        """Phase 4: thread per received entry -> position inside its local expert (or -1)."""
        g = self.g
        R, L, K, G = g.num_ranks, g.local_experts, g.num_topk, g.num_ctas
        if cta == 0:
            for e in cutlass.range(tid, L, THREADS):
                st_b32(counters + Int64((1 - parity) * L + e) * 4, Int32(0))
        tmax = self.received_tokens(home, parity)
        for j in cutlass.range(gthread, R * tmax * K, G * THREADS):
            i, src, t = self.entry(j, tmax)
            pos = Int32(-1)
            ntok = ld_b32(home + self.off["dispatch_ntok"] + Int64(parity * R + src) * 4)
            if t < ntok:
                m = ld_b32(home + self.off["meta_idx"] + (Int64(parity) * g.entries + i) * 4)
                if m >= 0:
                    if m < L:
                        pos = atomic_add_gpu_u32(counters + Int64(parity * L + m) * 4, Int32(1))
            st_b32(slot_pos + Int64(i) * 4, pos)

    @cute.jit
    def scan_segments(self, counters: Int64, scan: Int64, parity: Int32, cta: Int32, lane: Int32):
        """Psum layout, warp 0 of each CTA: scan[cta][e] = sum over e' < e of align(count[e'])."""
        g = self.g
        L, A = g.local_experts, g.alignment
        running = Int32(0)
        for c0 in cutlass.range_constexpr(0, L, 32):
            e = c0 + lane
            aligned = Int32(0)
            if e < L:
                c = ld_b32(counters + Int64(parity * L + e) * 4)
                aligned = (c + (A - 1)) // A * A
            incl = aligned
            for s in cutlass.range_constexpr(5):
                up = cute.arch.shuffle_sync_up(incl, offset=1 << s)
                if lane >= (1 << s):
                    incl = incl + up
            if e < L:
                st_b32(scan + Int64(cta * L + e) * 4, running + incl - aligned)
            running = running + cute.arch.shuffle_sync(incl, 31)

    @cute.jit
    def publish(self, counters: Int64, scan: Int64, parity: Int32, cta: Int32, gthread: Int32, out_counts: Int64,
                out_raw_counts: Int64, stats: Int64):
        """Phase 6: per local expert, raw count, masked_m or psum end, cumulative stats."""
        g = self.g
        L, G = g.local_experts, g.num_ctas
        for e in cutlass.range(gthread, L, G * THREADS):
            c = ld_b32(counters + Int64(parity * L + e) * 4)
            st_b32(out_raw_counts + Int64(e) * 4, c)
            if cutlass.const_expr(self.layout == "masked"):
                st_b32(out_counts + Int64(e) * 4, cutlass.min(c, Int32(g.max_m)))
            else:
                st_b32(out_counts + Int64(e) * 4, ld_b32(scan + Int64(cta * L + e) * 4) + c)
            if stats != 0:
                st_b32(stats + Int64(e) * 4, ld_b32(stats + Int64(e) * 4) + c)

    @cute.jit
    def copy(self, home: Int64, slot_pos: Int64, slot_row: Int64, scan: Int64, parity: Int32, cta: Int32,
             gwarp: Int32, lane: Int32, out_x: Int64, out_scales: Int64, out_src_info: Int64):
        """Phase 7: warp per ENTRIES_PER_WARP entries; each kept entry's staging row -> its layout row."""
        g = self.g
        R, L, K, TM = g.num_ranks, g.local_experts, g.num_topk, g.max_tokens
        payload_vecs = g.payload_bytes // VECTOR_BYTES
        scale_at = align_up(g.payload_bytes, VECTOR_BYTES)
        pitch = g.scale_row_pitch(self.layout)
        tmax = self.received_tokens(home, parity)
        active = R * tmax * K
        for c0 in cutlass.range(gwarp * ENTRIES_PER_WARP, active, (g.num_ctas * WARPS) * ENTRIES_PER_WARP):
            i, src, t = self.entry(c0 + lane, tmax)
            mine = Int32(0)
            if lane < ENTRIES_PER_WARP:
                if c0 + lane < active:
                    mine = Int32(1)
            pos = Int32(-1)
            if mine != 0:
                pos = ld_b32(slot_pos + Int64(i) * 4)
            m = Int32(0)
            row = Int32(-1)
            if pos >= 0:
                m = ld_b32(home + self.off["meta_idx"] + (Int64(parity) * g.entries + i) * 4)
                if cutlass.const_expr(self.layout == "masked"):
                    if pos < g.max_m:
                        row = m * g.max_m + pos
                else:
                    row = ld_b32(scan + Int64(cta * L + m) * 4) + pos
                    if row >= g.psum_rows:
                        row = Int32(-1)
            if mine != 0:
                st_b32(slot_row + Int64(i) * 4, row)
            if row >= 0:
                st_b32(out_src_info + Int64(row) * 4, src * TM + t)
            for j in cutlass.range(ENTRIES_PER_WARP):
                row_j = cute.arch.shuffle_sync(row, j)
                if row_j >= 0:
                    src_j = cute.arch.shuffle_sync(src, j)
                    t_j = cute.arch.shuffle_sync(t, j)
                    staged = home + self.off["dispatch_rows"] + Int64((parity * R + src_j) * TM + t_j) * g.row_stride
                    dst = out_x + Int64(row_j) * g.payload_bytes
                    copy_vectors(staged, dst, lane, payload_vecs)
                    if cutlass.const_expr(g.fp8):
                        m_j = cute.arch.shuffle_sync(m, j)
                        pos_j = cute.arch.shuffle_sync(pos, j)
                        for kb in cutlass.range(lane, g.scale_blocks, 32):
                            s = ld_b32(staged + scale_at + Int64(kb) * 4)
                            if cutlass.const_expr(self.layout == "masked"):
                                at = (Int64(m_j) * g.scale_blocks + kb) * pitch + pos_j
                            else:
                                at = Int64(kb) * pitch + row_j
                            st_b32(out_scales + at * 4, s)

