"""SM90 grouped GEMM with MXFP4 weights: D = A . dequant(B)^T, B widened in shared memory.

Hopper has no FP4 tensor-core path. B (the weights) stays MXFP4 in global memory — E2M1 codes
packed two per byte (``[(G,) N, K/2]`` uint8, element 2i in the low nibble) and one UE8M0 exponent
per 32 K (``[(G,) N, ceil(K/32)]`` uint8, rows 16-byte aligned) — and is widened on chip:

- BF16 x FP4 (A BF16): each element becomes ``value(code) * 2^(e - 127)`` in BF16, exact (BF16 has
  FP32's exponent range), so the FP32 accumulation equals the product of the dequantized operands up
  to accumulation order.
- FP8 x FP4 (A E4M3 with FP32 scales per row per 128 K): per 128-K block and weight row n, the
  largest of the row's four exponents ``e_max`` is factored out; each element becomes the E4M3 value
  ``value(code) * 2^(e - e_max)`` (exact while ``e - e_max >= -8``, else rounded to E4M3's subnormal
  grid, an absolute error of at most ``2^-10 * 2^(e_max - 127)`` per weight), and
  ``sfa[row] * 2^(e_max - 127)`` is applied when the 128-K block accumulator is promoted to FP32.

Roles (one CTA, ``128 * (1 + tile_m // 64)`` threads, cluster 1x1):
- warp 0: walks the tile schedule (``kernels/scheduler.py`` seam) and issues TMA loads of the A
  k-block (swizzled), of B's packed bytes (``tile_n x tile_k/2``, unswizzled) and, FP8, of A's scales
  into a ``stages``-deep ring (``PipelineTmaAsync``).
- ``tile_m // 64`` consumer warpgroups: per k-block, every consumer thread widens part of the packed
  tile (its rows' exponents read from global memory) into one of ``WIDE_BUFFERS`` swizzled BF16/E4M3
  tiles, fences the generic-proxy writes for the async proxy, meets the other consumers at a named
  barrier, then issues the WGMMAs (A and the widened B from shared memory). Widening works on whole
  32-bit words: byte-permute lookups of per-block tables (``fp4_widen_bits``), with an exact FP32
  path for the blocks outside the tables' range. Both pairs widen block k+1 while block k's WGMMAs
  run: BF16 keeps one WGMMA group in flight; FP8 issues block k, widens block k+1, then waits for
  block k and promotes it. The epilogue is the grouped GEMM's (``Sm90GroupedGemm.store_tile``),
  predicated on the tile's group rows.

Widened-buffer reuse: block w is written into buffer ``w % 3`` after the barrier of block w-1, which
every consumer reaches only after ``wait_group`` retired its WGMMAs of block w-3 (BF16: the
``wait_group(1)`` after issuing block w-2; FP8: the ``wait_group(0)`` and the promotion, which reads
the buffer's column scales, of block w-3, both before widening block w-1): three buffers make one
barrier per k-block enough.
"""

from typing import Optional, Type

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass.memory import SmemAllocator
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait
from cutlass.tensor_utils import LayoutEnum

from ..grouped_schedulers import GroupedTileScheduler
from ..scheduler import WorkTile
from .grouped_gemm import (CONSUMER_REGS, EPI_N, EPI_STAGES, PRODUCER_REGS, ROW_HALF, ROWS_PER_CONSUMER_WARPGROUP,
                           SFA_BYTES, THREADS_PER_WARPGROUP, TMA_ALIGN_BYTES, WARPS_PER_WARPGROUP, Sm90GroupedGemm)
from . import fp4_widen_bits as widen_bits
from .fp4_widen import BYTE_MASK, MX_BLOCK, SWIZZLE_ALIGN_BYTES, WIDEN_BARRIER_ID, E2m1Widening

WIDE_BUFFERS = 3  # widened B tiles in flight (see the module docstring)


