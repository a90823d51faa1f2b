"""SM90 GEMM1 of the MoE layer: the token gather fused into A's loads, SwiGLU fused into the epilogue.

For sorted slot ``r`` of expert ``e`` (ragged row space: expert ``e`` owns rows ``[ends[e-1], ends[e])``
of the ``S`` slots, the grouped GEMM's ``ragged`` kind) and output column ``c < I``:

    g = x[row_index[r]] . w13[e, c]        u = x[row_index[r]] . w13[e, I + c]        (FP32)
    act[r, c] = silu(g) * u                h[r, c] = g, h[r, I + c] = u              (bf16, h optional)

A ``Sm90GroupedGemm`` subclass (same scheduler, WGMMA mainloop and epilogue stores). Differences:
- A is gathered: TMA cannot gather rows on SM90, so the whole producer warpgroup (128 threads, its
  registers lowered to GATHER_PRODUCER_REGS instead of 40) copies A's rows ``x[row_index[r]]`` with
  16-byte cp.async into the same swizzled stage layout WGMMA reads (the copy is partitioned from that
  layout). Rows of a tile past its valid rows read the tile's last valid row; every row index is
  clamped to ``[0, T)``, so no value of ``row_index`` reads outside x. Warp 0 also issues B's TMA.
  ``PipelineTmaCpAsync`` (kernels/sm90/tma_cpasync_pipeline.py) completes a stage when B's TMA bytes
  and every loading thread's cp.async copies have landed; the consumers then fence the generic proxy
  (cp.async's writes) against the async proxy (WGMMA's reads) before the WGMMAs.
- B's stage holds two TMA boxes of tile_n / 2 rows: gate rows ``[c0, c0 + tile_n / 2)`` in its first
  half and up rows ``[I + c0, ...)`` in its second (``c0 = n_block * tile_n / 2``); the tiled MMA is
  tile_n / 2 wide, so the accumulator's N mode 0 holds the gate columns and mode 1 the up columns of
  the same rows and output columns, in the same thread. A gate box of the last N block may run into
  the up rows and an up box past 2I (TMA fills zeros): those columns (``c >= I``) are never stored.
- The epilogue (FP32) stores h's two halves when h is given, then act = silu(g) * u, all through the
  grouped GEMM's shared-memory epilogue, predicated on the tile's rows and on ``c < I``.
A multicast cluster shares B along M (cluster_m = 2); A is per CTA (cluster_n must be 1).
The kernel body (``gather_gemm``) and the gathering producer are shared with the backward dact GEMM
(kernels/sm90/gathered_swiglu_backward_gemm.py), which loads B as one N-major box per stage.
"""

from typing import Optional

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Int32
from cutlass.memory import SmemAllocator
from cutlass.pipeline import pipeline_init_arrive

from ..grouped_schedulers import GroupedTileScheduler
from .grouped_gemm import THREADS_PER_WARPGROUP, Sm90GroupedGemm
from .tma_cpasync_pipeline import PipelineTmaCpAsync

# setmaxnreg budgets: 128 gathering producer threads need more than the TMA-only 40 registers;
# 128 * 56 + 256 * 224 = 64512 <= 65536 registers of an SM with two consumer warpgroups.
GATHER_PRODUCER_REGS = 56
GATHER_CONSUMER_REGS = 224
COPY_BITS = 128  # one cp.async moves 16 bytes: 8 BF16 values of a row
GATE_HALVES = 2  # B stage halves: gate rows, then up rows


