"""SM90 Mega MoE with MXFP4 expert weights (FP8 x FP4): ``kernels/mega_moe.py``'s kernel, B widened on chip.

Everything but the GEMM engine is the FP8 kernel's (phases, row pulls, epilogues, reduction). Both
GEMMs' weights stay MXFP4 in global memory: packed E2M1 codes ``[L, N, K/2]`` uint8 (element 2i in
the low nibble) and, per row and 128-K block, one int32 word of its four UE8M0 exponents
``[L, K/128, N]`` (byte j: the exponent of 32-element block j; a k-block's words of consecutive rows
are contiguous, so a warp's loads of them coalesce). Per k-block the TMA producer loads A,
A's row scales and the packed B tile (``256 x 64`` bytes, unswizzled) into the stage ring; the
consumer warpgroups widen the packed tile into one of ``WIDE_BUFFERS`` swizzled E4M3 tiles
(``kernels/sm90/fp4_widen.py``: per row the block's largest exponent ``e_max`` is factored out), one
64-row N part (``PART_N``) at a time, each while the WGMMAs of the same part of the current block
run (64-wide parts keep the block accumulator at 32 registers: no spills beside the 128-register
tile accumulator):

    block k, part p = 0..3:  WGMMA part p of k | (p = 0: await k+1's stage) widen part p of k+1 |
                             wait, (p = 3: release k's stage) promote part p
    then: proxy fence + named barrier: block k+1 widened by every consumer thread

Promotion: ``acc[part] += block_acc * sfa[row] * 2^(e_max[col] - 127)`` (the column's ``e_max`` kept
per widened buffer in ``sRS``). Each consumer thread loads the exponent words of its widening items
from global memory a whole block ahead: a part's words of block k+2 right after widening that part
of block k+1, into the same registers.

Two widened buffers suffice: block k+1 is written into the buffer of block k-1, whose WGMMAs and
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

from cute_moe.mega_moe_layout import SCALE_BLOCK, TILE_N, MegaMoEGeometry

from .mega_moe import Sm90MegaMoE
from .scheduler import WorkTile
from .sm90 import fp4_widen_bits as widen_bits
from .sm90.fp4_widen import BYTE_MASK, MX_BLOCK, SWIZZLE_ALIGN_BYTES, WIDEN_BARRIER_ID, E2m1Widening
from .sm90.grouped_gemm import EPI_N, EPI_STAGES, ROW_HALF, STAGE_ALIGN_BYTES, TMA_ALIGN_BYTES

WIDE_BUFFERS = 2  # widened B tiles (see the module docstring)
PART_N = 64  # weight rows (output columns) of one WGMMA part
BLOCKS_PER_K_TILE = SCALE_BLOCK // MX_BLOCK  # exponents per row per 128-K block (bytes of one word)
BYTE_BITS = 8
ROW_SCALE_BYTES = 4  # one FP32 2^(e_max - 127) per widened row
# Shared-memory regions aligned beyond what SMEM_RESERVED_BYTES covers: A, the widened tiles, D.
ALIGNMENT_SLACK_BYTES = 2 * SWIZZLE_ALIGN_BYTES


class Sm90Fp4MegaMoE(E2m1Widening, Sm90MegaMoE):
    """Compile-time configuration of the FP8 x FP4 Mega MoE kernel of one geometry (see the module
    docstring); the geometry's ``fp4`` is set."""

    def __init__(self, geom: MegaMoEGeometry, clamp: bool, block_m: int):
        super().__init__(geom, clamp, block_m)
        # 64-wide WGMMA parts: a 32-register block accumulator leaves the widening registers.
        self.mma_tile_n = PART_N
        self.n_parts = TILE_N // PART_N
        self.b_tile_k = self.tile_shape_mnk[2] // 2  # packed bytes of a k-block row
        self.widen_barrier = pipeline.NamedBarrier(barrier_id=WIDEN_BARRIER_ID, num_threads=self.num_consumer_threads)
        # Widening items of one N part (64 rows x 4 blocks), dealt round-robin: item = thread + round *
        # threads; the thread count is a multiple of 4, so every item of a thread has block thread % 4.
        self.widen_rounds = PART_N * BLOCKS_PER_K_TILE // self.num_consumer_threads
        # B's exponent words of either GEMM as one (N, K blocks, L) view (K-block-major) with runtime strides.
        self.sfb_rows = max(2 * geom.intermediate, geom.hidden)
        self.sfb_n = (2 * geom.intermediate, geom.hidden)

    # ------------------------------------------------------------------ trace time
    def _setup(self, d_dtype):
        super()._setup(d_dtype)
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        stage_bytes = tile_m * tile_k + tile_n * self.b_tile_k + self.stage_scale_bytes()
        wide_bytes = WIDE_BUFFERS * tile_n * (tile_k + ROW_SCALE_BYTES)
        epi_bytes = tile_m * EPI_N * self.stage_dtype.width // 8 * EPI_STAGES
        self.stages = self.stage_count(stage_bytes, wide_bytes + epi_bytes + ALIGNMENT_SLACK_BYTES)
        self.a_smem_layout = self._operand_smem_layout("k", tile_m)
        self.b_smem_layout = cute.make_layout((tile_n, self.b_tile_k, self.stages),
                                              stride=(self.b_tile_k, 1, tile_n * self.b_tile_k))
        self.sfa_smem_layout = self.scale_smem_layout(tile_m)
        self.wide_smem_layout = self.make_wide_layout()

    def make_wide_layout(self) -> cute.ComposedLayout:
        """(tile_n, tile_k, WIDE_BUFFERS) swizzled K-major E4M3 tiles (what WGMMA reads as B)."""
        tile_n, tile_k = self.tile_shape_mnk[1], self.tile_shape_mnk[2]
        atom = cute.nvgpu.warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, self.ab_dtype, tile_k), self.ab_dtype)
        return cute.tile_to_shape(atom, (tile_n, tile_k, WIDE_BUFFERS), order=(0, 1, 2))

    def shared_storage_type(self, scale_buffers: dict[str, int]):
        """Barriers, segment table, A stages, packed B stages, A's row scales, the widened tiles and
        their row scales, the epilogue's buffers."""
        tile_n = self.tile_shape_mnk[1]
        return self.storage_struct(
            sA=(self.ab_dtype, cute.cosize(self.a_smem_layout), STAGE_ALIGN_BYTES),
            sB=(cutlass.Uint8, cute.cosize(self.b_smem_layout), TMA_ALIGN_BYTES),
            sSFA=(Float32, cute.cosize(self.sfa_smem_layout), TMA_ALIGN_BYTES),
            sW=(self.ab_dtype, cute.cosize(self.wide_smem_layout), SWIZZLE_ALIGN_BYTES),
            sRS=(Float32, tile_n * WIDE_BUFFERS, TMA_ALIGN_BYTES),
            sD=(self.stage_dtype, cute.cosize(self.epi_smem_layout), STAGE_ALIGN_BYTES))

    def weight_view(self, weights: cute.Tensor) -> cute.Tensor:
        """Packed weights ``[L, N, K/2]`` uint8 as (N, K/2, L)."""
        return cute.make_tensor(weights.iterator, cute.select(weights.layout, mode=[1, 2, 0]))

    def ab_load_atoms(self, mA: cute.Tensor, mB: cute.Tensor) -> tuple:
        """TMA atoms and tensors of one stage's A k-block and packed B k-block (no multicast)."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        tma_atom_a, tma_a = self._make_load_atom(mA, self.a_smem_layout, (tile_m, tile_k), 1)
        tma_atom_b, tma_b = self._make_load_atom(mB, self.b_smem_layout, (tile_n, self.b_tile_k), 1)
        return tma_atom_a, tma_a, tma_atom_b, tma_b

    # ------------------------------------------------------------------ device code
    def shared_tensors(self, storage, a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.Layout,
                       sfa_smem_layout: cute.Layout, epi_smem_layout: cute.ComposedLayout) -> dict:
        """The FP8 kernel's tensors (``sB``: the packed stages) plus the widened tiles ``sW`` and their
        row scales ``sRS`` (tile_n, WIDE_BUFFERS)."""
        wide_layout = self.make_wide_layout()
        return {"sA": storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner),
                "sB": storage.sB.get_tensor(b_smem_layout),
                "sSFA": storage.sSFA.get_tensor(sfa_smem_layout),
                "sD": storage.sD.get_tensor(epi_smem_layout.outer, swizzle=epi_smem_layout.inner),
                "sW": storage.sW.get_tensor(wide_layout.outer, swizzle=wide_layout.inner),
                "sRS": storage.sRS.get_tensor(cute.make_layout((TILE_N, WIDE_BUFFERS), stride=(1, TILE_N)))}

    def mma_b_source(self, smem: dict) -> cute.Tensor:
        """WGMMA reads B from the widened tiles."""
        return smem["sW"]

    @cute.jit
    def multiply_tile(self, tiled_mma, tCrA, tCrB, tCrB_parts, accumulators, block_acc,
                      num_k_blocks: cutlass.Constexpr[int], mainloop, state, release_state, wide: Int32, smem: dict,
                      sfb_addr: Int64, sfb_n: Int32, sfb_k: Int32, tCcC: cute.Tensor, r0: Int32, tile: WorkTile,
                      k_tiles: Int32, consumer_tidx: Int32):
        """All k-blocks of one tile (see the module docstring): ``state`` is the next stage to widen,
        ``release_state`` the stage being multiplied; block 0 is widened first, the last block is
        multiplied without widening. ``sfb_addr``: the exponent words, ``sfb_k`` k-blocks of ``sfb_n``
        rows per expert. Returns the ring states and ``wide`` advanced by ``k_tiles``."""
        mE = cute.make_tensor(cute.make_ptr(Int32, sfb_addr, cute.AddressSpace.gmem, assumed_align=4),
                              cute.make_layout((self.sfb_rows, self.sfb_cols, self.g.local_experts),
                                               stride=(1, sfb_n, sfb_n * sfb_k)))
        # Plain locals, not the dict, enter the loops (the tracer would thread the dict's tensors), and
        # two WGMMA configurations set once (a block's first WGMMA overwrites, the others add).
        sP, sW, sRS, sSFA = smem["sB"], smem["sW"], smem["sRS"], smem["sSFA"]
        first_mma, block_mma = self.make_tiled_mma(), self.make_tiled_mma()
        self.set_block_accumulate(block_mma, first_mma)
        words = cute.make_rmem_tensor((self.n_parts * self.widen_rounds,), Int32)
        for part in cutlass.range_constexpr(self.n_parts):
            self.load_words(words, mE, Int32(0), k_tiles, tile, part, consumer_tidx)
        buffer = wide % WIDE_BUFFERS
        mainloop.consumer_wait(state)
        for part in cutlass.range_constexpr(self.n_parts):
            self.widen_part(sP, sW, sRS, words, state.index, buffer, part, consumer_tidx)
            self.load_words(words, mE, Int32(1), k_tiles, tile, part, consumer_tidx)
        state.advance()
        self.publish_widened()
        for k_tile in cutlass.range(k_tiles - 1, unroll=1):
            next_buffer = (wide + 1) % WIDE_BUFFERS
            self.multiply_block(block_mma, first_mma, tCrA, tCrB_parts, accumulators, block_acc, num_k_blocks, mainloop,
                                state, release_state, sP, sW, sRS, sSFA, words, tCcC, r0, buffer, next_buffer, True,
                                consumer_tidx, mE, tile, k_tile + 2, k_tiles)
            state.advance()
            release_state.advance()
            self.publish_widened()
            wide = wide + 1
            buffer = next_buffer
        self.multiply_block(block_mma, first_mma, tCrA, tCrB_parts, accumulators, block_acc, num_k_blocks, mainloop,
                            state, release_state, sP, sW, sRS, sSFA, words, tCcC, r0, buffer, buffer, False,
                            consumer_tidx, mE, tile, k_tiles, k_tiles)
        release_state.advance()
        return state, release_state, wide + 1

    @cute.jit
    def multiply_block(self, block_mma, first_mma, tCrA, tCrB_parts, accumulators, block_acc,
                       num_k_blocks: cutlass.Constexpr[int], mainloop, state, release_state, sP: cute.Tensor,
                       sW: cute.Tensor, sRS: cute.Tensor, sSFA: cute.Tensor, words: cute.Tensor, tCcC: cute.Tensor,
                       r0: Int32, buffer: Int32, next_buffer: Int32, widen_next: cutlass.Constexpr[bool],
                       consumer_tidx: Int32, mE: cute.Tensor, tile: WorkTile, words_k_tile: Int32, k_tiles: Int32):
        """One k-block (stage ``release_state``, widened buffer ``buffer``), part by part: issue the
        part's WGMMAs, widen the same part of the next block (stage ``state`` into ``next_buffer``)
        when ``widen_next`` and load that part's exponent words of k-block ``words_k_tile`` into the
        registers just read (a whole block ahead of their use), wait, promote; the stage is released
        after the last part's WGMMAs."""
        scale_lo = sSFA[(r0, 0, release_state.index)]
        scale_hi = sSFA[(r0 + ROW_HALF, 0, release_state.index)]
        part_values = cute.size(block_acc)
        for part in cutlass.range_constexpr(self.n_parts):
            self.mma_fp8_block(block_mma, first_mma, tCrA, tCrB_parts[part], block_acc, num_k_blocks,
                               release_state.index, buffer)
            if cutlass.const_expr(widen_next):
                if cutlass.const_expr(part == 0):
                    mainloop.consumer_wait(state)  # the next block's stage, waited on while part 0 multiplies
                self.widen_part(sP, sW, sRS, words, state.index, next_buffer, part, consumer_tidx)
                self.load_words(words, mE, words_k_tile, k_tiles, tile, part, consumer_tidx)
            cute.nvgpu.warpgroup.wait_group(0)
            if cutlass.const_expr(part == self.n_parts - 1):
                mainloop.consumer_release(release_state)
            # Elements 4j + c sit on row r0 and 4j + 2 + c on row r0 + ROW_HALF, both in column tCcC[4j + c].
            for j in cutlass.range_constexpr(part_values // 4):
                for c in cutlass.range_constexpr(2):
                    low = part * part_values + 4 * j + c
                    column_scale = sRS[(tCcC[low][1], buffer)]
                    accumulators[low] = accumulators[low] + block_acc[4 * j + c] * (scale_lo * column_scale)
                    accumulators[low + 2] = (accumulators[low + 2]
                                             + block_acc[4 * j + 2 + c] * (scale_hi * column_scale))

    @cute.jit
    def load_words(self, words: cute.Tensor, mE: cute.Tensor, k_tile: Int32, k_tiles: Int32, tile: WorkTile,
                   part: cutlass.Constexpr[int], consumer_tidx: Int32):
        """This thread's exponent words of N part ``part`` of k-block ``k_tile`` (nothing past the
        tile's last k-block): one per widening item, the word of the item's row."""
        if k_tile < k_tiles:
            for round_ in cutlass.range_constexpr(self.widen_rounds):
                item = consumer_tidx + round_ * self.num_consumer_threads
                n = tile.n_block * TILE_N + part * PART_N + item // BLOCKS_PER_K_TILE
                words[part * self.widen_rounds + round_] = mE[(n, k_tile, tile.group)]

    @cute.jit
    def widen_part(self, sP: cute.Tensor, sW: cute.Tensor, sRS: cute.Tensor, words: cute.Tensor, stage: Int32,
                   buffer: Int32, part: cutlass.Constexpr[int], consumer_tidx: Int32):
        """Widen rows ``[64 part, 64 part + 64)`` of the packed tile of ``stage`` into widened buffer
        ``buffer``: per item the E4M3 values ``value * 2^(e - e_max)`` and, by the item of block 0,
        the row's ``2^(e_max - 127)``."""
        b = consumer_tidx % BLOCKS_PER_K_TILE
        for round_ in cutlass.range_constexpr(self.widen_rounds):
            item = consumer_tidx + round_ * self.num_consumer_threads
            n = part * PART_N + item // BLOCKS_PER_K_TILE
            word = words[part * self.widen_rounds + round_]
            e_max = word & BYTE_MASK
            for j in cutlass.range_constexpr(1, BLOCKS_PER_K_TILE):
                e_max = cutlass.max(e_max, (word >> (BYTE_BITS * j)) & BYTE_MASK)
            shift = ((word >> (BYTE_BITS * b)) & BYTE_MASK) - e_max  # the block shift e - e_max, <= 0
            if b == 0:
                sRS[(n, buffer)] = self.pow2(e_max)
            self.widen_item(sP, sW, stage, buffer, n, b, shift, shift >= widen_bits.E4M3_MIN_SHIFT)

    @cute.jit
    def publish_widened(self):
        """Make this thread's widened values visible to WGMMA (async proxy) and meet the other consumers."""
        cute.arch.fence_view_async_shared()
        self.widen_barrier.arrive_and_wait()
