"""EP dispatch: one persistent kernel that sends token rows to the ranks owning their experts and
lays the rows this rank receives out for the grouped GEMMs (masked or psum layout).

Roles (every CTA runs every phase; the grid is <= the SM count, so all CTAs are co-resident):
  routing  one warp per (token, destination rank): for each top-k slot that rank owns, the slot's
           position inside its expert comes from a system-scope atomic on that rank's expert
           counter; the warp writes (local expert or -1, position, weight) into the peer's routing
           staging. Positions are taken by the sender, so no phase needs a grid barrier.
  rows     one warp per (token, other rank, chunk of the row) when the token has a slot there:
           16-byte stores of the chunk into the peer's row staging (FP8 scales with chunk 0). A
           token is sent once per destination rank, whatever its number of slots there; rows for
           this rank itself are never staged (the layout copy reads ``x``).
  signal   CTA barrier, fence.acq_rel.sys, +1 on every rank's arrival word for this rank.
  expand   one warp per (source, token, chunk): the chunk is loaded once (from ``x`` for this rank's
           own tokens, from the staging otherwise) and stored into the layout row of each of the
           token's slots here; chunk 0 also stores the scales (MN-major), src_info and the handle's
           row map ``slot_row``.
  publish  per local expert: raw count, masked_m = min(count, max_m) or psum end, stats.

Masked layout (low latency): route to this rank; signal this rank only (a fence over local
writes: cheap); send rows, then route to the others (their remote atomics' round trips overlap the
rows on the wire); wait for this rank's own routing signal (every CTA of this rank has routed, so its
positions are visible) and expand its own tokens while the rows are on the wire; signal every rank
(rows, and routing to the others); wait for the others; publish; expand their tokens.
Psum layout (throughput): segment starts need every count first, so routing is signalled to every
rank before any row moves; then SENDER_FRACTION of the CTAs send rows over NVLink while the others
wait for every rank's routing, scan the counts (each CTA's warp 0, into its own scratch row) and
expand this rank's own tokens from HBM; signal rows; wait; every CTA expands the other ranks' tokens.

Each arrival word (routing, rows) advances by the grid size on every call of either layout, so the
layouts can alternate on one buffer.
Expert counters live in the symmetric buffer, double-buffered by call parity: CTA 0 zeroes the
other parity's counters before its first signal (every increment of that parity by any rank
happened before that rank's signals of the previous call, which this rank waited for; the next
increments come after this call's signals). Each CTA then bumps its own call counter. Row order
inside an expert is not deterministic (atomics); src_info names each row.
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.typing import Int32, Int64

from cute_moe.ep_layout import PARITIES, VECTOR_BYTES, EPGeometry, align_up

from .ep_ptx import (COPY_PER_LANE, RANKS_ALL, RANKS_OTHERS, RANKS_SELF, atomic_add_sys_u32, await_ranks, copy_chunks,
                     ld_b32, ld_b64, load_expert_id, num_chunks, signal_ranks, st_b32)

THREADS = 256
WARPS = THREADS // 32
OP_DISPATCH = 1  # error record op codes (cute_moe/ep.py names them)
OP_DISPATCH_ROUTING = 2
SENDER_FRACTION = 0.5  # psum layout: CTAs sending rows over NVLink while the others lay out own tokens


@cute.jit
def first_worker(worker: Int32, workers: Int32, busy: Int32) -> Int32:
    """Loop start of ``worker`` (of ``workers``) when the first ``busy`` units of the previous loop
    went to the same workers in order: the workers they kept busy take the last units instead."""
    return (worker + workers - busy % workers) % workers


class EPDispatchKernel:
    """Compiled per (geometry, layout, index width); every tensor is passed as a 64-bit address."""

    def __init__(self, geom: EPGeometry, layout: str, idx_bytes: int):
        self.g = geom
        self.layout = layout
        self.idx_bytes = idx_bytes
        self.off = geom.offsets()
        self.chunks = num_chunks(geom.payload_bytes // VECTOR_BYTES, COPY_PER_LANE)

    @cute.jit
    def __call__(self, x: Int64, x_scales: Int64, topk_idx: Int64, topk_w: Int64, num_tokens: Int32, peers: Int64,
                 rank: Int32, calls_tensor: cute.Tensor, slot_row: Int64, scan: Int64, err: Int64, out_x: Int64,
                 out_scales: Int64, out_counts: Int64, out_raw_counts: Int64, out_src_info: Int64, stats: Int64,
                 timeout_ns: Int64, stream):
        # calls_tensor (int32 [num_ctas], on the launch device) tells TVM-FFI the device and stream.
        calls = Int64(calls_tensor.iterator.toint())
        self.kernel(x, x_scales, topk_idx, topk_w, num_tokens, peers, rank, calls, slot_row, scan, err, out_x,
                    out_scales, out_counts, out_raw_counts, out_src_info, stats,
                    timeout_ns).launch(grid=(self.g.num_ctas, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, x: Int64, x_scales: Int64, topk_idx: Int64, topk_w: Int64, num_tokens: Int32, peers: Int64,
               rank: Int32, calls: Int64, slot_row: Int64, scan: Int64, err: Int64, out_x: Int64, out_scales: Int64,
               out_counts: Int64, out_raw_counts: Int64, out_src_info: Int64, stats: Int64, timeout_ns: Int64):
        g = self.g
        R, L = g.num_ranks, g.local_experts
        tid, _, _ = cute.arch.thread_idx()
        cta, _, _ = cute.arch.block_idx()
        lane = tid % 32
        warp = tid // 32
        gwarp = cta * WARPS + warp
        gthread = cta * THREADS + tid
        call = ld_b32(calls + Int64(cta) * 4)
        parity = call % PARITIES
        target = Int64(call + 1) * g.num_ctas
        home = ld_b64(peers + Int64(rank) * 8)
        out = (x, x_scales, slot_row, out_x, out_scales, out_src_info)
        everyone = g.num_ctas * WARPS

        if cta == 0:
            for e in cutlass.range(tid, L, THREADS):
                st_b32(home + self.off["expert_counters"] + Int64((1 - parity) * L + e) * 4, Int32(0))
            if tid < R:
                peer = ld_b64(peers + Int64(tid) * 8)
                st_b32(peer + self.off["dispatch_ntok"] + Int64(parity * R + rank) * 4, num_tokens)
        if cutlass.const_expr(self.layout == "masked"):
            self.route(topk_idx, topk_w, num_tokens, peers, rank, parity, RANKS_SELF, gwarp, everyone, lane, 0)
            cute.arch.sync_threads()
            if tid == 0:
                signal_ranks(peers, rank, R, ((self.off["routing_arrive"], RANKS_SELF),))
            self.send_rows(x, x_scales, topk_idx, num_tokens, peers, rank, parity, gwarp, everyone, lane)
            self.route(topk_idx, topk_w, num_tokens, peers, rank, parity, RANKS_OTHERS, gwarp, everyone, lane,
                       num_tokens * (R - 1) * self.chunks)
            ok = await_ranks(home, self.off["routing_arrive"], rank, R, RANKS_SELF, target, timeout_ns, err,
                             OP_DISPATCH_ROUTING, warp, lane)
            if ok != 0:
                self.expand(home, num_tokens, rank, parity, cta, scan, gwarp, everyone, lane, out, True)
            cute.arch.sync_threads()
            if tid == 0:
                signal_ranks(peers, rank, R, ((self.off["dispatch_arrive"], RANKS_ALL),
                                              (self.off["routing_arrive"], RANKS_OTHERS)))
            if ok != 0:
                ok = await_ranks(home, self.off["dispatch_arrive"], rank, R, RANKS_OTHERS, target, timeout_ns, err,
                                 OP_DISPATCH, warp, lane)
            if ok != 0:
                self.publish(home, scan, parity, cta, gthread, g.num_ctas * THREADS, out_counts, out_raw_counts,
                             stats)
                self.expand(home, num_tokens, rank, parity, cta, scan, gwarp, everyone, lane, out, False)
        else:
            senders = int(g.num_ctas * SENDER_FRACTION) if R > 1 else 0
            self.route(topk_idx, topk_w, num_tokens, peers, rank, parity, RANKS_ALL, gwarp, everyone, lane, 0)
            cute.arch.sync_threads()
            if tid == 0:
                signal_ranks(peers, rank, R, ((self.off["routing_arrive"], RANKS_ALL),))
            if cta < senders:
                self.send_rows(x, x_scales, topk_idx, num_tokens, peers, rank, parity, gwarp, senders * WARPS, lane)
            ok = await_ranks(home, self.off["routing_arrive"], rank, R, RANKS_ALL, target, timeout_ns, err,
                             OP_DISPATCH_ROUTING, warp, lane)
            if ok != 0:
                if warp == 0:
                    self.scan_segments(home, scan, parity, cta, lane)
                cute.arch.sync_threads()
                if cta == g.num_ctas - 1:
                    self.publish(home, scan, parity, cta, tid, THREADS, out_counts, out_raw_counts, stats)
                if cta >= senders:
                    self.expand(home, num_tokens, rank, parity, cta, scan, gwarp - senders * WARPS,
                                everyone - senders * WARPS, lane, out, True)
            cute.arch.sync_threads()
            if tid == 0:
                signal_ranks(peers, rank, R, ((self.off["dispatch_arrive"], RANKS_ALL),))
            if ok != 0:
                ok = await_ranks(home, self.off["dispatch_arrive"], rank, R, RANKS_ALL, target, timeout_ns, err,
                                 OP_DISPATCH, warp, lane)
            if ok != 0:
                self.expand(home, num_tokens, rank, parity, cta, scan, gwarp, everyone, lane, out, False)
        cute.arch.sync_threads()
        if tid == 0:
            st_b32(calls + Int64(cta) * 4, call + 1)

    @cute.jit
    def owned_by(self, topk_idx: Int64, t: Int32, r: Int32, lane: Int32) -> Int32:
        """Lane k < K: the local id on rank ``r`` of token ``t``'s slot k if ``r`` owns it, else -1."""
        g = self.g
        local = Int32(-1)
        if lane < g.num_topk:
            expert = load_expert_id(topk_idx, t * g.num_topk + lane, self.idx_bytes, g.num_experts)
            if expert >= 0:
                if expert // g.local_experts == r:
                    local = expert - r * g.local_experts
        return local

    @cute.jit
    def route(self, topk_idx: Int64, topk_w: Int64, num_tokens: Int32, peers: Int64, rank: Int32, parity: Int32,
              dests: cutlass.Constexpr[int], worker: Int32, workers: Int32, lane: Int32, busy: Int32):
        """Routing: warp per (token, destination rank) for the destinations ``dests`` (this rank, the
        others, all); lane k < K handles slot k. The first ``busy`` workers (still sending) start last."""
        g = self.g
        R, L, K, TM = g.num_ranks, g.local_experts, g.num_topk, g.max_tokens
        per_token = R
        if cutlass.const_expr(dests == RANKS_SELF):
            per_token = 1
        if cutlass.const_expr(dests == RANKS_OTHERS):
            per_token = R - 1
        if cutlass.const_expr(per_token > 0):
            for u in cutlass.range(first_worker(worker, workers, busy), num_tokens * per_token, workers):
                t = u // per_token
                r = u % per_token
                if cutlass.const_expr(dests == RANKS_SELF):
                    r = rank
                if cutlass.const_expr(dests == RANKS_OTHERS):
                    r = (rank + 1 + u % per_token) % R
                local = self.owned_by(topk_idx, t, r, lane)
                peer = ld_b64(peers + Int64(r) * 8)
                pos = Int32(-1)
                if local >= 0:
                    pos = atomic_add_sys_u32(peer + self.off["expert_counters"] + Int64(parity * L + local) * 4,
                                             Int32(1))
                if lane < K:
                    entry = (Int64((parity * R + rank) * TM + t) * K + lane) * 4
                    st_b32(peer + self.off["meta_idx"] + entry, local)
                    st_b32(peer + self.off["meta_pos"] + entry, pos)
                    st_b32(peer + self.off["meta_weight"] + entry, ld_b32(topk_w + Int64(t * K + lane) * 4))

    @cute.jit
    def send_rows(self, x: Int64, x_scales: Int64, topk_idx: Int64, num_tokens: Int32, peers: Int64, rank: Int32,
                  parity: Int32, worker: Int32, workers: Int32, lane: Int32):
        """Rows: warp per (token, other rank, chunk); the chunk goes to the peer's staging if the peer
        owns one of the token's slots."""
        g = self.g
        R, TM, C = g.num_ranks, g.max_tokens, self.chunks
        if cutlass.const_expr(R > 1):
            for u in cutlass.range(worker, num_tokens * (R - 1) * C, workers):
                c = u % C
                v = u // C
                t = v // (R - 1)
                r = (rank + 1 + v % (R - 1)) % R
                if cute.arch.vote_any_sync(self.owned_by(topk_idx, t, r, lane) >= 0):
                    peer = ld_b64(peers + Int64(r) * 8)
                    dst = peer + self.off["dispatch_rows"] + Int64((parity * R + rank) * TM + t) * g.row_stride
                    copy_chunks(x + Int64(t) * g.payload_bytes, [(dst, Int32(1))], lane, [c],
                                g.payload_bytes // VECTOR_BYTES)
                    if cutlass.const_expr(g.fp8):
                        if c == 0:
                            scale_at = align_up(g.payload_bytes, VECTOR_BYTES)
                            for j in cutlass.range(lane, g.scale_blocks, 32):
                                s = ld_b32(x_scales + Int64(t * g.scale_blocks + j) * 4)
                                st_b32(dst + scale_at + Int64(j) * 4, s)

    @cute.jit
    def scan_segments(self, home: Int64, scan: Int64, parity: Int32, cta: Int32, lane: Int32):
        """Psum layout, warp 0 of each CTA: scan[cta][e] = sum over e' < e of align(count[e'])."""
        g = self.g
        L, A = g.local_experts, g.alignment
        running = Int32(0)
        for c0 in cutlass.range_constexpr(0, L, 32):
            e = c0 + lane
            aligned = Int32(0)
            if e < L:
                c = ld_b32(home + self.off["expert_counters"] + Int64(parity * L + e) * 4)
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
    def publish(self, home: Int64, scan: Int64, parity: Int32, cta: Int32, worker: Int32, workers: Int32,
                out_counts: Int64, out_raw_counts: Int64, stats: Int64):
        """Thread per local expert (counts are final once every rank's routing arrived): raw count,
        masked_m or psum end (from this CTA's scan row), cumulative stats."""
        g = self.g
        L = g.local_experts
        for e in cutlass.range(worker, L, workers):
            c = ld_b32(home + self.off["expert_counters"] + Int64(parity * L + e) * 4)
            st_b32(out_raw_counts + Int64(e) * 4, c)
            if cutlass.const_expr(self.layout == "masked"):
                st_b32(out_counts + Int64(e) * 4, cutlass.min(c, Int32(g.max_m)))
            else:
                st_b32(out_counts + Int64(e) * 4, ld_b32(scan + Int64(cta * L + e) * 4) + c)
            if stats != 0:
                st_b32(stats + Int64(e) * 4, ld_b32(stats + Int64(e) * 4) + c)

    @cute.jit
    def layout_row(self, home: Int64, scan: Int64, parity: Int32, cta: Int32, entry: Int64) -> Int32:
        """Layout row of a received (source, token, slot) entry, -1 if not routed here or dropped
        (masked: past max_m; psum: past the layout, only possible with duplicate ids)."""
        g = self.g
        row = Int32(-1)
        m = ld_b32(home + self.off["meta_idx"] + (Int64(parity) * g.entries + entry) * 4)
        pos = ld_b32(home + self.off["meta_pos"] + (Int64(parity) * g.entries + entry) * 4)
        if m >= 0:
            if m < g.local_experts:
                if pos >= 0:
                    if cutlass.const_expr(self.layout == "masked"):
                        if pos < g.max_m:
                            row = m * g.max_m + pos
                    else:
                        row = ld_b32(scan + Int64(cta * g.local_experts + m) * 4) + pos
                        if row >= g.psum_rows:
                            row = Int32(-1)
        return row

    @cute.jit
    def expand(self, home: Int64, num_tokens: Int32, rank: Int32, parity: Int32, cta: Int32, scan: Int64,
               worker: Int32, workers: Int32, lane: Int32, out: tuple, own: cutlass.Constexpr[bool]):
        """Expand: warp per (source, token, chunk) of this rank's own tokens (``own``) or of every
        other rank's; the chunk is loaded once and stored to each of the token's layout rows here."""
        g = self.g
        R, K, TM, C = g.num_ranks, g.num_topk, g.max_tokens, self.chunks
        x, x_scales, slot_row, out_x, out_scales, out_src_info = out
        sources = 1 if own else R - 1
        tmax = num_tokens
        if cutlass.const_expr(not own):
            tmax = Int32(0)
            for i in cutlass.range_constexpr(R - 1):
                src_i = (rank + 1 + i) % R
                tmax = cutlass.max(tmax, ld_b32(home + self.off["dispatch_ntok"] + Int64(parity * R + src_i) * 4))
        for u in cutlass.range(worker, sources * tmax * C, workers):
            c = u % C
            v = u // C
            t = v % tmax
            src = rank
            ntok = num_tokens
            if cutlass.const_expr(not own):
                src = (rank + 1 + v // tmax) % R
                ntok = ld_b32(home + self.off["dispatch_ntok"] + Int64(parity * R + src) * 4)
            if t < ntok:
                entry = Int64(src * TM + t) * K + lane
                row = Int32(-1)
                if lane < K:
                    row = self.layout_row(home, scan, parity, cta, entry)
                    if c == 0:
                        st_b32(slot_row + entry * 4, row)
                        if row >= 0:
                            st_b32(out_src_info + Int64(row) * 4, src * TM + t)
                rows = [cute.arch.shuffle_sync(row, k) for k in range(K)]
                source = x + Int64(t) * g.payload_bytes
                if cutlass.const_expr(not own):
                    source = home + self.off["dispatch_rows"] + Int64((parity * R + src) * TM + t) * g.row_stride
                copy_chunks(source, [(out_x + Int64(rows[k]) * g.payload_bytes, Int32(rows[k] >= 0)) for k in range(K)],
                            lane, [c], g.payload_bytes // VECTOR_BYTES)
                if cutlass.const_expr(g.fp8):
                    if c == 0:
                        self.expand_scales(x_scales, source, t, rows, out_scales, lane, own)

    @cute.jit
    def expand_scales(self, x_scales: Int64, source: Int64, t: Int32, rows: list, out_scales: Int64, lane: Int32,
                      own: cutlass.Constexpr[bool]):
        """FP8: the token's 1x128 scales into the MN-major scale tensor, once per layout row."""
        g = self.g
        SB = g.scale_blocks
        pitch = g.scale_row_pitch(self.layout)
        scales_at = x_scales + Int64(t * SB) * 4
        if cutlass.const_expr(not own):
            scales_at = source + align_up(g.payload_bytes, VECTOR_BYTES)
        for kb in cutlass.range(lane, SB, 32):
            s = ld_b32(scales_at + Int64(kb) * 4)
            for k in cutlass.range_constexpr(g.num_topk):
                if rows[k] >= 0:
                    if cutlass.const_expr(self.layout == "masked"):
                        at = (Int64(rows[k] // g.max_m) * SB + kb) * pitch + rows[k] % g.max_m
                    else:
                        at = Int64(kb) * pitch + rows[k]
                    st_b32(out_scales + at * 4, s)
