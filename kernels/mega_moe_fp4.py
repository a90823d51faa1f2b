"""SM90 Mega MoE with MXFP4 expert weights (FP8 x FP4): ``kernels/mega_moe.py``'s kernel, B widened on chip.

Everything but the GEMM engine is the FP8 kernel's (phases, row pulls, epilogues, reduction). Both
GEMMs' weights stay MXFP4 in global memory: packed E2M1 codes ``[L, N, K/2]`` uint8 (element 2i in
the low nibble) and, per row and 128-K block, one int32 word of its four UE8M0 exponents
``[L, K/128, N]`` (byte j: the exponent of 32-element block j; a k-block's words of consecutive rows
are contiguous, so a warp's loads of them coalesce). Per k-block the TMA producer loads A,
A's row scales and the packed B tile (``256 x 64`` bytes, unswizzled) into the stage ring; the
packed tile is widened into one of ``wide_buffers`` swizzled E4M3 tiles (``kernels/sm90/fp4_widen.py``)
in slices of ``PART_N`` rows, and the consumers' WGMMAs read the widened tile. Each weight row's
largest exponent over K, ``e_row`` (the words' last row, written by the weight transform), is
factored out: a 32-block widens to ``value * 2^(e - e_row)`` (exact in E4M3 down to 2^-8; rows
whose blocks lie more than 5 binades apart take ``widen_item``'s FP32 path), so per k-block the
promotion is ``acc += block_acc * sfa[row]`` and the column factor ``2^(e_row[col] - 127)`` (kept
per widened buffer in ``sRS``) multiplies the accumulators once, after the tile's last k-block. Who
widens depends on the block height (``WIDENING_WARPGROUPS``):

Widening warpgroups (64-row blocks: few rows per weight byte, so widening sets the pace). Two extra
warpgroups widen while the consumer warpgroup only multiplies and promotes, as in the FP8 kernel
(128-wide parts); the widened tiles form a second ring of ``WIDENED_RING`` buffers
(``PipelineAsync``, widening threads -> consumer threads):

    widening:  wait stage k | acquire buffer | widen this thread's item of every slice (loads, then
               byte permutes, then stores) | load block k+2's exponent words | proxy fence, commit
               buffer | release stage k
    consumer:  wait stage k (A) and buffer | per part: WGMMA, wait, (last: release stage k) promote |
               (the tile's last k-block: scale the columns) release buffer

A stage is free once every consumer warp and every widening warp released it. The exponent words of
even and odd k-blocks sit in two register sets, so each load has a whole k-block to arrive.

Consumer widening (128-row blocks: two consumer warpgroups, no register room for a third). The
consumers widen the next block one 64-row slice at a time while the same part of the current block
multiplies (64-wide parts keep the block accumulator at 32 registers beside the 128-register tile
accumulator):

    block k, part p = 0..3:  WGMMA part p of k | (p = 0: await k+1's stage) widen part p of k+1 |
                             wait, (p = 3: release k's stage) promote part p
    then: proxy fence + named barrier: block k+1 widened by every consumer thread
    after the last block: scale the columns

Each consumer thread loads the exponent words of its widening items a whole block ahead: a part's
words of block k+2 right after widening that part of block k+1, into the same registers. Two
widened buffers suffice: block k+1 is written into the buffer of block k-1, whose WGMMAs and
promotions every consumer thread finished before it reached the barrier of block k; the ring
position ``wide`` runs across tiles, so a tile's first block goes into the buffer of the previous
tile's second-to-last block, equally finished before the barrier of the previous tile's last block.
"""

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64
from cutlass.tensor_utils import LayoutEnum

from cute_moe.mega_moe_layout import BLOCK_M, MIN_BLOCK_M, ROW_EXPONENT_ROWS, SCALE_BLOCK, TILE_N, MegaMoEGeometry

from .mega_moe import Sm90MegaMoE
from .scheduler import WorkTile
from .sm90 import fp4_widen_bits as widen_bits
from .sm90.fp4_widen import (BYTE_MASK, MX_BLOCK, PACKED_PER_BLOCK, SWIZZLE_ALIGN_BYTES, WIDEN_BARRIER_ID,
                             E2m1Widening)
