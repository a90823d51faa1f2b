"""PTX helpers of the expert-parallel kernels: raw-address loads/stores, system-scope signalling.

The EP kernels address every buffer (local tensors, peers' symmetric buffers, the host-mapped error
record) by a 64-bit address, so each access is one inline-PTX instruction whose width, cache policy
and memory order are explicit. Peer addresses are ordinary global addresses (CUDA peer mappings of
torch symmetric memory); no multimem / multicast instruction is used anywhere.
"""

import cutlass
import cutlass.cute as cute
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.cute.typing import Float32, Int32, Int64

from cute_moe.ep_layout import COPY_PER_LANE, VECTOR_BYTES



def _asm(result_type, operands, text: str, constraints: str, loc=None, ip=None):
    return llvm.inline_asm(result_type, operands, text, constraints, has_side_effects=True,
                           asm_dialect=0, loc=loc, ip=ip)


def _v(x, loc, ip):
    return x.ir_value(loc=loc, ip=ip)


@dsl_user_op
def ld_v4_pred(addr: Int64, pred: Int32, *, loc=None, ip=None):
    """16-byte load at ``addr`` if ``pred`` != 0, else four zero words (no memory access)."""
    st = _asm(ir.Type.parse("!llvm.struct<(i32,i32,i32,i32)>"), [_v(Int64(addr), loc, ip), _v(Int32(pred), loc, ip)],
              "{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;"
              " @p ld.global.cg.v4.b32 {$0, $1, $2, $3}, [$4]; }", "=r,=r,=r,=r,l,r", loc, ip)
    return tuple(Int32(llvm.extractvalue(T.i32(), st, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def st_v4_pred(addr: Int64, pred: Int32, a: Int32, b: Int32, c: Int32, d: Int32, *, loc=None, ip=None) -> None:
    """16-byte weak store at ``addr`` if ``pred`` != 0 (no memory access otherwise)."""
    _asm(None, [_v(Int64(addr), loc, ip), _v(Int32(pred), loc, ip)] + [_v(Int32(x), loc, ip) for x in (a, b, c, d)],
         "{ .reg .pred p; setp.ne.b32 p, $1, 0; @p st.global.v4.b32 [$0], {$2, $3, $4, $5}; }",
         "l,r,r,r,r,r,~{memory}", loc, ip)


@dsl_user_op
def ld_b32(addr: Int64, *, loc=None, ip=None) -> Int32:
    """4-byte L2-coherent load."""
    return Int32(_asm(T.i32(), [_v(Int64(addr), loc, ip)], "ld.global.cg.b32 $0, [$1];", "=r,l", loc, ip))


@dsl_user_op
def ld_b64(addr: Int64, *, loc=None, ip=None) -> Int64:
    """8-byte L2-coherent load."""
    return Int64(_asm(T.i64(), [_v(Int64(addr), loc, ip)], "ld.global.cg.b64 $0, [$1];", "=l,l", loc, ip))


@dsl_user_op
def st_b32(addr: Int64, x: Int32, *, loc=None, ip=None) -> None:
    """4-byte weak store (local or peer address)."""
    _asm(None, [_v(Int64(addr), loc, ip), _v(Int32(x), loc, ip)], "st.global.b32 [$0], $1;", "l,r,~{memory}", loc, ip)


@dsl_user_op
def st_relaxed_sys_b32(addr: Int64, x: Int32, *, loc=None, ip=None) -> None:
    """4-byte system-scope relaxed (strong) store: the host-mapped error record, or a flag after a
    fence.acq_rel.sys (together a release)."""
    _asm(None, [_v(Int64(addr), loc, ip), _v(Int32(x), loc, ip)], "st.relaxed.sys.global.b32 [$0], $1;",
         "l,r,~{memory}", loc, ip)


@dsl_user_op
def ld_acquire_sys_u64(addr: Int64, *, loc=None, ip=None) -> Int64:
    """System-scope acquire load of a 64-bit signal word."""
    return Int64(_asm(T.i64(), [_v(Int64(addr), loc, ip)], "ld.acquire.sys.global.b64 $0, [$1];", "=l,l,~{memory}",
                      loc, ip))


@dsl_user_op
def ld_acquire_sys_b32(addr: Int64, *, loc=None, ip=None) -> Int32:
    """System-scope acquire load of a 32-bit flag."""
    return Int32(_asm(T.i32(), [_v(Int64(addr), loc, ip)], "ld.acquire.sys.global.b32 $0, [$1];", "=r,l,~{memory}",
                      loc, ip))


@dsl_user_op
def st_release_sys_b32(addr: Int64, x: Int32, *, loc=None, ip=None) -> None:
    """System-scope release store of a 32-bit flag (local or peer): the writes this thread made or
    observed before it (e.g. its warp's, ordered by a warp barrier) are visible first."""
    _asm(None, [_v(Int64(addr), loc, ip), _v(Int32(x), loc, ip)], "st.release.sys.global.b32 [$0], $1;",
         "l,r,~{memory}", loc, ip)


@dsl_user_op
def st_release_sys_b64(addr: Int64, x: Int64, *, loc=None, ip=None) -> None:
    """System-scope release store of a 64-bit word (local or peer)."""
    _asm(None, [_v(Int64(addr), loc, ip), _v(Int64(x), loc, ip)], "st.release.sys.global.b64 [$0], $1;",
         "l,l,~{memory}", loc, ip)


@dsl_user_op
def red_relaxed_sys_add_u64(addr: Int64, *, loc=None, ip=None) -> None:
    """System-scope relaxed (strong) increment of a 64-bit signal word (local or peer)."""
    _asm(None, [_v(Int64(addr), loc, ip)], "red.relaxed.sys.global.add.u64 [$0], 1;", "l,~{memory}", loc, ip)


@dsl_user_op
def atomic_add_sys_u32(addr: Int64, x: Int32, *, loc=None, ip=None) -> Int32:
    """System-scope relaxed fetch-and-add (local or peer address); returns the old value."""
    return Int32(_asm(T.i32(), [_v(Int64(addr), loc, ip), _v(Int32(x), loc, ip)],
                      "atom.relaxed.sys.global.add.u32 $0, [$1], $2;", "=r,l,r,~{memory}", loc, ip))


@dsl_user_op
def fence_sys(*, loc=None, ip=None) -> None:
    """fence.acq_rel.sys: order this thread's prior writes (and those it observed) system-wide."""
    _asm(None, [], "fence.acq_rel.sys;", "~{memory}", loc, ip)


@dsl_user_op
def fence_gpu(*, loc=None, ip=None) -> None:
    """fence.acq_rel.gpu: order this thread's prior writes (and those it observed) GPU-wide."""
    _asm(None, [], "fence.acq_rel.gpu;", "~{memory}", loc, ip)


@dsl_user_op
def fence_proxy_async_global(*, loc=None, ip=None) -> None:
    """fence.proxy.async.global: order generic-proxy global accesses against async-proxy (TMA) ones."""
    _asm(None, [], "fence.proxy.async.global;", "~{memory}", loc, ip)


@dsl_user_op
def ld_acquire_gpu_b32(addr: Int64, *, loc=None, ip=None) -> Int32:
    """GPU-scope acquire load of a 32-bit counter."""
    return Int32(_asm(T.i32(), [_v(Int64(addr), loc, ip)], "ld.acquire.gpu.global.b32 $0, [$1];", "=r,l,~{memory}",
                      loc, ip))


@dsl_user_op
def ld_acquire_gpu_u64(addr: Int64, *, loc=None, ip=None) -> Int64:
    """GPU-scope acquire load of a 64-bit counter."""
    return Int64(_asm(T.i64(), [_v(Int64(addr), loc, ip)], "ld.acquire.gpu.global.b64 $0, [$1];", "=l,l,~{memory}",
                      loc, ip))


@dsl_user_op
def red_relaxed_gpu_add_u32(addr: Int64, x: Int32, *, loc=None, ip=None) -> None:
    """GPU-scope relaxed (strong) add to a 32-bit counter (after ``fence_gpu``: a release)."""
    _asm(None, [_v(Int64(addr), loc, ip), _v(Int32(x), loc, ip)], "red.relaxed.gpu.global.add.u32 [$0], $1;",
         "l,r,~{memory}", loc, ip)


@dsl_user_op
def red_relaxed_gpu_add_u64(addr: Int64, *, loc=None, ip=None) -> None:
    """GPU-scope relaxed (strong) increment of a 64-bit counter (after ``fence_gpu``: a release)."""
    _asm(None, [_v(Int64(addr), loc, ip)], "red.relaxed.gpu.global.add.u64 [$0], 1;", "l,~{memory}", loc, ip)


@dsl_user_op
def atomic_add_gpu_u32(addr: Int64, x: Int32, *, loc=None, ip=None) -> Int32:
    """GPU-scope relaxed fetch-and-add; returns the old value."""
    return Int32(_asm(T.i32(), [_v(Int64(addr), loc, ip), _v(Int32(x), loc, ip)],
                      "atom.relaxed.gpu.global.add.u32 $0, [$1], $2;", "=r,l,r,~{memory}", loc, ip))


@dsl_user_op
def st_b16(addr: Int64, x: Int32, *, loc=None, ip=None) -> None:
    """2-byte weak store of the low half of ``x``."""
    _asm(None, [_v(Int64(addr), loc, ip), _v(Int32(x), loc, ip)],
         "{ .reg .b16 h; cvt.u16.u32 h, $1; st.global.b16 [$0], h; }", "l,r,~{memory}", loc, ip)


@dsl_user_op
def st_f32(addr: Int64, x: Float32, *, loc=None, ip=None) -> None:
    """4-byte weak store of an FP32 value."""
    _asm(None, [_v(Int64(addr), loc, ip), _v(Float32(x), loc, ip)], "st.global.f32 [$0], $1;", "l,f,~{memory}",
         loc, ip)


@dsl_user_op
def cvt_e4m3x2(lo: Float32, hi: Float32, *, loc=None, ip=None) -> Int32:
    """(low, high) FP32 -> two FP8 E4M3 (round to nearest even, saturating) in the low 16 bits."""
    return Int32(_asm(T.i32(), [_v(Float32(lo), loc, ip), _v(Float32(hi), loc, ip)],
                      "{ .reg .b16 h; cvt.rn.satfinite.e4m3x2.f32 h, $2, $1; cvt.u32.u16 $0, h; }", "=r,f,f",
                      loc, ip))


@dsl_user_op
def unpack_bf16x2(x: Int32, *, loc=None, ip=None):
    """Two BF16 packed in a b32 word -> (low, high) as FP32."""
    st = _asm(ir.Type.parse("!llvm.struct<(f32,f32)>"), [_v(Int32(x), loc, ip)],
              "{ .reg .b32 t; shl.b32 t, $2, 16; mov.b32 $0, t; and.b32 t, $2, 0xffff0000; mov.b32 $1, t; }",
              "=f,=f,r", loc, ip)
    return (Float32(llvm.extractvalue(T.f32(), st, [0], loc=loc, ip=ip)),
            Float32(llvm.extractvalue(T.f32(), st, [1], loc=loc, ip=ip)))


@dsl_user_op
def pack_bf16x2(lo: Float32, hi: Float32, *, loc=None, ip=None) -> Int32:
    """(low, high) FP32 -> two BF16 (round to nearest even) packed in a b32 word."""
    return Int32(_asm(T.i32(), [_v(Float32(lo), loc, ip), _v(Float32(hi), loc, ip)],
                      "cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", loc, ip))


@dsl_user_op
def bits_to_f32(x: Int32, *, loc=None, ip=None) -> Float32:
    """Reinterpret a b32 word as FP32."""
    return Float32(_asm(T.f32(), [_v(Int32(x), loc, ip)], "mov.b32 $0, $1;", "=f,r", loc, ip))


@cute.jit
def chunk_vector(lane: Int32, chunk: Int32, j: cutlass.Constexpr[int], per_lane: cutlass.Constexpr[int]) -> Int32:
    """Index of the ``j``-th vector this lane handles in chunk ``chunk`` (warp-strided)."""
    return chunk * (32 * per_lane) + j * 32 + lane


@cute.jit
def vector_inside(index: Int32, num_vecs: cutlass.Constexpr[int]) -> Int32:
    """1 if vector ``index`` lies inside a row of ``num_vecs`` vectors, else 0."""
    return Int32(index < num_vecs)


def copy_chunks(src: Int64, dsts: list, lane: Int32, chunks: list, num_vecs: int, per_lane: int = COPY_PER_LANE):
    """Warp-cooperative copy of the chunks ``chunks`` of a row of ``num_vecs`` 16-byte vectors at
    ``src`` into every destination row of ``dsts`` (pairs (address, predicate); local or peer
    addresses; a destination whose predicate is 0 is skipped). The chunks are loaded once, every
    load before the first store (traced inline into the calling kernel)."""
    words, inside, offsets = [], [], []
    for chunk in chunks:
        for j in range(per_lane):
            index = chunk_vector(lane, Int32(chunk), j, per_lane)
            inside.append(vector_inside(index, num_vecs))
            offsets.append(Int64(index) * VECTOR_BYTES)
            words.append(ld_v4_pred(src + offsets[-1], inside[-1]))
    for dst, pred in dsts:
        for j in range(len(words)):
            a, b, c, d = words[j]
            st_v4_pred(dst + offsets[j], pred & inside[j], a, b, c, d)


@cute.jit
def load_expert_id(topk_idx: Int64, index: Int32, idx_bytes: cutlass.Constexpr[int],
                   num_experts: cutlass.Constexpr[int]) -> Int32:
    """Expert id at position ``index`` of an int32/int64 top-k tensor; -1 for any id outside
    [0, num_experts) (a dropped slot: never used as an index)."""
    expert = Int32(-1)
    at = topk_idx + Int64(index) * idx_bytes
    if cutlass.const_expr(idx_bytes == 8):
        raw = ld_b64(at)
        if raw >= 0:
            if raw < num_experts:
                expert = Int32(raw)
    else:
        raw32 = ld_b32(at)
        if raw32 >= 0:
            if raw32 < num_experts:
                expert = raw32
    return expert


@cute.jit
def warp_or(x: Int32) -> Int32:
    """Bitwise OR of ``x`` over the 32 lanes of a warp (every lane gets the result)."""
    for shift in cutlass.range_constexpr(5):
        x = x | cute.arch.shuffle_sync_bfly(x, offset=1 << shift)
    return x


@cute.jit
def timed_wait(load: cutlass.Constexpr, addr: Int64, target, start: Int64, timeout_ns: Int64, abort=None) -> Int32:
    """Spin until ``load(addr)`` (an acquire load) reaches ``target``; 1 on success, 0 once
    ``timeout_ns`` of %globaltimer time have passed since ``start`` or, with an ``abort`` word address,
    as soon as that word is non-zero."""
    waiting = Int32(1)
    ok = Int32(0)
    while waiting != 0:
        if load(addr) >= target:
            ok = Int32(1)
            waiting = Int32(0)
        elif cute.arch.globaltimer() - start > timeout_ns:
            waiting = Int32(0)
        if cutlass.const_expr(abort is not None):
            if ld_b32(abort) != 0:
                waiting = Int32(0)
    return ok


@cute.jit
def scan_aligned_counts(count_of: cutlass.Constexpr, num: cutlass.Constexpr[int], alignment: cutlass.Constexpr[int],
                        store: cutlass.Constexpr, lane: Int32) -> Int32:
    """One warp: for e < ``num``, ``store(e, start, count)`` with ``count = count_of(e)`` and ``start``
    the exclusive prefix sum of the counts rounded up to ``alignment`` (segment starts); returns the
    aligned total to every lane. ``count_of`` / ``store`` are traced inline (loads, stores)."""
    running = Int32(0)
    for c0 in cutlass.range_constexpr(0, num, 32):
        e = c0 + lane
        count = Int32(0)
        aligned = Int32(0)
        if e < num:
            count = count_of(e)
            aligned = (count + (alignment - 1)) // alignment * alignment
        inclusive = aligned
        for step in cutlass.range_constexpr(5):
            up = cute.arch.shuffle_sync_up(inclusive, offset=1 << step)
            if lane >= (1 << step):
                inclusive = inclusive + up
        if e < num:
            store(e, running + inclusive - aligned, count)
        running = running + cute.arch.shuffle_sync(inclusive, 31)
    return running


@cute.jit
def wait_counter(addr: Int64, target: Int64, timeout_ns: Int64) -> Int32:
    """Spin until the 64-bit counter at ``addr`` reaches ``target`` (acquire, system scope); 1 on
    success, 0 after ``timeout_ns`` of %globaltimer time."""
    return timed_wait(ld_acquire_sys_u64, addr, target, cute.arch.globaltimer(), timeout_ns)


@cute.jit
def wait_flag(addr: Int64, target: Int32, timeout_ns: Int64) -> Int32:
    """Spin until the 32-bit epoch flag at ``addr`` reaches ``target`` (acquire, system scope); 1 on
    success, 0 after ``timeout_ns`` of %globaltimer time. Flags only grow, so ``>=`` also accepts a
    later call's value (whose writer finished this call first). The first check reads no timer."""
    ok = Int32(0)
    if ld_acquire_sys_b32(addr) >= target:
        ok = Int32(1)
    else:
        ok = timed_wait(ld_acquire_sys_b32, addr, target, cute.arch.globaltimer(), timeout_ns)
    return ok


@cute.jit
def source_tokens(tokens_region: Int64, parity: Int32, num_ranks: cutlass.Constexpr[int], src: Int32) -> Int32:
    """Tokens source rank ``src`` sent in the call of ``parity``: the low half of its epoch word in
    the ``dispatch_tokens`` region at ``tokens_region`` (read once the word is known to be current)."""
    return ld_b32(tokens_region + Int64(parity * num_ranks + src) * 8)


RANKS_ALL, RANKS_SELF, RANKS_OTHERS = 0, 1, 2  # which ranks a signal goes to / an await waits for


@cute.jit
def selected_rank(r: Int32, rank: Int32, ranks: cutlass.Constexpr[int]) -> Int32:
    """1 if rank ``r`` belongs to the selection ``ranks`` (all, this rank only, every other rank)."""
    selected = Int32(1)
    if cutlass.const_expr(ranks == RANKS_SELF):
        selected = Int32(r == rank)
    if cutlass.const_expr(ranks == RANKS_OTHERS):
        selected = Int32(r != rank)
    return selected


@cute.jit
def signal_ranks(peers: Int64, rank: Int32, num_ranks: cutlass.Constexpr[int], words: cutlass.Constexpr[tuple]):
    """One thread, after a CTA barrier: for each (word_offset, ranks) of ``words``, +1 on u64 word
    ``rank`` of the region at ``word_offset`` in the symmetric buffer of each selected rank (``peers``:
    their base addresses). One fence.acq_rel.sys, then relaxed sys-scope atomics: fence + strong write
    is a release pattern (PTX memory model), cumulative over the CTA's writes ordered before it by
    the barrier. A red.release per rank would fence again before each atomic and wait for the
    previous remote atomic's NVLink round trip."""
    fence_sys()
    for w in cutlass.range_constexpr(len(words)):
        for r in cutlass.range_constexpr(num_ranks):
            if selected_rank(Int32(r), rank, words[w][1]) != 0:
                red_relaxed_sys_add_u64(ld_b64(peers + r * 8) + words[w][0] + Int64(rank) * 8)


@cute.jit
def await_ranks(home: Int64, word_offset: cutlass.Constexpr[int], rank: Int32, num_ranks: cutlass.Constexpr[int],
                ranks: cutlass.Constexpr[int], target: Int64, timeout_ns: Int64, err_addr: Int64,
                op: cutlass.Constexpr[int], warp: Int32, lane: Int32) -> Int32:
    """Every thread of the CTA: warp 0 waits until the arrival counter of each selected rank (all,
    this rank only, or every other rank) in this rank's buffer reaches ``target`` (timed; a timeout
    records op ``op`` and the mask of the missing ranks). Returns 1 to every thread iff they all
    arrived (a CTA barrier)."""
    arrived = Int32(1)
    if warp == 0:
        if lane < num_ranks:
            if selected_rank(lane, rank, ranks) != 0:
                arrived = wait_counter(home + word_offset + Int64(lane) * 8, target, timeout_ns)
        missing = cute.arch.vote_ballot_sync(arrived == 0)
        if lane == 0:
            if missing != 0:
                record_timeout(err_addr, Int32(op), rank, missing)
    return sync_threads_and(arrived)


@cute.jit
def exchange_arrivals(peers: Int64, home: Int64, word_offset: cutlass.Constexpr[int], rank: Int32,
                      num_ranks: cutlass.Constexpr[int], target: Int64, timeout_ns: Int64, err_addr: Int64,
                      op: cutlass.Constexpr[int], tid: Int32, warp: Int32, lane: Int32) -> Int32:
    """Every thread of the CTA, after a CTA barrier: thread 0 signals this rank's arrival to every
    rank (``signal_ranks``), then ``await_ranks`` for all ranks. Returns 1 to every thread iff every
    rank arrived."""
    if tid == 0:
        signal_ranks(peers, rank, num_ranks, ((word_offset, RANKS_ALL),))
    return await_ranks(home, word_offset, rank, num_ranks, RANKS_ALL, target, timeout_ns, err_addr, op, warp, lane)


@cute.jit
def record_timeout(err_addr: Int64, op: Int32, rank: Int32, missing: Int32):
    """Fill the host-mapped error record [flag, op, rank, missing-rank mask]; the flag is written last."""
    st_relaxed_sys_b32(err_addr + 4, op)
    st_relaxed_sys_b32(err_addr + 8, rank)
    st_relaxed_sys_b32(err_addr + 12, missing)
    fence_sys()
    st_relaxed_sys_b32(err_addr, Int32(1))


@dsl_user_op
def sync_threads_and(pred: Int32, *, loc=None, ip=None) -> Int32:
    """CTA barrier (barrier 0) that also returns 1 to every thread iff ``pred`` != 0 in all threads."""
    return Int32(_asm(T.i32(), [_v(Int32(pred), loc, ip)],
                      "{ .reg .pred p; setp.ne.b32 p, $1, 0; bar.red.and.pred p, 0, p; selp.b32 $0, 1, 0, p; }",
                      "=r,r,~{memory}", loc, ip))
