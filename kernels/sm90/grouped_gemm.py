"""SM90 persistent, warp-specialized GEMM for MoE problems: D = [C +] A . B^T.

One source serves every problem kind (compile-time ``kind``, see ``kernels.tile_scheduler``): dense
``A[M,K] . B[N,K]^T``, M-grouped contiguous (``grouped_layout`` picks each tile's expert) or its psum
form, M-grouped masked (``A[G,Mmax,K]``, rows ``< masked_m[g]``) and ragged (cumulative ``offs``),
and two operand types: BF16, or FP8 E4M3 with DeepSeek block scales (A: one FP32 scale per row per
128 K, MN-major; B: one per 128x128 block), promoted per 128-K block into an FP32 accumulator.
A and D are handled as 2-D row spaces; B is ``[G, N, K]`` and each tile reads its group's slice.

Roles (one CTA, one warpgroup per role instance, ``128 * (1 + tile_m // 64)`` threads):
- warp 0 (producer warpgroup, registers lowered to 40): walks the tile schedule and issues TMA loads
  of A and B k-blocks (and of A's scales, FP8) into a ``stages``-deep shared-memory ring guarded by
  mbarriers (``PipelineTmaAsync``: full barrier = TMA transaction bytes, empty barrier = consumer
  release). Inside a cluster of ``cluster_m x cluster_n`` CTAs, A is multicast along N, B along M.
- ``tile_m // 64`` consumer warpgroups (registers raised to 232), 64 rows each: BF16 issues WGMMA
  with one k-block group in flight; FP8 issues a 128-K block's WGMMAs into a block accumulator,
  waits, and adds it times ``sfa[row] * sfb`` to the main accumulator, one 128-wide N part (one
  weight-scale block) at a time. The epilogue converts (adding C in
  FP32 when present) and writes D from registers or through a shared-memory stage, predicated on the
  rows and columns that belong to the tile's group, so ragged and masked tiles never touch a
  neighbour's rows.
Producer and consumers walk the same tile sequence through the scheduler seam
(``kernels/scheduler.py``; the static schedulers are ``kernels/grouped_schedulers.py``).
"""

from typing import Optional, Type

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Int32
from cutlass.memory import SmemAllocator
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait
from cutlass.tensor_utils import LayoutEnum

from ..grouped_schedulers import GroupedSchedule, GroupedTileScheduler
from ..scheduler import WorkTile
from .config import FP8_SCALE_BLOCK, MAX_GROUPS

SMEM_CAPACITY = 232448  # bytes of dynamic shared memory per CTA on sm_90
SMEM_RESERVED_BYTES = 2048  # mbarriers, the struct's alignment padding and the scheduler's scalars
TILE_K_BYTES = 128  # one 128-byte swizzle row of K per stage: 64 BF16 or 128 FP8 values
SFA_BYTES = 4  # one FP32 A scale per row per stage (FP8)
THREADS_PER_WARPGROUP = 128
WARPS_PER_WARPGROUP = 4
ROWS_PER_CONSUMER_WARPGROUP = 64  # one WGMMA M extent
EPI_N = 32  # columns of one epilogue sub-tile
STORE_BITS = 128  # the epilogue writes D with 16-byte vector stores
TMA_ALIGN_BYTES = 128  # shared-memory alignment of a TMA destination without swizzle
STAGE_ALIGN_BYTES = 1024  # shared-memory alignment of a 128-byte-swizzled buffer (one whole swizzle pattern)
EPI_STAGES = 2  # epilogue sub-tile buffers in shared memory
EPILOGUE_BARRIER_ID = 1  # named barrier 0 is the CTA-wide __syncthreads
PRODUCER_REGS = 40
CONSUMER_REGS = 232
# Rows of a WGMMA accumulator fragment: element i of a thread sits on row r0 + ROW_HALF * ((i // 2) % 2).
ROW_HALF = 8
TAIL_BARRIER_ID = 2  # k_grouped: consumer warpgroups wait for the zeroed tail of a group's last k-block
MAJOR_LAYOUTS = {"k": LayoutEnum.ROW_MAJOR, "mn": LayoutEnum.COL_MAJOR}  # in (MN, K) coordinates


def _layout(major: str) -> LayoutEnum:
    """The DSL's layout enum of an operand major mode: ROW_MAJOR = K contiguous, COL_MAJOR = M / N."""
    return MAJOR_LAYOUTS[major]


