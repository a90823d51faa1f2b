"""SM90 Mega MoE: a whole expert-parallel MoE layer in one persistent kernel per GPU (docs/mega_moe.md).

For this rank's tokens ``t`` (every rank runs the same kernel at the same time):
``y[t] = sum over valid slots k of w[t,k] * W2[e] . act(W1[e] . x[t])``, ``e = topk_idx[t,k]``,
``act(g, u) = silu(min(g, c)) * clamp(u, -c, c)`` (the clamp ``c`` is a compile-time option). FP8:
operands with DeepSeek block scales, the intermediate re-quantized per token per 128 columns; BF16:
BF16 operands and intermediate.

Phases of one call (grid = the group's SM count, one CTA per SM, all co-resident):
  P0 start    CTA 0 announces this rank's inputs to every rank: ``(call + 1) << 32 | T`` into their
              ``input_arrive[rank]`` (release, system scope); every CTA zeroes the other parity's
              counters (their last user, the previous call, has finished).
  P1 route    every CTA waits for every rank's inputs (timed); one thread per received (source,
              token, slot) reads the slot's expert from the source's ``topk_idx`` over NVLink and,
              for a local expert, takes a position in it (GPU atomic).
  B1          grid barrier: expert counts final.
  P2 layout   each CTA scans the aligned counts into its shared segment table; one thread per entry
              writes ``row_src[pool row] = entry`` (-1 on padding rows).
  B2          grid barrier: the row table final.
  P3 main     warp-specialized over one tile list (GEMM-1 tiles of every block of ``block_m`` = 64 or
              128 pool rows, then GEMM-2 tiles; CTA c takes tiles c, c + grid, ...):
              - warp 0, producer: per tile waits until its inputs exist (GEMM-1: the block's rows
                pulled, ``block_rows``; GEMM-2: the block's GEMM-1 tiles done, ``l1_done``; acquire,
                GPU scope, timed), then TMA-loads A (pool / intermediate + their row scales) and B
                (expert weights) into the shared ring (``PipelineTmaAsync``).
              - warps 1-3, pull: copy every pool row from its source rank's ``x`` / ``x_sf`` (NVLink
                or local) and release the row's block counter.
              - ``block_m / 64`` consumer warpgroups: WGMMA (the grouped GEMM's mainloops; FP8 with
                per-128-K promotion); GEMM-1 epilogue = SwiGLU (+ clamp) and 1x128 FP8 quantization into the
                local intermediate, then ``l1_done`` release; GEMM-2 epilogue = BF16 rows stored
                straight into the source rank's ``combine[t][k]`` (16-byte stores, peer addresses).
              - ``aux_wgs`` auxiliary warpgroups (0 here; the FP4 variant's widening warpgroups).
  P4 signal   CTA barrier, +1 on every rank's ``combine_arrive[rank]`` (release, system scope).
  P5 reduce   wait until every rank's CTAs signalled this rank (timed); one warp per (token, chunk):
              ``y[t] = BF16(sum_k w[t,k] * combine[t][k])`` in FP32 (zeros for a token without slots).
Every wait gives up after ``timeout_ns`` (or at once when another CTA of this rank gave up): the
error record names the operation and the missing ranks; the kernel then finishes without hanging
(addresses stay inside their buffers whatever the data) and leaves ``y`` untouched.
"""

from typing import Union

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, Int64
from cutlass.memory import SmemAllocator
from cutlass.pipeline import pipeline_init_arrive

from cute_moe.ep_layout import num_chunks
from cute_moe.mega_moe_layout import (ENTRY_POSITION_BITS, GRID_BARRIERS_PER_CALL, PARITIES, SCALE_BLOCK, TILE_N,
                                      MegaMoEGeometry)

from .ep_combine import _sum_chunk
from .ep_ptx import (RANKS_ALL, atomic_add_gpu_u32, await_ranks, bits_to_f32, copy_chunks, cvt_e4m3x2, fence_gpu,
                     fence_proxy_async_global, ld_acquire_gpu_b32, ld_acquire_gpu_u64, ld_b32, ld_b64,
                     load_expert_id, pack_bf16x2, record_timeout, red_relaxed_gpu_add_u32, red_relaxed_gpu_add_u64,
                     signal_ranks, st_b16, st_b32, st_f32, st_release_sys_b64, st_v4_pred, sync_threads_and,
                     scan_aligned_counts, timed_wait)
from .scheduler import WorkTile
from .sm90.grouped_gemm import THREADS_PER_WARPGROUP, Sm90GroupedGemm

OP_INPUTS, OP_GRID, OP_TILE, OP_OUTPUTS = 4, 5, 6, 7  # error record op codes (cute_moe/ep.py names them)
PULL_WARPS = 3  # warps 1-3 of the producer warpgroup copy rows into the pool
PULL_PER_LANE = 4  # 16-byte vectors a pulling lane loads before storing them
# setmaxnreg budgets per block height (multiples of 8): (the producer warpgroup: TMA issue, row
# copies; each consumer warpgroup: a 64 x 256 FP32 accumulator and a 64 x 128 block accumulator).
# 128 rows: 128 * 56 + 256 * 224 = 64512 <= 65536; 64 rows (one consumer warpgroup): 128 * 96 + 128 * 232.
# After the tile loop every thread returns to TAIL_REGS (384 * 168 <= 65536) for the signal and
# reduction phases.
ROLE_REGS = {64: (96, 232), 128: (56, 224)}
TAIL_REGS = 168
REGISTER_FILE = 65536  # 32-bit registers of one SM (one CTA per SM)
REDUCE_LOADS_IN_FLIGHT = 16  # 16-byte loads a reducing lane issues before using them
FP8_MAX = 448.0
MIN_AMAX = 1e-4  # as layouts.per_token_cast_to_fp8
QUAD = 4  # threads of a WGMMA accumulator quad share its rows
ROW_HALF = 8  # element i of a thread's accumulator sits on row r0 + ROW_HALF * ((i // 2) % 2)
VECTOR_BYTES = 16


