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

from cute_moe.ep_layout import VECTOR_BYTES

COPY_BATCH = 14  # 16-byte vectors a lane loads before storing them (a BF16 row of 7168: 2 round trips)


def _asm(result_type, operands, text: str, constraints: str, loc=None, ip=None):
    return llvm.inline_asm(result_type, operands, text, constraints, has_side_effects=True,
                           asm_dialect=0, loc=loc, ip=ip)


def _v(x, loc, ip):
    return x.ir_value(loc=loc, ip=ip)


@dsl_user_op
def ld_v4(addr: Int64, *, loc=None, ip=None):
    """16-byte load (L2-coherent, .cg) of four b32 words at ``addr``."""
    st = _asm(ir.Type.parse("!llvm.struct<(i32,i32,i32,i32)>"), [_v(Int64(addr), loc, ip)],
              "ld.global.cg.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", loc, ip)
    return tuple(Int32(llvm.extractvalue(T.i32(), st, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def ld_v4_pred(addr: Int64, pred: Int32, *, loc=None, ip=None):
    """16-byte load at ``addr`` if ``pred`` != 0, else four zero words (no memory access)."""
    st = _asm(ir.Type.parse("!llvm.struct<(i32,i32,i32,i32)>"), [_v(Int64(addr), loc, ip), _v(Int32(pred), loc, ip)],
              "{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;"
              " @p ld.global.cg.v4.b32 {$0, $1, $2, $3}, [$4]; }", "=r,=r,=r,=r,l,r", loc, ip)
    return tuple(Int32(llvm.extractvalue(T.i32(), st, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def st_v4(addr: Int64, a: Int32, b: Int32, c: Int32, d: Int32, *, loc=None, ip=None) -> None:
    """16-byte weak store (local or peer address)."""
    _asm(None, [_v(Int64(addr), loc, ip)] + [_v(Int32(x), loc, ip) for x in (a, b, c, d)],
         "st.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r,~{memory}", loc, ip)


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
def st_volatile_sys_b32(addr: Int64, x: Int32, *, loc=None, ip=None) -> None:
    """4-byte system-scope relaxed store (the host-mapped error record)."""
    _asm(None, [_v(Int64(addr), loc, ip), _v(Int32(x), loc, ip)], "st.relaxed.sys.global.b32 [$0], $1;",
         "l,r,~{memory}", loc, ip)


@dsl_user_op
def ld_acquire_sys_u64(addr: Int64, *, loc=None, ip=None) -> Int64:
    """System-scope acquire load of a 64-bit signal word."""
    return Int64(_asm(T.i64(), [_v(Int64(addr), loc, ip)], "ld.acquire.sys.global.b64 $0, [$1];", "=l,l,~{memory}",
                      loc, ip))


@dsl_user_op
def ld_acquire_gpu_u64(addr: Int64, *, loc=None, ip=None) -> Int64:
    """GPU-scope acquire load of a 64-bit counter."""
    return Int64(_asm(T.i64(), [_v(Int64(addr), loc, ip)], "ld.acquire.gpu.global.b64 $0, [$1];", "=l,l,~{memory}",
                      loc, ip))


@dsl_user_op
def red_relaxed_sys_add_u64(addr: Int64, *, loc=None, ip=None) -> None:
    """System-scope relaxed (strong) increment of a 64-bit signal word (local or peer)."""
    _asm(None, [_v(Int64(addr), loc, ip)], "red.relaxed.sys.global.add.u64 [$0], 1;", "l,~{memory}", loc, ip)


@dsl_user_op
def red_release_gpu_add_u64(addr: Int64, *, loc=None, ip=None) -> None:
    """GPU-scope release increment of a 64-bit counter (grid barrier)."""
    _asm(None, [_v(Int64(addr), loc, ip)], "red.release.gpu.global.add.u64 [$0], 1;", "l,~{memory}", loc, ip)


@dsl_user_op
def atomic_add_gpu_u32(addr: Int64, x: Int32, *, loc=None, ip=None) -> Int32:
    """GPU-scope relaxed fetch-and-add; returns the old value."""
    return Int32(_asm(T.i32(), [_v(Int64(addr), loc, ip), _v(Int32(x), loc, ip)],
                      "atom.relaxed.gpu.global.add.u32 $0, [$1], $2;", "=r,l,r,~{memory}", loc, ip))


@dsl_user_op
def fence_sys(*, loc=None, ip=None) -> None:
    """fence.acq_rel.sys: order this thread's prior writes (and those it observed) system-wide."""
    _asm(None, [], "fence.acq_rel.sys;", "~{memory}", loc, ip)


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


def lane_vector_batches(num_vecs: int, batch: int) -> list[list[int]]:
    """Unrolled warp-strided schedule of a row of ``num_vecs`` 16-byte vectors: lane ``l`` handles
    vectors ``offset + l`` for the offsets (multiples of 32) of each batch, ``batch`` per batch.
    A lane issues every load of a batch before its stores, so it has ``batch`` loads in flight: the
    loads and stores are opaque inline asm that may alias, so a load->store->load loop would
    serialize one memory round trip per vector."""
    offsets = list(range(0, num_vecs, 32))
    return [offsets[i:i + batch] for i in range(0, len(offsets), batch)]


@cute.jit
def lane_in_row(lane: Int32, offset: cutlass.Constexpr[int], num_vecs: cutlass.Constexpr[int]) -> Int32:
    """1 if vector ``offset + lane`` lies inside a row of ``num_vecs`` vectors, else 0."""
    return Int32(lane < num_vecs - offset)


@cute.jit
def copy_vectors(src: Int64, dst: Int64, lane: Int32, num_vecs: cutlass.Constexpr[int]):
    """Warp-cooperative copy of ``num_vecs`` 16-byte vectors from ``src`` to ``dst`` (local or peer
    addresses), COPY_BATCH loads in flight per lane (see ``lane_vector_batches``)."""
    batches = lane_vector_batches(num_vecs, COPY_BATCH)
    for i in cutlass.range_constexpr(len(batches)):
        offsets = batches[i]
        words = []
        for u in cutlass.range_constexpr(len(offsets)):
            at = Int64(lane + offsets[u]) * VECTOR_BYTES
            if cutlass.const_expr(offsets[u] + 32 <= num_vecs):
                words.append(ld_v4(src + at))
            else:
                words.append(ld_v4_pred(src + at, lane_in_row(lane, offsets[u], num_vecs)))
        for u in cutlass.range_constexpr(len(offsets)):
            at = Int64(lane + offsets[u]) * VECTOR_BYTES
            a, b, c, d = words[u]
            if cutlass.const_expr(offsets[u] + 32 <= num_vecs):
                st_v4(dst + at, a, b, c, d)
            else:
                st_v4_pred(dst + at, lane_in_row(lane, offsets[u], num_vecs), a, b, c, d)


@cute.jit
def warp_or(x: Int32) -> Int32:
    """Bitwise OR of ``x`` over the 32 lanes of a warp (every lane gets the result)."""
    for shift in cutlass.range_constexpr(5):
        x = x | cute.arch.shuffle_sync_bfly(x, offset=1 << shift)
    return x


@cute.jit
def wait_counter(addr: Int64, target: Int64, timeout_ns: Int64, sys_scope: cutlass.Constexpr[bool]) -> Int32:
    """Spin until the 64-bit counter at ``addr`` reaches ``target`` (acquire); 1 on success, 0 after
    ``timeout_ns`` of %globaltimer time."""
    start = cute.arch.globaltimer()
    waiting = Int32(1)
    ok = Int32(0)
    while waiting != 0:
        value = ld_acquire_sys_u64(addr) if sys_scope else ld_acquire_gpu_u64(addr)
        if value >= target:
            ok = Int32(1)
            waiting = Int32(0)
        elif cute.arch.globaltimer() - start > timeout_ns:
            waiting = Int32(0)
    return ok


@cute.jit
def signal_ranks(peers: Int64, word_offset: cutlass.Constexpr[int], index: Int32, num_ranks: cutlass.Constexpr[int]):
    """One thread, after a CTA barrier: +1 on u64 word ``index`` of the region at ``word_offset`` in
    every rank's symmetric buffer (``peers``: their base addresses). One fence.acq_rel.sys, then
    relaxed sys-scope atomics: fence + strong write is a release pattern (PTX memory model), cumulative
    over the CTA's writes ordered before it by the barrier. A red.release per rank would fence again
    before each atomic and wait for the previous remote atomic's NVLink round trip."""
    fence_sys()
    for r in cutlass.range_constexpr(num_ranks):
        red_relaxed_sys_add_u64(ld_b64(peers + r * 8) + word_offset + Int64(index) * 8)


@cute.jit
def exchange_arrivals(peers: Int64, home: Int64, word_offset: cutlass.Constexpr[int], rank: Int32,
                      num_ranks: cutlass.Constexpr[int], target: Int64, timeout_ns: Int64, err_addr: Int64,
                      op: cutlass.Constexpr[int], tid: Int32, warp: Int32, lane: Int32) -> Int32:
    """Every thread of the CTA, after a CTA barrier: thread 0 signals this rank's arrival to every
    rank (``signal_ranks``), warp 0 waits until each rank's counter in this rank's buffer reaches
    ``target`` (timed; a timeout records op ``op`` and the mask of the missing ranks). Returns 1 to
    every thread iff every rank arrived."""
    if tid == 0:
        signal_ranks(peers, word_offset, rank, num_ranks)
    arrived = Int32(1)
    if warp == 0:
        if lane < num_ranks:
            arrived = wait_counter(home + word_offset + Int64(lane) * 8, target, timeout_ns, True)
        missing = cute.arch.vote_ballot_sync(arrived == 0)
        if lane == 0:
            if missing != 0:
                record_timeout(err_addr, Int32(op), rank, missing)
    return sync_threads_and(arrived)


@cute.jit
def record_timeout(err_addr: Int64, op: Int32, rank: Int32, missing: Int32):
    """Fill the host-mapped error record [flag, op, rank, missing-rank mask]; the flag is written last."""
    st_volatile_sys_b32(err_addr + 4, op)
    st_volatile_sys_b32(err_addr + 8, rank)
    st_volatile_sys_b32(err_addr + 12, missing)
    fence_sys()
    st_volatile_sys_b32(err_addr, Int32(1))


@dsl_user_op
def sync_threads_and(pred: Int32, *, loc=None, ip=None) -> Int32:
    """CTA barrier (barrier 0) that also returns 1 to every thread iff ``pred`` != 0 in all threads."""
    return Int32(_asm(T.i32(), [_v(Int32(pred), loc, ip)],
                      "{ .reg .pred p; setp.ne.b32 p, $1, 0; bar.red.and.pred p, 0, p; selp.b32 $0, 1, 0, p; }",
                      "=r,r,~{memory}", loc, ip))
