"""SM90 K-grouped FP8 GEMM with per-row scales on both operands (DeepGEMM's 1D1D wgrad recipe).

Computes, for every group g (weight gradients, K grouped along tokens),

    D[g] = [C[g] +] sum over the group's 128-row K blocks kb of
           (sfa[:, kb] x sfb[:, kb]) * (A[:, kb] . B[:, kb]^T)        (FP32 accumulation)

with A ``[M, sum K]`` and B ``[N, sum K]`` E4M3, both K-major (FP8 WGMMA reads K-major operands
only; the ops in cute_moe/fp8_backward.py bring DeepGEMM's tn / nt operand forms into this one),
``sfa [M, sum K / 128]`` and ``sfb [N, sum K / 128]`` FP32, MN-major and TMA-aligned, and D, C
``[G, M, N]`` FP32. Group g reduces over K rows ``[k_start(g), k_start(g) + k_rows(g))`` (the
grouped scheduler's ``k_grouped`` kind); the op hands the kernel sizes that are multiples of 128, so
every group starts on a scale block and no k-block straddles two groups.

Roles as in ``Sm90GroupedGemm`` (whose layouts, epilogue and scheduler this subclass reuses):
- producer warp: per k-block, TMA loads of A's and B's 128-K boxes (multicast inside a cluster) and
  of this CTA's ``tile_m`` A scales and ``tile_n`` B scales into the stage, all on the stage's full
  barrier;
- consumer warpgroups: per k-block and 128-wide N part, WGMMAs into a block accumulator, then
  ``acc += block_acc * sfa[row] * sfb[column]`` read from the stage's scales; the stage is released
  after the last part's promotion (its scales are read until then).
"""

from typing import Optional, Type

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Int32
from cutlass.memory import SmemAllocator
from cutlass.pipeline import pipeline_init_arrive

from ..grouped_schedulers import GroupedTileScheduler
from ..scheduler import WorkTile
from .grouped_gemm import (CONSUMER_REGS, EPI_N, EPI_STAGES, PRODUCER_REGS, ROW_HALF, SMEM_CAPACITY,
                           SMEM_RESERVED_BYTES, THREADS_PER_WARPGROUP, Sm90GroupedGemm)

SCALE_BYTES = 4  # one FP32 scale per row (A) or column (B) per stage


