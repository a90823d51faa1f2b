"""SM90 grouped GEMM with MXFP4 weights, swap-AB: D^T = dequant(B) . A^T with the weights as WGMMA's
register-sourced A operand.

Same operands and results as ``fp4_grouped_gemm.py`` (B packed E2M1 ``[(G,) N, K/2]`` uint8 and UE8M0
exponents ``[(G,) N, ceil(K/32)]`` uint8, rows 16-byte aligned; A BF16 or E4M3 with FP32 scales per
row per 128 K), but no widened tile ever goes through shared memory:

- the WGMMA's M is the weights' N (64 rows per consumer warpgroup, ``tile_n`` = 64 .. 256 per CTA:
  one to four consumer warpgroups, registers split by ``register_split``) and its N is the token tile
  (``tile_m`` = 8 .. 128 tokens), so decode pays no 64-row M padding;
- every consumer thread reads its own rows' packed bytes from shared memory (per 32-element block,
  E4M3: the two halfwords its fragment needs, joined by one ``prmt``; BF16: one 16-byte load and a
  ``prmt`` gather; conflict-free thanks to the TMA swizzle of the packed tile; ``fp4_fragment_bits``),
  widens them in registers with the byte-permute recipes
  of ``fp4_widen_bits`` (E4M3: per-block shifted tables; BF16: constant tables then one exact
  ``mul.rn.bf16x2`` by the block scale; exact FP32 fallback outside their range, as the other
  kernel), and issues WGMMA with A from those registers and B = the activations (tokens x K,
  K-major, swizzled) from shared memory;
- the accumulator is D^T (weight rows x tokens); the epilogue stores it transposed straight from
  registers, predicated on the tile's group rows and on N.

Numerics are the other kernel's: BF16 x FP4 widens exactly; FP8 x FP4 folds the four exponents of a
row's 128-K block (``e_max``) into E4M3 weights and promotes each block as
``acc += block * sfa[token] * 2^(e_max[row] - 127)``, now per (weight row, token) in registers.

Roles (one CTA per SM, ``128 * (1 + tile_n // 64)`` threads, cluster 1x1):
- warp 0: walks the tile schedule (the grouped scheduler with ``tile_m`` token rows) and issues TMA
  loads of the activation k-block, the packed weight k-block (``tile_n x tile_k/2`` bytes, 32B/64B
  swizzle) and, FP8, the activation scales into a ``stages``-deep ring (``PipelineTmaAsync``).
- ``tile_n // 64`` consumer warpgroups: per k-block, WGMMAs of k-block k (A from fragment buffer
  ``k % 2``) run while the thread widens k-block k+1 into the other buffer. BF16 keeps one WGMMA
  group in flight (``wait_group(1)`` retires block k-1, whose buffer is widened next, and releases
  its stage); FP8 issues block k, widens block k+1, waits for block k, releases its stage and
  promotes it. The UE8M0 exponents are loaded from global memory as one word per row and k-block, a
  whole step before the widening that reads them (k-block k + 2 while block k runs; two word buffers,
  like the fragments), and those of the next tile's rows are prefetched to L2 when a tile starts.
"""

from typing import Optional, Type

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.tensor_utils import LayoutEnum

from ..grouped_schedulers import GroupedSchedule, GroupedTileScheduler
from ..scheduler import WorkTile
from . import fp4_fragment_bits as fragment_bits
from . import fp4_widen_bits as widen_bits
from .config import MAX_GROUPS
from .fp4_grouped_gemm import Sm90Fp4GroupedGemm
from .fp4_widen import (BYTE_MASK, E2M1_MAG_MASK, E2M1_MAG_SHIFT, E2M1_RAW_SHIFT, E2M1_SIGN_BIT, FP32_BIAS,
                        FP32_SIGN_SHIFT, MX_BLOCK, SWIZZLE_ALIGN_BYTES, prmt)
from .grouped_gemm import CONSUMER_REGS, PRODUCER_REGS, SFA_BYTES, THREADS_PER_WARPGROUP, TMA_ALIGN_BYTES

