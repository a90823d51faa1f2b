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

Roles as in ``Sm90GroupedGemm``, whose launch, CTA body, producer, consumer, layouts, epilogue and
scheduler this subclass reuses through its hooks (``stage_scale_bytes``, ``partition_scales``,
``consumer_scales``, ``k_tiles_of``, ``mainloop_fp8``):
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
from cutlass import Int32

from ..scheduler import WorkTile
from .grouped_gemm import ROW_HALF, Sm90GroupedGemm

SCALE_BYTES = 4  # one FP32 scale per row (A) or column (B) per stage


class Sm90Fp8KGroupedGemm(Sm90GroupedGemm):
    """K-grouped FP8 GEMM with 1 x 128 scales on A and B (see module docstring). ``m`` is D's rows
    per group (the spec's ``k``), ``n`` its columns."""

    def __init__(self, tile_m: int, tile_n: int, cluster_m: int, cluster_n: int, stages: int, panel: int,
                 m: int, n: int, has_c: bool):
        super().__init__("k_grouped", True, tile_m, tile_n, cluster_m, cluster_n, stages, panel, n, m, has_c)

    # ------------------------------------------------------------------ host-side (trace time) setup
    def _setup(self, d_dtype: Type[cutlass.Numeric]):
        """The base setup (its stages count the B scales, ``stage_scale_bytes``) and B's staged scales."""
        super()._setup(d_dtype)
        self.sfb_smem_layout = self.scale_smem_layout(self.tile_shape_mnk[1])

    def stage_scale_bytes(self) -> int:
        """A stage holds ``tile_m`` A scales and ``tile_n`` B scales."""
        tile_m, tile_n, _ = self.tile_shape_mnk
        return (tile_m + tile_n) * SCALE_BYTES

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
        mA, mB, mD, mC, max_m, num_groups, _, total_k, total_rows = self.launch_views(mA, mB, mD, mC, mGroup)
        tma_atom_a, tma_a, tma_atom_b, tma_b = self.ab_load_atoms(mA, mB)
        tile_m, tile_n, _ = self.tile_shape_mnk
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
        scale_loads = [("sSFA", tma_atom_sfa, mSFA, sfa_smem_layout), ("sSFB", tma_atom_sfb, mSFB, sfb_smem_layout)]
        self.run_cta(tma_atom_a, mA, tma_atom_b, mB, tma_atom_b, mB, scale_loads, None, mD, mC, mGroup, total_rows,
                     max_m, num_groups, Int32(1), tiled_mma, cta_layout_mnk, a_smem_layout, b_smem_layout,
                     epi_smem_layout, total_k)

    def consumer_scales(self, staged: list, mSFB: Optional[cute.Tensor]) -> tuple:
        """Both operands' scales are staged in smem: (sSFA, sSFB)."""
        return staged[0], staged[1]

    def k_tiles_of(self, tile: WorkTile, k_tiles: Optional[Int32] = None) -> Int32:
        """k-blocks of a tile: its group's K rows in whole 128-row blocks (producer and consumers
        agree on it; the op passes sizes that are multiples of 128; the base's ``k_tiles`` is unused)."""
        return tile.k_rows // self.tile_shape_mnk[2]

    def partition_scales(self, scale_copies: list, tile: WorkTile) -> list:
        """(TMA atom, smem, gmem) partitions of this CTA's ``tile_m`` A scales (rows from the tile's
        local row) and ``tile_n`` B scales (its N block's columns), one K block per stage from the
        group's first block on."""
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        first_block = tile.k_start // tile_k
        (atom_a, sfa, sSFA), (atom_b, sfb, sSFB) = scale_copies
        return [(atom_a, *self._scale_partition(atom_a, sfa, sSFA, tile.local_row, first_block, tile_m)),
                (atom_b, *self._scale_partition(atom_b, sfb, sSFB, tile.n_block * tile_n, first_block, tile_n))]

    @staticmethod
    def _scale_partition(tma_atom: cute.CopyAtom, scales: cute.Tensor, smem: cute.Tensor, row: Int32,
                         first_block: Int32, rows: int):
        """TMA partition (smem, gmem) of ``rows`` scales from ``row`` on, one K block per stage
        starting at block ``first_block``."""
        gS = cute.local_tile(cute.domain_offset((row, first_block, 0), scales), (rows, 1), (0, None, 0))
        return cute.nvgpu.cpasync.tma_partition(
            tma_atom, 0, cute.make_layout(1), cute.group_modes(smem, 0, 2), cute.group_modes(gS, 0, 2))

    @cute.jit
    def mainloop_fp8(self, tiled_mma, tCrA, tCrB_parts, accumulators, block_acc,
                     num_k_blocks: cutlass.Constexpr[int], mainloop, state, release_state, sSFA: cute.Tensor,
                     sSFB: cute.Tensor, tCcC: cute.Tensor, r0: Int32, tile: WorkTile):
        """The tile's k-blocks (none for an empty group: zeros, + C), per 128-K block and N part:
        WGMMAs into ``block_acc`` (overwritten by the first), wait, then
        ``acc[part] += block_acc * sfa[row] * sfb[column]`` with both scales read from the stage; the
        stage is released after the last part's promotion (``release_state`` is not used)."""
        part_values = cute.size(block_acc)
        for k_tile in cutlass.range(self.k_tiles_of(tile), unroll=1):
            mainloop.consumer_wait(state)
            scale_lo = sSFA[(r0, 0, state.index)]
            scale_hi = sSFA[(r0 + ROW_HALF, 0, state.index)]
            for part in cutlass.range_constexpr(self.n_parts):
                self.block_wgmmas(tiled_mma, block_acc, tCrA, tCrB_parts[part], num_k_blocks, state.index)
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
        return state, release_state