class Sm90Fp8KGroupedGemm(Sm90GroupedGemm):
    """K-grouped FP8 GEMM with 1 x 128 scales on A and B (see module docstring). ``m`` is D's rows
    per group (the spec's ``k``), ``n`` its columns."""

    def __init__(self, tile_m: int, tile_n: int, cluster_m: int, cluster_n: int, stages: int, panel: int,
                 m: int, n: int, has_c: bool):
        super().__init__("k_grouped", True, tile_m, tile_n, cluster_m, cluster_n, stages, panel, n, m, has_c)

    # ------------------------------------------------------------------ host-side (trace time) setup
    def _setup(self, d_dtype: Type[cutlass.Numeric]):
        """The base setup, with the B scales counted in each stage (fewer stages may fit)."""
        super()._setup(d_dtype)
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        stage_bytes = (tile_m + tile_n) * (tile_k * self.ab_dtype.width // 8 + SCALE_BYTES)
        epi_bytes = tile_m * EPI_N * self.stage_dtype.width // 8 * EPI_STAGES
        fit = (SMEM_CAPACITY - SMEM_RESERVED_BYTES - epi_bytes - self.table_len * 4) // stage_bytes
        self.stages = fit if self.requested_stages == 0 else min(self.requested_stages, fit)
        if self.stages < 2:
            raise ValueError(f"stages: tile {self.tile_shape_mnk} leaves room for {fit} stages, need 2")
        self.a_smem_layout = self._operand_smem_layout("k", tile_m)
        self.b_smem_layout = self._operand_smem_layout("k", tile_n)
        self.sfa_smem_layout = self._scale_smem_layout(tile_m)
        self.sfb_smem_layout = self._scale_smem_layout(tile_n)

    def _scale_smem_layout(self, rows: int):
        return cute.make_layout((rows, 1, self.stages), stride=(1, rows, rows))

    def _scale_load_atom(self, scales: cute.Tensor, smem_layout, rows: int):
        """TMA atom and tensor of MN-major scales ``[MN, K blocks]`` viewed as (MN, K blocks, 1); one
        ``rows x 1`` box per stage."""
        scales = cute.make_tensor(scales.iterator, cute.append(scales.layout, cute.make_layout(1, stride=0)))
        return self._make_load_atom(scales, smem_layout, (rows, 1), 1)

    @cute.jit
    def __call__(self, mA: cute.Tensor, mB: cute.Tensor, mD: cute.Tensor, mC: Optional[cute.Tensor],
                 mSFA: cute.Tensor, mSFB: cute.Tensor, mGroup: cute.Tensor, max_clusters: Int32, stream):
        """Launch: A ``[M, sum K]`` and B ``[N, sum K]`` uint8 (E4M3 bits), K-major; D and C
        ``[G, M, N]`` FP32; SFA ``[M, sum K / 128]`` and SFB ``[N, sum K / 128]`` FP32 MN-major;
        ``mGroup`` the groups' K rows (int32 ``[G]``)."""
        self._setup(mD.element_type)
        mA = cute.recast_tensor(mA, self.ab_dtype)
        mB = cute.recast_tensor(mB, self.ab_dtype)
        max_m = mD.shape[1]
        num_groups = mD.shape[0]
        total_k = mA.shape[1]
        mD = self._rows_2d(mD)
        if cutlass.const_expr(self.has_c):
            mC = self._rows_2d(mC)
        mB = cute.make_tensor(mB.iterator, cute.append(mB.layout, cute.make_layout(1, stride=0)))
        total_rows = mD.shape[0]

        tile_m, tile_n, tile_k = self.tile_shape_mnk
        tma_atom_a, tma_a = self._make_load_atom(mA, self.a_smem_layout, (tile_m, tile_k), self.num_mcast_a)
        tma_atom_b, tma_b = self._make_load_atom(mB, self.b_smem_layout, (tile_n, tile_k), self.num_mcast_b)
        tma_atom_sfa, tma_sfa = self._scale_load_atom(mSFA, self.sfa_smem_layout, tile_m)
        tma_atom_sfb, tma_sfb = self._scale_load_atom(mSFB, self.sfb_smem_layout, tile_n)

        self.shared_storage = self.shared_storage_type({"sSFA": cute.cosize(self.sfa_smem_layout),
                                                         "sSFB": cute.cosize(self.sfb_smem_layout)})

        num_clusters = self.k_grouped_clusters(max_clusters, max_m, num_groups)
        self.kernel(tma_atom_a, tma_a, tma_atom_b, tma_b, tma_atom_sfa, tma_sfa, tma_atom_sfb, tma_sfb, mD, mC,
                    mGroup, total_rows, max_m, num_groups, total_k, self.tiled_mma, self.cta_layout_mnk,
                    self.a_smem_layout, self.b_smem_layout, self.sfa_smem_layout, self.sfb_smem_layout,
                    self.epi_smem_layout).launch(**self.launch_arguments(num_clusters, stream))

    # ------------------------------------------------------------------ device code
    @cute.kernel
    def kernel(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
               tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor, tma_atom_sfb: cute.CopyAtom, mSFB: cute.Tensor,
               mD: cute.Tensor, mC: Optional[cute.Tensor], mGroup: cute.Tensor, total_rows: Int32, max_m: Int32,
               num_groups: Int32, total_k: Int32, tiled_mma: cute.TiledMma, cta_layout_mnk: cute.Layout,
               a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.ComposedLayout, sfa_smem_layout: cute.Layout,
               sfb_smem_layout: cute.Layout, epi_smem_layout: cute.ComposedLayout):
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            for atom in (tma_atom_a, tma_atom_b, tma_atom_sfa, tma_atom_sfb):
                cute.nvgpu.cpasync.prefetch_descriptor(atom)

        cluster_coord, cluster_id, num_clusters = self.cluster_position(cta_layout_mnk)

        storage = SmemAllocator().allocate(self.shared_storage)
        tile_m, tile_n, _ = self.tile_shape_mnk
        tx_bytes = (cute.size_in_bytes(self.ab_dtype, cute.slice_(a_smem_layout, (None, None, 0)))
                    + cute.size_in_bytes(self.ab_dtype, cute.slice_(b_smem_layout, (None, None, 0)))
                    + (tile_m + tile_n) * SCALE_BYTES)
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mainloop_barriers.data_ptr(),
            num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=self.stage_consumers(),
            tx_count=tx_bytes,
            cta_layout_vmnk=cute.make_layout((1, *cta_layout_mnk.shape)),
            defer_sync=True,
        )

        scheduler = self.make_scheduler(storage, mGroup, num_groups, total_rows, max_m, Int32(1), num_clusters,
                                        cluster_coord, tidx, total_k)
        # Barrier init becomes visible cluster-wide here; the wait below also orders the group table
        # (written by every thread above) before any thread walks the schedule.
        pipeline_init_arrive(cluster_shape_mn=self.cluster_shape_mn, is_relaxed=True)

        sA = storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner)
        sB = storage.sB.get_tensor(b_smem_layout.outer, swizzle=b_smem_layout.inner)
        sSFA = storage.sSFA.get_tensor(sfa_smem_layout)
        sSFB = storage.sSFB.get_tensor(sfb_smem_layout)
        sD = storage.sD.get_tensor(epi_smem_layout.outer, swizzle=epi_smem_layout.inner)

        warp_group_idx = self.await_barrier_init(tidx)
        if warp_group_idx == 0:
            cute.arch.setmaxregister_decrease(PRODUCER_REGS)
            if warp_idx == 0:
                a_mcast_mask = cute.make_layout_image_mask(cta_layout_mnk, cluster_coord, mode=1)
                b_mcast_mask = cute.make_layout_image_mask(cta_layout_mnk, cluster_coord, mode=0)
                self.producer(tma_atom_a, mA, tma_atom_b, mB, tma_atom_sfa, mSFA, tma_atom_sfb, mSFB, sA, sB, sSFA,
                              sSFB, mainloop, scheduler, a_mcast_mask if self.num_mcast_a > 1 else 0,
                              b_mcast_mask if self.num_mcast_b > 1 else 0, cluster_coord[0], cluster_coord[1],
                              cluster_id)
        else:
            cute.arch.setmaxregister_increase(CONSUMER_REGS)
            self.consumer(tiled_mma, sA, sB, sSFA, sSFB, sD, mD, mC, mainloop, scheduler,
                          tidx - THREADS_PER_WARPGROUP, cluster_id)

    def k_tiles_of(self, tile: WorkTile) -> Int32:
        """k-blocks of a tile: its group's K rows in whole 128-row blocks (producer and consumers
        agree on it; the op passes sizes that are multiples of 128)."""
        return tile.k_rows // self.tile_shape_mnk[2]

    @staticmethod
    def _scale_partition(tma_atom: cute.CopyAtom, scales: cute.Tensor, smem: cute.Tensor, row: Int32,
                         first_block: Int32, rows: int):
        """TMA partition (smem, gmem) of ``rows`` scales from ``row`` on, one K block per stage
        starting at block ``first_block``."""
        gS = cute.local_tile(cute.domain_offset((row, first_block, 0), scales), (rows, 1), (0, None, 0))
        return cute.nvgpu.cpasync.tma_partition(
            tma_atom, 0, cute.make_layout(1), cute.group_modes(smem, 0, 2), cute.group_modes(gS, 0, 2))

    @cute.jit
    def producer(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
                 tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor, tma_atom_sfb: cute.CopyAtom, mSFB: cute.Tensor,
                 sA: cute.Tensor, sB: cute.Tensor, sSFA: cute.Tensor, sSFB: cute.Tensor,
                 mainloop: pipeline.PipelineTmaAsync, scheduler: GroupedTileScheduler, a_mcast_mask, b_mcast_mask,
                 cta_m: Int32, cta_n: Int32, cluster_id: Int32):
        """TMA producer: for each scheduled tile, its group's k-blocks of A and B (multicast inside
        the cluster) and this CTA's A and B scales of the same K blocks.

        ``producer_acquire`` waits until every consumer (in every CTA the stage is multicast to) has
        released the slot; the loads then arrive on the slot's full barrier with their bytes."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        cluster_m, cluster_n = self.cluster_shape_mn
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        cursor = scheduler.start(cluster_id)
        while scheduler.has_tile(cursor):
            tile = scheduler.tile(cursor)
            if tile.group >= 0:
                gA = cute.local_tile(cute.domain_offset((tile.local_row, tile.k_start), mA), (tile_m, tile_k),
                                     (0, None))
                gB = cute.local_tile(cute.domain_offset((0, tile.k_start, 0), mB), (tile_n, tile_k),
                                     (tile.n_block, None, 0))
                tAsA, tAgA = cute.nvgpu.cpasync.tma_partition(
                    tma_atom_a, cta_n, cute.make_layout(cluster_n),
                    cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2))
                tBsB, tBgB = cute.nvgpu.cpasync.tma_partition(
                    tma_atom_b, cta_m, cute.make_layout(cluster_m),
                    cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))
                first_block = tile.k_start // tile_k
                tSAs, tSAg = self._scale_partition(tma_atom_sfa, mSFA, sSFA, tile.local_row, first_block, tile_m)
                tSBs, tSBg = self._scale_partition(tma_atom_sfb, mSFB, sSFB, tile.n_block * tile_n, first_block,
                                                   tile_n)
                for k_tile in cutlass.range(self.k_tiles_of(tile), unroll=1):
                    mainloop.producer_acquire(state)
                    barrier = mainloop.producer_get_barrier(state)
                    cute.copy(tma_atom_a, tAgA[(None, k_tile)], tAsA[(None, state.index)],
                              tma_bar_ptr=barrier, mcast_mask=a_mcast_mask)
                    cute.copy(tma_atom_b, tBgB[(None, k_tile)], tBsB[(None, state.index)],
                              tma_bar_ptr=barrier, mcast_mask=b_mcast_mask)
                    cute.copy(tma_atom_sfa, tSAg[(None, k_tile)], tSAs[(None, state.index)], tma_bar_ptr=barrier)
                    cute.copy(tma_atom_sfb, tSBg[(None, k_tile)], tSBs[(None, state.index)], tma_bar_ptr=barrier)
                    mainloop.producer_commit(state)
                    state.advance()
            cursor = scheduler.next(cursor)
        # Wait until the consumers released every slot, so no multicast lands in an exited peer CTA.
        mainloop.producer_tail(state)

    @cute.jit
    def consumer(self, tiled_mma: cute.TiledMma, sA: cute.Tensor, sB: cute.Tensor, sSFA: cute.Tensor,
                 sSFB: cute.Tensor, sD: cute.Tensor, mD: cute.Tensor, mC: Optional[cute.Tensor],
                 mainloop: pipeline.PipelineTmaAsync, scheduler: GroupedTileScheduler, consumer_tidx: Int32,
                 cluster_id: Int32):
        """WGMMA consumer warpgroups: accumulate each tile in registers (an empty group: zeros), then
        run the base epilogue (adds C, writes D)."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        wg_layout = cute.make_layout(self.num_consumer_wgs, stride=THREADS_PER_WARPGROUP)
        thr_mma = tiled_mma.get_slice(wg_layout(consumer_tidx // THREADS_PER_WARPGROUP))
        thr_c = tiled_mma.get_slice(consumer_tidx)  # this thread's accumulator elements
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        # B fragments of each 128-wide N part (one block accumulator of one part's width).
        tCrB_parts = [tiled_mma.make_fragment_B(thr_mma.partition_B(
            cute.local_tile(sB, (self.mma_tile_n, tile_k, self.stages), (part, 0, 0))))
            for part in range(self.n_parts)]
        accumulators = cute.make_rmem_tensor(thr_mma.partition_shape_C((tile_m, tile_n)), self.acc_dtype)
        block_acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((tile_m, self.mma_tile_n)), self.acc_dtype)
        num_k_blocks = cute.size(tCrA, mode=[2])
        # (row, column) in the tile of each accumulator element; rows of element i: r0 or r0 + ROW_HALF.
        tCcC = thr_c.partition_C(cute.make_identity_tensor((tile_m, tile_n)))
        r0 = tCcC[0][0]

        epilogue = self.make_epilogue(tiled_mma, sD, consumer_tidx)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        epi_buffer = Int32(0)
        cursor = scheduler.start(cluster_id)
        while scheduler.has_tile(cursor):
            tile = scheduler.tile(cursor)
            if tile.group >= 0:
                accumulators.fill(0.0)
                state = self.mainloop_1d1d(tiled_mma, tCrA, tCrB_parts, accumulators, block_acc, num_k_blocks,
                                           mainloop, state, sSFA, sSFB, tCcC, r0, self.k_tiles_of(tile))
                if tile.rows_valid > 0 and tile.n_block * tile_n < self.n:
                    epi_buffer = self.store_tile(epilogue, accumulators, sD, mD, mC, tile, epi_buffer)
            cursor = scheduler.next(cursor)

    @cute.jit
    def mainloop_1d1d(self, tiled_mma, tCrA, tCrB_parts, accumulators, block_acc,
                      num_k_blocks: cutlass.Constexpr[int], mainloop, state, sSFA: cute.Tensor, sSFB: cute.Tensor,
                      tCcC: cute.Tensor, r0: Int32, k_tiles: Int32):
        """Per 128-K block and N part: WGMMAs into ``block_acc`` (overwritten by the first), wait, then
        ``acc[part] += block_acc * sfa[row] * sfb[column]`` with both scales read from the stage; the
        stage is released after the last part's promotion."""
        part_values = cute.size(block_acc)
        for k_tile in cutlass.range(k_tiles, unroll=1):
            mainloop.consumer_wait(state)
            scale_lo = sSFA[(r0, 0, state.index)]
            scale_hi = sSFA[(r0 + ROW_HALF, 0, state.index)]
            for part in cutlass.range_constexpr(self.n_parts):
                tCrB = tCrB_parts[part]
                tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, False)
                cute.nvgpu.warpgroup.fence()
                for kb in cutlass.range_constexpr(num_k_blocks):
                    cute.gemm(tiled_mma, block_acc, tCrA[(None, None, kb, state.index)],
                              tCrB[(None, None, kb, state.index)], block_acc)
                    tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
                cute.nvgpu.warpgroup.commit_group()
                cute.nvgpu.warpgroup.wait_group(0)
                # Elements 4j + c sit on row r0 and 4j + 2 + c on row r0 + ROW_HALF, both in column
                # tCcC[part * part_values + 4j + c].
                for j in cutlass.range_constexpr(part_values // 4):
                    for c in cutlass.range_constexpr(2):
                        low, high = 4 * j + c, 4 * j + 2 + c
                        column_scale = sSFB[(tCcC[part * part_values + low][1], 0, state.index)]
                        out_low, out_high = part * part_values + low, part * part_values + high
                        accumulators[out_low] = accumulators[out_low] + block_acc[low] * (scale_lo * column_scale)
                        accumulators[out_high] = accumulators[out_high] + block_acc[high] * (scale_hi * column_scale)
            mainloop.consumer_release(state)
            state.advance()
        return state