WEIGHT_ROWS_PER_WARPGROUP = 64  # WGMMA's M
TILE_K = {True: 128, False: 64}  # FP8: one 128-K activation scale block; BF16: one 128-byte swizzle row
FRAGMENT_BUFFERS = 2  # A fragments: k-block k multiplied while k-block k+1 is widened
ROW_HALVES = 2  # a thread's rows r and r + 8
ROW_HALF = 8
QUAD = 4  # threads sharing a row in the fragment layout
CODES_PER_WORD = 8
# TMA's 32B / 64B swizzle of the packed rows (cute Swizzle<log2(chunks), 4, 3>): the 16-byte chunk
# index is XORed with address bits 7.. , i.e. with (row * row_bytes / 128) mod chunks-per-row.
SWIZZLE_SPAN_BYTES = 128
# The CTA's registers, handed out per thread at launch (the most the block size allows, a multiple of
# REGISTER_GRANULE) and moved between warpgroups by setmaxnreg (``register_split``).
REGISTER_FILE = 65536
REGISTER_GRANULE = 8
MAX_THREAD_REGS = 248  # 255 registers per thread, rounded down to the granule
BYTE_BITS = 8
HALFWORD_BYTES = 2
ZERO_EXTEND_BYTE = 0x4440  # prmt selector: byte (selector & 3) of a, then three zero bytes of b = 0
EXPONENT_WORD_TYPES = {2: cutlass.Uint16, 4: Int32}  # a k-block's exponents of one row (BF16, E4M3)
TAIL_WORDS = FRAGMENT_BUFFERS  # the column of the exponent words that holds a partial last k-block


