"""EP dispatch: one persistent kernel that sends token rows to the ranks owning their experts and
lays the rows this rank receives out for the grouped GEMMs (masked or psum layout).

Roles (every CTA runs every phase; the grid is <= the SM count, so all CTAs are co-resident):
  routing  one warp per (token, destination rank): for each top-k slot that rank owns, the slot's
           position inside its expert comes from a system-scope atomic on that rank's expert
           counter; the warp writes (local expert or -1, position, weight) into the rank's routing
           staging. Positions are taken by the sender, so no phase needs a grid barrier.
  rows     one warp per (token, other rank, chunk of the row) when the token has a slot there:
           16-byte stores of the chunk into the peer's row staging (FP8 scales with chunk 0), then
           a warp barrier and one ``st.release.sys`` of the chunk's arrival flag (the call's epoch).
           A token is sent once per destination rank, whatever its number of slots there; rows for
           this rank itself are never staged (the layout copy reads ``x``).
  expand   one warp per (source, token, chunk): waits for that chunk's flag only, loads the chunk
           once (from ``x`` for this rank's own tokens, from the staging otherwise) and stores it
           into the layout row of each of the token's slots here; chunk 0 also stores the scales
           (MN-major), src_info and the handle's row map ``slot_row``. Copies of early tokens
           overlap the transfer of later ones.
  publish  per local expert: raw count, masked_m = min(count, max_m) or psum end, stats; after
           every rank's CTAs signalled ``routing_arrive`` (fence.acq_rel.sys, then +1 per CTA).

Masked layout (low latency): the routing of a (token, other rank) pair travels with the token's
chunk 0 (same warp, same flag), own tokens' routing gets a flag in this rank's buffer, and each
source's token count is an epoch word (``dispatch_tokens``) written at the start: the only waits
are per chunk, except the last CTA's wait for every rank's routing before it publishes the counts.
Psum layout (throughput): segment starts need every count first, so routing is signalled to every
rank before any row moves; then SENDER_FRACTION of the CTAs send rows over NVLink while the others
wait for every rank's routing, scan the counts (each CTA's warp 0, into its own scratch row) and
expand this rank's own tokens from HBM; every CTA then expands the other ranks' tokens, chunk by
chunk as their flags arrive.

Every CTA of every rank signals ``routing_arrive`` once per call in both layouts, so the layouts can
alternate on one buffer, and some CTA of every call waits for every rank's signal of the same call:
a rank's call n + 2 (which reuses call n's staging parity) starts only after every peer finished
call n. Expert counters live in the symmetric buffer, double-buffered by call parity: CTA 0 zeroes
the other parity's counters before its signal (every increment of that parity by any rank happened
before that rank's signal of the previous call, which this rank waited for; the next increments come
after this call's signals). Each CTA then bumps its own call counter. Row order inside an expert is
not deterministic (atomics); src_info names each row.
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.typing import Int32, Int64

from cute_moe.ep_layout import PARITIES, VECTOR_BYTES, EPGeometry, align_up

from .ep_ptx import (RANKS_ALL, atomic_add_sys_u32, await_ranks, copy_chunks, fence_sys, ld_b32, ld_b64,
                     load_expert_id, record_timeout, signal_ranks, source_tokens, st_b32, st_relaxed_sys_b32,
                     st_release_sys_b32, st_release_sys_b64, wait_counter, wait_flag, scan_aligned_counts)

# Threads per CTA, by (layout, FP8 payload), measured on 2 H200 at hidden 7168 (docs/ep.md): the
# masked layout's latency is best with 256 (512: 17.9 -> 25.0 µs at 128 BF16 tokens); BF16 psum
# copies keep more rows in flight with 512 (8192 tokens: 543 -> 493 µs); FP8 psum rows are half as
# long and 512 measured slower (406 -> 444 µs).
THREADS = {("masked", False): 256, ("masked", True): 256, ("psum", False): 512, ("psum", True): 256}
OP_DISPATCH = 1  # error record op codes (cute_moe/ep.py names them)
OP_DISPATCH_ROUTING = 2
SENDER_FRACTION = 0.5  # psum layout: CTAs sending rows over NVLink while the others lay out own tokens
FLAG_BATCH = 8  # psum layout: units a sending warp copies before one fence releases all their flags
EPOCH_SHIFT = 32  # dispatch_tokens word: epoch in the high half, token count in the low half


@cute.jit
def first_worker(worker: Int32, workers: Int32, busy: Int32) -> Int32:
    """Loop start of ``worker`` (of ``workers``) when the first ``busy`` units of the previous loops
    went to the same workers in order: the workers they kept busy take the last units instead."""
    return (worker + workers - busy % workers) % workers


class EPDispatchKernel:
    """Compiled per (geometry, layout, index width); every tensor is passed as a 64-bit address."""

    def __init__(self, geom: EPGeometry, layout: str, idx_bytes: int):
        self.g = geom
        self.layout = layout
        self.idx_bytes = idx_bytes
        self.off = geom.offsets()
        self.chunks = geom.row_chunks
        self.threads = THREADS[(layout, geom.fp8)]
        self.warps = self.threads // 32

    @cute.jit
    def __call__(self, x: Int64, x_scales: Int64, topk_idx: Int64, topk_w: Int64, num_tokens: Int32, peers: Int64,
                 rank: Int32, calls_tensor: cute.Tensor, slot_row: Int64, scan: Int64, err: Int64, out_x: Int64,
                 out_scales: Int64, out_counts: Int64, out_raw_counts: Int64, out_src_info: Int64, stats: Int64,
                 timeout_ns: Int64, stream):
        # calls_tensor (int32 [num_ctas], on the launch device) tells TVM-FFI the device and stream.
        calls = Int64(calls_tensor.iterator.toint())
        self.kernel(x, x_scales, topk_idx, topk_w, num_tokens, peers, rank, calls, slot_row, scan, err, out_x,
                    out_scales, out_counts, out_raw_counts, out_src_info, stats,
                    timeout_ns).launch(grid=(self.g.num_ctas, 1, 1), block=(self.threads, 1, 1), stream=stream)

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
        gwarp = cta * self.warps + warp
        call = ld_b32(calls + Int64(cta) * 4)
        parity = call % PARITIES
        epoch = call + 1
        target = Int64(epoch) * g.num_ctas
        home = ld_b64(peers + Int64(rank) * 8)
        out = (x, x_scales, slot_row, out_x, out_scales, out_src_info)
        everyone = g.num_ctas * self.warps
        waits = (epoch, timeout_ns, err, rank)

        if cta == 0:
            for e in cutlass.range(tid, L, self.threads):
                st_b32(home + self.off["expert_counters"] + Int64((1 - parity) * L + e) * 4, Int32(0))
            if tid < R:
                peer = ld_b64(peers + Int64(tid) * 8)
                st_release_sys_b64(peer + self.off["dispatch_tokens"] + Int64(parity * R + rank) * 8,
                                   (Int64(epoch) << EPOCH_SHIFT) | Int64(num_tokens))
        if cutlass.const_expr(self.layout == "masked"):
            self.produce_masked(x, x_scales, topk_idx, topk_w, num_tokens, peers, home, rank, parity, epoch, gwarp,
                                everyone, lane)
            cute.arch.sync_threads()
            if tid == 0:
                signal_ranks(peers, rank, R, ((self.off["routing_arrive"], RANKS_ALL),))
            produced = num_tokens * (1 + (R - 1) * self.chunks)
            alive = self.expand(home, num_tokens, rank, parity, cta, scan,
                                first_worker(gwarp, everyone, produced), everyone, lane, out, waits, Int32(1), True,
                                True)
            alive = self.expand(home, num_tokens, rank, parity, cta, scan,
                                first_worker(gwarp, everyone, produced + num_tokens * self.chunks), everyone, lane,
                                out, waits, alive, False, True)
            if cta == g.num_ctas - 1:
                ok = await_ranks(home, self.off["routing_arrive"], rank, R, RANKS_ALL, target, timeout_ns, err,
                                 OP_DISPATCH_ROUTING, warp, lane)
                if ok != 0:
                    self.publish(home, scan, parity, cta, tid, self.threads, out_counts, out_raw_counts, stats)
        else:
            senders = int(g.num_ctas * SENDER_FRACTION) if R > 1 else 0
            self.route(topk_idx, topk_w, num_tokens, peers, rank, parity, gwarp, everyone, lane)
            cute.arch.sync_threads()
            if tid == 0:
                signal_ranks(peers, rank, R, ((self.off["routing_arrive"], RANKS_ALL),))
            if cta < senders:
                self.send_rows(x, x_scales, topk_idx, num_tokens, peers, rank, parity, epoch, gwarp, senders * self.warps,
                               lane)
            ok = await_ranks(home, self.off["routing_arrive"], rank, R, RANKS_ALL, target, timeout_ns, err,
                             OP_DISPATCH_ROUTING, warp, lane)
            if ok != 0:
                if warp == 0:
                    self.scan_segments(home, scan, parity, cta, lane)
                cute.arch.sync_threads()
                if cta == g.num_ctas - 1:
                    self.publish(home, scan, parity, cta, tid, self.threads, out_counts, out_raw_counts, stats)
                if cta >= senders:
                    self.expand(home, num_tokens, rank, parity, cta, scan, gwarp - senders * self.warps,
                                everyone - senders * self.warps, lane, out, waits, Int32(1), True, False)
                self.expand(home, num_tokens, rank, parity, cta, scan, gwarp, everyone, lane, out, waits, Int32(1),
                            False, False)
        cute.arch.sync_threads()
        if tid == 0:
            st_b32(calls + Int64(cta) * 4, call + 1)

    # ------------------------------------------------------------------ producer side
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
    def route_token(self, topk_idx: Int64, topk_w: Int64, t: Int32, r: Int32, peer: Int64, rank: Int32,
                    parity: Int32, lane: Int32) -> Int32:
        """Routing of token ``t`` to rank ``r`` (buffer at ``peer``), lane k < K for slot k: a position
        from r's expert counter if r owns the slot, then (local expert or -1, position, weight) into
        r's routing staging. Returns the lane's local expert id (-1 if none)."""
        g = self.g
        R, L, K, TM = g.num_ranks, g.local_experts, g.num_topk, g.max_tokens
        local = self.owned_by(topk_idx, t, r, lane)
        pos = Int32(-1)
        if local >= 0:
            pos = atomic_add_sys_u32(peer + self.off["expert_counters"] + Int64(parity * L + local) * 4, Int32(1))
        if lane < K:
            entry = (Int64((parity * R + rank) * TM + t) * K + lane) * 4
            st_b32(peer + self.off["meta_idx"] + entry, local)
            st_b32(peer + self.off["meta_pos"] + entry, pos)
            st_b32(peer + self.off["meta_weight"] + entry, ld_b32(topk_w + Int64(t * K + lane) * 4))
        return local

    @cute.jit
    def route(self, topk_idx: Int64, topk_w: Int64, num_tokens: Int32, peers: Int64, rank: Int32, parity: Int32,
              worker: Int32, workers: Int32, lane: Int32):
        """Psum routing: warp per (token, destination rank), every rank."""
        R = self.g.num_ranks
        for u in cutlass.range(worker, num_tokens * R, workers):
            r = u % R
            self.route_token(topk_idx, topk_w, u // R, r, ld_b64(peers + Int64(r) * 8), rank, parity, lane)

    @cute.jit
    def flag_addr(self, base: Int64, parity: Int32, src: Int32, t: Int32, c: Int32) -> Int64:
        """Arrival flag of chunk ``c`` of (source ``src``, token ``t``) in the buffer at ``base``."""
        g = self.g
        return base + self.off["dispatch_flags"] + ((Int64(parity * g.num_ranks + src) * g.max_tokens + t)
                                                    * self.chunks + c) * 4

    @cute.jit
    def release_flag(self, base: Int64, parity: Int32, src: Int32, t: Int32, c: Int32, epoch: Int32, lane: Int32):
        """Warp barrier (orders every lane's stores of the unit), then lane 0 releases the flag."""
        cute.arch.sync_warp()
        if lane == 0:
            st_release_sys_b32(self.flag_addr(base, parity, src, t, c), epoch)

    @cute.jit
    def send_chunk(self, x: Int64, x_scales: Int64, t: Int32, c: Int32, peer: Int64, rank: Int32, parity: Int32,
                   lane: Int32):
        """Chunk ``c`` of token ``t``'s row (and, with chunk 0, its FP8 scales) into the peer's staging."""
        g = self.g
        R, TM = g.num_ranks, g.max_tokens
        dst = peer + self.off["dispatch_rows"] + Int64((parity * R + rank) * TM + t) * g.row_stride
        copy_chunks(x + Int64(t) * g.payload_bytes, [(dst, Int32(1))], lane, [c], g.payload_bytes // VECTOR_BYTES)
        if cutlass.const_expr(g.fp8):
            if c == 0:
                scale_at = align_up(g.payload_bytes, VECTOR_BYTES)
                for j in cutlass.range(lane, g.scale_blocks, 32):
                    st_b32(dst + scale_at + Int64(j) * 4, ld_b32(x_scales + Int64(t * g.scale_blocks + j) * 4))

    @cute.jit
    def produce_masked(self, x: Int64, x_scales: Int64, topk_idx: Int64, topk_w: Int64, num_tokens: Int32,
                       peers: Int64, home: Int64, rank: Int32, parity: Int32, epoch: Int32, worker: Int32,
                       workers: Int32, lane: Int32):
        """Masked producer units, warp-strided: first one per own token (routing here, then its flag in
        this rank's buffer), then one per (token, other rank, chunk): chunk 0 routes the token to that
        rank; the chunk's rows go out if the rank owns a slot; the flag follows (always for chunk 0,
        which carries the routing)."""
        g = self.g
        R, C = g.num_ranks, self.chunks
        for u in cutlass.range(worker, num_tokens * (1 + (R - 1) * C), workers):
            if u < num_tokens:
                self.route_token(topk_idx, topk_w, u, rank, home, rank, parity, lane)
                self.release_flag(home, parity, rank, u, 0, epoch, lane)
            else:
                if cutlass.const_expr(R > 1):
                    v = u - num_tokens
                    c = v % C
                    w = v // C
                    t = w // (R - 1)
                    r = (rank + 1 + w % (R - 1)) % R
                    peer = ld_b64(peers + Int64(r) * 8)
                    local = Int32(-1)
                    if c == 0:
                        local = self.route_token(topk_idx, topk_w, t, r, peer, rank, parity, lane)
                    else:
                        local = self.owned_by(topk_idx, t, r, lane)
                    owned = cute.arch.vote_any_sync(local >= 0)
                    if owned:
                        self.send_chunk(x, x_scales, t, c, peer, rank, parity, lane)
                    if owned or c == 0:
                        self.release_flag(peer, parity, rank, t, c, epoch, lane)

    @cute.jit
    def send_rows(self, x: Int64, x_scales: Int64, topk_idx: Int64, num_tokens: Int32, peers: Int64, rank: Int32,
                  parity: Int32, epoch: Int32, worker: Int32, workers: Int32, lane: Int32):
        """Psum rows: warp per (token, other rank, chunk); the chunk goes to the peer if the peer owns
        one of the token's slots. A warp copies FLAG_BATCH units, then lane 0 fences once and sets
        their flags (a fence per unit waits for each unit's NVLink acknowledgements in turn)."""
        g = self.g
        R, C = g.num_ranks, self.chunks
        units = num_tokens * (R - 1) * C
        if cutlass.const_expr(R > 1):
            for u0 in cutlass.range(worker, units, workers * FLAG_BATCH):
                for j in cutlass.range_constexpr(FLAG_BATCH):
                    u = u0 + j * workers
                    if u < units:
                        t, r, c = self.send_unit(u, rank)
                        if cute.arch.vote_any_sync(self.owned_by(topk_idx, t, r, lane) >= 0):
                            self.send_chunk(x, x_scales, t, c, ld_b64(peers + Int64(r) * 8), rank, parity, lane)
                cute.arch.sync_warp()
                if lane == 0:
                    fence_sys()
                    for j in cutlass.range_constexpr(FLAG_BATCH):
                        u = u0 + j * workers
                        if u < units:
                            t, r, c = self.send_unit(u, rank)
                            st_relaxed_sys_b32(self.flag_addr(ld_b64(peers + Int64(r) * 8), parity, rank, t, c),
                                               epoch)

    @cute.jit
    def send_unit(self, u: Int32, rank: Int32) -> tuple:
        """(token, destination rank, chunk) of psum send unit ``u``."""
        R, C = self.g.num_ranks, self.chunks
        v = u // C
        return v // (R - 1), (rank + 1 + v % (R - 1)) % R, u % C

    # ------------------------------------------------------------------ receiver side
    @cute.jit
    def await_flag(self, addr: Int64, waits: tuple, src: Int32, lane: Int32, is_word: cutlass.Constexpr[bool]) -> Int32:
        """Lane 0 waits (timed) for the epoch flag at ``addr`` (or the epoch half of a
        ``dispatch_tokens`` word); a timeout records the missing source. Returns 1 to every lane on
        arrival, after a warp barrier that orders the lanes' later loads after lane 0's acquire."""
        epoch, timeout_ns, err, rank = waits
        ok = Int32(0)
        if lane == 0:
            if cutlass.const_expr(is_word):
                ok = wait_counter(addr, Int64(epoch) << EPOCH_SHIFT, timeout_ns)
            else:
                ok = wait_flag(addr, epoch, timeout_ns)
            if ok == 0:
                record_timeout(err, Int32(OP_DISPATCH), rank, Int32(1) << src)
        ok = cute.arch.shuffle_sync(ok, 0)
        cute.arch.sync_warp()
        return ok

    @cute.jit
    def scan_segments(self, home: Int64, scan: Int64, parity: Int32, cta: Int32, lane: Int32):
        """Psum layout, warp 0 of each CTA: scan[cta][e] = sum over e' < e of align(count[e'])."""
        L = self.g.local_experts
        counters = home + self.off["expert_counters"] + Int64(parity * L) * 4
        row = scan + Int64(cta * L) * 4
        scan_aligned_counts(lambda e: ld_b32(counters + Int64(e) * 4), L, self.g.alignment,
                            lambda e, start, count: st_b32(row + Int64(e) * 4, start), lane)

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
               worker: Int32, workers: Int32, lane: Int32, out: tuple, waits: tuple, alive: Int32,
               own: cutlass.Constexpr[bool], routed_by_chunk0: cutlass.Constexpr[bool]) -> Int32:
        """Expand: warp per (source, token, chunk) of this rank's own tokens (``own``) or of every
        other rank's; the chunk is loaded once and stored to each of the token's layout rows here.

        Waits: with ``routed_by_chunk0`` (masked) each unit first waits for its token's chunk-0 flag
        (the routing; for other sources also each source's token-count word), and a unit of another
        source waits for its own chunk's flag when the token has rows here. A warp whose wait timed
        out (``alive`` 0) skips its remaining units; returns ``alive``."""
        g = self.g
        R, C = g.num_ranks, self.chunks
        x, x_scales, slot_row, out_x, out_scales, out_src_info = out
        sources = 1 if own else R - 1
        tokens_region = home + self.off["dispatch_tokens"]
        tmax = num_tokens
        if cutlass.const_expr(not own):
            tmax = Int32(0)
            for i in cutlass.range_constexpr(R - 1):
                src_i = (rank + 1 + i) % R
                if cutlass.const_expr(routed_by_chunk0):
                    if alive != 0:
                        alive = self.await_flag(tokens_region + Int64(parity * R + src_i) * 8, waits, src_i, lane,
                                                True)
                tmax = cutlass.max(tmax, source_tokens(tokens_region, parity, R, src_i))
            if alive == 0:
                tmax = Int32(0)
        for u in cutlass.range(worker, sources * tmax * C, workers):
            c = u % C
            v = u // C
            t = v % tmax
            src = rank
            ntok = num_tokens
            if cutlass.const_expr(not own):
                src = (rank + 1 + v // tmax) % R
                ntok = source_tokens(tokens_region, parity, R, src)
            if t < ntok:
                if alive != 0:
                    if cutlass.const_expr(routed_by_chunk0):
                        alive = self.await_flag(self.flag_addr(home, parity, src, t, 0), waits, src, lane, False)
                if alive != 0:
                    alive = self.expand_unit(home, scan, parity, cta, src, t, c, lane, out, waits, own,
                                             routed_by_chunk0)
        return alive

    @cute.jit
    def expand_unit(self, home: Int64, scan: Int64, parity: Int32, cta: Int32, src: Int32, t: Int32, c: Int32,
                    lane: Int32, out: tuple, waits: tuple, own: cutlass.Constexpr[bool],
                    routed_by_chunk0: cutlass.Constexpr[bool]) -> Int32:
        """One (source, token, chunk) unit whose routing is visible: layout rows, the row map (chunk 0),
        the chunk's copies (after its flag, for another source's rows). Returns 0 on a timeout."""
        g = self.g
        R, K, TM = g.num_ranks, g.num_topk, g.max_tokens
        x, x_scales, slot_row, out_x, out_scales, out_src_info = out
        entry = Int64(src * TM + t) * K + lane
        row = Int32(-1)
        if lane < K:
            row = self.layout_row(home, scan, parity, cta, entry)
            if c == 0:
                st_b32(slot_row + entry * 4, row)
                if row >= 0:
                    st_b32(out_src_info + Int64(row) * 4, src * TM + t)
        ok = Int32(1)
        if cutlass.const_expr(not own):
            if cute.arch.vote_any_sync(row >= 0):
                if cutlass.const_expr(routed_by_chunk0):
                    if c > 0:
                        ok = self.await_flag(self.flag_addr(home, parity, src, t, c), waits, src, lane, False)
                else:
                    ok = self.await_flag(self.flag_addr(home, parity, src, t, c), waits, src, lane, False)
        if ok != 0:
            rows = [cute.arch.shuffle_sync(row, k) for k in range(K)]
            source = x + Int64(t) * g.payload_bytes
            if cutlass.const_expr(not own):
                source = home + self.off["dispatch_rows"] + Int64((parity * R + src) * TM + t) * g.row_stride
            copy_chunks(source, [(out_x + Int64(rows[k]) * g.payload_bytes, Int32(rows[k] >= 0)) for k in range(K)],
                        lane, [c], g.payload_bytes // VECTOR_BYTES)
            if cutlass.const_expr(g.fp8):
                if c == 0:
                    self.expand_scales(x_scales, source, t, rows, out_scales, lane, own)
        return ok

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