from .sm90.grouped_gemm import (EPI_N, EPI_STAGES, ROW_HALF, STAGE_ALIGN_BYTES, THREADS_PER_WARPGROUP,
                                TMA_ALIGN_BYTES, WARPS_PER_WARPGROUP)

WIDE_BUFFERS = 2  # widened B tiles when the consumers widen (see the module docstring)
WIDENED_RING = 3  # widened B tiles with widening warpgroups: they may run two k-blocks ahead
PART_N = 64  # weight rows of one widening slice (and of one WGMMA part when the consumers widen)
# Widening warpgroups per block height (0: the consumers widen; see the module docstring).
WIDENING_WARPGROUPS = {MIN_BLOCK_M: 2, BLOCK_M: 0}
# setmaxnreg budgets with widening warpgroups (512 threads: 128 registers each at launch): producer
# 56, consumer 232 (the FP8 kernel's 64-row budget), each widening warpgroup 112:
# 128 * (56 + 232 + 2 * 112) = 65536; every thread returns to 128 after the tile loop.
WIDENING_ROLE_REGS = (56, 232)
WIDENING_REGS = 112
WIDENING_TAIL_REGS = 128
BLOCKS_PER_K_TILE = SCALE_BLOCK // MX_BLOCK  # exponents per row per 128-K block (bytes of one word)
BYTE_BITS = 8
ROW_SCALE_BYTES = 4  # one FP32 2^(e_row - 127) per widened row
# Shared-memory regions aligned beyond what SMEM_RESERVED_BYTES covers: A, the widened tiles, D.
ALIGNMENT_SLACK_BYTES = 2 * SWIZZLE_ALIGN_BYTES


