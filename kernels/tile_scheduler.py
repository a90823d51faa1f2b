"""Persistent tile scheduler shared by the M-grouped GEMM kernels.

The work of one launch is a list of *groups* (experts); group ``g`` owns ``rows(g)`` consecutive rows
of the 2-D row space of A and D starting at ``row_start(g)``. Each group is cut into cluster tiles of
``cluster_tile_m x cluster_tile_n``; tiles are numbered group by group, and inside a group in panels
of ``panel`` M-blocks so that consecutive tiles share their B (weight) block and a panel's A blocks
stay in L2 while the N blocks sweep.

Clusters walk the numbering persistently: cluster ``c`` takes tiles ``c, c + num_clusters, ...``. The
group of a tile is found by advancing a cursor monotonically through the groups, so each cluster
reads every group's row count once per launch.

Problem kinds (compile-time):
- ``dense`` / ``contiguous``: one group of ``total_rows`` rows (the contiguous kind looks up each
  tile's expert in ``grouped_layout`` separately);
- ``masked``: group ``g`` has ``masked_m[g]`` rows starting at ``g * max_m``;
- ``ragged``: group ``g`` spans rows ``[ends[g-1], ends[g])`` of cumulative ends ``ends``;
- ``psum``: the contiguous layout's psum form, group ``g`` spans ``[align(ends[g-1]), ends[g])``.
The per-group values live in shared memory (``group_values``), filled once per CTA by
``load_group_values``: for ``masked`` ``group_values[g] = masked_m[g]``; for ``ragged`` and ``psum``
``group_values[0] = 0`` and ``group_values[g + 1] = ends[g]``.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Int32

from ..specs import KINDS

# Groups whose row counts one launch can hold in shared memory.
MAX_GROUPS = 1024


def kind_has_group_table(kind: str) -> bool:
    """Whether the kind keeps per-group row counts in shared memory."""
    return kind in ("masked", "ragged", "psum")


class GroupedTileScheduler:
    """Compile-time description of the tile numbering; the device methods keep their state in Int32s."""

    def __init__(self, kind: str, tile_m: int, cluster_m: int, num_n_clusters: int, panel: int, alignment: int = 0):
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.tile_m = tile_m
        self.cluster_m = cluster_m
        self.cluster_tile_m = tile_m * cluster_m
        self.num_n_clusters = num_n_clusters
        self.panel = panel
        if kind == "psum" and (alignment <= 0 or alignment % tile_m != 0):
            raise ValueError(f"alignment: psum groups need an alignment that is a multiple of tile_m={tile_m}, "
                             f"got {alignment}")
        self.alignment = alignment

    @cute.jit
    def load_group_values(self, group_values: cute.Tensor, group_src: cute.Tensor, num_groups: Int32,
                          tidx: Int32, num_threads: cutlass.Constexpr[int]):
        """Copy the per-group counts (masked) or cumulative ends (ragged) into shared memory."""
        if cutlass.const_expr(self.kind == "masked"):
            for i in cutlass.range(tidx, num_groups, num_threads):
                group_values[i] = group_src[i]
        if cutlass.const_expr(self.kind in ("ragged", "psum")):
            if tidx == 0:
                group_values[0] = Int32(0)
            for i in cutlass.range(tidx, num_groups, num_threads):
                group_values[i + 1] = group_src[i]

    @cute.jit
    def group_rows(self, group_values: cute.Tensor, g: Int32, num_groups: Int32, total_rows: Int32) -> Int32:
        """Rows owned by group g."""
        rows = total_rows
        if cutlass.const_expr(self.kind == "masked"):
            # masked_m[g] > Mmax must not spill into the next group's rows.
            rows = cutlass.min(group_values[g], total_rows // cutlass.max(num_groups, 1))
        if cutlass.const_expr(self.kind in ("ragged", "psum")):
            rows = group_values[g + 1] - self.group_row_start(group_values, g, 0)
        return cutlass.max(rows, 0)

    @cute.jit
    def group_row_start(self, group_values: cute.Tensor, g: Int32, max_m: Int32) -> Int32:
        """First row of group g in the 2-D row space."""
        start = Int32(0)
        if cutlass.const_expr(self.kind == "masked"):
            start = g * max_m
        if cutlass.const_expr(self.kind == "ragged"):
            start = cutlass.max(group_values[g], 0)
        if cutlass.const_expr(self.kind == "psum"):
            start = (cutlass.max(group_values[g], 0) + (self.alignment - 1)) // self.alignment * self.alignment
        return start

    @cute.jit
    def group_tiles(self, group_values: cute.Tensor, g: Int32, num_groups: Int32, total_rows: Int32) -> Int32:
        """Cluster tiles of group g (zero for an empty group)."""
        rows = self.group_rows(group_values, g, num_groups, total_rows)
        m_clusters = (rows + (self.cluster_tile_m - 1)) // self.cluster_tile_m
        return m_clusters * self.num_n_clusters

    @cute.jit
    def advance(self, group_values: cute.Tensor, linear: Int32, g: Int32, g_first_tile: Int32,
                num_groups: Int32, total_rows: Int32):
        """Move the group cursor (g, g_first_tile) forward until group g contains tile ``linear``.

        Returns the new cursor; ``g == num_groups`` once ``linear`` lies past the last tile.
        """
        g_tiles = self.group_tiles(group_values, g, num_groups, total_rows)
        while g < num_groups and linear >= g_first_tile + g_tiles:
            g_first_tile = g_first_tile + g_tiles
            g = g + 1
            g_tiles = self.group_tiles(group_values, g, num_groups, total_rows)
        return g, g_first_tile

    @cute.jit
    def locate(self, group_values: cute.Tensor, linear: Int32, g: Int32, g_first_tile: Int32,
               num_groups: Int32, total_rows: Int32, max_m: Int32, cta_m: Int32, cta_n: Int32, cluster_n: cutlass.Constexpr[int]):
        """Row start, valid rows (clamped to the row space) and N block of this CTA's tile ``linear``."""
        rows = self.group_rows(group_values, g, num_groups, total_rows)
        m_clusters = (rows + (self.cluster_tile_m - 1)) // self.cluster_tile_m
        local = linear - g_first_tile
        panel_span = self.panel * self.num_n_clusters
        panel_idx = local // panel_span
        in_panel = local - panel_idx * panel_span
        panel_first_m = panel_idx * self.panel
        panel_height = cutlass.min(Int32(self.panel), m_clusters - panel_first_m)
        n_cluster = in_panel // panel_height
        m_cluster = panel_first_m + (in_panel - n_cluster * panel_height)
        m_block = m_cluster * self.cluster_m + cta_m
        row_in_group = m_block * self.tile_m
        row_start = self.group_row_start(group_values, g, max_m) + row_in_group
        # Never past the end of the row space, whatever the group table says.
        rows_valid = cutlass.min(rows - row_in_group, total_rows - row_start)
        n_block = n_cluster * cluster_n + cta_n
        return row_start, rows_valid, n_block