class Sm90GatheredSwigluGemm(Sm90GroupedGemm):
    """Compile-time configuration of GEMM1 (see the module docstring): ``inter`` = I, ``hidden`` = H."""

    def __init__(self, tile_m: int, tile_n: int, cluster_m: int, stages: int, panel: int, inter: int,
                 hidden: int, store_h: bool):
        super().__init__("ragged", False, tile_m, tile_n, cluster_m, 1, stages, panel, 2 * inter, hidden, False)
        self.half_n = tile_n // GATE_HALVES
        self.mma_tile_n = self.half_n  # WGMMA N extent: the accumulator's N mode holds (gate, up)
        self.store_h = store_h
        self.init_gather(inter, GATE_HALVES, self.half_n)

    def init_gather(self, inter: int, b_boxes: int, box_n: int) -> None:
        """Facts of the gathering producer, shared by the kernels of this family: the intermediate
        size I, and B's stage as ``b_boxes`` TMA boxes of ``box_n`` rows each (box h of N block n
        starts at B row ``h * I + n * box_n``)."""
        self.inter = inter
        self.b_boxes = b_boxes
        self.box_n = box_n
        self.generic_proxy_stages = True
        self.copy_elems = COPY_BITS // cutlass.BFloat16.width

    @cute.jit
    def __call__(self, mX: cute.Tensor, mW: cute.Tensor, mAct: cute.Tensor, mH: Optional[cute.Tensor],
                 mRowIndex: cute.Tensor, mEnds: cute.Tensor, max_clusters: Int32, stream):
        """x ``[T, H]``, w13 ``[E, 2I, H]``, act ``[S, I]``, h ``[S, 2I]`` (optional), row_index int32
        ``[S]``, ends int32 ``[E]`` (cumulative); all row-major bf16 but the index tables."""
        self._setup(mAct.element_type)
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        mB = cute.make_tensor(mW.iterator, cute.select(mW.layout, mode=[1, 2, 0]))  # (2I, H, E)
        # One TMA box fills half a B stage: tile_n / 2 rows of the gate or of the up weights.
        b_half_layout = self._operand_smem_layout("k", self.half_n)
        tma_atom_b, tma_b = self._make_load_atom(mB, b_half_layout, (self.half_n, tile_k), self.num_mcast_b)
        self.shared_storage = self.shared_storage_type({})  # no scales
        self.gathered_kernel(mX, tma_atom_b, tma_b, mAct, mH, mRowIndex, mEnds, mRowIndex.shape[0], mEnds.shape[0],
                             mW.shape[0], self.tiled_mma, self.cta_layout_mnk, self.a_smem_layout,
                             self.b_smem_layout, self.epi_smem_layout).launch(
            **self.launch_arguments(max_clusters, stream))

    @cute.kernel
    def gathered_kernel(self, mX: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor, mAct: cute.Tensor,
                        mH: Optional[cute.Tensor], mRowIndex: cute.Tensor, mEnds: cute.Tensor, total_rows: Int32,
                        num_groups: Int32, num_experts: Int32, tiled_mma: cute.TiledMma, cta_layout_mnk: cute.Layout,
                        a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.ComposedLayout,
                        epi_smem_layout: cute.ComposedLayout):
        # h travels in C's slot of the shared consumer; store_outputs below writes it.
        self.gather_gemm(mX, tma_atom_b, mB, mAct, mH, mRowIndex, mEnds, total_rows, num_groups, num_experts,
                         tiled_mma, cta_layout_mnk, a_smem_layout, b_smem_layout, epi_smem_layout)

    @cute.jit
    def gather_gemm(self, mX: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor, mD: cute.Tensor, mC,
                    mRowIndex: cute.Tensor, mEnds: cute.Tensor, total_rows: Int32, num_groups: Int32,
                    num_experts: Int32, tiled_mma: cute.TiledMma, cta_layout_mnk: cute.Layout,
                    a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.ComposedLayout,
                    epi_smem_layout: cute.ComposedLayout):
        """The body of this family's kernels: the gathering producer warpgroup and the grouped GEMM's
        consumer warpgroups over one ``PipelineTmaCpAsync`` ring. ``mD`` and ``mC`` (any value, e.g.
        a tuple of the epilogue's tensors) are handed to ``store_outputs``."""
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_b)
        cluster_coord, cluster_id, num_clusters = self.cluster_position(cta_layout_mnk)

        storage = SmemAllocator().allocate(self.shared_storage)
        mainloop = PipelineTmaCpAsync.create(
            cpasync_threads=THREADS_PER_WARPGROUP,
            barrier_storage=storage.mainloop_barriers.data_ptr(),
            num_stages=self.stages,
            consumer_group=self.stage_consumers(),
            tx_count=cute.size_in_bytes(self.ab_dtype, cute.slice_(b_smem_layout, (None, None, 0))),
            cta_layout_vmnk=cute.make_layout((1, *cta_layout_mnk.shape)),
            defer_sync=True,
        )
        scheduler = self.make_scheduler(storage, mEnds, num_groups, total_rows, Int32(0), num_experts, num_clusters,
                                        cluster_coord, tidx)
        pipeline_init_arrive(cluster_shape_mn=self.cluster_shape_mn, is_relaxed=True)

        sA = storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner)
        sB = storage.sB.get_tensor(b_smem_layout.outer, swizzle=b_smem_layout.inner)
        sD = storage.sD.get_tensor(epi_smem_layout.outer, swizzle=epi_smem_layout.inner)

        warp_group_idx = self.await_barrier_init(tidx)
        if warp_group_idx == 0:
            cute.arch.setmaxregister_decrease(GATHER_PRODUCER_REGS)
            b_mcast_mask = cute.make_layout_image_mask(cta_layout_mnk, cluster_coord, mode=0)
            self.gather_producer(mX, mRowIndex, tma_atom_b, mB, sA, sB, mainloop, scheduler,
                                 b_mcast_mask if self.num_mcast_b > 1 else 0, cluster_coord[0], cluster_id,
                                 total_rows, tidx, warp_idx)
        else:
            cute.arch.setmaxregister_increase(GATHER_CONSUMER_REGS)
            self.consumer(tiled_mma, sA, sB, sA, sD, None, mD, mC, mainloop, scheduler,
                          tidx - THREADS_PER_WARPGROUP, cluster_id)

    def gather_copy(self) -> cute.TiledCopy:
        """cp.async plan of one A stage: 128 threads, each a 16-byte piece of a K row, a warp covering
        whole 128-byte rows; partitioned against the swizzled stage layout, so every piece lands where
        WGMMA's descriptors expect it."""
        atom = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(cache_mode=cute.nvgpu.cpasync.LoadCacheMode.GLOBAL),
                                   self.ab_dtype, num_bits_per_copy=COPY_BITS)
        pieces_per_row = self.tile_shape_mnk[2] // self.copy_elems
        threads = cute.make_layout((THREADS_PER_WARPGROUP // pieces_per_row, pieces_per_row),
                                   stride=(pieces_per_row, 1))
        return cute.make_tiled_copy_tv(atom, threads, cute.make_layout((1, self.copy_elems)))

    @cute.jit
    def gather_producer(self, mX: cute.Tensor, mRowIndex: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
                        sA: cute.Tensor, sB: cute.Tensor, mainloop: PipelineTmaCpAsync,
                        scheduler: GroupedTileScheduler, b_mcast_mask, cta_m: Int32, cluster_id: Int32,
                        total_rows: Int32, producer_tidx: Int32, warp_idx: Int32):
        """Producer warpgroup: per tile, read its rows' token ids (clamped), then per k-block wait for
        the free stage; warp 0 arms the full barrier and issues B's TMA boxes (GEMM1: gate, up), every
        thread issues its cp.async pieces of A and arrives on the full barrier when they land."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        box_n = self.box_n
        tokens = mX.shape[0]
        thr_copy = self.gather_copy().get_slice(producer_tidx)
        tAsA = thr_copy.partition_D(sA)  # (CPY, rows of this thread, 1, stages)
        tAcA = thr_copy.partition_S(cute.make_identity_tensor((tile_m, tile_k)))  # (row, col) of each piece
        rows_per_thread = cute.size(tAcA, mode=[1])
        piece = tAcA[(0, 0, 0)][1] // self.copy_elems  # this thread's 16-byte piece of every K row
        sB_boxes = [cute.local_tile(sB, (box_n, tile_k, self.stages), (h, 0, 0)) for h in range(self.b_boxes)]
        token = cute.make_rmem_tensor(rows_per_thread, Int32)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        cursor = scheduler.start(cluster_id)
        while scheduler.has_tile(cursor):
            tile = scheduler.tile(cursor)
            if tile.group >= 0:
                # Rows past the tile's valid rows (or past S) read its last valid row; every index is
                # clamped into x, whatever row_index holds.
                last_row = cutlass.min(tile.row_start + tile.rows_valid, total_rows) - 1
                for j in cutlass.range_constexpr(rows_per_thread):
                    row = cutlass.max(cutlass.min(tile.row_start + tAcA[(0, j, 0)][0], last_row), 0)
                    token[j] = cutlass.max(cutlass.min(mRowIndex[row], tokens - 1), 0)
                b_parts = []
                for h in cutlass.range_constexpr(self.b_boxes):
                    gB = cute.local_tile(cute.domain_offset((h * self.inter, 0, 0), mB), (box_n, tile_k),
                                         (tile.n_block, None, tile.group))
                    b_parts.append(cute.nvgpu.cpasync.tma_partition(
                        tma_atom_b, cta_m, cute.make_layout(self.cluster_shape_mn[0]),
                        cute.group_modes(sB_boxes[h], 0, 2), cute.group_modes(gB, 0, 2)))
                for k_tile in cutlass.range(self.k_tiles, unroll=1):
                    mainloop.producer_wait_empty(state)
                    if warp_idx == 0:
                        mainloop.producer_expect_tx(state)
                        barrier = mainloop.producer_get_barrier(state)
                        for tBsB, tBgB in b_parts:
                            cute.copy(tma_atom_b, tBgB[(None, k_tile)], tBsB[(None, state.index)],
                                      tma_bar_ptr=barrier, mcast_mask=b_mcast_mask)
                    for j in cutlass.range_constexpr(rows_per_thread):
                        self.copy_piece(thr_copy, mX, token[j], k_tile, piece, tAsA[(None, j, 0, state.index)])
                    mainloop.producer_cpasync_arrive(state)
                    state.advance()
            cursor = scheduler.next(cursor)
        if warp_idx == 0:
            # Wait until the consumers (of every CTA B is multicast to) released every stage.
            mainloop.producer_tail(state)

    @cute.jit
    def copy_piece(self, thr_copy, mX: cute.Tensor, token: Int32, k_tile: Int32, piece: Int32, dst: cute.Tensor):
        """cp.async of x[token, k_tile * tile_k + piece * 8 : + 8] into ``dst`` (16 bytes). When H is not
        a multiple of tile_k, a piece past H is zero-filled (cp.async with source size 0: nothing read;
        its address is clamped to the row's last piece all the same)."""
        pieces_per_row = self.tile_shape_mnk[2] // self.copy_elems
        column_piece = k_tile * pieces_per_row + piece
        if cutlass.const_expr(self.k % self.tile_shape_mnk[2] == 0):
            src = cute.local_tile(mX, (1, self.copy_elems), (token, column_piece))
            cute.copy(thr_copy, cute.make_tensor(src.iterator, dst.layout.shape), dst)
        else:
            last_piece = self.k // self.copy_elems - 1
            inside = cute.make_rmem_tensor(cute.make_layout((1, 1)), cutlass.Boolean)
            inside[0] = column_piece <= last_piece
            src = cute.local_tile(mX, (1, self.copy_elems), (token, cutlass.min(column_piece, last_piece)))
            cute.copy(thr_copy, cute.make_tensor(src.iterator, dst.layout.shape), dst, pred=inside)

    @cute.jit
    def store_outputs(self, epilogue, accumulators: cute.Tensor, sD: cute.Tensor, mD: cute.Tensor,
                      mC: Optional[cute.Tensor], tile, epi_buffer: Int32) -> Int32:
        """h's gate and up halves (``mC`` holds h, when given), then act = silu(gate) * up into D."""
        half = self.half_n
        part_shape = (cute.shape(accumulators)[0], 1, 1)
        part_values = cute.size(accumulators) // GATE_HALVES
        gate = cute.make_tensor(accumulators.iterator, cute.make_layout(part_shape))
        up = cute.make_tensor(accumulators.iterator + part_values, cute.make_layout(part_shape))
        if cutlass.const_expr(self.store_h):
            epi_buffer = self.store_tile(epilogue, gate, sD, mC, None, tile, epi_buffer, half, self.inter, 0)
            epi_buffer = self.store_tile(epilogue, up, sD, mC, None, tile, epi_buffer, half, self.inter,
                                         self.inter)
        g = gate.load()
        gate.store(g / (1.0 + cute.math.exp(-g, fastmath=True)) * up.load())
        return self.store_tile(epilogue, gate, sD, mD, None, tile, epi_buffer, half, self.inter, 0)