@dsl_user_op
def mul_bf16x2(a, b, *, loc=None, ip=None) -> Int32:
    """PTX ``mul.rn.bf16x2`` on two packed BF16 pairs (pure)."""
    return Int32(llvm.inline_asm(T.i32(), [Int32(x).ir_value(loc=loc, ip=ip) for x in (a, b)],
                                 "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", has_side_effects=False,
                                 is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


class Sm90Fp4SwapGemm(Sm90Fp4GroupedGemm):
    """Compile-time configuration of one swap-AB FP4-weight specialization (module docstring).

    ``token_tile``: tokens per tile (WGMMA N, 8..128); ``tile_n``: weight rows per CTA (64 .. 256, one
    consumer warpgroup per 64). Kinds: dense (no C), contiguous, psum, masked. Inherits the other FP4
    kernel's launch and CTA-start helpers (``launch_operands``, ``storage_struct``,
    ``launch_persistent``, ``start_cta``, ``run_roles``), its producer, ``scale_exponent`` and
    ``pow2``, and the grouped GEMM's TMA-atom helpers; its own ``__init__`` (no call to the parents'):
    the tile roles differ."""

    def __init__(self, kind: str, fp8: bool, token_tile: int, tile_n: int, stages: int, panel: int, n: int,
                 k: int, alignment: int = 0):
        self.kind = kind
        self.fp8 = fp8
        tile_k = TILE_K[fp8]
        self.tile_shape_mnk = (token_tile, tile_n, tile_k)
        self.n = n
        self.k = k
        self.has_c = False
        self.acc_dtype = Float32
        self.num_consumer_wgs = tile_n // WEIGHT_ROWS_PER_WARPGROUP
        self.num_consumer_threads = THREADS_PER_WARPGROUP * self.num_consumer_wgs
        self.threads_per_cta = THREADS_PER_WARPGROUP * (1 + self.num_consumer_wgs)
        self.num_n_clusters = -(-n // tile_n)
        self.k_tiles = -(-k // tile_k)
        self.k_scale_blocks = -(-k // MX_BLOCK)
        self.blocks_per_k_tile = tile_k // MX_BLOCK
        self.packed_k = tile_k // 2
        self.requested_stages = stages
        self.schedule = GroupedSchedule(kind, token_tile, 1, self.num_n_clusters, panel, alignment)
        self.table_len = MAX_GROUPS if self.schedule.has_group_table else 1

    def register_split(self) -> tuple[int, int]:
        """(producer, consumer) registers per thread after setmaxnreg: the launch gives every thread
        ``REGISTER_FILE / threads`` (ptxas takes the most the block size allows when a kernel moves
        registers), the producer warpgroup keeps PRODUCER_REGS and the consumer warpgroups share the
        rest (at most CONSUMER_REGS): 232 with one or two consumer warpgroups, 152 with three, 104
        with four. Asking for more than the pool holds would block ``setmaxnreg.inc`` forever."""
        warpgroups = 1 + self.num_consumer_wgs
        launch = min(REGISTER_FILE // (THREADS_PER_WARPGROUP * warpgroups), MAX_THREAD_REGS)
        launch -= launch % REGISTER_GRANULE
        share = (launch * warpgroups - PRODUCER_REGS) // self.num_consumer_wgs
        return PRODUCER_REGS, min(CONSUMER_REGS, share - share % REGISTER_GRANULE)

    # ------------------------------------------------------------------ host-side (trace time) setup
    def _setup(self, d_dtype: Type[cutlass.Numeric]):
        token_tile, tile_n, tile_k = self.tile_shape_mnk
        self.ab_dtype = cutlass.Float8E4M3FN if self.fp8 else cutlass.BFloat16
        self.d_dtype = d_dtype
        k_major = cute.nvgpu.OperandMajorMode.K
        rmem = cute.nvgpu.warpgroup.OperandSource.RMEM
        # FP8 issues each block's first WGMMA with ``first_mma`` (ACCUMULATE off), the rest with
        # ``tiled_mma`` (on); both are set once per kernel.
        self.tiled_mma, self.first_mma = (sm90_utils.make_trivial_tiled_mma(
            self.ab_dtype, self.ab_dtype, k_major, k_major, self.acc_dtype, (self.num_consumer_wgs, 1, 1),
            tiler_mn=(WEIGHT_ROWS_PER_WARPGROUP, token_tile), a_source=rmem) for _ in range(2))

        stage_bytes = token_tile * tile_k * self.ab_dtype.width // 8 + tile_n * self.packed_k
        stage_bytes += max(token_tile * SFA_BYTES, TMA_ALIGN_BYTES) if self.fp8 else 0
        self.stages = self.stage_count(stage_bytes, 0)
        self.a_smem_layout = cute.tile_to_shape(self.k_major_atom(), (token_tile, tile_k, self.stages),
                                                order=(0, 1, 2))
        # Packed rows of 32 (BF16) / 64 (FP8) bytes, swizzled so that the 16-byte loads of eight
        # consecutive rows (one per quad of a warp) hit distinct banks.
        packed_atom = cute.nvgpu.warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, cutlass.Uint8, self.packed_k), cutlass.Uint8)
        self.packed_smem_layout = cute.tile_to_shape(packed_atom, (tile_n, self.packed_k, self.stages),
                                                     order=(0, 1, 2))
        chunks = self.packed_k // fragment_bits.MX_BLOCK_BYTES
        expected = f"S<{chunks.bit_length() - 1},4,3>"  # what packed_chunk_swizzle assumes
        if str(self.packed_smem_layout.inner) != expected:
            raise ValueError(f"packed tile swizzle: expected {expected}, got {self.packed_smem_layout.inner}")
        # TMA destinations start on 128-byte boundaries: small token tiles pad their scale stage.
        sfa_stage = max(token_tile, TMA_ALIGN_BYTES // SFA_BYTES)
        self.sfa_smem_layout = cute.make_layout((token_tile, 1, self.stages), stride=(1, sfa_stage, sfa_stage))

    @cute.jit
    def __call__(self, mA: cute.Tensor, mB: cute.Tensor, mD: cute.Tensor, mC: Optional[cute.Tensor],
                 mSFA: Optional[cute.Tensor], mSFB: cute.Tensor, mGroup: Optional[cute.Tensor],
                 max_clusters: Int32, stream):
        """Launch: the FP4 family's signature (``fp4_signature``); ``mC`` must be None."""
        mD, mSFB, rows, atoms = self.launch_operands(mA, mB, mD, mSFA, mSFB, mGroup)
        self.shared_storage = self.storage_struct(
            sA=(self.ab_dtype, cute.cosize(self.a_smem_layout), SWIZZLE_ALIGN_BYTES),
            sP=(cutlass.Uint8, cute.cosize(self.packed_smem_layout), SWIZZLE_ALIGN_BYTES),
            sSFA=(Float32, cute.cosize(self.sfa_smem_layout) if self.fp8 else 1, TMA_ALIGN_BYTES))
        self.launch_persistent(
            self.kernel(*atoms, mSFB, mD, mGroup, rows, self.tiled_mma, self.first_mma, self.a_smem_layout,
                        self.packed_smem_layout, self.sfa_smem_layout),
            max_clusters, rows, stream)

    # ------------------------------------------------------------------ device code
    @cute.kernel
    def kernel(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
               tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor, mSFB: cute.Tensor, mD: cute.Tensor,
               mGroup: Optional[cute.Tensor], rows: tuple, tiled_mma: cute.TiledMma, first_mma: cute.TiledMma,
               a_smem_layout: cute.ComposedLayout, packed_smem_layout: cute.ComposedLayout,
               sfa_smem_layout: cute.Layout):
        tidx, warp_idx, storage, mainloop, scheduler = self.start_cta(
            (tma_atom_a, tma_atom_b, tma_atom_sfa), mGroup, rows)

        sA = storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner)
        sP = storage.sP.get_tensor(packed_smem_layout.outer, swizzle=packed_smem_layout.inner)
        # The consumers address the packed rows themselves (``packed_chunk_swizzle``): the same bytes
        # without the swizzle functor, so that the per-thread part of each address is loop-invariant.
        sP_rows = storage.sP.get_tensor(packed_smem_layout.outer)
        sSFA = storage.sSFA.get_tensor(sfa_smem_layout if self.fp8 else cute.make_layout(1))
        self.run_roles(tidx, warp_idx,
                       (tma_atom_a, mA, tma_atom_b, mB, tma_atom_sfa, mSFA, sA, sP, sSFA, mainloop, scheduler),
                       (tiled_mma, first_mma, sA, sP_rows, sSFA, mSFB, mD, mainloop, scheduler))

    @cute.jit
    def consumer(self, tiled_mma: cute.TiledMma, first_mma: cute.TiledMma, sA: cute.Tensor, sP: cute.Tensor,
                 sSFA: cute.Tensor, mSFB: cute.Tensor, mD: cute.Tensor, mainloop: pipeline.PipelineTmaAsync,
                 scheduler: GroupedTileScheduler, consumer_tidx: Int32, cluster_id: Int32):
        """Consumer warpgroups: per tile, the k-loop (``mainloop``) then the transposed store."""
        token_tile, tile_n, tile_k = self.tile_shape_mnk
        thr_mma, thr_c = self.mma_slices(tiled_mma, consumer_tidx)
        fragments = [tiled_mma.make_fragment_A(thr_mma.partition_shape_A((tile_n, tile_k)))
                     for _ in range(FRAGMENT_BUFFERS)]
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sA))
        accumulators = cute.make_rmem_tensor(thr_mma.partition_shape_C((tile_n, token_tile)), self.acc_dtype)
        block_acc = cute.make_rmem_tensor(accumulators.shape, self.acc_dtype) if self.fp8 else accumulators
        # (weight row, token) of each accumulator element; the thread's fragment rows are r0, r0 + 8.
        tCcC = thr_c.partition_C(cute.make_identity_tensor((tile_n, token_tile)))
        r0 = tCcC[0][0]
        # BF16: the prmt selector of the lane's gather; E4M3: the byte offset of its first halfword.
        lane = fragment_bits.gather_selector(consumer_tidx % QUAD, self.fp8)
        if cutlass.const_expr(self.fp8):
            lane = fragment_bits.e4m3_halfword_offsets(consumer_tidx % QUAD)[0]
        swizzle = self.packed_chunk_swizzle(r0)

        state, mma_state, release_state = self.consumer_states(3)
        if cutlass.const_expr(self.fp8):
            self.set_block_accumulate(tiled_mma, first_mma)
        else:
            tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
        cursor = scheduler.start(cluster_id)
        while scheduler.has_tile(cursor):
            tile = scheduler.tile(cursor)
            following = scheduler.next(cursor)
            if scheduler.has_tile(following):
                self.prefetch_exponent_rows(mSFB, scheduler.tile(following), r0)
            if tile.group >= 0:
                accumulators.fill(0.0)
                state, mma_state, release_state = self.mainloop(
                    tiled_mma, first_mma, fragments, tCrB, accumulators, block_acc, mainloop, state, mma_state,
                    release_state, sP, sSFA, mSFB, tCcC, r0, lane, swizzle, tile)
                if tile.rows_valid > 0 and tile.n_block * tile_n < self.n:
                    self.store_transposed(accumulators, tCcC, mD, tile)
            cursor = following

    @cute.jit
    def prefetch_exponent_rows(self, mSFB: cute.Tensor, tile: WorkTile, r0: Int32):
        """Ask L2 for the UE8M0 exponent rows (r0, r0 + 8) of ``tile`` (the next one) while this tile
        runs: its first k-block reads them at once, and they are the only operand not staged by TMA.
        A row's ``ceil(K/32)`` bytes span at most two 128-byte lines: its first and last byte's."""
        if tile.group >= 0:
            for h in cutlass.range_constexpr(ROW_HALVES):
                n = tile.n_block * self.tile_shape_mnk[1] + r0 + ROW_HALF * h
                if n < self.n:
                    row = mSFB[(n, None, tile.group)]
                    cute.arch.prefetch(row.iterator.llvm_ptr, cache_level="L2")
                    cute.arch.prefetch((row.iterator + (self.k_scale_blocks - 1)).llvm_ptr, cache_level="L2")

    @cute.jit
    def mainloop(self, tiled_mma, first_mma, fragments, tCrB, accumulators, block_acc, mainloop, state,
                 mma_state, release_state, sP: cute.Tensor, sSFA: cute.Tensor, mSFB: cute.Tensor, tCcC: cute.Tensor,
                 r0: Int32, lane: Int32, swizzle: Int32, tile: WorkTile):
        """All k-blocks of one tile. ``state``: the next stage to widen (one ahead of ``mma_state``);
        ``mma_state``: the stage whose WGMMAs are issued; ``release_state``: the next stage to release
        (FP8: ``mma_state``'s, released in the same step; BF16: one behind). Every branch on the step's
        place is static (``k_block_step``'s ``first`` / ``has_next`` / ``parity``): the first and the
        last k-blocks are peeled, the ones between run in pairs (fragment buffers 1, 0) plus one odd.
        The exponent words of k-block k live in ``words[:, k % 2]``, loaded one whole step before the
        widening that reads them (k-blocks 0 and 1 here, k + 2 in step k); those of a partial last
        k-block are read byte by byte here, once per tile (``tail_words``)."""
        words = cute.make_rmem_tensor((ROW_HALVES, FRAGMENT_BUFFERS + 1), Int32)  # + the tail words
        row_scales = cute.make_rmem_tensor((ROW_HALVES, FRAGMENT_BUFFERS), Float32)  # FP8: 2^(e_max - 127)
        n_first = tile.n_block * self.tile_shape_mnk[1] + r0
        self.load_tail_words(words, mSFB, n_first, tile.group)
        for buffer in cutlass.range_constexpr(FRAGMENT_BUFFERS):
            self.load_exponent_words(words, buffer, mSFB, Int32(buffer), n_first, tile.group)
        mainloop.consumer_wait(state)
        self.widen_k_block(fragments[0], sP, state.index, words, row_scales, 0, r0, lane, swizzle)
        state.advance()
        steps = (tiled_mma, first_mma, fragments, tCrB, accumulators, block_acc, mainloop)
        operands = (sP, sSFA, mSFB, words, row_scales, tCcC, r0, lane, swizzle, tile)
        last = self.k_tiles - 1
        state, mma_state, release_state = self.k_block_step(
            *steps, state, mma_state, release_state, *operands, Int32(0), 0, True, last > 0)
        middle = max(last - 1, 0)  # k-blocks 1 .. last - 1
        for pair in cutlass.range(middle // 2, unroll=1):
            for j in cutlass.range_constexpr(FRAGMENT_BUFFERS):
                state, mma_state, release_state = self.k_block_step(
                    *steps, state, mma_state, release_state, *operands, 1 + 2 * pair + j, (1 + j) % 2, False, True)
        if cutlass.const_expr(middle % 2 == 1):
            state, mma_state, release_state = self.k_block_step(
                *steps, state, mma_state, release_state, *operands, Int32(last - 1), (last - 1) % 2, False, True)
        if cutlass.const_expr(last > 0):
            state, mma_state, release_state = self.k_block_step(
                *steps, state, mma_state, release_state, *operands, Int32(last), last % 2, False, False)
        if cutlass.const_expr(not self.fp8):
            cute.nvgpu.warpgroup.wait_group(0)
            mainloop.consumer_release(release_state)
            release_state.advance()
        return state, mma_state, release_state

    @cute.jit
    def k_block_step(self, tiled_mma, first_mma, fragments, tCrB, accumulators, block_acc, mainloop, state,
                     mma_state, release_state, sP: cute.Tensor, sSFA: cute.Tensor, mSFB: cute.Tensor,
                     words: cute.Tensor, row_scales: cute.Tensor, tCcC: cute.Tensor, r0: Int32, lane: Int32,
                     swizzle: Int32, tile: WorkTile, k_tile: Int32, parity: cutlass.Constexpr[int],
                     first: cutlass.Constexpr[bool], has_next: cutlass.Constexpr[bool]):
        """K-block ``k_tile`` (its fragment and exponent words in buffer ``parity``, its stage
        ``mma_state``): issue its WGMMAs, load the exponent words of k-block ``k_tile + 2`` into
        buffer ``parity`` (its own were read when it was widened), widen k-block ``k_tile + 1`` (stage
        ``state``, when ``has_next``) into the other buffer, then BF16: retire block k-1
        (``wait_group(1)`` before the widening, which reuses its buffer) and release its stage (none
        when ``first``); FP8: wait for block k, promote it, release its stage."""
        current, following = fragments[parity], fragments[1 - parity]
        stage = mma_state.index
        num_mmas = cute.size(current, mode=[2])
        cute.nvgpu.warpgroup.fence()
        for kb in cutlass.range_constexpr(num_mmas):
            if cutlass.const_expr(self.fp8):
                mma = first_mma if kb == 0 else tiled_mma
                cute.gemm(mma, block_acc, current[(None, None, kb)], tCrB[(None, None, kb, stage)], block_acc)
            else:
                cute.gemm(tiled_mma, accumulators, current[(None, None, kb)], tCrB[(None, None, kb, stage)],
                          accumulators)
        cute.nvgpu.warpgroup.commit_group()
        if cutlass.const_expr(has_next):
            self.load_exponent_words(words, parity, mSFB, k_tile + 2, tile.n_block * self.tile_shape_mnk[1] + r0,
                                     tile.group)
        if cutlass.const_expr(not self.fp8):
            cute.nvgpu.warpgroup.wait_group(1)
            if cutlass.const_expr(not first):
                mainloop.consumer_release(release_state)
                release_state.advance()
        if cutlass.const_expr(has_next):
            mainloop.consumer_wait(state)
            self.widen_k_block(following, sP, state.index, words, row_scales, 1 - parity, r0, lane, swizzle)
            state.advance()
        if cutlass.const_expr(self.fp8):
            cute.nvgpu.warpgroup.wait_group(0)
            self.promote(accumulators, block_acc, sSFA, stage, row_scales, parity, tCcC)
            mainloop.consumer_release(release_state)
            release_state.advance()
        mma_state.advance()
        return state, mma_state, release_state

    @cute.jit
    def promote(self, accumulators: cute.Tensor, block_acc: cute.Tensor, sSFA: cute.Tensor, stage: Int32,
                row_scales: cute.Tensor, parity: cutlass.Constexpr[int], tCcC: cute.Tensor):
        """FP8: ``acc += block * sfa[token] * 2^(e_max[row] - 127)``. Elements 4j + c sit on row r0 and
        4j + 2 + c on row r0 + 8, both in token column ``tCcC[4j + c][1]``."""
        scale_lo = row_scales[(0, parity)]
        scale_hi = row_scales[(1, parity)]
        for j in cutlass.range_constexpr(cute.size(accumulators) // 4):
            for c in cutlass.range_constexpr(2):
                token_scale = sSFA[(tCcC[4 * j + c][1], 0, stage)]
                low, high = 4 * j + c, 4 * j + 2 + c
                accumulators[low] = accumulators[low] + block_acc[low] * (token_scale * scale_lo)
                accumulators[high] = accumulators[high] + block_acc[high] * (token_scale * scale_hi)

    @cute.jit
    def load_tail_words(self, words: cute.Tensor, mSFB: cute.Tensor, n_first: Int32, group: Int32):
        """When the last k-block holds fewer than ``blocks_per_k_tile`` exponents (K not a multiple of
        tile_k): its exponents of rows (n_first, n_first + 8), byte by byte (no byte past the row's
        ``ceil(K/32)`` is read), into ``words[h, TAIL_WORDS]`` (0 past N)."""
        blocks = self.blocks_per_k_tile
        if cutlass.const_expr(self.k_scale_blocks % blocks != 0):
            first_block = self.k_scale_blocks // blocks * blocks
            for h in cutlass.range_constexpr(ROW_HALVES):
                n = n_first + ROW_HALF * h
                word = Int32(0)
                if n < self.n:
                    for b in cutlass.range_constexpr(self.k_scale_blocks % blocks):
                        word = word | (Int32(mSFB[(n, first_block + b, group)]) & BYTE_MASK) << (BYTE_BITS * b)
                words[(h, TAIL_WORDS)] = word

    @cute.jit
    def load_exponent_words(self, words: cute.Tensor, buffer: cutlass.Constexpr[int], mSFB: cute.Tensor,
                            k_tile: Int32, n_first: Int32, group: Int32):
        """UE8M0 exponents of this thread's rows (n_first, n_first + 8) in k-block ``k_tile`` into
        ``words[h, buffer]``, byte b = 32-block b (0 past N or past the last k-block): one aligned
        4-byte (FP8) / 2-byte (BF16) load per row (rows are 16-byte aligned); a partial last k-block
        takes the tail words (``load_tail_words``)."""
        blocks = self.blocks_per_k_tile
        full_k_tiles = self.k_scale_blocks // blocks  # k-blocks whose exponents all lie inside K
        for h in cutlass.range_constexpr(ROW_HALVES):
            n = n_first + ROW_HALF * h
            words[(h, buffer)] = Int32(0)
            if n < self.n and k_tile < full_k_tiles:
                row = cute.make_rmem_tensor((blocks,), cutlass.Uint8)
                cute.autovec_copy(cute.local_tile(mSFB[(n, None, group)], (blocks,), (k_tile,)), row)
                # Bytes past the k-block's (BF16: 2, 3) are never read (``widen_k_block``).
                words[(h, buffer)] = Int32(cute.recast_tensor(row, EXPONENT_WORD_TYPES[blocks])[0])
            if cutlass.const_expr(self.k_scale_blocks % blocks != 0):
                if k_tile == full_k_tiles:
                    words[(h, buffer)] = words[(h, TAIL_WORDS)]

    @cute.jit
    def widen_k_block(self, fragment: cute.Tensor, sP: cute.Tensor, stage: Int32, words: cute.Tensor,
                      row_scales: cute.Tensor, parity: cutlass.Constexpr[int], r0: Int32, lane: Int32,
                      swizzle: Int32):
        """Widen this thread's A fragment of one k-block from the packed stage (``sP`` without its
        swizzle functor, chunks located by ``swizzle``): per row half and 32-block, the lane's four code
        bytes (``widen_block``), then the byte-permute tables (exact FP32 path outside their range);
        ``lane``: BF16 the gather's prmt selector, E4M3 the byte offset of the lane's first halfword
        in a block. The exponents are the bytes of
        ``words[:, parity]``; FP8 also records ``2^(e_max - 127)`` per row in ``row_scales[:, parity]``.
        Rows past N and blocks past K read zeros (TMA fill) with exponent 0."""
        blocks = self.blocks_per_k_tile
        out = cute.recast_tensor(fragment, Int32)
        for h in cutlass.range_constexpr(ROW_HALVES):
            exponents = [prmt(words[(h, parity)], 0, ZERO_EXTEND_BYTE | b) for b in range(blocks)]
            e_max = exponents[0]
            e_min = exponents[0]
            for b in cutlass.range_constexpr(1, blocks):
                e_max = cutlass.max(e_max, exponents[b])
                e_min = cutlass.min(e_min, exponents[b])
            if cutlass.const_expr(self.fp8):
                row_scales[(h, parity)] = self.pow2(e_max)
                row_fast = e_min - e_max >= widen_bits.E4M3_MIN_SHIFT
            else:
                row_fast = e_min >= widen_bits.BF16_MIN_EXP and e_max <= widen_bits.BF16_MAX_EXP
            # One branch per row: every block of the row on the byte-permute path (the common case), or
            # a per-block choice with the exact FP32 path.
            if row_fast:
                for b in cutlass.range_constexpr(blocks):
                    self.widen_block(out, sP, stage, exponents[b], e_max, r0, lane, swizzle, h, b, False)
            else:
                for b in cutlass.range_constexpr(blocks):
                    self.widen_block(out, sP, stage, exponents[b], e_max, r0, lane, swizzle, h, b, True)

    @cute.jit
    def widen_block(self, words: cute.Tensor, sP: cute.Tensor, stage: Int32, exponent: Int32, e_max: Int32,
                    r0: Int32, lane: Int32, swizzle: Int32, h: cutlass.Constexpr[int],
                    b: cutlass.Constexpr[int], checked: cutlass.Constexpr[bool]):
        """The thread's codes of 32-block ``b`` of row ``r0 + 8 h`` (UE8M0 ``exponent``) into its
        fragment words ``words``: the lane's four code bytes (E4M3: two 2-byte shared loads of its
        halfwords; BF16: one 16-byte load and a ``prmt`` gather), byte-permute widening; with
        ``checked`` the block's exponent picks that path or the exact FP32 one (without, the caller
        knows it is in range)."""
        row = sP[(r0 + ROW_HALF * h, None, stage)]
        if cutlass.const_expr(self.fp8):
            halves = []
            for k_half in cutlass.range_constexpr(2):
                half = cute.make_rmem_tensor((HALFWORD_BYTES,), cutlass.Uint8)
                block_start = (b ^ swizzle) * fragment_bits.MX_BLOCK_BYTES
                start = block_start + lane + k_half * fragment_bits.HIGH_HALF_BYTES  # even
                cute.autovec_copy(cute.local_tile(row, (HALFWORD_BYTES,), (start // HALFWORD_BYTES,)), half)
                halves.append(Int32(cute.recast_tensor(half, cutlass.Uint16)[0]))
            gathered = fragment_bits.combine_halfwords(halves[0], halves[1], prmt)
        else:
            packed = cute.make_rmem_tensor((fragment_bits.MX_BLOCK_BYTES,), cutlass.Uint8)
            cute.autovec_copy(cute.local_tile(row, (fragment_bits.MX_BLOCK_BYTES,), (b ^ swizzle,)), packed)
            packed_words = cute.recast_tensor(packed, Int32)
            gathered = fragment_bits.gather(
                (packed_words[0], packed_words[1], packed_words[2], packed_words[3]), lane, prmt)
        if cutlass.const_expr(self.fp8):
            exponent = exponent - e_max  # the block's shift 2^(e - e_max), <= 0
        out_words = 2 if self.fp8 else 4
        widened = cute.make_rmem_tensor((out_words,), Int32)
        if cutlass.const_expr(checked):
            fast = exponent >= widen_bits.E4M3_MIN_SHIFT
            if cutlass.const_expr(not self.fp8):
                fast = exponent >= widen_bits.BF16_MIN_EXP and exponent <= widen_bits.BF16_MAX_EXP
            if fast:
                self.widen_block_fast(gathered, widened, exponent)
            else:
                self.widen_word_exact(gathered, widened, exponent)
        else:
            self.widen_block_fast(gathered, widened, exponent)
        for i in cutlass.range_constexpr(out_words):
            words[fragment_bits.fragment_word(b, i, h, self.fp8)] = widened[i]

    @cute.jit
    def widen_block_fast(self, gathered: Int32, widened: cute.Tensor, exponent: Int32):
        """Byte-permute widening of 8 codes: E4M3 with the block's shifted tables; BF16 with constant
        tables (the values themselves), then one exact BF16x2 multiply by 2^(e - 127) per word."""
        if cutlass.const_expr(self.fp8):
            first, second = widen_bits.e4m3_words(gathered, widen_bits.e4m3_tables(exponent), prmt)
            widened[0] = first
            widened[1] = second
        else:
            values = widen_bits.bf16_words(gathered, widen_bits.BF16_UNIT_TABLES, prmt)
            scale = widen_bits.bf16x2_scale(exponent)
            for i in cutlass.range_constexpr(4):
                widened[i] = mul_bf16x2(values[i], scale)

    def packed_chunk_swizzle(self, r0: Int32) -> Int32:
        """Where TMA's swizzle put the 16-byte chunks of this thread's packed rows: logical chunk b of row
        r sits at chunk ``b ^ ((r * packed_k / 128) mod chunks)`` (64-byte rows: ``(r >> 1) & 3``,
        32-byte rows: ``(r >> 2) & 1``). Rows r0 and r0 + 8 share the value (8 rows are a multiple of
        the swizzle period in rows), and stage bases are multiples of the swizzle period (256 / 512 B)."""
        chunks = self.packed_k // fragment_bits.MX_BLOCK_BYTES
        return (r0 * self.packed_k // SWIZZLE_SPAN_BYTES) % chunks

    @cute.jit
    def widen_word_exact(self, word: Int32, out: cute.Tensor, exponent: Int32):
        """Exact path for 8 codes (nibble i = element i): each placed as FP32 ``value * 2^-126``, scaled
        without flush-to-zero and rounded once (``exponent``: FP8 the block shift, BF16 the UE8M0 one)."""
        shift = exponent
        if cutlass.const_expr(self.fp8):
            shift = exponent + FP32_BIAS + E2M1_RAW_SHIFT  # value * 2^(e - e_max)
        scale = self.pow2(shift)
        bits = cute.make_rmem_tensor((CODES_PER_WORD,), Int32)
        for i in cutlass.range_constexpr(CODES_PER_WORD):
            code = (word >> (4 * i)) & (E2M1_MAG_MASK | E2M1_SIGN_BIT)
            bits[i] = (code & E2M1_MAG_MASK) << E2M1_MAG_SHIFT | (code & E2M1_SIGN_BIT) << FP32_SIGN_SHIFT
        values = cute.recast_tensor(bits, Float32).load()
        if cutlass.const_expr(not self.fp8):
            values = values * Float32(2.0 ** E2M1_RAW_SHIFT)  # exact, normal results
        narrow = cute.make_rmem_tensor((CODES_PER_WORD,), self.ab_dtype)
        narrow.store((values * scale).to(self.ab_dtype))
        narrow_words = cute.recast_tensor(narrow, Int32)
        for i in cutlass.range_constexpr(cute.size(out)):
            out[i] = narrow_words[i]

    @cute.jit
    def store_transposed(self, accumulators: cute.Tensor, tCcC: cute.Tensor, mD: cute.Tensor, tile: WorkTile):
        """D[token, n] = acc[n, token] from registers, for tokens < rows_valid and n < N (no shared
        memory: decode tiles are a few KB)."""
        n_base = tile.n_block * self.tile_shape_mnk[1]
        for i in cutlass.range_constexpr(cute.size(accumulators)):
            n_local, token = tCcC[i]
            n = n_base + n_local
            if token < tile.rows_valid and n < self.n:
                mD[(tile.row_start + token, n)] = self.d_dtype(accumulators[i])