class Sm90Fp4MegaMoE(E2m1Widening, Sm90MegaMoE):
    """Compile-time configuration of the FP8 x FP4 Mega MoE kernel of one geometry (see the module
    docstring); the geometry's ``fp4`` is set."""

    def __init__(self, geom: MegaMoEGeometry, clamp: bool, block_m: int):
        super().__init__(geom, clamp, block_m)
        self.aux_wgs = WIDENING_WARPGROUPS[block_m]
        self.widening_warpgroups = self.aux_wgs > 0
        self.wide_buffers = WIDENED_RING if self.widening_warpgroups else WIDE_BUFFERS
        if self.widening_warpgroups:
            self.role_regs = WIDENING_ROLE_REGS
            self.aux_regs = WIDENING_REGS
            self.tail_regs = WIDENING_TAIL_REGS
            self.widen_threads = THREADS_PER_WARPGROUP * self.aux_wgs
        else:
            # 64-wide WGMMA parts: a 32-register block accumulator leaves the widening registers.
            self.mma_tile_n = PART_N
            self.n_parts = TILE_N // PART_N
            self.widen_threads = self.num_consumer_threads
            self.widen_barrier = pipeline.NamedBarrier(barrier_id=WIDEN_BARRIER_ID,
                                                       num_threads=self.num_consumer_threads)
        self.set_thread_count()
        self.b_tile_k = self.tile_shape_mnk[2] // 2  # packed bytes of a k-block row
        # Widening items of one slice (64 rows x 4 blocks), dealt round-robin: item = thread + round *
        # threads; the thread count is a multiple of 4, so every item of a thread has block thread % 4.
        self.widen_slices = TILE_N // PART_N
        self.widen_rounds = PART_N * BLOCKS_PER_K_TILE // self.widen_threads
        # B's exponent words of either GEMM as one (N, K blocks + the row exponents, L) view (K-block-major)
        # with runtime strides.
        self.sfb_rows = max(2 * geom.intermediate, geom.hidden)
        self.sfb_cols = max(geom.hidden_blocks, geom.inter_blocks) + ROW_EXPONENT_ROWS
        self.sfb_n = (2 * geom.intermediate, geom.hidden)
        self.sfb_k = (geom.hidden_blocks + ROW_EXPONENT_ROWS, geom.inter_blocks + ROW_EXPONENT_ROWS)

    # ------------------------------------------------------------------ trace time
    def _setup(self, d_dtype):
        super()._setup(d_dtype)
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        stage_bytes = tile_m * tile_k + tile_n * self.b_tile_k + self.stage_scale_bytes()
        wide_bytes = self.wide_buffers * tile_n * (tile_k + ROW_SCALE_BYTES)
        epi_bytes = tile_m * EPI_N * self.stage_dtype.width // 8 * EPI_STAGES
        self.stages = self.stage_count(stage_bytes, wide_bytes + epi_bytes + ALIGNMENT_SLACK_BYTES)
        self.a_smem_layout = self._operand_smem_layout("k", tile_m)
        self.b_smem_layout = cute.make_layout((tile_n, self.b_tile_k, self.stages),
                                              stride=(self.b_tile_k, 1, tile_n * self.b_tile_k))
        self.sfa_smem_layout = self.scale_smem_layout(tile_m)
        self.wide_smem_layout = self.make_wide_layout()

    def make_wide_layout(self) -> cute.ComposedLayout:
        """(tile_n, tile_k, wide_buffers) swizzled K-major E4M3 tiles (what WGMMA reads as B)."""
        tile_n, tile_k = self.tile_shape_mnk[1], self.tile_shape_mnk[2]
        atom = cute.nvgpu.warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, self.ab_dtype, tile_k), self.ab_dtype)
        return cute.tile_to_shape(atom, (tile_n, tile_k, self.wide_buffers), order=(0, 1, 2))

    def shared_storage_type(self, scale_buffers: dict[str, int]):
        """Barriers, segment table, A stages, packed B stages, A's row scales, the widened tiles and
        their row scales, the epilogue's buffers (and the widened ring's barriers, with widening
        warpgroups)."""
        tile_n = self.tile_shape_mnk[1]
        ring = {"wide_barriers": (cutlass.Int64, 2 * self.wide_buffers, 8)} if self.widening_warpgroups else {}
        return self.storage_struct(
            sA=(self.ab_dtype, cute.cosize(self.a_smem_layout), STAGE_ALIGN_BYTES),
            sB=(cutlass.Uint8, cute.cosize(self.b_smem_layout), TMA_ALIGN_BYTES),
            sSFA=(Float32, cute.cosize(self.sfa_smem_layout), TMA_ALIGN_BYTES),
            sW=(self.ab_dtype, cute.cosize(self.wide_smem_layout), SWIZZLE_ALIGN_BYTES),
            sRS=(Float32, tile_n * self.wide_buffers, TMA_ALIGN_BYTES),
            sD=(self.stage_dtype, cute.cosize(self.epi_smem_layout), STAGE_ALIGN_BYTES), **ring)

    def weight_view(self, weights: cute.Tensor) -> cute.Tensor:
        """Packed weights ``[L, N, K/2]`` uint8 as (N, K/2, L)."""
        return cute.make_tensor(weights.iterator, cute.select(weights.layout, mode=[1, 2, 0]))

    def ab_load_atoms(self, mA: cute.Tensor, mB: cute.Tensor) -> tuple:
        """TMA atoms and tensors of one stage's A k-block and packed B k-block (no multicast)."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        tma_atom_a, tma_a = self._make_load_atom(mA, self.a_smem_layout, (tile_m, tile_k), 1)
        tma_atom_b, tma_b = self._make_load_atom(mB, self.b_smem_layout, (tile_n, self.b_tile_k), 1)
        return tma_atom_a, tma_a, tma_atom_b, tma_b

    def stage_consumers(self) -> pipeline.CooperativeGroup:
        """A stage is released by each consumer warp (A) and each widening warp (the packed B), once."""
        return pipeline.CooperativeGroup(pipeline.Agent.Thread,
                                         (self.num_consumer_wgs + self.aux_wgs) * WARPS_PER_WARPGROUP)

    # ------------------------------------------------------------------ device code
    def shared_tensors(self, storage, a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.Layout,
                       sfa_smem_layout: cute.Layout, epi_smem_layout: cute.ComposedLayout) -> dict:
        """The FP8 kernel's tensors (``sB``: the packed stages) plus the widened tiles ``sW``, their
        row scales ``sRS`` (tile_n, wide_buffers) and, with widening warpgroups, the widened ring
        ``wide_ring`` (every widening thread commits a buffer, every consumer thread releases it)."""
        wide_layout = self.make_wide_layout()
        wide_ring = None
        if cutlass.const_expr(self.widening_warpgroups):
            wide_ring = pipeline.PipelineAsync.create(
                num_stages=self.wide_buffers,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.widen_threads),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.num_consumer_threads),
                barrier_storage=storage.wide_barriers.data_ptr(), defer_sync=True)
        return {"sA": storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner),
                "sB": storage.sB.get_tensor(b_smem_layout),
                "sSFA": storage.sSFA.get_tensor(sfa_smem_layout),
                "sD": storage.sD.get_tensor(epi_smem_layout.outer, swizzle=epi_smem_layout.inner),
                "sW": storage.sW.get_tensor(wide_layout.outer, swizzle=wide_layout.inner),
                "sRS": storage.sRS.get_tensor(cute.make_layout((TILE_N, self.wide_buffers), stride=(1, TILE_N))),
                "wide_ring": wide_ring}

    def mma_b_source(self, smem: dict) -> cute.Tensor:
        """WGMMA reads B from the widened tiles."""
        return smem["sW"]

    def multiply_tile(self, *args):
        """All k-blocks of one tile (the base class's arguments): the engine of this block height."""
        engine = self.multiply_widened_tile if self.widening_warpgroups else self.multiply_widening_tile
        return engine(*args)

    def exponent_view(self, sfb_addr: Int64, sfb_n: Int32, sfb_k: Int32) -> cute.Tensor:
        """Device code: B's exponent words of one GEMM as (N, K blocks, L): ``sfb_k`` k-blocks of ``sfb_n``
        rows per expert, K-block-major."""
        return cute.make_tensor(cute.make_ptr(Int32, sfb_addr, cute.AddressSpace.gmem, assumed_align=4),
                                cute.make_layout((self.sfb_rows, self.sfb_cols, self.g.local_experts),
                                                 stride=(1, sfb_n, sfb_n * sfb_k)))

    @cute.jit
    def multiply_widened_tile(self, tiled_mma, tCrA, tCrB, tCrB_parts, accumulators, block_acc,
                              num_k_blocks: cutlass.Constexpr[int], mainloop, state, release_state, wide: Int32,
                              smem: dict, sfb_addr: Int64, sfb_n: Int32, sfb_k: Int32, tCcC: cute.Tensor, r0: Int32,
                              tile: WorkTile, k_tiles: Int32, consumer_tidx: Int32):
        """Consumer with widening warpgroups: per k-block, wait for its stage (A, A's scales) and its
        widened buffer (position ``wide`` of the widened ring, counted across tiles), multiply and
        promote part by part, release both; the last k-block's buffer gives the column scales. Returns
        the stage states and ``wide`` advanced by ``k_tiles``."""
        sRS, sSFA, wide_ring = smem["sRS"], smem["sSFA"], smem["wide_ring"]
        first_mma, block_mma = self.make_tiled_mma(), self.make_tiled_mma()
        self.set_block_accumulate(block_mma, first_mma)
        ring = self.wide_buffers
        widened = pipeline.PipelineState(ring, wide, wide % ring, (wide // ring) % 2)
        for k_tile in cutlass.range(k_tiles, unroll=1):
            mainloop.consumer_wait(state)
            wide_ring.consumer_wait(widened)
            scale_lo = sSFA[(r0, 0, state.index)]
            scale_hi = sSFA[(r0 + ROW_HALF, 0, state.index)]
            for part in cutlass.range_constexpr(self.n_parts):
                self.mma_fp8_block(block_mma, first_mma, tCrA, tCrB_parts[part], block_acc, num_k_blocks,
                                   state.index, widened.index)
                cute.nvgpu.warpgroup.wait_group(0)
                if cutlass.const_expr(part == self.n_parts - 1):
                    mainloop.consumer_release(state)
                self.promote_part(accumulators, block_acc, part, scale_lo, scale_hi)
            if k_tile == k_tiles - 1:
                self.scale_columns(accumulators, sRS, widened.index, tCcC)
            wide_ring.consumer_release(widened)
            widened.advance()
            state.advance()
            release_state.advance()
        return state, release_state, wide + k_tiles

    @cute.jit
    def aux_role(self, smem: dict, mainloop: pipeline.PipelineTmaAsync, table: cute.Tensor, blocks: Int32,
                 sfb1_addr: Int64, sfb2_addr: Int64, cta: Int32, widen_tidx: Int32):
        """Widening warpgroups: every k-block of this CTA's tiles (the consumers' order) through
        ``widen_stage``, two at a time: the exponent words of even and odd k-blocks sit in two register
        sets, each refilled two k-blocks ahead of its use (global-memory latency off the critical path);
        the items' row exponents are loaded once per tile."""
        g = self.g
        sP, sW, sRS, wide_ring = smem["sB"], smem["sW"], smem["sRS"], smem["wide_ring"]
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        widened = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.wide_buffers)
        even = cute.make_rmem_tensor((self.widen_slices * self.widen_rounds,), Int32)
        odd = cute.make_rmem_tensor((self.widen_slices * self.widen_rounds,), Int32)
        row_exps = cute.make_rmem_tensor((self.widen_slices * self.widen_rounds,), Int32)
        for i in cutlass.range(cta, blocks * (g.l1_tiles + g.l2_tiles), g.num_ctas, unroll=1):
            second, block, n_block = self.tile_position(i, blocks)
            tile = self.block_tile(table, block, n_block)
            k_tiles, sfb_addr, sfb_n, sfb_k = self.phase_operands(second, sfb1_addr, sfb2_addr)
            mE = self.exponent_view(sfb_addr, sfb_n, sfb_k)
            self.load_row_exponents(row_exps, mE, k_tiles, tile, widen_tidx)
            for part in cutlass.range_constexpr(self.widen_slices):
                self.load_words(even, mE, Int32(0), k_tiles, tile, part, widen_tidx)
                self.load_words(odd, mE, Int32(1), k_tiles, tile, part, widen_tidx)
            for pair in cutlass.range((k_tiles + 1) // 2, unroll=1):
                state, widened = self.widen_stage(sP, sW, sRS, even, row_exps, mE, mainloop, wide_ring, state, widened,
                                                  tile, 2 * pair, k_tiles, widen_tidx)
                if 2 * pair + 1 < k_tiles:
                    state, widened = self.widen_stage(sP, sW, sRS, odd, row_exps, mE, mainloop, wide_ring, state,
                                                      widened, tile, 2 * pair + 1, k_tiles, widen_tidx)

    @cute.jit
    def widen_stage(self, sP: cute.Tensor, sW: cute.Tensor, sRS: cute.Tensor, words: cute.Tensor,
                    row_exps: cute.Tensor, mE: cute.Tensor, mainloop: pipeline.PipelineTmaAsync,
                    wide_ring: pipeline.PipelineAsync, state, widened, tile: WorkTile, k_tile: Int32, k_tiles: Int32,
                    widen_tidx: Int32) -> tuple:
        """Widening warpgroups, k-block ``k_tile``: wait for its stage and a free widened buffer, widen
        (``widen_block``), refill ``words`` with k-block ``k_tile + 2``'s, publish the buffer (proxy
        fence, commit), release the stage. Returns both ring states, advanced."""
        mainloop.consumer_wait(state)
        wide_ring.producer_acquire(widened)
        self.widen_block(sP, sW, sRS, words, row_exps, state.index, widened.index, widen_tidx)
        for part in cutlass.range_constexpr(self.widen_slices):
            self.load_words(words, mE, k_tile + 2, k_tiles, tile, part, widen_tidx)
        cute.arch.fence_view_async_shared()
        wide_ring.producer_commit(widened)
        mainloop.consumer_release(state)
        widened.advance()
        state.advance()
        return state, widened

    @cute.jit
    def multiply_widening_tile(self, tiled_mma, tCrA, tCrB, tCrB_parts, accumulators, block_acc,
                               num_k_blocks: cutlass.Constexpr[int], mainloop, state, release_state, wide: Int32,
                               smem: dict, sfb_addr: Int64, sfb_n: Int32, sfb_k: Int32, tCcC: cute.Tensor, r0: Int32,
                               tile: WorkTile, k_tiles: Int32, consumer_tidx: Int32):
        """Consumers that widen (see the module docstring): ``state`` is the next stage to widen,
        ``release_state`` the stage being multiplied; block 0 is widened first, the last block is
        multiplied without widening. ``sfb_addr``: the exponent words, ``sfb_k`` k-blocks of ``sfb_n``
        rows per expert. Returns the ring states and ``wide`` advanced by ``k_tiles``."""
        mE = self.exponent_view(sfb_addr, sfb_n, sfb_k)
        # Plain locals, not the dict, enter the loops (the tracer would thread the dict's tensors), and
        # two WGMMA configurations set once (a block's first WGMMA overwrites, the others add).
        sP, sW, sRS, sSFA = smem["sB"], smem["sW"], smem["sRS"], smem["sSFA"]
        first_mma, block_mma = self.make_tiled_mma(), self.make_tiled_mma()
        self.set_block_accumulate(block_mma, first_mma)
        words = cute.make_rmem_tensor((self.widen_slices * self.widen_rounds,), Int32)
        row_exps = cute.make_rmem_tensor((self.widen_slices * self.widen_rounds,), Int32)
        self.load_row_exponents(row_exps, mE, k_tiles, tile, consumer_tidx)
        for part in cutlass.range_constexpr(self.widen_slices):
            self.load_words(words, mE, Int32(0), k_tiles, tile, part, consumer_tidx)
        buffer = wide % self.wide_buffers
        mainloop.consumer_wait(state)
        for part in cutlass.range_constexpr(self.widen_slices):
            self.widen_part(sP, sW, sRS, words, row_exps, state.index, buffer, part, consumer_tidx)
            self.load_words(words, mE, Int32(1), k_tiles, tile, part, consumer_tidx)
        state.advance()
        self.publish_widened()
        for k_tile in cutlass.range(k_tiles - 1, unroll=1):
            next_buffer = (wide + 1) % self.wide_buffers
            self.multiply_block(block_mma, first_mma, tCrA, tCrB_parts, accumulators, block_acc, num_k_blocks, mainloop,
                                state, release_state, sP, sW, sRS, sSFA, words, row_exps, r0, buffer, next_buffer, True,
                                consumer_tidx, mE, tile, k_tile + 2, k_tiles)
            state.advance()
            release_state.advance()
            self.publish_widened()
            wide = wide + 1
            buffer = next_buffer
        self.multiply_block(block_mma, first_mma, tCrA, tCrB_parts, accumulators, block_acc, num_k_blocks, mainloop,
                            state, release_state, sP, sW, sRS, sSFA, words, row_exps, r0, buffer, buffer, False,
                            consumer_tidx, mE, tile, k_tiles, k_tiles)
        self.scale_columns(accumulators, sRS, buffer, tCcC)
        release_state.advance()
        return state, release_state, wide + 1

    @cute.jit
    def multiply_block(self, block_mma, first_mma, tCrA, tCrB_parts, accumulators, block_acc,
                       num_k_blocks: cutlass.Constexpr[int], mainloop, state, release_state, sP: cute.Tensor,
                       sW: cute.Tensor, sRS: cute.Tensor, sSFA: cute.Tensor, words: cute.Tensor,
                       row_exps: cute.Tensor, r0: Int32, buffer: Int32, next_buffer: Int32,
                       widen_next: cutlass.Constexpr[bool], consumer_tidx: Int32, mE: cute.Tensor, tile: WorkTile,
                       words_k_tile: Int32, k_tiles: Int32):
        """One k-block (stage ``release_state``, widened buffer ``buffer``), part by part: issue the
        part's WGMMAs, widen the same part of the next block (stage ``state`` into ``next_buffer``)
        when ``widen_next`` and load that part's exponent words of k-block ``words_k_tile`` into the
        registers just read (a whole block ahead of their use), wait, promote; the stage is released
        after the last part's WGMMAs."""
        scale_lo = sSFA[(r0, 0, release_state.index)]
        scale_hi = sSFA[(r0 + ROW_HALF, 0, release_state.index)]
        for part in cutlass.range_constexpr(self.n_parts):
            self.mma_fp8_block(block_mma, first_mma, tCrA, tCrB_parts[part], block_acc, num_k_blocks,
                               release_state.index, buffer)
            if cutlass.const_expr(widen_next):
                if cutlass.const_expr(part == 0):
                    mainloop.consumer_wait(state)  # the next block's stage, waited on while part 0 multiplies
                self.widen_part(sP, sW, sRS, words, row_exps, state.index, next_buffer, part, consumer_tidx)
                self.load_words(words, mE, words_k_tile, k_tiles, tile, part, consumer_tidx)
            cute.nvgpu.warpgroup.wait_group(0)
            if cutlass.const_expr(part == self.n_parts - 1):
                mainloop.consumer_release(release_state)
            self.promote_part(accumulators, block_acc, part, scale_lo, scale_hi)

    @cute.jit
    def promote_part(self, accumulators: cute.Tensor, block_acc: cute.Tensor, part: cutlass.Constexpr[int],
                     scale_lo: Float32, scale_hi: Float32):
        """``accumulators[part] += block_acc * sfa[row]`` (``scale_lo`` / ``scale_hi``: A's scales of the
        thread's two rows; B's per-column factor is constant over K and applied by ``scale_columns``)."""
        part_values = cute.size(block_acc)
        # Elements 4j, 4j + 1 sit on row r0 and 4j + 2, 4j + 3 on row r0 + ROW_HALF.
        for j in cutlass.range_constexpr(part_values // 4):
            for c in cutlass.range_constexpr(2):
                low = part * part_values + 4 * j + c
                accumulators[low] = accumulators[low] + block_acc[4 * j + c] * scale_lo
                accumulators[low + 2] = accumulators[low + 2] + block_acc[4 * j + 2 + c] * scale_hi

    @cute.jit
    def scale_columns(self, accumulators: cute.Tensor, sRS: cute.Tensor, buffer: Int32, tCcC: cute.Tensor):
        """The tile's last step: every accumulator column times its weight row's ``2^(e_row - 127)``
        (``sRS`` of widened buffer ``buffer``)."""
        # Elements 4j + c (row r0) and 4j + 2 + c (row r0 + ROW_HALF) share column tCcC[4j + c].
        for j in cutlass.range_constexpr(cute.size(accumulators) // 4):
            for c in cutlass.range_constexpr(2):
                factor = sRS[(tCcC[4 * j + c][1], buffer)]
                accumulators[4 * j + c] = accumulators[4 * j + c] * factor
                accumulators[4 * j + 2 + c] = accumulators[4 * j + 2 + c] * factor

    @cute.jit
    def load_row_exponents(self, row_exps: cute.Tensor, mE: cute.Tensor, k_tiles: Int32, tile: WorkTile,
                           widen_tidx: Int32):
        """The row exponent (the largest over K, the words' row after the last k-block) of each of this
        thread's widening items' rows."""
        for part in cutlass.range_constexpr(self.widen_slices):
            for round_ in cutlass.range_constexpr(self.widen_rounds):
                n = tile.n_block * TILE_N + self.item_row(part, round_, widen_tidx)
                row_exps[part * self.widen_rounds + round_] = mE[(n, k_tiles, tile.group)] & BYTE_MASK

    @cute.jit
    def load_words(self, words: cute.Tensor, mE: cute.Tensor, k_tile: Int32, k_tiles: Int32, tile: WorkTile,
                   part: cutlass.Constexpr[int], widen_tidx: Int32):
        """This thread's exponent words of slice ``part`` (64 rows) of k-block ``k_tile`` (nothing past the
        tile's last k-block): one per widening item, the word of the item's row."""
        if k_tile < k_tiles:
            for round_ in cutlass.range_constexpr(self.widen_rounds):
                item = widen_tidx + round_ * self.widen_threads
                n = tile.n_block * TILE_N + part * PART_N + item // BLOCKS_PER_K_TILE
                words[part * self.widen_rounds + round_] = mE[(n, k_tile, tile.group)]

    @cute.jit
    def widen_part(self, sP: cute.Tensor, sW: cute.Tensor, sRS: cute.Tensor, words: cute.Tensor,
                   row_exps: cute.Tensor, stage: Int32, buffer: Int32, part: cutlass.Constexpr[int], widen_tidx: Int32):
        """Widen rows ``[64 part, 64 part + 64)`` of the packed tile of ``stage`` into widened buffer
        ``buffer``: per item the E4M3 values ``value * 2^(e - e_row)`` and, by the item of block 0,
        the row's ``2^(e_row - 127)``."""
        b = widen_tidx % BLOCKS_PER_K_TILE
        for round_ in cutlass.range_constexpr(self.widen_rounds):
            n = self.item_row(part, round_, widen_tidx)
            item = part * self.widen_rounds + round_
            shift = self.block_shift(words[item], row_exps[item], b, sRS, n, buffer)
            self.widen_item(sP, sW, stage, buffer, n, b, shift, self.fast_shift(shift))

    @cute.jit
    def widen_block(self, sP: cute.Tensor, sW: cute.Tensor, sRS: cute.Tensor, words: cute.Tensor,
                    row_exps: cute.Tensor, stage: Int32, buffer: Int32, widen_tidx: Int32):
        """Widening warpgroups: this thread's items of every slice of the packed tile of ``stage`` into
        widened buffer ``buffer``. The items' shifts come first; when all are in the byte-permute domain
        (the common case) their packed bytes are loaded, widened and stored together, independent chains
        the warp scheduler interleaves; otherwise every item takes ``widen_item``'s own path."""
        b = widen_tidx % BLOCKS_PER_K_TILE
        rows, shifts = [], []
        fast = Int32(1)
        for part in cutlass.range_constexpr(self.widen_slices):
            for round_ in cutlass.range_constexpr(self.widen_rounds):
                n = self.item_row(part, round_, widen_tidx)
                item = part * self.widen_rounds + round_
                shift = self.block_shift(words[item], row_exps[item], b, sRS, n, buffer)
                rows.append(n)
                shifts.append(shift)
                fast = fast & self.fast_shift(shift)
        if fast != 0:
            packed = [cute.make_rmem_tensor((PACKED_PER_BLOCK,), cutlass.Uint8) for _ in rows]
            widened = [cute.make_rmem_tensor((MX_BLOCK,), self.ab_dtype) for _ in rows]
            for i in cutlass.range_constexpr(len(rows)):
                cute.autovec_copy(cute.local_tile(sP[(rows[i], None, stage)], (PACKED_PER_BLOCK,), (b,)), packed[i])
            for i in cutlass.range_constexpr(len(rows)):
                self.widen_words(cute.recast_tensor(packed[i], Int32), cute.recast_tensor(widened[i], Int32),
                                 shifts[i])
            for i in cutlass.range_constexpr(len(rows)):
                cute.autovec_copy(widened[i], cute.local_tile(sW[(rows[i], None, buffer)], (MX_BLOCK,), (b,)))
        else:
            for i in cutlass.range_constexpr(len(rows)):
                self.widen_item(sP, sW, stage, buffer, rows[i], b, shifts[i], self.fast_shift(shifts[i]))

    def item_row(self, part: int, round_: int, widen_tidx: Int32) -> Int32:
        """Device code: the tile row of this thread's widening item ``round_`` of slice ``part``."""
        return part * PART_N + (widen_tidx + round_ * self.widen_threads) // BLOCKS_PER_K_TILE

    @cute.jit
    def fast_shift(self, shift: Int32) -> Int32:
        """1 where the byte-permute path widens a block shifted by ``2^shift``, else 0 (the FP32 path: far
        smaller blocks). Shifts are <= 0 with the transform's row exponents; the fast path's domain
        reaches E4M3_MAX_SHIFT, so words whose row exponent lies up to 6 below a block's stay exact."""
        return Int32(shift >= widen_bits.E4M3_MIN_SHIFT) & Int32(shift <= widen_bits.E4M3_MAX_SHIFT)

    @cute.jit
    def block_shift(self, word: Int32, row_exp: Int32, b: Int32, sRS: cute.Tensor, n: Int32, buffer: Int32) -> Int32:
        """Block ``b``'s shift ``e - e_row`` (<= 0) from row ``n``'s exponent word and row exponent; the
        thread of block 0 also stores the row's ``2^(e_row - 127)`` in ``sRS`` of widened buffer ``buffer``."""
        if b == 0:
            sRS[(n, buffer)] = self.pow2(row_exp)
        return ((word >> (BYTE_BITS * b)) & BYTE_MASK) - row_exp

    @cute.jit
    def publish_widened(self):
        """Make this thread's widened values visible to WGMMA (async proxy) and meet the other consumers."""
        cute.arch.fence_view_async_shared()
        self.widen_barrier.arrive_and_wait()
