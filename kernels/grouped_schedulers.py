"""Static persistent tile schedulers of the M-grouped GEMM kinds (implementations of ``TileScheduler``).

The work of one launch is a list of *groups* (experts); group ``g`` owns ``rows(g)`` consecutive rows
of the 2-D row space of A and D starting at ``row_start(g)``. Each group is cut into cluster tiles of
``cluster_tile_m x cluster_tile_n``; tiles are numbered group by group, and inside a group in panels
of ``panel`` M-blocks so that consecutive tiles share their B (weight) block and a panel's A blocks
stay in L2 while the N blocks sweep. Cluster ``c`` takes tiles ``c, c + num_clusters, ...``; the group
of a tile is found by advancing the cursor monotonically through the groups, so each cluster reads
every group's row count once per launch.

Problem kinds (compile-time), and what any value of their index tensors produces (no value can make
a tile read or write outside the row space, or make two groups own one row):
- ``dense``: one group of ``total_rows`` rows.
- ``contiguous``: one group of ``total_rows`` rows; each CTA tile's expert is ``grouped_layout`` at
  its first row; a tile whose id lies outside [0, num_experts) is skipped (rows left unwritten). The
  two CTAs of an M-cluster may hold different experts (``mixed_clusters``: segments aligned to fewer
  rows than a cluster tile): they share (multicast) B only when their experts agree, and a
  CTA whose own id is bad computes with its partner's expert, so both keep the same pipeline
  schedule, and stores nothing.
- ``masked``: group ``g`` has ``clamp(masked_m[g], 0, max_m)`` rows starting at ``g * max_m``.
- ``ragged``: group ``g`` spans ``[start(g), min(ends[g], total_rows))`` with ``start(g)`` the largest
  end of the groups before it (at least 0): an end below an earlier one leaves its group empty.
- ``psum``: as ragged with ``start(g)`` rounded up to the alignment.
- ``k_grouped`` (weight gradients): group ``g`` is D's block ``[g * M, (g + 1) * M)`` (``max_m`` = M);
  its reduction runs over K rows ``[k_start(g), k_start(g) + k_rows(g))`` of A and B, with
  ``k_rows(g) = clamp(ks[g], 0, total_k - k_start(g))`` and ``k_start(g)`` the clamped sum of the
  earlier groups' rows: no value of ``ks`` makes a group read outside ``[0, total_k)`` or another
  group's rows (the kernel zeroes the tail of a group's last k-block).
The per-group values (``masked_m``, ``ends`` or ``ks``) are copied into a shared-memory table once per CTA.
"""

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Int32

from cute_moe.specs import KINDS

from cutlass.cutlass_dsl import extract_mlir_values, new_from_mlir_values

from .scheduler import TileCursor, TileScheduler, WorkTile

TABLE_KINDS = ("masked", "ragged", "psum", "k_grouped")  # kinds whose per-group values live in shared memory
ENDS_KINDS = ("ragged", "psum")  # kinds whose per-group values are cumulative ends


@dataclass(frozen=True)
class GroupedSchedule:
    """Compile-time description of the tile numbering of one kernel specialization."""

    kind: str
    tile_m: int
    cluster_m: int
    num_n_clusters: int
    panel: int
    alignment: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.kind == "psum" and (self.alignment <= 0 or self.alignment % self.tile_m != 0):
            raise ValueError(f"alignment: psum groups need an alignment that is a multiple of "
                             f"tile_m={self.tile_m}, got {self.alignment}")

    @property
    def cluster_tile_m(self) -> int:
        return self.tile_m * self.cluster_m

    @property
    def has_group_table(self) -> bool:
        return self.kind in TABLE_KINDS

    @property
    def mixed_clusters(self) -> bool:
        """Contiguous M-clusters: their CTA tiles may belong to different experts (the segment
        alignment is a runtime setting, it may be smaller than a cluster tile)."""
        return self.kind == "contiguous" and self.cluster_m > 1