class Sm90Fp4GroupedGemm(E2m1Widening, Sm90GroupedGemm):
    """Compile-time configuration of one FP4-weight specialization (see the module docstring).

    ``fp8`` selects FP8 x FP4 (tile_k 128) or BF16 x FP4 (tile_k 64); kinds: dense, contiguous, psum,
    masked; the cluster is 1x1 (no multicast)."""

    def __init__(self, kind: str, fp8: bool, tile_m: int, tile_n: int, stages: int, panel: int, n: int, k: int,
                 has_c: bool, alignment: int = 0):
        super().__init__(kind, fp8, tile_m, tile_n, 1, 1, stages, panel, n, k, has_c, alignment)
        self.k_scale_blocks = -(-k // MX_BLOCK)
        self.widen_barrier = pipeline.NamedBarrier(barrier_id=WIDEN_BARRIER_ID,
                                                   num_threads=self.num_consumer_threads)

    # ------------------------------------------------------------------ host-side (trace time) setup
    def _setup(self, d_dtype: Type[cutlass.Numeric]):
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        self.ab_dtype = cutlass.Float8E4M3FN if self.fp8 else cutlass.BFloat16
        self.d_dtype = d_dtype
        self.stage_dtype = self.acc_dtype if self.has_c else d_dtype
        k_major = cute.nvgpu.OperandMajorMode.K
        # FP8 issues each block's first WGMMA with ``first_mma`` (ACCUMULATE off) and the rest with
        # ``tiled_mma`` (on): both are set once per kernel, outside the loops.
        self.tiled_mma, self.first_mma = (sm90_utils.make_trivial_tiled_mma(
            self.ab_dtype, self.ab_dtype, k_major, k_major, self.acc_dtype,
            (self.num_consumer_wgs, 1, 1), tiler_mn=(ROWS_PER_CONSUMER_WARPGROUP, tile_n)) for _ in range(2))
        self.num_mcast_a = 1
        self.num_mcast_b = 1
        self.cta_layout_mnk = cute.make_layout((1, 1, 1))
        self.packed_k = tile_k // 2

        stage_bytes = tile_m * tile_k * self.ab_dtype.width // 8 + tile_n * self.packed_k
        stage_bytes += tile_m * SFA_BYTES if self.fp8 else 0
        wide_bytes = WIDE_BUFFERS * tile_n * (tile_k * self.ab_dtype.width // 8 + (4 if self.fp8 else 0))
        epi_bytes = tile_m * EPI_N * self.stage_dtype.width // 8 * EPI_STAGES
        self.stages = self.stage_count(stage_bytes, epi_bytes + wide_bytes)

        row_major = LayoutEnum.ROW_MAJOR
        ab_atom = self.k_major_atom()
        self.a_smem_layout = cute.tile_to_shape(ab_atom, (tile_m, tile_k, self.stages), order=(0, 1, 2))
        self.wide_smem_layout = cute.tile_to_shape(ab_atom, (tile_n, tile_k, WIDE_BUFFERS), order=(0, 1, 2))
        self.packed_smem_layout = cute.make_layout(
            (tile_n, self.packed_k, self.stages), stride=(self.packed_k, 1, tile_n * self.packed_k))
        self.row_scale_layout = cute.make_layout((tile_n, WIDE_BUFFERS), stride=(1, tile_n))
        self.sfa_smem_layout = cute.make_layout((tile_m, 1, self.stages), stride=(1, tile_m, tile_m))
        epi_atom = cute.nvgpu.warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(row_major, self.stage_dtype, EPI_N), self.stage_dtype)
        self.epi_smem_layout = cute.tile_to_shape(epi_atom, (*self.epi_tile, EPI_STAGES), order=(0, 1, 2))

    def k_major_atom(self):
        """The swizzled K-major shared-memory atom of one ``tile_k`` row of ``ab_dtype`` (128 bytes)."""
        return cute.nvgpu.warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, self.ab_dtype, self.tile_shape_mnk[2]),
            self.ab_dtype)

    @cute.jit
    def __call__(self, mA: cute.Tensor, mB: cute.Tensor, mD: cute.Tensor, mC: Optional[cute.Tensor],
                 mSFA: Optional[cute.Tensor], mSFB: cute.Tensor, mGroup: Optional[cute.Tensor],
                 max_clusters: Int32, stream):
        """Launch: A/D ``[rows, K]``/``[rows, N]`` (masked ``[G, Mmax, K]``/``[G, Mmax, N]``), FP8 A as
        uint8 with SFA MN-major ``[rows, K/128]`` (masked ``[G, Mmax, K/128]``); B packed uint8
        ``[(G,) N, K/2]``; SFB UE8M0 uint8 ``[(G,) N, ceil(K/32)]`` K-major; ``mGroup`` as the grouped
        GEMM's."""
        mD, mSFB, rows, atoms = self.launch_operands(mA, mB, mD, mSFA, mSFB, mGroup)
        self.shared_storage = self.storage_struct(
            sA=(self.ab_dtype, cute.cosize(self.a_smem_layout), SWIZZLE_ALIGN_BYTES),
            sW=(self.ab_dtype, cute.cosize(self.wide_smem_layout), SWIZZLE_ALIGN_BYTES),
            sP=(cutlass.Uint8, cute.cosize(self.packed_smem_layout), TMA_ALIGN_BYTES),
            sSFA=(Float32, cute.cosize(self.sfa_smem_layout) if self.fp8 else 1, TMA_ALIGN_BYTES),
            sRS=(Float32, cute.cosize(self.row_scale_layout) if self.fp8 else 1, TMA_ALIGN_BYTES),
            sD=(self.stage_dtype, cute.cosize(self.epi_smem_layout), SWIZZLE_ALIGN_BYTES))
        self.launch_persistent(
            self.kernel(*atoms, mSFB, mD, mC, mGroup, rows, self.tiled_mma, self.first_mma, self.a_smem_layout,
                        self.wide_smem_layout, self.packed_smem_layout, self.sfa_smem_layout, self.row_scale_layout,
                        self.epi_smem_layout),
            max_clusters, rows, stream)

    # ------------------------------------------------------------------ launch helpers (both FP4 kernels)
    def launch_operands(self, mA: cute.Tensor, mB: cute.Tensor, mD: cute.Tensor, mSFA: Optional[cute.Tensor],
                        mSFB: cute.Tensor, mGroup: Optional[cute.Tensor]):
        """``_setup`` for D's type, then the kernels' views of the launch operands (FP8 A as E4M3; masked
        A and D as 2-D row spaces; B and SFB as (N, K/2 | K/32, G), dense with a unit G mode). Returns
        D, SFB, the row-space facts ``(max_m, num_groups, num_experts, total_rows)`` and the TMA atoms
        (``load_atoms``)."""
        self._setup(mD.element_type)
        if cutlass.const_expr(self.fp8):
            mA = cute.recast_tensor(mA, self.ab_dtype)
        max_m = Int32(0)
        num_groups = Int32(1)
        num_experts = Int32(1)
        if cutlass.const_expr(self.kind == "masked"):
            max_m = mA.shape[1]
            num_groups = mA.shape[0]
            mA = self._rows_2d(mA)
            mD = self._rows_2d(mD)
        if cutlass.const_expr(self.kind == "psum"):
            num_groups = mGroup.shape[0]
        if cutlass.const_expr(self.kind == "dense"):
            mB = cute.make_tensor(mB.iterator, cute.append(mB.layout, cute.make_layout(1, stride=0)))
            mSFB = cute.make_tensor(mSFB.iterator, cute.append(mSFB.layout, cute.make_layout(1, stride=0)))
        else:
            num_experts = mB.shape[0]
            mB = cute.make_tensor(mB.iterator, cute.select(mB.layout, mode=[1, 2, 0]))  # (N, K/2, G)
            mSFB = cute.make_tensor(mSFB.iterator, cute.select(mSFB.layout, mode=[1, 2, 0]))  # (N, K/32, G)
        return mD, mSFB, (max_m, num_groups, num_experts, mA.shape[0]), self.load_atoms(mA, mB, mSFA)

    def load_atoms(self, mA: cute.Tensor, mB: cute.Tensor, mSFA: Optional[cute.Tensor]) -> tuple:
        """TMA atoms and tensors ``(atom_a, a, atom_b, b, atom_sfa, sfa)`` of one stage: the A k-block,
        B's packed k-block and, FP8, A's scales (else A's atom again, unused)."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        tma_atom_a, tma_a = self._make_load_atom(mA, self.a_smem_layout, (tile_m, tile_k), 1)
        tma_atom_b, tma_b = self._make_load_atom(mB, self.packed_smem_layout, (tile_n, self.packed_k), 1)
        tma_atom_sfa, tma_sfa = tma_atom_a, tma_a
        if cutlass.const_expr(self.fp8):
            tma_atom_sfa, tma_sfa = self.sfa_load_atom(mSFA)
        return tma_atom_a, tma_a, tma_atom_b, tma_b, tma_atom_sfa, tma_sfa

    def launch_persistent(self, kernel, max_clusters: Int32, rows: tuple, stream):
        """Launch ``kernel`` (a traced ``self.kernel(...)``) on one CTA per resident slot, fewer for dense
        and contiguous problems with fewer tiles (masked and psum tiles are known only on the device)."""
        num_clusters = max_clusters
        if cutlass.const_expr(self.kind in ("dense", "contiguous")):
            tile_m = self.tile_shape_mnk[0]
            m_tiles = (rows[-1] + (tile_m - 1)) // tile_m
            num_clusters = cutlass.max(cutlass.min(max_clusters, m_tiles * self.num_n_clusters), Int32(1))
        kernel.launch(grid=(1, 1, num_clusters), block=[self.threads_per_cta, 1, 1], cluster=(1, 1, 1),
                      min_blocks_per_mp=1, stream=stream)

    @cute.jit
    def prefetch_descriptors(self, warp_idx: Int32, tma_atom_a: cute.CopyAtom, tma_atom_b: cute.CopyAtom,
                             tma_atom_sfa: cute.CopyAtom):
        """Warp 0 prefetches the TMA descriptors (A's scales only with FP8)."""
        if warp_idx == 0:
            cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_a)
            cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_b)
            if cutlass.const_expr(self.fp8):
                cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_sfa)

    def start_cta(self, tma_atoms: tuple, mGroup: Optional[cute.Tensor], rows: tuple):
        """The kernels' common start: thread and warp index, TMA descriptor prefetch, shared storage,
        stage ring and scheduler (``mainloop_and_scheduler``)."""
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        self.prefetch_descriptors(warp_idx, *tma_atoms)
        storage = SmemAllocator().allocate(self.shared_storage)
        mainloop, scheduler = self.mainloop_and_scheduler(storage, mGroup, rows, tidx)
        return tidx, warp_idx, storage, mainloop, scheduler

    def mainloop_and_scheduler(self, storage, mGroup: Optional[cute.Tensor], rows: tuple, tidx: Int32):
        """The stage ring (``PipelineTmaAsync``: transaction bytes of the A k-block, the packed B k-block
        and, FP8, A's scales; one release per consumer warp) and the tile scheduler, its group table
        loaded by every thread; barrier init is published (``pipeline_init_wait`` must follow)."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        tx_bytes = tile_m * tile_k * self.ab_dtype.width // 8 + tile_n * self.packed_k
        if cutlass.const_expr(self.fp8):
            tx_bytes += tile_m * SFA_BYTES
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mainloop_barriers.data_ptr(),
            num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread,
                                                     self.num_consumer_wgs * WARPS_PER_WARPGROUP),
            tx_count=tx_bytes,
            cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
            defer_sync=True,
        )
        max_m, num_groups, num_experts, total_rows = rows
        _, _, num_clusters = cute.arch.grid_dim()
        scheduler = GroupedTileScheduler(
            self.schedule, storage.group_values.get_tensor(cute.make_layout(self.table_len)), mGroup, num_groups,
            total_rows, max_m, num_experts, num_clusters, Int32(0), Int32(0), 1)
        scheduler.load_group_values(tidx, self.threads_per_cta)
        pipeline_init_arrive(cluster_shape_mn=(1, 1), is_relaxed=True)
        return mainloop, scheduler

    @cute.jit
    def run_roles(self, tidx: Int32, warp_idx: Int32, producer_args: tuple, consumer_args: tuple):
        """After barrier init is visible to all: warp 0 runs ``producer`` (its warpgroup's registers
        lowered), the consumer warpgroups ``consumer`` (registers raised) with their thread index and
        the CTA's first tile id appended to ``consumer_args`` (the producer gets the tile id too)."""
        _, _, cluster_id = cute.arch.block_idx()
        warp_group_idx = cute.arch.make_warp_uniform(tidx // THREADS_PER_WARPGROUP)
        pipeline_init_wait(cluster_shape_mn=(1, 1))
        cute.arch.sync_threads()
        producer_regs, consumer_regs = self.register_split()
        if warp_group_idx == 0:
            cute.arch.setmaxregister_decrease(producer_regs)
            if warp_idx == 0:
                self.producer(*producer_args, cluster_id)
        else:
            cute.arch.setmaxregister_increase(consumer_regs)
            self.consumer(*consumer_args, tidx - THREADS_PER_WARPGROUP, cluster_id)

    def register_split(self) -> tuple[int, int]:
        """Registers per thread of the producer warpgroup and of each consumer warpgroup after
        ``setmaxnreg`` (the grouped GEMM's: one or two consumer warpgroups fit 232)."""
        return PRODUCER_REGS, CONSUMER_REGS

    # ------------------------------------------------------------------ device code
    @cute.kernel
    def kernel(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
               tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor, mSFB: cute.Tensor, mD: cute.Tensor,
               mC: Optional[cute.Tensor], mGroup: Optional[cute.Tensor], rows: tuple, tiled_mma: cute.TiledMma,
               first_mma: cute.TiledMma, a_smem_layout: cute.ComposedLayout,
               wide_smem_layout: cute.ComposedLayout, packed_smem_layout: cute.Layout, sfa_smem_layout: cute.Layout,
               row_scale_layout: cute.Layout, epi_smem_layout: cute.ComposedLayout):
        tidx, warp_idx, storage, mainloop, scheduler = self.start_cta(
            (tma_atom_a, tma_atom_b, tma_atom_sfa), mGroup, rows)

        sA = storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner)
        sW = storage.sW.get_tensor(wide_smem_layout.outer, swizzle=wide_smem_layout.inner)
        sP = storage.sP.get_tensor(packed_smem_layout)
        sSFA = storage.sSFA.get_tensor(sfa_smem_layout if self.fp8 else cute.make_layout(1))
        sRS = storage.sRS.get_tensor(row_scale_layout if self.fp8 else cute.make_layout(1))
        sD = storage.sD.get_tensor(epi_smem_layout.outer, swizzle=epi_smem_layout.inner)
        self.run_roles(tidx, warp_idx,
                       (tma_atom_a, mA, tma_atom_b, mB, tma_atom_sfa, mSFA, sA, sP, sSFA, mainloop, scheduler),
                       (tiled_mma, first_mma, sA, sW, sP, sSFA, sRS, sD, mSFB, mD, mC, mainloop, scheduler))

    @cute.jit
    def producer(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
                 tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor, sA: cute.Tensor, sP: cute.Tensor,
                 sSFA: cute.Tensor, mainloop: pipeline.PipelineTmaAsync, scheduler: GroupedTileScheduler,
                 cluster_id: Int32):
        """TMA producer: per scheduled tile, stream A's k-blocks, B's packed k-blocks (and A's scales)."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        cursor = scheduler.start(cluster_id)
        while scheduler.has_tile(cursor):
            tile = scheduler.tile(cursor)
            if tile.group >= 0:
                gA = cute.local_tile(cute.domain_offset((tile.row_start, 0), mA), (tile_m, tile_k), (0, None))
                gP = cute.local_tile(mB, (tile_n, self.packed_k), (tile.n_block, None, tile.group))
                tAsA, tAgA = cute.nvgpu.cpasync.tma_partition(
                    tma_atom_a, 0, cute.make_layout(1), cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2))
                tPsP, tPgP = cute.nvgpu.cpasync.tma_partition(
                    tma_atom_b, 0, cute.make_layout(1), cute.group_modes(sP, 0, 2), cute.group_modes(gP, 0, 2))
                tSsS, tSgS = tAsA, tAgA
                if cutlass.const_expr(self.fp8):
                    tSsS, tSgS = self.partition_sfa(tma_atom_sfa, mSFA, sSFA, tile)
                for k_tile in cutlass.range(self.k_tiles, unroll=1):
                    mainloop.producer_acquire(state)
                    barrier = mainloop.producer_get_barrier(state)
                    cute.copy(tma_atom_a, tAgA[(None, k_tile)], tAsA[(None, state.index)], tma_bar_ptr=barrier)
                    cute.copy(tma_atom_b, tPgP[(None, k_tile)], tPsP[(None, state.index)], tma_bar_ptr=barrier)
                    if cutlass.const_expr(self.fp8):
                        cute.copy(tma_atom_sfa, tSgS[(None, k_tile)], tSsS[(None, state.index)], tma_bar_ptr=barrier)
                    mainloop.producer_commit(state)
                    state.advance()
            cursor = scheduler.next(cursor)
        mainloop.producer_tail(state)

    def consumer_states(self, count: int) -> tuple:
        """``count`` consumer positions in the stage ring, all at its first stage."""
        return tuple(pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                     for _ in range(count))

    def mma_slices(self, tiled_mma: cute.TiledMma, consumer_tidx: Int32):
        """This thread's warpgroup slice of the tiled MMA (operand fragments, shared-memory
        descriptors) and its thread slice (accumulator coordinates)."""
        wg_layout = cute.make_layout(self.num_consumer_wgs, stride=THREADS_PER_WARPGROUP)
        warpgroup = wg_layout(consumer_tidx // THREADS_PER_WARPGROUP)
        return tiled_mma.get_slice(warpgroup), tiled_mma.get_slice(consumer_tidx)

    @cute.jit
    def consumer(self, tiled_mma: cute.TiledMma, first_mma: cute.TiledMma, sA: cute.Tensor, sW: cute.Tensor,
                 sP: cute.Tensor, sSFA: cute.Tensor, sRS: cute.Tensor, sD: cute.Tensor, mSFB: cute.Tensor,
                 mD: cute.Tensor, mC: Optional[cute.Tensor], mainloop: pipeline.PipelineTmaAsync,
                 scheduler: GroupedTileScheduler, consumer_tidx: Int32, cluster_id: Int32):
        """Consumer warpgroups: widen B, WGMMA, promote (FP8), then the grouped GEMM's epilogue."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        thr_mma, thr_c = self.mma_slices(tiled_mma, consumer_tidx)
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sW))
        accumulators = cute.make_rmem_tensor(thr_mma.partition_shape_C((tile_m, tile_n)), self.acc_dtype)
        block_acc = cute.make_rmem_tensor(accumulators.shape, self.acc_dtype) if self.fp8 else accumulators
        num_k_blocks = cute.size(tCrA, mode=[2])
        tCcC = thr_c.partition_C(cute.make_identity_tensor((tile_m, tile_n)))
        r0 = tCcC[0][0]

        epilogue = self.make_epilogue(tiled_mma, sD, consumer_tidx)
        state, release_state = self.consumer_states(2)
        epi_buffer = Int32(0)
        wide = Int32(0)  # k-blocks widened so far: the widened buffer is wide % WIDE_BUFFERS
        if cutlass.const_expr(self.fp8):
            self.set_block_accumulate(tiled_mma, first_mma)
        cursor = scheduler.start(cluster_id)
        while scheduler.has_tile(cursor):
            tile = scheduler.tile(cursor)
            if tile.group >= 0:
                accumulators.fill(0.0)
                state, release_state, wide = self.mainloop(
                    tiled_mma, first_mma, tCrA, tCrB, accumulators, block_acc, num_k_blocks, mainloop, state,
                    release_state, wide, sW, sP, sSFA, sRS, mSFB, tCcC, r0, tile, consumer_tidx)
                if tile.rows_valid > 0 and tile.n_block * tile_n < self.n:
                    epi_buffer = self.store_tile(epilogue, accumulators, sD, mD, mC, tile, epi_buffer)
            cursor = scheduler.next(cursor)

    @cute.jit
    def mainloop(self, tiled_mma, first_mma, tCrA, tCrB, accumulators, block_acc, num_k_blocks: cutlass.Constexpr[int],
                 mainloop, state, release_state, wide: Int32, sW: cute.Tensor, sP: cute.Tensor, sSFA: cute.Tensor,
                 sRS: cute.Tensor, mSFB: cute.Tensor, tCcC: cute.Tensor, r0: Int32, tile: WorkTile,
                 consumer_tidx: Int32):
        """All k-blocks of one tile; ``release_state`` trails ``state`` by one stage inside the loop.
        BF16: one WGMMA group in flight, the stage released one k-block behind. FP8: per 128-K block,
        WGMMAs into ``block_acc``, block k+1 widened while they run, then wait, release and
        ``acc += block_acc * sfa[row] * 2^(e_max[col] - 127)``. The exponents of k-block k+1 are loaded
        from global memory while k-block k is multiplied."""
        exponents = cute.make_rmem_tensor((self.widen_rounds * self.exponents_per_item,), Int32)
        self.load_exponents(exponents, mSFB, Int32(0), tile, consumer_tidx)
        if cutlass.const_expr(self.fp8):
            # state: the next stage to widen; release_state: the stage whose WGMMAs run. Block k+1 is
            # widened while block k's WGMMAs run (before waiting for them), then block k is promoted.
            buffer = self.widen_stage(sW, sP, sRS, exponents, mainloop, state, wide, consumer_tidx)
            self.load_exponents(exponents, mSFB, Int32(1), tile, consumer_tidx)
            state.advance()
            for k_tile in cutlass.range(self.k_tiles - 1, unroll=1):
                self.mma_fp8_block(tiled_mma, first_mma, tCrA, tCrB, block_acc, num_k_blocks, release_state.index,
                                   buffer)
                next_buffer = self.widen_stage(sW, sP, sRS, exponents, mainloop, state, wide + 1, consumer_tidx)
                self.load_exponents(exponents, mSFB, k_tile + 2, tile, consumer_tidx)
                state.advance()
                self.promote_fp8_block(accumulators, block_acc, mainloop, release_state, sSFA, sRS, tCcC, r0, buffer)
                release_state.advance()
                wide = wide + 1
                buffer = next_buffer
            self.mma_fp8_block(tiled_mma, first_mma, tCrA, tCrB, block_acc, num_k_blocks, release_state.index, buffer)
            self.promote_fp8_block(accumulators, block_acc, mainloop, release_state, sSFA, sRS, tCcC, r0, buffer)
            release_state.advance()
            wide = wide + 1
        else:
            tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
            buffer = self.widen_stage(sW, sP, sRS, exponents, mainloop, state, wide, consumer_tidx)
            self.load_exponents(exponents, mSFB, Int32(1), tile, consumer_tidx)
            self.mma_bf16(tiled_mma, tCrA, tCrB, accumulators, num_k_blocks, state.index, buffer)
            state.advance()
            wide = wide + 1
            for k_tile in cutlass.range(1, self.k_tiles, unroll=1):
                buffer = self.widen_stage(sW, sP, sRS, exponents, mainloop, state, wide, consumer_tidx)
                self.load_exponents(exponents, mSFB, k_tile + 1, tile, consumer_tidx)
                self.mma_bf16(tiled_mma, tCrA, tCrB, accumulators, num_k_blocks, state.index, buffer)
                cute.nvgpu.warpgroup.wait_group(1)
                mainloop.consumer_release(release_state)
                release_state.advance()
                state.advance()
                wide = wide + 1
            cute.nvgpu.warpgroup.wait_group(0)
            mainloop.consumer_release(release_state)
            release_state.advance()
        return state, release_state, wide

    @cute.jit
    def promote_fp8_block(self, accumulators, block_acc, mainloop, release_state, sSFA: cute.Tensor,
                          sRS: cute.Tensor, tCcC: cute.Tensor, r0: Int32, buffer: Int32):
        """Wait for the block's WGMMAs, read its row scales, release its stage (the caller advances
        ``release_state``) and add ``block_acc * sfa[row] * 2^(e_max[col] - 127)``."""
        cute.nvgpu.warpgroup.wait_group(0)
        scale_lo = sSFA[(r0, 0, release_state.index)]
        scale_hi = sSFA[(r0 + ROW_HALF, 0, release_state.index)]
        mainloop.consumer_release(release_state)
        # Elements 4j + c sit on row r0 and 4j + 2 + c on row r0 + ROW_HALF, both in column tCcC[4j + c].
        for j in cutlass.range_constexpr(cute.size(accumulators) // 4):
            for c in cutlass.range_constexpr(2):
                column_scale = sRS[(tCcC[4 * j + c][1], buffer)]
                low, high = 4 * j + c, 4 * j + 2 + c
                accumulators[low] = accumulators[low] + block_acc[low] * (scale_lo * column_scale)
                accumulators[high] = accumulators[high] + block_acc[high] * (scale_hi * column_scale)

    @cute.jit
    def mma_bf16(self, tiled_mma, tCrA, tCrB, accumulators, num_k_blocks: cutlass.Constexpr[int], stage: Int32,
                 buffer: Int32):
        """Issue and commit one k-block's WGMMAs (A from the stage, B from the widened buffer)."""
        cute.nvgpu.warpgroup.fence()
        for kb in cutlass.range_constexpr(num_k_blocks):
            cute.gemm(tiled_mma, accumulators, tCrA[(None, None, kb, stage)], tCrB[(None, None, kb, buffer)],
                      accumulators)
        cute.nvgpu.warpgroup.commit_group()

    @cute.jit
    def widen_stage(self, sW: cute.Tensor, sP: cute.Tensor, sRS: cute.Tensor, exponents: cute.Tensor, mainloop,
                    state, wide: Int32, consumer_tidx: Int32) -> Int32:
        """Wait for the stage, widen its packed B into buffer ``wide % WIDE_BUFFERS``, make the writes
        visible to WGMMA (async proxy) and meet the other consumer threads; returns the buffer."""
        buffer = wide % WIDE_BUFFERS
        mainloop.consumer_wait(state)
        self.widen(sP, sW, sRS, exponents, state.index, buffer, consumer_tidx)
        cute.arch.fence_view_async_shared()
        self.widen_barrier.arrive_and_wait()
        return buffer

    # Work items of the widening: item = (row n, 32-element block b) of the B tile, 16 packed bytes ->
    # 32 BF16/E4M3 values, dealt round-robin over the consumer threads (item = thread + round * threads).
    # The thread count is a multiple of the blocks per row, so b = thread % blocks in every round.
    @property
    def widen_rounds(self) -> int:
        return -(-self.tile_shape_mnk[1] * self.tile_shape_mnk[2] // MX_BLOCK // self.num_consumer_threads)

    @property
    def exponents_per_item(self) -> int:
        """FP8: all exponents of the item's row in the k-block (for e_max); BF16: the item's own."""
        return self.tile_shape_mnk[2] // MX_BLOCK if self.fp8 else 1

    @cute.jit
    def load_exponents(self, exponents: cute.Tensor, mSFB: cute.Tensor, k_tile: Int32, tile: WorkTile,
                       consumer_tidx: Int32):
        """This thread's UE8M0 exponents of k-block ``k_tile`` (0 past N, past K or past the last k-block)."""
        tile_n, tile_k = self.tile_shape_mnk[1], self.tile_shape_mnk[2]
        blocks = tile_k // MX_BLOCK
        for round_ in cutlass.range_constexpr(self.widen_rounds):
            item = consumer_tidx + round_ * self.num_consumer_threads
            n_global = tile.n_block * tile_n + item // blocks
            if cutlass.const_expr(self.fp8):
                for j in cutlass.range_constexpr(blocks):
                    exponents[round_ * blocks + j] = self.scale_exponent(mSFB, n_global, k_tile * blocks + j,
                                                                         tile.group)
            else:
                exponents[round_] = self.scale_exponent(mSFB, n_global, k_tile * blocks + item % blocks, tile.group)

    @cute.jit
    def widen(self, sP: cute.Tensor, sW: cute.Tensor, sRS: cute.Tensor, exponents: cute.Tensor, stage: Int32,
              buffer: Int32, consumer_tidx: Int32):
        """Widen the packed B tile of ``stage`` into widened buffer ``buffer`` (items: see above).
        Rows past N and blocks past K have exponent 0 and TMA zero fill, so their values are zeros."""
        tile_n, tile_k = self.tile_shape_mnk[1], self.tile_shape_mnk[2]
        blocks = tile_k // MX_BLOCK
        items = tile_n * blocks
        for round_ in cutlass.range_constexpr(self.widen_rounds):
            item = consumer_tidx + round_ * self.num_consumer_threads
            if item < items:
                n = item // blocks
                b = item % blocks
                exponent = Int32(0)
                fast = cutlass.Boolean(False)
                if cutlass.const_expr(self.fp8):
                    e_max = exponents[round_ * blocks]
                    exponent = exponents[round_ * blocks]
                    for j in cutlass.range_constexpr(1, blocks):
                        e_max = cutlass.max(e_max, exponents[round_ * blocks + j])
                        if b == j:
                            exponent = exponents[round_ * blocks + j]
                    exponent = exponent - e_max  # the block's shift 2^(e - e_max), <= 0
                    fast = exponent >= widen_bits.E4M3_MIN_SHIFT
                    if b == 0:
                        sRS[(n, buffer)] = self.pow2(e_max)
                else:
                    exponent = exponents[round_]
                    fast = exponent >= widen_bits.BF16_MIN_EXP and exponent <= widen_bits.BF16_MAX_EXP
                self.widen_item(sP, sW, stage, buffer, n, b, exponent, fast)

    @cute.jit
    def scale_exponent(self, mSFB: cute.Tensor, n: Int32, kb: Int32, group: Int32) -> Int32:
        """UE8M0 exponent of row n, 32-block kb (0 outside N or K: those elements are zero)."""
        exponent = Int32(0)
        if n < self.n and kb < self.k_scale_blocks:
            exponent = Int32(mSFB[(n, kb, group)]) & BYTE_MASK  # the load sign-extends the byte
        return exponent