class Sm90GroupedGemm:
    """Compile-time configuration of one GEMM specialization (see module docstring)."""

    def __init__(self, kind: str, fp8: bool, tile_m: int, tile_n: int, cluster_m: int, cluster_n: int,
                 stages: int, panel: int, n: int, k: int, has_c: bool, alignment: int = 0,
                 a_major: str = "k", b_major: str = "k"):
        """Constraints on these values are checked by the backend (kernels/sm90/rules.can_implement).

        ``a_major`` / ``b_major``: "k" (K contiguous) or "mn" (M / N contiguous; BF16 only). The
        ``k_grouped`` kind takes ``k`` as D's rows per group (M): its reduction extent is grouped and
        known only at launch."""
        self.kind = kind
        self.a_major = a_major
        self.b_major = b_major
        self.fp8 = fp8
        self.tile_shape_mnk = (tile_m, tile_n, TILE_K_BYTES if fp8 else TILE_K_BYTES // 2)
        # FP8 N tiles wider than a 128 x 128 weight-scale block run as parts of one scale block each,
        # every part with its own WGMMAs and promotion (one block accumulator of one part's width).
        self.mma_tile_n = min(tile_n, FP8_SCALE_BLOCK) if fp8 else tile_n
        self.n_parts = tile_n // self.mma_tile_n
        self.n_scale_blocks = -(-n // FP8_SCALE_BLOCK)
        self.cluster_shape_mn = (cluster_m, cluster_n)
        self.n = n
        self.k = k
        self.has_c = has_c
        self.acc_dtype = cutlass.Float32
        self.num_consumer_wgs = tile_m // ROWS_PER_CONSUMER_WARPGROUP
        self.num_consumer_threads = THREADS_PER_WARPGROUP * self.num_consumer_wgs
        self.threads_per_cta = THREADS_PER_WARPGROUP * (1 + self.num_consumer_wgs)  # + the producer warpgroup
        self.num_n_clusters = -(-n // (tile_n * cluster_n))
        self.k_tiles = -(-k // self.tile_shape_mnk[2])
        self.requested_stages = stages
        self.schedule = GroupedSchedule(kind, tile_m, cluster_m, self.num_n_clusters, panel, alignment)
        self.table_len = MAX_GROUPS if self.schedule.has_group_table else 1
        self.epi_tile = (tile_m, EPI_N)
        self.epilogue_barrier = pipeline.NamedBarrier(barrier_id=EPILOGUE_BARRIER_ID,
                                                      num_threads=self.num_consumer_threads)
        self.tail_barrier = pipeline.NamedBarrier(barrier_id=TAIL_BARRIER_ID, num_threads=self.num_consumer_threads)
        # Stages written by cp.async (the generic proxy) need a proxy fence before WGMMA (the async proxy)
        # reads them; TMA-filled stages do not (see kernels/sm90/gathered_swiglu_gemm.py).
        self.generic_proxy_stages = False

    # ------------------------------------------------------------------ host-side (trace time) setup
    def _setup(self, d_dtype: Type[cutlass.Numeric]):
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        self.ab_dtype = cutlass.Float8E4M3FN if self.fp8 else cutlass.BFloat16
        self.d_dtype = d_dtype
        # C is added in FP32 before rounding, so an epilogue with C stages FP32 values in shared memory.
        self.stage_dtype = self.acc_dtype if self.has_c else d_dtype
        self.tiled_mma = self.make_tiled_mma()
        self.num_mcast_a = self.cluster_shape_mn[1]
        self.num_mcast_b = self.cluster_shape_mn[0]
        self.cta_layout_mnk = cute.make_layout((*self.cluster_shape_mn, 1))

        ab_bytes = (tile_m + tile_n) * tile_k * self.ab_dtype.width // 8 + self.stage_scale_bytes()
        epi_bytes = tile_m * EPI_N * self.stage_dtype.width // 8 * EPI_STAGES
        table_bytes = self.table_len * 4
        fit = (SMEM_CAPACITY - SMEM_RESERVED_BYTES - epi_bytes - table_bytes) // ab_bytes
        self.stages = fit if self.requested_stages == 0 else min(self.requested_stages, fit)
        if self.stages < 2:
            raise ValueError(f"stages: tile {self.tile_shape_mnk} leaves room for {fit} stages, need 2")

        row_major = LayoutEnum.ROW_MAJOR
        self.a_smem_layout = self._operand_smem_layout(self.a_major, tile_m)
        self.b_smem_layout = self._operand_smem_layout(self.b_major, tile_n)
        self.sfa_smem_layout = self.scale_smem_layout(tile_m)
        epi_atom = cute.nvgpu.warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(row_major, self.stage_dtype, EPI_N), self.stage_dtype)
        self.epi_smem_layout = cute.tile_to_shape(epi_atom, (*self.epi_tile, EPI_STAGES), order=(0, 1, 2))

    def make_tiled_mma(self) -> cute.TiledMma:
        """The consumers' tiled WGMMA (after ``ab_dtype`` is set): one 64-row warpgroup slice per
        consumer warpgroup, ``mma_tile_n`` columns."""
        return sm90_utils.make_trivial_tiled_mma(
            self.ab_dtype, self.ab_dtype, _layout(self.a_major).sm90_mma_major_mode(),
            _layout(self.b_major).sm90_mma_major_mode(), self.acc_dtype,
            (self.num_consumer_wgs, 1, 1), tiler_mn=(ROWS_PER_CONSUMER_WARPGROUP, self.mma_tile_n))

    def stage_scale_bytes(self) -> int:
        """Bytes of scales a mainloop stage holds besides its A and B k-blocks (FP8: one FP32 A scale
        per tile row); they size the stage and its TMA transaction."""
        return self.tile_shape_mnk[0] * SFA_BYTES if self.fp8 else 0

    def scale_smem_layout(self, rows: int) -> cute.Layout:
        """Staged (rows, 1, stages) smem layout of FP32 scales: one per row per stage."""
        return cute.make_layout((rows, 1, self.stages), stride=(1, rows, rows))

    def _operand_smem_layout(self, major: str, tile_mn: int):
        """Staged (tile_mn, tile_k, stages) smem layout of an operand: the swizzle atom runs along the
        operand's contiguous mode (K, or M / N), so the TMA box and WGMMA's descriptors follow it."""
        tile_k = self.tile_shape_mnk[2]
        atom = cute.nvgpu.warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(_layout(major), self.ab_dtype, tile_k if major == "k" else tile_mn),
            self.ab_dtype)
        return cute.tile_to_shape(atom, (tile_mn, tile_k, self.stages), order=(0, 1, 2) if major == "k" else (1, 0, 2))

    @staticmethod
    def _make_load_atom(tensor: cute.Tensor, smem_layout, tile: tuple, mcast: int):
        op = (cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp() if mcast == 1
              else cute.nvgpu.cpasync.CopyBulkTensorTileG2SMulticastOp())
        return cute.nvgpu.cpasync.make_tiled_tma_atom(
            op, tensor, cute.slice_(smem_layout, (None, None, 0)), tile, num_multicast=mcast)

    def sfa_load_atom(self, mSFA: cute.Tensor):
        """TMA atom and tensor of the FP8 A scales viewed as (rows, K blocks, L): masked keeps its group
        mode (rows are padded per group), the other kinds a unit mode; one tile_m x 1 box per stage."""
        if cutlass.const_expr(self.kind == "masked"):
            mSFA = cute.make_tensor(mSFA.iterator, cute.select(mSFA.layout, mode=[1, 2, 0]))
        else:
            mSFA = cute.make_tensor(mSFA.iterator, cute.append(mSFA.layout, cute.make_layout(1, stride=0)))
        return self._make_load_atom(mSFA, self.sfa_smem_layout, (self.tile_shape_mnk[0], 1), 1)

    @staticmethod
    def _rows_2d(t: cute.Tensor) -> cute.Tensor:
        """View a contiguous [G, Mmax, X] tensor as the 2-D row space [G * Mmax, X]."""
        return cute.make_tensor(t.iterator, cute.make_layout((t.shape[0] * t.shape[1], t.shape[2]),
                                                             stride=(t.stride[1], 1)))

    def launch_views(self, mA: cute.Tensor, mB: cute.Tensor, mD: cute.Tensor, mC: Optional[cute.Tensor],
                     mGroup: Optional[cute.Tensor]) -> tuple:
        """``_setup`` for D's type, then the kernel's views of the launch operands (see ``__call__``): FP8
        A and B as E4M3, masked A and D and k_grouped D and C as 2-D row spaces, B as (N, K, G) (dense
        and k_grouped: a unit G mode). Returns ``(A, B, D, C, max_m, num_groups, num_experts, total_k,
        total_rows)``."""
        self._setup(mD.element_type)
        if cutlass.const_expr(self.fp8):
            mA = cute.recast_tensor(mA, self.ab_dtype)
            mB = cute.recast_tensor(mB, self.ab_dtype)
        max_m = Int32(0)
        num_groups = Int32(1)
        num_experts = Int32(1)  # B's batch count (dense: 1)
        total_k = None
        if cutlass.const_expr(self.kind == "k_grouped"):
            # Groups are D's [M, N] blocks; A's rows (M) restart at 0 in every group.
            max_m = mD.shape[1]
            num_groups = mD.shape[0]
            total_k = mA.shape[1]
            mD = self._rows_2d(mD)
            if cutlass.const_expr(self.has_c):
                mC = self._rows_2d(mC)
        if cutlass.const_expr(self.kind == "masked"):
            max_m = mA.shape[1]
            num_groups = mA.shape[0]
            mA = self._rows_2d(mA)
            mD = self._rows_2d(mD)
        if cutlass.const_expr(self.kind in ("ragged", "psum")):
            num_groups = mGroup.shape[0]
        if cutlass.const_expr(self.kind in ("dense", "k_grouped")):
            mB = cute.make_tensor(mB.iterator, cute.append(mB.layout, cute.make_layout(1, stride=0)))
        else:
            num_experts = mB.shape[0]
            mB = cute.make_tensor(mB.iterator, cute.select(mB.layout, mode=[1, 2, 0]))  # (N, K, G)
        total_rows = mD.shape[0] if self.kind == "k_grouped" else mA.shape[0]
        return mA, mB, mD, mC, max_m, num_groups, num_experts, total_k, total_rows

    def ab_load_atoms(self, mA: cute.Tensor, mB: cute.Tensor) -> tuple:
        """TMA atoms and tensors ``(atom_a, a, atom_b, b)`` of one stage's A and B k-blocks, A multicast
        along the cluster's N mode and B along its M mode."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        tma_atom_a, tma_a = self._make_load_atom(mA, self.a_smem_layout, (tile_m, tile_k), self.num_mcast_a)
        tma_atom_b, tma_b = self._make_load_atom(mB, self.b_smem_layout, (tile_n, tile_k), self.num_mcast_b)
        return tma_atom_a, tma_a, tma_atom_b, tma_b

    @cute.jit
    def __call__(self, mA: cute.Tensor, mB: cute.Tensor, mD: cute.Tensor, mC: Optional[cute.Tensor],
                 mSFA: Optional[cute.Tensor], mSFB: Optional[cute.Tensor], mGroup: Optional[cute.Tensor],
                 max_clusters: Int32, stream):
        """Launch: A/D are ``[rows, K]``/``[rows, N]`` (masked: ``[G, Mmax, K]``/``[G, Mmax, N]``);
        B is ``[N, K]`` (dense) or ``[G, N, K]``; FP8 operands arrive as uint8 with SFA ``[rows, K/128]``
        (masked ``[G, Mmax, K/128]``) MN-major and SFB ``[(G,) N/128, K/128]``; ``mGroup`` is
        grouped_layout, masked_m, or cumulative ends (ragged, psum). MN-major operands arrive as the
        same (MN, K) views with the MN mode contiguous. k_grouped: A ``[M, sum K]`` and B ``[N, sum K]``
        (MN-major views of the ``[sum K, M]`` / ``[sum K, N]`` tensors), D and C ``[G, M, N]``,
        ``mGroup`` the per-group K counts."""
        mA, mB, mD, mC, max_m, num_groups, num_experts, total_k, total_rows = self.launch_views(mA, mB, mD, mC,
                                                                                               mGroup)
        tma_atom_a, tma_a, tma_atom_b, tma_b = self.ab_load_atoms(mA, mB)
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        # Mixed-expert clusters load a B block that the partner CTA does not share without multicast.
        tma_atom_b_own, tma_b_own = tma_atom_b, tma_b
        if cutlass.const_expr(self.schedule.mixed_clusters):
            tma_atom_b_own, tma_b_own = self._make_load_atom(mB, self.b_smem_layout, (tile_n, tile_k), 1)
        tma_atom_sfa, tma_sfa = tma_atom_a, tma_a
        if cutlass.const_expr(self.fp8):
            tma_atom_sfa, tma_sfa = self.sfa_load_atom(mSFA)
            if cutlass.const_expr(self.kind == "dense"):
                mSFB = cute.make_tensor(mSFB.iterator, cute.append(mSFB.layout, cute.make_layout(1, stride=0)))
            else:
                mSFB = cute.make_tensor(mSFB.iterator, cute.select(mSFB.layout, mode=[1, 2, 0]))

        self.shared_storage = self.shared_storage_type({"sSFA": cute.cosize(self.sfa_smem_layout) if self.fp8 else 1})

        cluster_m = self.cluster_shape_mn[0]
        num_clusters = max_clusters
        if cutlass.const_expr(self.kind in ("dense", "contiguous")):
            m_clusters = (total_rows + (tile_m * cluster_m - 1)) // (tile_m * cluster_m)
            num_clusters = cutlass.max(cutlass.min(max_clusters, m_clusters * self.num_n_clusters), Int32(1))
        if cutlass.const_expr(self.kind == "k_grouped"):
            num_clusters = self.k_grouped_clusters(max_clusters, max_m, num_groups)
        self.kernel(tma_atom_a, tma_a, tma_atom_b, tma_b, tma_atom_b_own, tma_b_own, tma_atom_sfa, tma_sfa, mSFB,
                    mD, mC, mGroup, total_rows, max_m, num_groups, num_experts, self.tiled_mma, self.cta_layout_mnk,
                    self.a_smem_layout, self.b_smem_layout, self.sfa_smem_layout, self.epi_smem_layout,
                    total_k).launch(**self.launch_arguments(num_clusters, stream))

    def shared_storage_type(self, scale_buffers: dict[str, int]):
        """The kernel's shared memory, a ``cute.struct``: the mainloop's barriers, the scheduler's group
        table, A's and B's stages, one TMA-aligned FP32 buffer per entry of ``scale_buffers`` (field
        name: values), then the epilogue's buffers."""
        fields = {
            "mainloop_barriers": cute.struct.MemRange[cutlass.Int64, self.stages * 2],
            "group_values": cute.struct.MemRange[Int32, self.table_len],
            "sA": cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(self.a_smem_layout)],
                                    STAGE_ALIGN_BYTES],
            "sB": cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(self.b_smem_layout)],
                                    STAGE_ALIGN_BYTES],
        }
        for name, values in scale_buffers.items():
            fields[name] = cute.struct.Align[cute.struct.MemRange[cutlass.Float32, values], TMA_ALIGN_BYTES]
        fields["sD"] = cute.struct.Align[cute.struct.MemRange[self.stage_dtype, cute.cosize(self.epi_smem_layout)],
                                         STAGE_ALIGN_BYTES]
        return cute.struct(type("SharedStorage", (), {"__annotations__": fields}))

    def k_grouped_clusters(self, max_clusters: Int32, max_m: Int32, num_groups: Int32) -> Int32:
        """Clusters worth launching for the k_grouped kind: one per (group, M tile of clusters, N tile
        of clusters) at most, ``max_clusters`` at most, at least one."""
        tile_m, cluster_m = self.tile_shape_mnk[0], self.cluster_shape_mn[0]
        m_clusters = (max_m + (tile_m * cluster_m - 1)) // (tile_m * cluster_m)
        return cutlass.max(cutlass.min(max_clusters, num_groups * m_clusters * self.num_n_clusters), Int32(1))

    def launch_arguments(self, num_clusters: Int32, stream) -> dict:
        """Launch arguments of the persistent grid: ``num_clusters`` clusters of cluster_m x cluster_n
        CTAs along the grid's z mode, one CTA per SM."""
        cluster_m, cluster_n = self.cluster_shape_mn
        return dict(grid=(cluster_m, cluster_n, num_clusters), block=[self.threads_per_cta, 1, 1],
                    cluster=(cluster_m, cluster_n, 1), min_blocks_per_mp=1, stream=stream)

    # ------------------------------------------------------------------ device code
    def cluster_position(self, cta_layout_mnk: cute.Layout) -> tuple:
        """Device code: (this CTA's (m, n) coordinate in its cluster, the cluster's id, the number of
        clusters) of the persistent grid."""
        cta_rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
        cluster_coord = cta_layout_mnk.get_flat_coord(cta_rank)
        _, _, cluster_id = cute.arch.block_idx()
        _, _, num_clusters = cute.arch.grid_dim()
        return cluster_coord, cluster_id, num_clusters

    def await_barrier_init(self, tidx: Int32) -> Int32:
        """Device code, after ``pipeline_init_arrive``: wait until every CTA of the cluster initialized
        its barriers and every thread of this CTA wrote its part of the group table; returns this
        thread's warpgroup (0: the producer's)."""
        warp_group_idx = cute.arch.make_warp_uniform(tidx // THREADS_PER_WARPGROUP)
        pipeline_init_wait(cluster_shape_mn=self.cluster_shape_mn)
        cute.arch.sync_threads()
        return warp_group_idx

    def stage_consumers(self) -> pipeline.CooperativeGroup:
        """The arrivals that release a mainloop stage: each consumer warp of every CTA the stage is
        multicast to, once."""
        mcast_size = self.num_mcast_a + self.num_mcast_b - 1
        return pipeline.CooperativeGroup(pipeline.Agent.Thread,
                                         mcast_size * self.num_consumer_wgs * WARPS_PER_WARPGROUP)

    def make_scheduler(self, storage, group_src, num_groups: Int32, total_rows: Int32, max_m: Int32,
                       num_experts: Int32, num_clusters: Int32, cluster_coord, tidx: Int32,
                       total_k: Optional[Int32] = None) -> GroupedTileScheduler:
        """Device code: this CTA's tile scheduler over the group table in ``storage``, the group values
        copied there by every thread of the CTA (ordered before use by the pipeline's init wait)."""
        scheduler = GroupedTileScheduler(
            self.schedule, storage.group_values.get_tensor(cute.make_layout(self.table_len)), group_src, num_groups,
            total_rows, max_m, num_experts, num_clusters, cluster_coord[0], cluster_coord[1],
            self.cluster_shape_mn[1], total_k=total_k)
        scheduler.load_group_values(tidx, self.threads_per_cta)
        return scheduler

    @cute.kernel
    def kernel(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
               tma_atom_b_own: cute.CopyAtom, mB_own: cute.Tensor, tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor,
               mSFB: Optional[cute.Tensor], mD: cute.Tensor, mC: Optional[cute.Tensor], mGroup: Optional[cute.Tensor], total_rows: Int32, max_m: Int32,
               num_groups: Int32, num_experts: Int32, tiled_mma: cute.TiledMma, cta_layout_mnk: cute.Layout,
               a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.ComposedLayout, sfa_smem_layout: cute.Layout,
               epi_smem_layout: cute.ComposedLayout, total_k: Optional[Int32]):
        scale_loads = [("sSFA", tma_atom_sfa, mSFA, sfa_smem_layout)] if self.fp8 else []
        self.run_cta(tma_atom_a, mA, tma_atom_b, mB, tma_atom_b_own, mB_own, scale_loads, mSFB, mD, mC, mGroup,
                     total_rows, max_m, num_groups, num_experts, tiled_mma, cta_layout_mnk, a_smem_layout,
                     b_smem_layout, epi_smem_layout, total_k)

    def make_mainloop(self, storage, a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.ComposedLayout,
                      cta_layout_mnk: cute.Layout) -> pipeline.PipelineTmaAsync:
        """Device code: the stage ring over the barriers in ``storage``; a stage's full barrier expects
        its A and B k-blocks and its scales (``stage_scale_bytes``) by TMA, its empty barrier one
        arrival per consumer warp of every CTA the stage is multicast to."""
        tx_bytes = (cute.size_in_bytes(self.ab_dtype, cute.slice_(a_smem_layout, (None, None, 0)))
                    + cute.size_in_bytes(self.ab_dtype, cute.slice_(b_smem_layout, (None, None, 0)))
                    + self.stage_scale_bytes())
        return pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mainloop_barriers.data_ptr(),
            num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=self.stage_consumers(),
            tx_count=tx_bytes,
            cta_layout_vmnk=cute.make_layout((1, *cta_layout_mnk.shape)),
            defer_sync=True,
        )

    def consumer_scales(self, staged: list, mSFB: Optional[cute.Tensor]) -> tuple:
        """The consumer's (A scales, B scales): A's staged in smem (FP8; None without scales) and B's
        in global memory."""
        return (staged[0] if staged else None), mSFB

    @cute.jit
    def run_cta(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
                tma_atom_b_own: cute.CopyAtom, mB_own: cute.Tensor, scale_loads: list, mSFB: Optional[cute.Tensor],
                mD: cute.Tensor, mC: Optional[cute.Tensor], mGroup: Optional[cute.Tensor], total_rows: Int32,
                max_m: Int32, num_groups: Int32, num_experts: Int32, tiled_mma: cute.TiledMma,
                cta_layout_mnk: cute.Layout, a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.ComposedLayout,
                epi_smem_layout: cute.ComposedLayout, total_k: Optional[Int32]):
        """One CTA of the kernel (device code): descriptor prefetch, shared storage, stage ring and
        scheduler, then the role split (warp 0 produces, the consumer warpgroups compute and store).
        ``scale_loads`` lists each per-stage scale load as (storage field, TMA atom, tensor, smem
        layout); ``mSFB`` are B's scales read from global memory (FP8 block scales) or None."""
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_a)
            cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_b)
            if cutlass.const_expr(self.schedule.mixed_clusters):
                cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_b_own)
            for scale_load in scale_loads:
                cute.nvgpu.cpasync.prefetch_descriptor(scale_load[1])

        cluster_coord, cluster_id, num_clusters = self.cluster_position(cta_layout_mnk)

        storage = SmemAllocator().allocate(self.shared_storage)
        mainloop = self.make_mainloop(storage, a_smem_layout, b_smem_layout, cta_layout_mnk)

        scheduler = self.make_scheduler(storage, mGroup, num_groups, total_rows, max_m, num_experts, num_clusters,
                                        cluster_coord, tidx, total_k)
        # Barrier init becomes visible cluster-wide here; the wait below also orders the group table
        # (written by every thread above) before any thread walks the schedule.
        pipeline_init_arrive(cluster_shape_mn=self.cluster_shape_mn, is_relaxed=True)

        sA = storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner)
        sB = storage.sB.get_tensor(b_smem_layout.outer, swizzle=b_smem_layout.inner)
        staged = [getattr(storage, field).get_tensor(layout) for field, _, _, layout in scale_loads]
        sD = storage.sD.get_tensor(epi_smem_layout.outer, swizzle=epi_smem_layout.inner)
        scale_copies = [(atom, tensor, smem) for (_, atom, tensor, _), smem in zip(scale_loads, staged)]
        sSFA, consumer_sfb = self.consumer_scales(staged, mSFB)

        warp_group_idx = self.await_barrier_init(tidx)
        if warp_group_idx == 0:
            cute.arch.setmaxregister_decrease(PRODUCER_REGS)
            if warp_idx == 0:
                a_mcast_mask = cute.make_layout_image_mask(cta_layout_mnk, cluster_coord, mode=1)
                b_mcast_mask = cute.make_layout_image_mask(cta_layout_mnk, cluster_coord, mode=0)
                self.producer(tma_atom_a, mA, tma_atom_b, mB, tma_atom_b_own, mB_own, scale_copies, sA, sB,
                              mainloop, scheduler,
                              a_mcast_mask if self.num_mcast_a > 1 else 0,
                              b_mcast_mask if self.num_mcast_b > 1 else 0, cluster_coord[0], cluster_coord[1],
                              cluster_id, max_m)
        else:
            cute.arch.setmaxregister_increase(CONSUMER_REGS)
            self.consumer(tiled_mma, sA, sB, sSFA, sD, consumer_sfb, mD, mC, mainloop, scheduler,
                          tidx - THREADS_PER_WARPGROUP, cluster_id)

    @cute.jit
    def producer(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
                 tma_atom_b_own: cute.CopyAtom, mB_own: cute.Tensor, scale_copies: list, sA: cute.Tensor,
                 sB: cute.Tensor, mainloop: pipeline.PipelineTmaAsync, scheduler: GroupedTileScheduler,
                 a_mcast_mask, b_mcast_mask, cta_m: Int32, cta_n: Int32, cluster_id: Int32, max_m: Int32):
        """TMA producer: for each scheduled tile, stream its k-blocks of A and B, and the scales of
        ``scale_copies`` ((TMA atom, tensor, smem) each, see ``partition_scales``), into the smem ring.

        ``producer_acquire`` waits until every consumer (in every CTA the stage is multicast to) has
        released the slot; the TMA loads then arrive on the slot's full barrier with their bytes. A
        tile whose cluster does not share B (``b_shared`` false: mixed-expert contiguous clusters)
        loads its whole B block without multicast; the bytes per stage are the same either way."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        cluster_m, cluster_n = self.cluster_shape_mn
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        cursor = scheduler.start(cluster_id)
        while scheduler.has_tile(cursor):
            tile = scheduler.tile(cursor)
            if tile.group >= 0:
                if cutlass.const_expr(self.kind == "k_grouped"):
                    # The group's K rows [k_start, k_start + k_rows); the tail of the last box (rows of
                    # the next group) is zeroed by the consumers (see mainloop_k_grouped).
                    k_tiles = (tile.k_rows + (tile_k - 1)) // tile_k
                    gA = cute.local_tile(cute.domain_offset((tile.local_row, tile.k_start), mA),
                                         (tile_m, tile_k), (0, None))
                    gB = cute.local_tile(cute.domain_offset((0, tile.k_start, 0), mB), (tile_n, tile_k),
                                         (tile.n_block, None, 0))
                else:
                    k_tiles = self.k_tiles
                    gA = cute.local_tile(cute.domain_offset((tile.row_start, 0), mA), (tile_m, tile_k), (0, None))
                    gB = cute.local_tile(mB, (tile_n, tile_k), (tile.n_block, None, tile.group))
                tAsA, tAgA = cute.nvgpu.cpasync.tma_partition(
                    tma_atom_a, cta_n, cute.make_layout(cluster_n),
                    cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2))
                tBsB, tBgB = cute.nvgpu.cpasync.tma_partition(
                    tma_atom_b, cta_m, cute.make_layout(cluster_m),
                    cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))
                tBsB_own, tBgB_own = tBsB, tBgB
                if cutlass.const_expr(self.schedule.mixed_clusters):
                    gB_own = cute.local_tile(mB_own, (tile_n, tile_k), (tile.n_block, None, tile.group))
                    tBsB_own, tBgB_own = cute.nvgpu.cpasync.tma_partition(
                        tma_atom_b_own, 0, cute.make_layout(1),
                        cute.group_modes(sB, 0, 2), cute.group_modes(gB_own, 0, 2))
                scale_parts = self.partition_scales(scale_copies, tile)
                for k_tile in cutlass.range(self.k_tiles_of(tile, k_tiles), unroll=1):
                    mainloop.producer_acquire(state)
                    barrier = mainloop.producer_get_barrier(state)
                    cute.copy(tma_atom_a, tAgA[(None, k_tile)], tAsA[(None, state.index)],
                              tma_bar_ptr=barrier, mcast_mask=a_mcast_mask)
                    if cutlass.const_expr(self.schedule.mixed_clusters):
                        if tile.b_shared:
                            cute.copy(tma_atom_b, tBgB[(None, k_tile)], tBsB[(None, state.index)],
                                      tma_bar_ptr=barrier, mcast_mask=b_mcast_mask)
                        else:
                            cute.copy(tma_atom_b_own, tBgB_own[(None, k_tile)], tBsB_own[(None, state.index)],
                                      tma_bar_ptr=barrier)
                    else:
                        cute.copy(tma_atom_b, tBgB[(None, k_tile)], tBsB[(None, state.index)],
                                  tma_bar_ptr=barrier, mcast_mask=b_mcast_mask)
                    for atom, tSs, tSg in scale_parts:
                        cute.copy(atom, tSg[(None, k_tile)], tSs[(None, state.index)], tma_bar_ptr=barrier)
                    mainloop.producer_commit(state)
                    state.advance()
            cursor = scheduler.next(cursor)
        # Wait until the consumers released every slot, so no multicast lands in an exited peer CTA.
        mainloop.producer_tail(state)

    def k_tiles_of(self, tile: WorkTile, k_tiles: Int32) -> Int32:
        """k-blocks the producer loads for a tile: ``k_tiles``, the kernel's K blocks or a k_grouped
        tile's ``ceil(k_rows / tile_k)`` (the last one partial, its tail zeroed by the consumers)."""
        return k_tiles

    def partition_scales(self, scale_copies: list, tile: WorkTile) -> list:
        """(TMA atom, smem partition, gmem partition) of each per-stage scale load of a tile, one
        k-block per stage: FP8 A's scales (``partition_sfa``)."""
        return [(atom, *self.partition_sfa(atom, tensor, smem, tile)) for atom, tensor, smem in scale_copies]

    def partition_sfa(self, tma_atom_sfa: cute.CopyAtom, mSFA: cute.Tensor, sSFA: cute.Tensor, tile: WorkTile):
        """TMA partition (smem, gmem) of this tile's FP8 A scales, one k-block per stage: masked tiles
        index (local row, group), the others the 2-D row space."""
        sfa_origin = (tile.row_start, 0, 0)
        if cutlass.const_expr(self.kind == "masked"):
            sfa_origin = (tile.local_row, 0, tile.group)
        gS = cute.local_tile(cute.domain_offset(sfa_origin, mSFA), (self.tile_shape_mnk[0], 1), (0, None, 0))
        return cute.nvgpu.cpasync.tma_partition(
            tma_atom_sfa, 0, cute.make_layout(1), cute.group_modes(sSFA, 0, 2), cute.group_modes(gS, 0, 2))

    @cute.jit
    def consumer(self, tiled_mma: cute.TiledMma, sA: cute.Tensor, sB: cute.Tensor, sSFA: cute.Tensor,
                 sD: cute.Tensor, mSFB: Optional[cute.Tensor], mD: cute.Tensor, mC: Optional[cute.Tensor],
                 mainloop: pipeline.PipelineTmaAsync, scheduler: GroupedTileScheduler, consumer_tidx: Int32,
                 cluster_id: Int32):
        """WGMMA consumer warpgroups: accumulate each tile in registers, then run the epilogue.
        ``sSFA`` / ``mSFB``: the FP8 scales of ``consumer_scales`` (A's staged, B's global or staged)."""
        tile_n = self.tile_shape_mnk[1]
        (tCrA, tCrB, tCrB_parts, accumulators, block_acc, num_k_blocks, tCcC, r0, epilogue, state,
         release_state) = self.consumer_setup(tiled_mma, sA, sB, sD, consumer_tidx)
        epi_buffer = Int32(0)
        cursor = scheduler.start(cluster_id)
        while scheduler.has_tile(cursor):
            tile = scheduler.tile(cursor)
            if tile.group >= 0:
                accumulators.fill(0.0)
                if cutlass.const_expr(self.fp8):
                    state, release_state = self.mainloop_fp8(
                        tiled_mma, tCrA, tCrB_parts, accumulators, block_acc, num_k_blocks, mainloop, state,
                        release_state, sSFA, mSFB, tCcC, r0, tile)
                elif cutlass.const_expr(self.kind == "k_grouped"):
                    if tile.k_rows > 0:  # an empty group stores zeros (+ C)
                        state, release_state = self.mainloop_k_grouped(
                            tiled_mma, tCrA, tCrB, accumulators, num_k_blocks, mainloop, state, release_state,
                            sA, sB, tile.k_rows, consumer_tidx)
                else:
                    state, release_state = self.mainloop_bf16(
                        tiled_mma, tCrA, tCrB, accumulators, num_k_blocks, mainloop, state, release_state)
                if tile.rows_valid > 0 and tile.n_block * tile_n < self.n:
                    epi_buffer = self.store_outputs(epilogue, accumulators, sD, mD, mC, tile, epi_buffer)
            cursor = scheduler.next(cursor)

    def consumer_setup(self, tiled_mma, sA: cute.Tensor, sB: cute.Tensor, sD: cute.Tensor,
                       consumer_tidx: Int32) -> tuple:
        """Device code, consumer warpgroups: ``(tCrA, tCrB, tCrB_parts, accumulators, block_acc,
        num_k_blocks, tCcC, r0, epilogue, state, release_state)``: WGMMA fragments of the A stages
        and of B's (tile_n, tile_k, buffers) tiles ``sB`` (also per N part), the tile's accumulators
        (FP8: and one part's block accumulator), k-blocks per stage, each accumulator element's (row,
        column) in the tile and the row of the first, the epilogue's copy plans, the ring's consumer
        state and its release state."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        wg_layout = cute.make_layout(self.num_consumer_wgs, stride=THREADS_PER_WARPGROUP)
        thr_mma = tiled_mma.get_slice(wg_layout(consumer_tidx // THREADS_PER_WARPGROUP))
        thr_c = tiled_mma.get_slice(consumer_tidx)  # this thread's accumulator elements
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        # B fragments of each N part (FP8 tiles of two scale blocks; otherwise the whole tile).
        tCrB_parts = [tCrB]
        if cutlass.const_expr(self.n_parts > 1):
            tCrB_parts = [tiled_mma.make_fragment_B(thr_mma.partition_B(
                cute.local_tile(sB, (self.mma_tile_n, tile_k, cute.size(sB, mode=[2])), (part, 0, 0))))
                for part in range(self.n_parts)]
        accumulators = cute.make_rmem_tensor(thr_mma.partition_shape_C((tile_m, tile_n)), self.acc_dtype)
        block_acc = accumulators
        if cutlass.const_expr(self.fp8):
            block_acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((tile_m, self.mma_tile_n)), self.acc_dtype)
        num_k_blocks = cute.size(tCrA, mode=[2])
        # (row, column) in the tile of each accumulator element; r0: the first one's row (ROW_HALF: the others).
        tCcC = thr_c.partition_C(cute.make_identity_tensor((tile_m, tile_n)))
        r0 = tCcC[0][0]
        epilogue = self.make_epilogue(tiled_mma, sD, consumer_tidx)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        release_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        return (tCrA, tCrB, tCrB_parts, accumulators, block_acc, num_k_blocks, tCcC, r0, epilogue, state,
                release_state)

    @cute.jit
    def mainloop_bf16(self, tiled_mma, tCrA, tCrB, accumulators, num_k_blocks: cutlass.Constexpr[int],
                      mainloop, state, release_state, k_tiles: Optional[Int32] = None):
        """All k-blocks of one tile (``k_tiles``, default the kernel's K), one WGMMA group in flight
        behind the one being issued.

        A stage is released only after ``wait_group(1)`` retired the WGMMAs that read it (they read
        shared memory asynchronously), i.e. one k-tile behind the one just issued; ``release_state``
        trails ``state`` by that one stage."""
        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
        cute.nvgpu.warpgroup.fence()
        mainloop.consumer_wait(state)
        if cutlass.const_expr(self.generic_proxy_stages):
            cute.arch.fence_proxy("async.shared", space="cta")
        for kb in cutlass.range_constexpr(num_k_blocks):
            cute.gemm(tiled_mma, accumulators, tCrA[(None, None, kb, state.index)],
                      tCrB[(None, None, kb, state.index)], accumulators)
        cute.nvgpu.warpgroup.commit_group()
        state.advance()
        k_tiles = self.k_tiles if k_tiles is None else k_tiles
        for k_tile in cutlass.range(1, k_tiles, unroll=1):
            mainloop.consumer_wait(state)
            if cutlass.const_expr(self.generic_proxy_stages):
                cute.arch.fence_proxy("async.shared", space="cta")
            for kb in cutlass.range_constexpr(num_k_blocks):
                cute.gemm(tiled_mma, accumulators, tCrA[(None, None, kb, state.index)],
                          tCrB[(None, None, kb, state.index)], accumulators)
            cute.nvgpu.warpgroup.commit_group()
            cute.nvgpu.warpgroup.wait_group(1)
            mainloop.consumer_release(release_state)
            release_state.advance()
            state.advance()
        cute.nvgpu.warpgroup.wait_group(0)
        mainloop.consumer_release(release_state)
        release_state.advance()
        return state, release_state

    @cute.jit
    def mainloop_k_grouped(self, tiled_mma, tCrA, tCrB, accumulators, num_k_blocks: cutlass.Constexpr[int],
                           mainloop, state, release_state, sA: cute.Tensor, sB: cute.Tensor, k_rows: Int32,
                           consumer_tidx: Int32):
        """A k_grouped tile: ``ceil(k_rows / tile_k)`` k-blocks (``k_rows`` >= 1), as mainloop_bf16.

        The TMA boxes of the last k-block run past the group's rows into the next group's (or past
        the tensor, which TMA fills with zeros): before that block's WGMMAs the consumer threads
        zero its rows ``>= k_rows % tile_k`` in A and B (so even a non-finite value of another group
        cannot leak in), fence the generic-proxy writes for the async proxy, and meet at a named
        barrier."""
        tile_k = self.tile_shape_mnk[2]
        k_tiles = (k_rows + (tile_k - 1)) // tile_k
        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
        mainloop.consumer_wait(state)
        self.zero_tail(sA, sB, state.index, k_rows, consumer_tidx)
        cute.nvgpu.warpgroup.fence()
        for kb in cutlass.range_constexpr(num_k_blocks):
            cute.gemm(tiled_mma, accumulators, tCrA[(None, None, kb, state.index)],
                      tCrB[(None, None, kb, state.index)], accumulators)
        cute.nvgpu.warpgroup.commit_group()
        state.advance()
        for k_tile in cutlass.range(1, k_tiles, unroll=1):
            mainloop.consumer_wait(state)
            self.zero_tail(sA, sB, state.index, k_rows - k_tile * tile_k, consumer_tidx)
            for kb in cutlass.range_constexpr(num_k_blocks):
                cute.gemm(tiled_mma, accumulators, tCrA[(None, None, kb, state.index)],
                          tCrB[(None, None, kb, state.index)], accumulators)
            cute.nvgpu.warpgroup.commit_group()
            cute.nvgpu.warpgroup.wait_group(1)
            mainloop.consumer_release(release_state)
            release_state.advance()
            state.advance()
        cute.nvgpu.warpgroup.wait_group(0)
        mainloop.consumer_release(release_state)
        release_state.advance()
        return state, release_state

    @cute.jit
    def zero_tail(self, sA: cute.Tensor, sB: cute.Tensor, stage: Int32, valid_rows: Int32, consumer_tidx: Int32):
        """Zero K rows ``[valid_rows, tile_k)`` of stage ``stage`` of A and B when ``valid_rows`` (the
        group's rows left at this k-block) is below tile_k; every consumer thread takes part."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        if valid_rows < tile_k:
            zero = self.ab_dtype(0.0)
            for i in cutlass.range(consumer_tidx, (tile_k - valid_rows) * tile_m, self.num_consumer_threads):
                sA[(i % tile_m, valid_rows + i // tile_m, stage)] = zero
            for i in cutlass.range(consumer_tidx, (tile_k - valid_rows) * tile_n, self.num_consumer_threads):
                sB[(i % tile_n, valid_rows + i // tile_n, stage)] = zero
            cute.arch.fence_proxy("async.shared", space="cta")
            self.tail_barrier.arrive_and_wait()

    @cute.jit
    def block_wgmmas(self, tiled_mma, block_acc, tCrA, tCrB, num_k_blocks: cutlass.Constexpr[int], stage: Int32):
        """FP8: one 128-K block's WGMMAs of one N part (``tCrB``) into ``block_acc`` (overwritten by
        the first), then waited on, so the promotion may read ``block_acc``."""
        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, False)
        cute.nvgpu.warpgroup.fence()
        for kb in cutlass.range_constexpr(num_k_blocks):
            cute.gemm(tiled_mma, block_acc, tCrA[(None, None, kb, stage)], tCrB[(None, None, kb, stage)], block_acc)
            tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
        cute.nvgpu.warpgroup.commit_group()
        cute.nvgpu.warpgroup.wait_group(0)

    @cute.jit
    def mainloop_fp8(self, tiled_mma, tCrA, tCrB_parts, accumulators, block_acc,
                     num_k_blocks: cutlass.Constexpr[int], mainloop, state, release_state, sSFA: cute.Tensor,
                     mSFB: cute.Tensor, tCcC: cute.Tensor, r0: Int32, tile: WorkTile,
                     k_tiles: Optional[Int32] = None):
        """Per 128-K block and N part: WGMMAs into ``block_acc``, then
        ``acc[part] += block_acc * sfa[row] * sfb[part]`` (``tCcC``: the accumulator elements'
        (row, column) in the tile, for a variant that scales per column). ``k_tiles``: the K blocks
        of the tile (default: the kernel's K, a constant).

        The promotion needs the part's WGMMAs complete (``wait_group(0)``); the stage is released
        after the last part's WGMMAs, its A scales read before. B's scales of the next block are
        loaded ahead (an N part past the last scale block reuses the last one: its columns are never
        stored)."""
        expert = tile.group
        part_values = cute.size(block_acc)
        tile_n = self.tile_shape_mnk[1]
        sfb_rows = [cutlass.min((tile.n_block * tile_n + part * self.mma_tile_n) // FP8_SCALE_BLOCK,
                                self.n_scale_blocks - 1) for part in range(self.n_parts)]
        sfb_next = [mSFB[(row, 0, expert)] for row in sfb_rows]
        k_tiles = self.k_tiles if k_tiles is None else k_tiles
        for k_tile in cutlass.range(k_tiles, unroll=1):
            sfb = [value for value in sfb_next]
            if k_tile + 1 < k_tiles:
                sfb_next = [mSFB[(row, k_tile + 1, expert)] for row in sfb_rows]
            mainloop.consumer_wait(state)
            scale_lo = sSFA[(r0, 0, state.index)]
            scale_hi = sSFA[(r0 + ROW_HALF, 0, state.index)]
            for part in cutlass.range_constexpr(self.n_parts):
                self.block_wgmmas(tiled_mma, block_acc, tCrA, tCrB_parts[part], num_k_blocks, state.index)
                if cutlass.const_expr(part == self.n_parts - 1):
                    mainloop.consumer_release(release_state)
                    release_state.advance()
                    state.advance()
                part_lo = scale_lo * sfb[part]
                part_hi = scale_hi * sfb[part]
                # Elements 4j, 4j+1 sit on row r0 and 4j+2, 4j+3 on row r0 + ROW_HALF.
                for j in cutlass.range_constexpr(part_values // 4):
                    for r in cutlass.range_constexpr(4):
                        scale = part_hi if r >= 2 else part_lo
                        index = part * part_values + 4 * j + r
                        accumulators[index] = accumulators[index] + block_acc[4 * j + r] * scale
        return state, release_state

    def make_epilogue(self, tiled_mma, sD: cute.Tensor, consumer_tidx: Int32):
        """Copy plans of the epilogue: registers -> smem (stmatrix), smem -> gmem (16-byte stores)."""
        r2s_atom = sm90_utils.sm90_get_smem_store_op(LayoutEnum.ROW_MAJOR, self.stage_dtype, self.acc_dtype)
        stmatrix_atom = cute.make_copy_atom(cute.nvgpu.warp.StMatrix8x8x16bOp(False, 4), self.stage_dtype)
        tiled_r2s = cute.make_tiled_copy_S(r2s_atom, cute.make_tiled_copy_C_atom(stmatrix_atom, tiled_mma))
        thr_r2s = tiled_r2s.get_slice(consumer_tidx)
        vec = STORE_BITS // self.stage_dtype.width
        threads_per_row = EPI_N // vec
        s2g_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.stage_dtype, num_bits_per_copy=STORE_BITS)
        tiled_s2g = cute.make_tiled_copy_tv(
            s2g_atom,
            cute.make_layout((self.num_consumer_threads // threads_per_row, threads_per_row),
                             stride=(threads_per_row, 1)),
            cute.make_layout((1, vec)))
        return tiled_r2s, thr_r2s, tiled_s2g.get_slice(consumer_tidx)

    @cute.jit
    def store_outputs(self, epilogue, accumulators: cute.Tensor, sD: cute.Tensor, mD: cute.Tensor,
                      mC: Optional[cute.Tensor], tile: WorkTile, epi_buffer: Int32) -> Int32:
        """Write one finished tile's outputs: D (= [C +] the accumulators). Variants with other
        epilogues override this."""
        return self.store_tile(epilogue, accumulators, sD, mD, mC, tile, epi_buffer)

    @cute.jit
    def store_vector(self, values: cute.Tensor, dst: cute.Tensor, coord, tile: WorkTile):
        """The epilogue's last step: one 16-byte vector of D ``values`` at (row in the tile, column)
        ``coord`` into ``dst``, its place in D. Variants that send rows elsewhere override this."""
        cute.autovec_copy(values, dst)

    @cute.jit
    def store_tile(self, epilogue, accumulators: cute.Tensor, sD: cute.Tensor, mD: cute.Tensor,
                   mC: Optional[cute.Tensor], tile: WorkTile, epi_buffer: Int32,
                   tile_cols: cutlass.Constexpr[int] = 0, n_cols: cutlass.Constexpr[int] = 0,
                   col_offset: cutlass.Constexpr[int] = 0) -> Int32:
        """Epilogue through shared memory, tile_m x EPI_N sub-tiles in a ring of EPI_STAGES buffers.

        ``accumulators`` holds ``tile_cols`` columns (default tile_n) of N block ``tile.n_block``; they
        go to D's columns ``col_offset + n_block * tile_cols + j``, stored while
        ``n_block * tile_cols + j < n_cols`` (default N). One barrier per sub-tile suffices with two
        buffers: a thread writes buffer b again only after the next sub-tile's barrier, which every
        thread reaches after reading buffer b."""
        tiled_r2s, thr_r2s, thr_s2g = epilogue
        row_start, rows_valid, n_block = tile.row_start, tile.rows_valid, tile.n_block
        tile_m = self.tile_shape_mnk[0]
        tile_n = tile_cols if tile_cols else self.tile_shape_mnk[1]
        n_extent = n_cols if n_cols else self.n
        tRS_sD = thr_r2s.partition_D(sD)
        tRS_acc = tiled_r2s.retile(accumulators)
        rD_shape = cute.shape(thr_r2s.partition_S(sD))[:3]
        tRS_rAcc = cute.make_rmem_tensor(rD_shape, self.acc_dtype)
        tRS_rD = cute.make_rmem_tensor(rD_shape, self.stage_dtype)
        epi_values = cute.size(tRS_rAcc)
        gD_epi = cute.flat_divide(
            cute.local_tile(cute.domain_offset((row_start, col_offset), mD), (tile_m, tile_n), (0, n_block)),
            self.epi_tile)
        cD_epi = cute.flat_divide(
            cute.local_tile(cute.make_identity_tensor((tile_m, n_extent)), (tile_m, tile_n), (0, n_block)),
            self.epi_tile)
        gC_epi = gD_epi
        if cutlass.const_expr(self.has_c):
            gC_epi = cute.flat_divide(
                cute.local_tile(cute.domain_offset((row_start, 0), mC), (tile_m, tile_n), (0, n_block)),
                self.epi_tile)
        for epi_n in cutlass.range_constexpr(tile_n // EPI_N):
            for v in cutlass.range_constexpr(epi_values):
                tRS_rAcc[v] = tRS_acc[epi_n * epi_values + v]
            tRS_rD.store(tRS_rAcc.load().to(self.stage_dtype))
            cute.copy(tiled_r2s, tRS_rD, tRS_sD[(None, None, None, epi_buffer)])
            self.epilogue_barrier.arrive_and_wait()
            tS = thr_s2g.partition_S(sD[(None, None, epi_buffer)])
            tG = thr_s2g.partition_D(gD_epi[(None, None, 0, epi_n)])
            tC = thr_s2g.partition_D(gC_epi[(None, None, 0, epi_n)])
            tCoord = thr_s2g.partition_D(cD_epi[(None, None, 0, epi_n)])
            sub_tile = cute.make_rmem_tensor_like(tS)
            cute.autovec_copy(tS, sub_tile)
            for m in cutlass.range_constexpr(cute.size(tS, mode=[1])):
                for n in cutlass.range_constexpr(cute.size(tS, mode=[2])):
                    coord = tCoord[(0, m, n)]
                    if coord[0] < rows_valid and coord[1] < n_extent:
                        values = sub_tile[(None, m, n)].load().to(self.acc_dtype)
                        if cutlass.const_expr(self.has_c):
                            c_vals = cute.make_rmem_tensor_like(sub_tile[(None, m, n)], self.d_dtype)
                            cute.autovec_copy(tC[(None, m, n)], c_vals)
                            values = values + c_vals.load().to(self.acc_dtype)
                        out = cute.make_rmem_tensor_like(sub_tile[(None, m, n)], self.d_dtype)
                        out.store(values.to(self.d_dtype))
                        self.store_vector(out, tG[(None, m, n)], coord, tile)
            epi_buffer = (epi_buffer + 1) % EPI_STAGES
        return epi_buffer