class GroupedTileScheduler(TileScheduler):
    """A ``GroupedSchedule`` bound to one launch's arguments, inside the kernel.

    group_values: the shared-memory table (see ``load_group_values``); group_src: grouped_layout
    (contiguous), masked_m (masked) or ends (ragged, psum); num_experts: B's batch count (contiguous
    ids are checked against it); cta_m / cta_n: this CTA's place in its cluster; total_k (k_grouped
    only): A's and B's K rows. The cursor's ``rows_before`` holds, for k_grouped, the K rows before
    the group.
    """

    def __init__(self, schedule: GroupedSchedule, group_values: cute.Tensor, group_src, num_groups: Int32,
                 total_rows: Int32, max_m: Int32, num_experts: Int32, num_clusters: Int32, cta_m: Int32,
                 cta_n: Int32, cluster_n: int, total_k=None):
        self.s = schedule
        self.group_values = group_values
        self.group_src = group_src
        self.num_groups = num_groups
        self.total_rows = total_rows
        self.max_m = max_m
        self.num_experts = num_experts
        self.num_clusters = num_clusters
        self.cta_m = cta_m
        self.cta_n = cta_n
        self.cluster_n = cluster_n
        self.total_k = total_k

    # The scheduler is used inside the kernel's loops: the DSL carries it as dynamic values.
    DYNAMIC_FIELDS = ("group_values", "group_src", "num_groups", "total_rows", "max_m", "num_experts",
                      "num_clusters", "cta_m", "cta_n", "total_k")

    def __extract_mlir_values__(self) -> list:
        self._widths = []
        values = []
        for name in self.DYNAMIC_FIELDS:
            field_values = extract_mlir_values(getattr(self, name))
            self._widths.append(len(field_values))
            values += field_values
        return values

    def __new_from_mlir_values__(self, values: list) -> "GroupedTileScheduler":
        fields, offset = {}, 0
        for name, width in zip(self.DYNAMIC_FIELDS, self._widths):
            fields[name] = new_from_mlir_values(getattr(self, name), values[offset:offset + width])
            offset += width
        return GroupedTileScheduler(self.s, cluster_n=self.cluster_n, **fields)

    @cute.jit
    def load_group_values(self, tidx: Int32, num_threads: cutlass.Constexpr[int]):
        """Copy the per-group counts (masked) or cumulative ends (ragged, psum) into shared memory;
        every thread of the CTA takes part, a barrier must follow before the table is read."""
        if cutlass.const_expr(self.s.has_group_table):
            table, source = self.group_values, self.group_src
            for i in cutlass.range(tidx, self.num_groups, num_threads):
                table[i] = source[i]

    @cute.jit
    def _value(self, g: Int32) -> Int32:
        """Table entry of group g; g == num_groups (the cursor looking one past the end) reads the last."""
        return self.group_values[cutlass.min(g, self.num_groups - 1)]

    @cute.jit
    def _group_start(self, g: Int32, rows_before: Int32) -> Int32:
        """First row of group g in the 2-D row space."""
        start = Int32(0)
        if cutlass.const_expr(self.s.kind in ("masked", "k_grouped")):
            start = g * self.max_m
        if cutlass.const_expr(self.s.kind == "ragged"):
            start = rows_before
        if cutlass.const_expr(self.s.kind == "psum"):
            start = (rows_before + (self.s.alignment - 1)) // self.s.alignment * self.s.alignment
        return start

    @cute.jit
    def _group_rows(self, g: Int32, rows_before: Int32) -> Int32:
        """Rows owned by group g (never past the row space, never negative)."""
        rows = self.total_rows
        if cutlass.const_expr(self.s.kind == "k_grouped"):
            rows = self.max_m
        if cutlass.const_expr(self.s.kind == "masked"):
            rows = cutlass.min(self._value(g), self.max_m)
        if cutlass.const_expr(self.s.kind in ENDS_KINDS):
            rows = cutlass.min(self._value(g), self.total_rows) - self._group_start(g, rows_before)
        return cutlass.max(rows, 0)

    @cute.jit
    def _group_tiles(self, g: Int32, rows_before: Int32) -> Int32:
        """Cluster tiles of group g (zero for an empty group)."""
        m_clusters = (self._group_rows(g, rows_before) + (self.s.cluster_tile_m - 1)) // self.s.cluster_tile_m
        return m_clusters * self.s.num_n_clusters

    @cute.jit
    def _seek(self, linear: Int32, g: Int32, g_first: Int32, rows_before: Int32) -> TileCursor:
        """Move the group cursor forward until group g contains tile ``linear`` (or g == num_groups)."""
        g_tiles = self._group_tiles(g, rows_before)
        while g < self.num_groups and linear >= g_first + g_tiles:
            g_first = g_first + g_tiles
            if cutlass.const_expr(self.s.kind in ENDS_KINDS):
                # Clamped to the row space: a huge end must not overflow the aligned start of psum.
                rows_before = cutlass.max(rows_before, cutlass.min(self._value(g), self.total_rows))
            if cutlass.const_expr(self.s.kind == "k_grouped"):
                rows_before = rows_before + self._k_rows(g, rows_before)
            g = g + 1
            g_tiles = self._group_tiles(g, rows_before)
        return TileCursor(linear, g, g_first, rows_before)

    @cute.jit
    def start(self, cluster_id: Int32) -> TileCursor:
        return self._seek(cluster_id, Int32(0), Int32(0), Int32(0))

    @cute.jit
    def has_tile(self, cursor: TileCursor):
        return cursor.group < self.num_groups

    @cute.jit
    def next(self, cursor: TileCursor) -> TileCursor:
        return self._seek(cursor.linear + self.num_clusters, cursor.group, cursor.group_first_tile,
                          cursor.rows_before)

    @cute.jit
    def tile(self, cursor: TileCursor) -> WorkTile:
        """Row start, valid rows and N block of this CTA's part of the cursor's cluster tile, and its
        group (contiguous: the expert id at the cluster's first row, -1 when outside [0, num_experts))."""
        g = cursor.group
        rows = self._group_rows(g, cursor.rows_before)
        m_clusters = (rows + (self.s.cluster_tile_m - 1)) // self.s.cluster_tile_m
        local = cursor.linear - cursor.group_first_tile
        panel_span = self.s.panel * self.s.num_n_clusters
        panel_idx = local // panel_span
        in_panel = local - panel_idx * panel_span
        panel_first_m = panel_idx * self.s.panel
        panel_height = cutlass.min(Int32(self.s.panel), m_clusters - panel_first_m)
        n_cluster = in_panel // panel_height
        m_cluster = panel_first_m + (in_panel - n_cluster * panel_height)
        local_row = (m_cluster * self.s.cluster_m + self.cta_m) * self.s.tile_m
        row_start = self._group_start(g, cursor.rows_before) + local_row
        rows_valid = cutlass.min(rows - local_row, self.total_rows - row_start)
        group = g
        b_shared = cutlass.Boolean(True)
        if cutlass.const_expr(self.s.kind == "contiguous"):
            cluster_row = row_start - self.cta_m * self.s.tile_m
            group = self._expert_at(cluster_row)
            if cutlass.const_expr(self.s.mixed_clusters):
                group, rows_valid, b_shared = self._mixed_cluster_tile(cluster_row, group, rows_valid)
        k_start = k_rows = None
        if cutlass.const_expr(self.s.kind == "k_grouped"):
            k_start, k_rows = cursor.rows_before, self._k_rows(g, cursor.rows_before)
        return WorkTile(group, row_start, rows_valid, local_row, n_cluster * self.cluster_n + self.cta_n,
                        b_shared, k_start, k_rows)

    @cute.jit
    def _k_rows(self, g: Int32, k_start: Int32) -> Int32:
        """k_grouped: K rows of group g starting at ``k_start`` (<= total_k): ks[g] clamped to
        [0, total_k - k_start]."""
        return cutlass.min(cutlass.max(self._value(g), 0), self.total_k - k_start)

    @cute.jit
    def _expert_at(self, row: Int32) -> Int32:
        """Contiguous: the expert id of ``row`` (inside the row space), -1 when outside [0, num_experts)."""
        expert = self.group_src[row]
        if expert >= self.num_experts or expert < 0:
            expert = Int32(-1)
        return expert

    @cute.jit
    def _mixed_cluster_tile(self, cluster_row: Int32, first: Int32, rows_valid: Int32):
        """(group, rows_valid, b_shared) of this CTA in an M-cluster of two tiles starting at
        ``cluster_row`` whose first tile belongs to expert ``first``. Both CTAs read both ids, so they
        agree on ``b_shared`` and on skipping (both ids bad); a CTA with a bad id of its own computes
        with its partner's expert and stores nothing."""
        second = Int32(-1)
        if cluster_row + self.s.tile_m < self.total_rows:
            second = self._expert_at(cluster_row + self.s.tile_m)
        own, partner = first, second
        if self.cta_m == 1:
            own, partner = second, first
        group = own
        if own < 0:
            group = partner
            rows_valid = Int32(0)
        return group, rows_valid, first == second