class CombineTile(WorkTile):
    """A GEMM-2 tile and where its rows go: ``row_src`` (this rank's pool-row -> entry table),
    ``peers`` (every rank's symmetric base address)."""

    def __init__(self, tile: WorkTile, row_src: Int64, peers: Int64):
        super().__init__(tile.group, tile.row_start, tile.rows_valid, tile.local_row, tile.n_block, tile.b_shared)
        self.row_src = row_src
        self.peers = peers


class Sm90MegaMoE(Sm90GroupedGemm):
    """Compile-time configuration of the Mega MoE kernel of one geometry (see the module docstring)."""

    def __init__(self, geom: MegaMoEGeometry, clamp: bool, block_m: int):
        h, i = geom.hidden, geom.intermediate
        # The GEMM machinery sees one block_m x 256 tile shape for both GEMMs; N and K are per phase.
        super().__init__("contiguous", geom.fp8, block_m, TILE_N, 1, 1, 0, 1, max(2 * i, h), max(h, i), False)
        self.block_m = block_m
        # Both GEMMs multiply 128-wide N parts: FP8 promotes each with its weight-scale block, and the
        # GEMM-1 epilogue finds the gate in part 0 and the up projection in part 1 (BF16 alike).
        self.mma_tile_n = SCALE_BLOCK
        self.n_parts = TILE_N // SCALE_BLOCK
        self.g = geom
        self.clamp = clamp
        self.sym = geom.symmetric_offsets()
        self.work_off = geom.work_offsets()
        self.table_len = 2 * geom.local_experts + 2  # segment starts [L + 1], counts [L], blocks
        tile_k = self.tile_shape_mnk[2]
        self.b_tile_k = tile_k  # B's k-block extent in its stored elements
        self.k1_tiles = h // tile_k
        self.k2_tiles = i // tile_k
        # Warpgroups after the consumers with a variant-defined role (``aux_role``), their setmaxnreg
        # budget, and the tile loop's budgets (producer, consumer) and the tail's.
        self.aux_wgs = 0
        self.aux_regs = 0
        self.role_regs = ROLE_REGS[block_m]
        self.tail_regs = TAIL_REGS
        self.set_thread_count()
        # Binary search of a block's expert: probe distances span/2, span/4, ..., 1 (span: the
        # power of two >= L).
        span = 1 << max(geom.local_experts - 1, 0).bit_length()
        self.search_steps = [span >> (d + 1) for d in range(span.bit_length() - 1)]
        # B's block scales of either GEMM as one (N blocks, K blocks, L) view with runtime strides:
        # its extent, and per GEMM its N blocks and K blocks.
        self.sfb_rows = max(2 * geom.inter_blocks, geom.hidden_blocks)
        self.sfb_cols = max(geom.hidden_blocks, geom.inter_blocks)
        self.sfb_n = (2 * geom.inter_blocks, geom.hidden_blocks)
        self.sfb_k = (geom.hidden_blocks, geom.inter_blocks)

    def set_thread_count(self):
        """Threads and warps of the CTA: the producer, consumer and auxiliary warpgroups."""
        self.threads_per_cta = THREADS_PER_WARPGROUP * (1 + self.num_consumer_wgs + self.aux_wgs)
        self.threads = self.threads_per_cta
        self.warps = self.threads // 32
        assert self.tail_regs * self.threads <= REGISTER_FILE, "the tail's registers exceed the register file"

    # ------------------------------------------------------------------ launch
    @cute.jit
    def __call__(self, pool: cute.Tensor, pool_sf: cute.Tensor, l1: cute.Tensor, s1: cute.Tensor, inter: cute.Tensor,
                 inter_sf: cute.Tensor, l2: cute.Tensor, s2: cute.Tensor, calls_tensor: cute.Tensor, y: Int64,
                 num_tokens: Int32, peers: Int64, rank: Int32, work: Int64, err: Int64, stats: Int64,
                 clamp: Float32, timeout_ns: Int64, stream):
        """pool ``[pool_rows, H]`` / inter ``[pool_rows, I]`` (uint8 = FP8, or BF16), their scales FP32
        ``[pool_rows, blocks]`` MN-major; l1 ``[L, 2I, H]`` (gate/up interleaved) and l2 ``[L, H, I]``
        (uint8 = FP8, or BF16) with block scales s1 ``[L, 2I/128, H/128]``, s2 ``[L, H/128, I/128]``
        (BF16: the four scale tensors are None); calls
        int32 ``[grid]`` (per-CTA call counters; also gives TVM-FFI the device); the rest are
        addresses and scalars (see ``kernels/mega_moe_signature.py``)."""
        self._setup(cutlass.BFloat16)
        pool_addr = Int64(pool.iterator.toint())
        inter_addr = Int64(inter.iterator.toint())
        calls = Int64(calls_tensor.iterator.toint())
        mA1, mA2, mB1, mB2 = pool, inter, l1, l2
        if cutlass.const_expr(self.fp8):
            mA1, mA2 = (cute.recast_tensor(t, self.ab_dtype) for t in (pool, inter))
        mB1, mB2 = (self.weight_view(t) for t in (l1, l2))
        tma_atom_a1, tma_a1, tma_atom_b1, tma_b1 = self.ab_load_atoms(mA1, mB1)
        tma_atom_a2, tma_a2, tma_atom_b2, tma_b2 = self.ab_load_atoms(mA2, mB2)
        # BF16 has no scales: their slots carry the A operands (never used).
        pool_sf_addr, inter_sf_addr, sfb1_addr, sfb2_addr = Int64(0), Int64(0), Int64(0), Int64(0)
        tma_atom_sfa1, tma_sfa1, tma_atom_sfa2, tma_sfa2 = tma_atom_a1, tma_a1, tma_atom_a2, tma_a2
        scale_buffers = {}
        if cutlass.const_expr(self.fp8):
            pool_sf_addr = Int64(pool_sf.iterator.toint())
            inter_sf_addr = Int64(inter_sf.iterator.toint())
            sfb1_addr = Int64(s1.iterator.toint())
            sfb2_addr = Int64(s2.iterator.toint())
            tma_atom_sfa1, tma_sfa1 = self.sfa_load_atom(pool_sf)
            tma_atom_sfa2, tma_sfa2 = self.sfa_load_atom(inter_sf)
            scale_buffers = {"sSFA": cute.cosize(self.sfa_smem_layout)}
        # store_tile partitions a D tensor; GEMM-2's store_vector sends each vector elsewhere, so any
        # BF16 view of the right extent serves (it is never accessed).
        mOut = cute.make_tensor(cute.make_ptr(cutlass.BFloat16, pool_addr, cute.AddressSpace.gmem, assumed_align=16),
                                cute.make_layout((self.g.pool_rows, self.g.hidden), stride=(self.g.hidden, 1)))
        self.shared_storage = self.shared_storage_type(scale_buffers)
        self.kernel(tma_atom_a1, tma_a1, tma_atom_b1, tma_b1, tma_atom_sfa1, tma_sfa1, sfb1_addr,
                    tma_atom_a2, tma_a2, tma_atom_b2, tma_b2, tma_atom_sfa2, tma_sfa2, sfb2_addr, mOut,
                    self.tiled_mma, self.cta_layout_mnk, self.a_smem_layout, self.b_smem_layout,
                    self.sfa_smem_layout, self.epi_smem_layout, calls, y, num_tokens, peers, rank, work, err, stats,
                    pool_addr, pool_sf_addr, inter_addr, inter_sf_addr, clamp, timeout_ns).launch(
            **self.launch_arguments(Int32(self.g.num_ctas), stream))

    def weight_view(self, weights: cute.Tensor) -> cute.Tensor:
        """Trace time: expert weights ``[L, N, K]`` as the GEMMs' B operand, (N, K, L) of ``ab_dtype``."""
        if cutlass.const_expr(self.fp8):
            weights = cute.recast_tensor(weights, self.ab_dtype)
        return cute.make_tensor(weights.iterator, cute.select(weights.layout, mode=[1, 2, 0]))

    def shared_tensors(self, storage, a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.ComposedLayout,
                       sfa_smem_layout: cute.Layout, epi_smem_layout: cute.ComposedLayout) -> dict:
        """Device code, before the barriers' init fence (a variant may create its own pipelines here): the
        CTA's shared-memory tensors by name: the A and B stages (``sA``, ``sB``), A's staged row scales
        (``sSFA``, FP8; else None), the epilogue's buffers (``sD``)."""
        return {"sA": storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner),
                "sB": storage.sB.get_tensor(b_smem_layout.outer, swizzle=b_smem_layout.inner),
                "sSFA": storage.sSFA.get_tensor(sfa_smem_layout) if self.fp8 else None,
                "sD": storage.sD.get_tensor(epi_smem_layout.outer, swizzle=epi_smem_layout.inner)}

    # ------------------------------------------------------------------ the kernel
    @cute.kernel
    def kernel(self, tma_atom_a1: cute.CopyAtom, mA1: cute.Tensor, tma_atom_b1: cute.CopyAtom, mB1: cute.Tensor,
               tma_atom_sfa1: cute.CopyAtom, mSFA1: cute.Tensor, sfb1_addr: Int64,
               tma_atom_a2: cute.CopyAtom, mA2: cute.Tensor, tma_atom_b2: cute.CopyAtom, mB2: cute.Tensor,
               tma_atom_sfa2: cute.CopyAtom, mSFA2: cute.Tensor, sfb2_addr: Int64, mOut: cute.Tensor,
               tiled_mma: cute.TiledMma, cta_layout_mnk: cute.Layout, a_smem_layout: cute.ComposedLayout,
               b_smem_layout: Union[cute.ComposedLayout, cute.Layout], sfa_smem_layout: cute.Layout,
               epi_smem_layout: cute.ComposedLayout,
               calls: Int64, y: Int64, num_tokens: Int32, peers: Int64, rank: Int32, work: Int64, err: Int64,
               stats: Int64, pool_addr: Int64, pool_sf_addr: Int64, inter_addr: Int64, inter_sf_addr: Int64,
               clamp: Float32, timeout_ns: Int64):
        g = self.g
        R, L = g.num_ranks, g.local_experts
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = tidx % 32
        if warp_idx == 0:
            for atom in (tma_atom_a1, tma_atom_b1, tma_atom_sfa1, tma_atom_a2, tma_atom_b2, tma_atom_sfa2):
                cute.nvgpu.cpasync.prefetch_descriptor(atom)
        _, _, cta = cute.arch.block_idx()

        storage = SmemAllocator().allocate(self.shared_storage)
        mainloop = self.make_mainloop(storage, a_smem_layout, b_smem_layout, cta_layout_mnk)
        smem = self.shared_tensors(storage, a_smem_layout, b_smem_layout, sfa_smem_layout, epi_smem_layout)
        pipeline_init_arrive(cluster_shape_mn=self.cluster_shape_mn, is_relaxed=True)
        table = storage.group_values.get_tensor(cute.make_layout(self.table_len))

        call = ld_b32(calls + Int64(cta) * 4)
        parity = call % PARITIES
        home = ld_b64(peers + Int64(rank) * 8)
        abort = work + self.work_off["abort"]

        # P0 / P1: announce this rank's inputs, wait for everyone's, route the received entries.
        if cta == 0:
            if tidx == 0:
                self.announce_inputs(peers, rank, call, num_tokens)
        self.zero_counters(work, 1 - parity, cta, tidx)
        arrived = await_ranks(home, self.sym["input_arrive"], rank, R, RANKS_ALL, Int64(call + 1) << 32,
                              timeout_ns, err, OP_INPUTS, warp_idx, lane)
        if arrived == 0:
            if tidx == 0:
                st_b32(abort, Int32(1))
        ntok = [cutlass.min(ld_b32(home + self.sym["input_arrive"] + s * 8), g.max_tokens) * arrived
                for s in range(R)]
        self.route(peers, rank, work, parity, ntok, cta, tidx)
        self.grid_barrier(work, call, 0, timeout_ns, err, rank, tidx)

        # P2: segment table, pool-row table.
        if warp_idx == 0:
            self.scan_segments(table, work, parity, lane)
        cute.arch.sync_threads()
        self.layout_rows(table, work, ntok, cta, tidx)
        if cta == 0:
            self.add_stats(table, stats, tidx)
        self.grid_barrier(work, call, 1, timeout_ns, err, rank, tidx)

        # P3: the tile loop.
        blocks = table[2 * L + 1]
        warp_group_idx = self.await_barrier_init(tidx)
        if warp_group_idx == 0:
            cute.arch.setmaxregister_decrease(self.role_regs[0])
            self.roles_ready()
            if warp_idx == 0:
                self.produce(tma_atom_a1, mA1, tma_atom_b1, mB1, tma_atom_sfa1, mSFA1, tma_atom_a2, mA2, tma_atom_b2,
                             mB2, tma_atom_sfa2, mSFA2, smem["sA"], smem["sB"], smem["sSFA"], mainloop, table,
                             blocks, parity, work, cta, timeout_ns, err, rank)
            else:
                self.pull_rows(blocks, parity, peers, work, pool_addr, pool_sf_addr,
                               cta * PULL_WARPS + warp_idx - 1, lane)
            cute.arch.setmaxregister_increase(self.tail_regs)
        elif warp_group_idx <= self.num_consumer_wgs:
            cute.arch.setmaxregister_increase(self.role_regs[1])
            self.roles_ready()
            self.consume(tiled_mma, smem, sfb1_addr, sfb2_addr, mOut, mainloop, table, blocks, parity, work, peers,
                         inter_addr, inter_sf_addr, clamp, tidx - THREADS_PER_WARPGROUP, cta)
            cute.arch.setmaxregister_decrease(self.tail_regs)
        else:
            if cutlass.const_expr(self.aux_wgs > 0):
                cute.arch.setmaxregister_decrease(self.aux_regs)
                self.roles_ready()
                self.aux_role(smem, mainloop, table, blocks, sfb1_addr, sfb2_addr, cta,
                              tidx - THREADS_PER_WARPGROUP * (1 + self.num_consumer_wgs))
                cute.arch.setmaxregister_increase(self.tail_regs)

        # P4 / P5: signal the expert outputs, wait for everyone's, reduce this rank's tokens.
        cute.arch.sync_threads()
        if tidx == 0:
            signal_ranks(peers, rank, R, ((self.sym["combine_arrive"], RANKS_ALL),))
        healthy = sync_threads_and(Int32(ld_b32(abort) == 0))
        if healthy != 0:
            done = await_ranks(home, self.sym["combine_arrive"], rank, R, RANKS_ALL, Int64(call + 1) * g.num_ctas,
                               timeout_ns, err, OP_OUTPUTS, warp_idx, lane)
            if done != 0:
                self.reduce(home, y, num_tokens, cta * self.warps + warp_idx, lane)
        cute.arch.sync_threads()
        if tidx == 0:
            st_b32(calls + Int64(cta) * 4, call + 1)

    def roles_ready(self):
        """Device code, each warpgroup right after its tile-loop setmaxnreg: a CTA barrier, so no
        warpgroup starts its role (and, with no tiles, takes registers back at once) before every move
        was made. Were a donor (the producer, the FP4 variant's widening warpgroups) to give its
        registers and take them back before the consumers' increase is granted, that increase would
        wait forever (seen with CTAs without tiles, 1 token per rank)."""
        cute.arch.sync_threads()

    # ------------------------------------------------------------------ P0 - P2
    @cute.jit
    def announce_inputs(self, peers: Int64, rank: Int32, call: Int32, num_tokens: Int32):
        """One thread: ``(call + 1) << 32 | T`` into ``input_arrive[rank]`` of every rank (a release at
        system scope: the caller's writes of the input views, earlier on this stream, come first)."""
        word = (Int64(call + 1) << 32) | Int64(num_tokens)
        for r in cutlass.range_constexpr(self.g.num_ranks):
            st_release_sys_b64(ld_b64(peers + r * 8) + self.sym["input_arrive"] + Int64(rank) * 8, word)

    @cute.jit
    def zero_counters(self, work: Int64, parity: Int32, cta: Int32, tidx: Int32):
        """Every thread of the grid: zero the counters of ``parity`` (expert counts, block arrivals,
        GEMM-1 tiles done), which the next call uses."""
        g = self.g
        nb, L = g.pool_blocks, g.local_experts
        for i in cutlass.range(cta * self.threads + tidx, L + 2 * nb, g.num_ctas * self.threads, unroll=1):
            addr = work + self.work_off["counts"] + Int64(parity * L + i) * 4
            if i >= L:
                j = i - L
                addr = work + self.work_off["block_rows"] + Int64(parity * nb + j) * 4
                if j >= nb:
                    addr = work + self.work_off["l1_done"] + Int64(parity * nb + j - nb) * 4
            st_b32(addr, Int32(0))

    @cute.jit
    def route(self, peers: Int64, rank: Int32, work: Int64, parity: Int32, ntok: list, cta: Int32, tidx: Int32):
        """One thread per received entry (source s, token t < ntok[s], slot k): the slot's expert from
        s's ``topk_idx``; for an expert of this rank a position in it (GPU atomic). ``entry_slot`` =
        local expert << 20 | position, or -1."""
        g = self.g
        K, L, TM = g.num_topk, g.local_experts, g.max_tokens
        for s in cutlass.range_constexpr(g.num_ranks):
            topk_idx = ld_b64(peers + s * 8) + self.sym["topk_idx"]
            for u in cutlass.range(cta * self.threads + tidx, ntok[s] * K, g.num_ctas * self.threads, unroll=1):
                expert = load_expert_id(topk_idx, u, 8, g.num_experts)
                local = expert - rank * L
                slot = Int32(-1)
                if expert >= 0:
                    if local >= 0:
                        if local < L:
                            pos = atomic_add_gpu_u32(work + self.work_off["counts"] + Int64(parity * L + local) * 4,
                                                     Int32(1))
                            slot = (local << ENTRY_POSITION_BITS) | pos
                st_b32(work + self.work_off["entry_slot"] + Int64(s * TM * K + u) * 4, slot)

    @cute.jit
    def grid_barrier(self, work: Int64, call: Int32, index: cutlass.Constexpr[int], timeout_ns: Int64, err: Int64,
                     rank: Int32, tidx: Int32):
        """Every thread of the grid: barrier ``index`` of this call over a monotonic GPU counter
        (release / acquire at GPU scope, timed)."""
        g = self.g
        cute.arch.sync_threads()
        if tidx == 0:
            counter = work + self.work_off["grid_barrier"]
            fence_gpu()
            red_relaxed_gpu_add_u64(counter)
            target = Int64(call * GRID_BARRIERS_PER_CALL + index + 1) * g.num_ctas
            self.wait_local(ld_acquire_gpu_u64, counter, target, work, timeout_ns, err, OP_GRID, rank)
        cute.arch.sync_threads()

    @cute.jit
    def wait_local(self, load: cutlass.Constexpr, addr: Int64, target, work: Int64, timeout_ns: Int64, err: Int64,
                   op: cutlass.Constexpr[int], rank: Int32) -> Int32:
        """Spin until ``load(addr) >= target`` (1), or until this rank's abort word is set or
        ``timeout_ns`` passed (0; a timeout fills the error record and sets the abort word)."""
        abort = work + self.work_off["abort"]
        ok = timed_wait(load, addr, target, cute.arch.globaltimer(), timeout_ns, abort)
        if ok == 0:
            if ld_b32(abort) == 0:  # a timeout (not another CTA's abort)
                record_timeout(err, Int32(op), rank, Int32(0))
                st_b32(abort, Int32(1))
        return ok

    @cute.jit
    def scan_segments(self, table: cute.Tensor, work: Int64, parity: Int32, lane: Int32):
        """One warp: table[e] = start row of expert e (counts aligned to the block height, exclusive scan),
        table[L] = rows in use, table[L + 1 + e] = count of e, table[2L + 1] = blocks in use."""
        L = self.g.local_experts
        counts = work + self.work_off["counts"] + Int64(parity * L) * 4

        def store(e: Int32, start: Int32, count: Int32) -> None:
            table[e] = start
            table[L + 1 + e] = count
        running = scan_aligned_counts(lambda e: ld_b32(counts + Int64(e) * 4), L, self.block_m, store, lane)
        if lane == 0:
            table[L] = running
            table[2 * L + 1] = running // self.block_m

    @cute.jit
    def layout_rows(self, table: cute.Tensor, work: Int64, ntok: list, cta: Int32, tidx: Int32):
        """Every thread of the grid: ``row_src[segment start + position] = entry`` for each received
        entry of a local expert; ``row_src = -1`` on each segment's padding rows."""
        g = self.g
        K, L, TM = g.num_topk, g.local_experts, g.max_tokens
        row_src = work + self.work_off["row_src"]
        first = cta * self.threads + tidx
        stride = g.num_ctas * self.threads
        for s in cutlass.range_constexpr(g.num_ranks):
            for u in cutlass.range(first, ntok[s] * K, stride, unroll=1):
                entry = s * TM * K + u
                slot = ld_b32(work + self.work_off["entry_slot"] + Int64(entry) * 4)
                if slot >= 0:
                    expert = slot >> ENTRY_POSITION_BITS
                    row = table[expert] + (slot & ((1 << ENTRY_POSITION_BITS) - 1))
                    st_b32(row_src + Int64(row) * 4, entry)
        for v in cutlass.range(first, L * self.block_m, stride, unroll=1):
            expert = v // self.block_m
            row = table[expert] + table[L + 1 + expert] + v % self.block_m
            if row < table[expert + 1]:
                st_b32(row_src + Int64(row) * 4, Int32(-1))

    @cute.jit
    def add_stats(self, table: cute.Tensor, stats: Int64, tidx: Int32):
        """CTA 0: ``stats[e] += rows received by local expert e`` (when stats were given)."""
        L = self.g.local_experts
        if stats != 0:
            for e in cutlass.range(tidx, L, self.threads, unroll=1):
                st_b32(stats + Int64(e) * 4, ld_b32(stats + Int64(e) * 4) + table[L + 1 + e])

    # ------------------------------------------------------------------ P3: tiles
    @cute.jit
    def block_expert(self, table: cute.Tensor, block: Int32) -> Int32:
        """The local expert whose segment holds block ``block``: the last e with table[e] <= row
        (an empty expert's start equals the next one's, so the last such e owns rows)."""
        L = self.g.local_experts
        row = block * self.block_m
        lo = Int32(0)
        for step in cutlass.range_constexpr(len(self.search_steps)):
            probe = lo + self.search_steps[step]
            if probe < L:
                if table[probe] <= row:
                    lo = probe
        return lo

    def block_tile(self, table: cute.Tensor, block: Int32, n_block: Int32) -> WorkTile:
        """The tile of block ``block`` and N block ``n_block``: its expert, first pool row and the rows
        that hold entries (the expert's rows come first in its segment; the rest is padding)."""
        L = self.g.local_experts
        expert = self.block_expert(table, block)
        row_start = block * self.block_m
        rows = cutlass.min(table[expert] + table[L + 1 + expert] - row_start, self.block_m)
        return WorkTile(expert, row_start, rows, Int32(0), n_block, True)

    @cute.jit
    def produce(self, tma_atom_a1, mA1, tma_atom_b1, mB1, tma_atom_sfa1, mSFA1, tma_atom_a2, mA2, tma_atom_b2, mB2,
                tma_atom_sfa2, mSFA2, sA: cute.Tensor, sB: cute.Tensor, sSFA: cute.Tensor,
                mainloop: pipeline.PipelineTmaAsync, table: cute.Tensor, blocks: Int32, parity: Int32, work: Int64,
                cta: Int32, timeout_ns: Int64, err: Int64, rank: Int32):
        """Warp 0: per tile of this CTA, wait until its A rows exist, then stream its k-blocks."""
        g = self.g
        nb = g.pool_blocks
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        for i in cutlass.range(cta, blocks * (g.l1_tiles + g.l2_tiles), g.num_ctas, unroll=1):
            second, block, n_block = self.tile_position(i, blocks)
            tile = self.block_tile(table, block, n_block)
            counter = work + self.work_off["block_rows"] + Int64(parity * nb + block) * 4
            target = tile.rows_valid
            if second != 0:
                counter = work + self.work_off["l1_done"] + Int64(parity * nb + block) * 4
                target = Int32(g.l1_tiles)
            self.wait_local(ld_acquire_gpu_b32, counter, target, work, timeout_ns, err, OP_TILE, rank)
            fence_proxy_async_global()  # the rows were written by generic stores of other CTAs
            if second != 0:
                state = self.load_tile(tma_atom_a2, mA2, tma_atom_b2, mB2, tma_atom_sfa2, mSFA2, sA, sB, sSFA,
                                       mainloop, state, tile, self.k2_tiles)
            else:
                state = self.load_tile(tma_atom_a1, mA1, tma_atom_b1, mB1, tma_atom_sfa1, mSFA1, sA, sB, sSFA,
                                       mainloop, state, tile, self.k1_tiles)
        mainloop.producer_tail(state)

    @cute.jit
    def tile_position(self, i: Int32, blocks: Int32):
        """Tile ``i`` of the list -> (is a GEMM-2 tile, block, N block): GEMM-1 tiles of every block
        first (block-major), then GEMM-2 tiles."""
        g = self.g
        first_l2 = blocks * g.l1_tiles
        second = Int32(0)
        block = i // g.l1_tiles
        n_block = i % g.l1_tiles
        if i >= first_l2:
            second = Int32(1)
            block = (i - first_l2) // g.l2_tiles
            n_block = (i - first_l2) % g.l2_tiles
        return second, block, n_block

    @cute.jit
    def load_tile(self, tma_atom_a, mA, tma_atom_b, mB, tma_atom_sfa, mSFA, sA: cute.Tensor, sB: cute.Tensor,
                  sSFA: cute.Tensor, mainloop: pipeline.PipelineTmaAsync, state, tile: WorkTile,
                  k_tiles: cutlass.Constexpr[int]):
        """TMA loads of one tile's ``k_tiles`` k-blocks: A rows of the block, B rows of the N block of
        the tile's expert, A's row scales."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        gA = cute.local_tile(cute.domain_offset((tile.row_start, 0), mA), (tile_m, tile_k), (0, None))
        gB = cute.local_tile(mB, (tile_n, self.b_tile_k), (tile.n_block, None, tile.group))
        tAsA, tAgA = cute.nvgpu.cpasync.tma_partition(tma_atom_a, 0, cute.make_layout(1), cute.group_modes(sA, 0, 2),
                                                      cute.group_modes(gA, 0, 2))
        tBsB, tBgB = cute.nvgpu.cpasync.tma_partition(tma_atom_b, 0, cute.make_layout(1), cute.group_modes(sB, 0, 2),
                                                      cute.group_modes(gB, 0, 2))
        scale_parts = [self.partition_sfa(tma_atom_sfa, mSFA, sSFA, tile)] if self.fp8 else []
        for k_tile in cutlass.range(k_tiles, unroll=1):
            mainloop.producer_acquire(state)
            barrier = mainloop.producer_get_barrier(state)
            cute.copy(tma_atom_a, tAgA[(None, k_tile)], tAsA[(None, state.index)], tma_bar_ptr=barrier)
            cute.copy(tma_atom_b, tBgB[(None, k_tile)], tBsB[(None, state.index)], tma_bar_ptr=barrier)
            for tSs, tSg in scale_parts:
                cute.copy(tma_atom_sfa, tSg[(None, k_tile)], tSs[(None, state.index)], tma_bar_ptr=barrier)
            mainloop.producer_commit(state)
            state.advance()
        return state

    @cute.jit
    def pull_rows(self, blocks: Int32, parity: Int32, peers: Int64, work: Int64, pool_addr: Int64,
                  pool_sf_addr: Int64, pull_warp: Int32, lane: Int32):
        """Warps 1-3: pool rows ``pull_warp, + PULL_WARPS * grid, ...`` in increasing order: copy the
        row's token (and its scales, MN-major) from the source rank, then +1 on the block's arrival
        counter (padding rows are skipped: a block waits for its entry rows only)."""
        g = self.g
        K, TM, H = g.num_topk, g.max_tokens, g.hidden
        row_bytes = H * g.act_bytes
        vecs = row_bytes // VECTOR_BYTES
        chunks = num_chunks(vecs, PULL_PER_LANE)
        row_src = work + self.work_off["row_src"]
        for row in cutlass.range(pull_warp, blocks * self.block_m, g.num_ctas * PULL_WARPS, unroll=1):
            entry = ld_b32(row_src + Int64(row) * 4)
            if entry >= 0:
                source = entry // (TM * K)
                token = entry % (TM * K) // K
                peer = ld_b64(peers + Int64(source) * 8)
                src = peer + self.sym["x"] + Int64(token) * row_bytes
                dst = pool_addr + Int64(row) * row_bytes
                for c in cutlass.range(chunks, unroll=1):
                    copy_chunks(src, [(dst, Int32(1))], lane, [c], vecs, PULL_PER_LANE)
                for q in cutlass.range_constexpr(-(-g.hidden_blocks // 32) if g.fp8 else 0):
                    kb = lane + 32 * q
                    if kb < g.hidden_blocks:
                        scale = ld_b32(peer + self.sym["x_sf"] + Int64(token * g.hidden_blocks + kb) * 4)
                        st_b32(pool_sf_addr + (Int64(kb) * g.scale_pitch + row) * 4, scale)
                fence_proxy_async_global()
                cute.arch.sync_warp()
                if lane == 0:
                    fence_gpu()
                    red_relaxed_gpu_add_u32(work + self.work_off["block_rows"]
                                            + Int64(parity * g.pool_blocks + row // self.block_m) * 4, Int32(1))

    @cute.jit
    def consume(self, tiled_mma: cute.TiledMma, smem: dict, sfb1_addr: Int64, sfb2_addr: Int64, mOut: cute.Tensor,
                mainloop: pipeline.PipelineTmaAsync, table: cute.Tensor, blocks: Int32, parity: Int32, work: Int64,
                peers: Int64, inter_addr: Int64, inter_sf_addr: Int64, clamp: Float32, consumer_tidx: Int32,
                cta: Int32):
        """Consumer warpgroups: the mainloop of each tile (``multiply_tile``), then the GEMM-1 epilogue
        (SwiGLU, FP8 intermediate, ``l1_done`` release) or the GEMM-2 epilogue (rows into the sources'
        combine)."""
        g = self.g
        sD = smem["sD"]
        (tCrA, tCrB, tCrB_parts, accumulators, block_acc, num_k_blocks, tCcC, r0, epilogue, state,
         release_state) = self.consumer_setup(tiled_mma, smem["sA"], self.mma_b_source(smem), sD, consumer_tidx)
        epi_buffer = Int32(0)
        wide = Int32(0)  # k-blocks multiplied so far (the FP4 variant's widened-buffer ring position)
        row_src = work + self.work_off["row_src"]
        for i in cutlass.range(cta, blocks * (g.l1_tiles + g.l2_tiles), g.num_ctas, unroll=1):
            second, block, n_block = self.tile_position(i, blocks)
            tile = self.block_tile(table, block, n_block)
            k_tiles, sfb_addr, sfb_n, sfb_k = self.phase_operands(second, sfb1_addr, sfb2_addr)
            accumulators.fill(0.0)
            state, release_state, wide = self.multiply_tile(
                tiled_mma, tCrA, tCrB, tCrB_parts, accumulators, block_acc, num_k_blocks, mainloop, state,
                release_state, wide, smem, sfb_addr, sfb_n, sfb_k, tCcC, r0, tile, k_tiles, consumer_tidx)
            if second != 0:
                epi_buffer = self.store_tile(epilogue, accumulators, sD, mOut, None, CombineTile(tile, row_src, peers),
                                             epi_buffer, TILE_N, g.hidden, 0)
            else:
                self.store_swiglu(accumulators, tCcC, r0, tile, inter_addr, inter_sf_addr, clamp, consumer_tidx)
                fence_proxy_async_global()  # GEMM-2's TMA (another CTA) reads these rows
                self.epilogue_barrier.arrive_and_wait()
                if consumer_tidx == 0:
                    fence_gpu()
                    red_relaxed_gpu_add_u32(work + self.work_off["l1_done"] + Int64(parity * g.pool_blocks + block) * 4,
                                            Int32(1))

    @cute.jit
    def phase_operands(self, second: Int32, sfb1_addr: Int64, sfb2_addr: Int64) -> tuple:
        """A tile's K blocks and B's scales by GEMM: (k-blocks, scale address, N extent and K extent of
        one expert's scales): s1 [L, 2I/128, H/128] or s2 [L, H/128, I/128] (FP4: the variant's
        ``sfb_n`` / ``sfb_k``)."""
        k_tiles = Int32(self.k1_tiles)
        sfb_addr = sfb1_addr
        sfb_n, sfb_k = Int32(self.sfb_n[0]), Int32(self.sfb_k[0])
        if second != 0:
            k_tiles = Int32(self.k2_tiles)
            sfb_addr = sfb2_addr
            sfb_n, sfb_k = Int32(self.sfb_n[1]), Int32(self.sfb_k[1])
        return k_tiles, sfb_addr, sfb_n, sfb_k

    def mma_b_source(self, smem: dict) -> cute.Tensor:
        """The shared-memory B tiles WGMMA reads: the B stages."""
        return smem["sB"]

    @cute.jit
    def multiply_tile(self, tiled_mma, tCrA, tCrB, tCrB_parts, accumulators, block_acc,
                      num_k_blocks: cutlass.Constexpr[int], mainloop, state, release_state, wide: Int32, smem: dict,
                      sfb_addr: Int64, sfb_n: Int32, sfb_k: Int32, tCcC: cute.Tensor, r0: Int32, tile: WorkTile,
                      k_tiles: Int32, consumer_tidx: Int32):
        """All k-blocks of one tile into ``accumulators``: the grouped GEMM's FP8 mainloop (B's block
        scales: a (N blocks, K blocks, L) view of ``sfb_addr`` with row pitch ``sfb_k`` and ``sfb_n``
        rows per expert) or its BF16 one. Returns the ring states and ``wide`` (unchanged here; the
        FP4 variant's override uses it and ``consumer_tidx``)."""
        if cutlass.const_expr(self.fp8):
            mSFB = cute.make_tensor(cute.make_ptr(Float32, sfb_addr, cute.AddressSpace.gmem, assumed_align=4),
                                    cute.make_layout((self.sfb_rows, self.sfb_cols, self.g.local_experts),
                                                     stride=(sfb_k, 1, sfb_n * sfb_k)))
            state, release_state = self.mainloop_fp8(
                tiled_mma, tCrA, tCrB_parts, accumulators, block_acc, num_k_blocks, mainloop, state,
                release_state, smem["sSFA"], mSFB, tCcC, r0, tile, k_tiles)
        else:
            state, release_state = self.mainloop_bf16(tiled_mma, tCrA, tCrB, accumulators, num_k_blocks,
                                                      mainloop, state, release_state, k_tiles)
        return state, release_state, wide

    @cute.jit
    def store_swiglu(self, acc: cute.Tensor, tCcC: cute.Tensor, r0: Int32, tile: WorkTile, inter_addr: Int64,
                     inter_sf_addr: Int64, clamp: Float32, consumer_tidx: Int32):
        """GEMM-1 epilogue: part 0 of the accumulators holds the gate and part 1 the up projection of
        the same (row, column) (the weight transform interleaves them), so h = silu(g) * u is
        register-local. FP8: see ``store_fp8_rows``; BF16: h as BF16 pairs into ``inter[row, 128 n_block
        + col]``."""
        g = self.g
        values = cute.size(acc) // 2
        column0 = tile.n_block * SCALE_BLOCK
        amax_lo = Float32(0.0)
        amax_hi = Float32(0.0)
        # Elements 4j, 4j+1 sit on row r0 and 4j+2, 4j+3 on row r0 + ROW_HALF.
        for j in cutlass.range_constexpr(values // 4):
            for r in cutlass.range_constexpr(4):
                v = 4 * j + r
                gate = acc[v]
                up = acc[values + v]
                if cutlass.const_expr(self.clamp):
                    gate = cute.arch.fmin(gate, clamp)
                    up = cute.arch.fmax(cute.arch.fmin(up, clamp), -clamp)
                h = gate / (Float32(1.0) + cute.math.exp(-gate, fastmath=True)) * up
                acc[v] = h
                magnitude = cute.arch.fmax(h, -h)  # (fmax's abs form returns a sign: not an amax)
                if cutlass.const_expr(r < 2):
                    amax_lo = cute.arch.fmax(amax_lo, magnitude)
                else:
                    amax_hi = cute.arch.fmax(amax_hi, magnitude)
        if cutlass.const_expr(self.fp8):
            self.store_fp8_rows(acc, values, amax_lo, amax_hi, tCcC, r0, tile, column0, inter_addr, inter_sf_addr,
                                consumer_tidx)
        else:
            for j in cutlass.range_constexpr(values // 2):
                row, col = tCcC[2 * j]
                st_b32(inter_addr + (Int64(tile.row_start + row) * g.intermediate + column0 + col) * 2,
                       pack_bf16x2(acc[2 * j], acc[2 * j + 1]))

    @cute.jit
    def store_fp8_rows(self, acc: cute.Tensor, values: cutlass.Constexpr[int], amax_lo: Float32, amax_hi: Float32,
                       tCcC: cute.Tensor, r0: Int32, tile: WorkTile, column0: Int32, inter_addr: Int64,
                       inter_sf_addr: Int64, consumer_tidx: Int32):
        """FP8 intermediate: per row, amax over the quad's 4 threads -> scale = amax / 448; h / scale as
        E4M3 pairs into ``inter[row, 128 n_block + col]``, the scales into ``inter_sf[n_block][row]``."""
        g = self.g
        for shift in cutlass.range_constexpr(2):
            amax_lo = cute.arch.fmax(amax_lo, cute.arch.shuffle_sync_bfly(amax_lo, offset=1 << shift))
            amax_hi = cute.arch.fmax(amax_hi, cute.arch.shuffle_sync_bfly(amax_hi, offset=1 << shift))
        scale_lo = cute.arch.fmax(amax_lo, Float32(MIN_AMAX)) / FP8_MAX
        scale_hi = cute.arch.fmax(amax_hi, Float32(MIN_AMAX)) / FP8_MAX
        inv_lo = Float32(1.0) / scale_lo
        inv_hi = Float32(1.0) / scale_hi
        for j in cutlass.range_constexpr(values // 4):
            for half in cutlass.range_constexpr(2):
                v = 4 * j + 2 * half
                inv = inv_hi if half else inv_lo
                row, col = tCcC[v]
                packed = cvt_e4m3x2(acc[v] * inv, acc[v + 1] * inv)
                st_b16(inter_addr + Int64(tile.row_start + row) * g.intermediate + column0 + col, packed)
        if consumer_tidx % QUAD == 0:
            sf_row = inter_sf_addr + (Int64(tile.n_block) * g.scale_pitch + tile.row_start + r0) * 4
            st_f32(sf_row, scale_lo)
            st_f32(sf_row + ROW_HALF * 4, scale_hi)

    @cute.jit
    def store_vector(self, values: cute.Tensor, dst: cute.Tensor, coord, tile: CombineTile):
        """GEMM-2 epilogue's last step: the 16-byte vector at (row, column) ``coord`` of the tile goes
        to ``combine[t][k][column]`` of the source rank of the row's entry (padding rows: nowhere)."""
        g = self.g
        entry = ld_b32(tile.row_src + Int64(tile.row_start + coord[0]) * 4)
        if entry >= 0:
            slots = g.max_tokens * g.num_topk
            peer = ld_b64(tile.peers + Int64(entry // slots) * 8)
            addr = peer + self.sym["combine"] + (Int64(entry % slots) * g.hidden + coord[1]) * 2
            words = cute.recast_tensor(values, Int32)
            st_v4_pred(addr, Int32(1), words[0], words[1], words[2], words[3])

    # ------------------------------------------------------------------ P5
    @cute.jit
    def reduce(self, home: Int64, y: Int64, num_tokens: Int32, gwarp: Int32, lane: Int32):
        """One warp per (token, chunk of the row): y[t] = BF16(sum over valid slots of w * combine[t][k])."""
        g = self.g
        K, H = g.num_topk, g.hidden
        row_vecs = H * 2 // VECTOR_BYTES
        per_lane = max(1, REDUCE_LOADS_IN_FLIGHT // K)
        chunks = num_chunks(row_vecs, per_lane)
        for u in cutlass.range(gwarp, num_tokens * chunks, g.num_ctas * self.warps, unroll=1):
            t = u // chunks
            c = u % chunks
            valid = []
            weights = []
            for k in cutlass.range_constexpr(K):
                valid.append(Int32(load_expert_id(home + self.sym["topk_idx"], t * K + k, 8, g.num_experts) >= 0))
                weights.append(bits_to_f32(ld_b32(home + self.sym["topk_weights"] + Int64(t * K + k) * 4)))
            combine_row = lambda k: home + self.sym["combine"] + Int64(t * K + k) * (H * 2)  # noqa: E731
            _sum_chunk(K, combine_row, lambda k: valid[k], lambda k: weights[k], y + Int64(t) * (H * 2), row_vecs,
                       lane, c, per_lane)
