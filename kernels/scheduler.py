"""The seam between a GEMM mainloop and the source of its tiles.

A kernel's producer warp and its consumer warpgroups walk one tile sequence with the same four calls:

    cursor = scheduler.start(cluster_id)
    while scheduler.has_tile(cursor):
        tile = scheduler.tile(cursor)            # a WorkTile of this CTA
        if tile.group >= 0:                      # negative: nothing to compute (padding, bad id)
            ...load / multiply / store rows [tile.row_start, + tile.rows_valid) x N block tile.n_block
        cursor = scheduler.next(cursor)

Producer and consumers must see the same sequence, so ``has_tile`` / ``tile`` / ``next`` are pure
functions of the cursor and of data that does not change while the kernel runs (static schedulers),
or of data whose changes every caller observes in the same order (dynamic schedulers).

Static schedulers (``kernels/grouped_schedulers.py``) know every group's rows at kernel start: the
dense, contiguous, psum, masked and ragged problem kinds. A dynamic scheduler — tiles whose rows
arrive while the kernel runs, e.g. Mega MoE's per-expert arrival counters published by other CTAs
or other GPUs — implements the same calls: ``has_tile`` waits (with a timeout that stops the kernel
with an error flag, never a hang) until the cursor's tile is known to exist or the work is known to
be complete, ``tile`` reads the group's published row count, ``next`` moves on. The cursor is any
DSL-dynamic object (``__extract_mlir_values__`` / ``__new_from_mlir_values__``), as ``TileCursor``.
"""

from cutlass import Int32
from cutlass.cutlass_dsl import extract_mlir_values, new_from_mlir_values


class TileCursor:
    """Loop-carried position in a tile sequence: the linear tile index of this cluster, the group
    holding it, the linear index of that group's first tile and the rows before the group."""

    FIELDS = ("linear", "group", "group_first_tile", "rows_before")

    def __init__(self, linear: Int32, group: Int32, group_first_tile: Int32, rows_before: Int32):
        self.linear = linear
        self.group = group
        self.group_first_tile = group_first_tile
        self.rows_before = rows_before

    def __extract_mlir_values__(self) -> list:
        return [value for name in self.FIELDS for value in extract_mlir_values(getattr(self, name))]

    def __new_from_mlir_values__(self, values: list) -> "TileCursor":
        return TileCursor(*(new_from_mlir_values(getattr(self, name), [value])
                            for name, value in zip(self.FIELDS, values)))


class WorkTile:
    """One CTA's unit of work: ``group`` (B's batch index; negative = skip the tile), the first row in
    the 2-D row space of A and D, the rows that belong to the group (clipped to the row space; may be
    <= 0: compute but store nothing), the first row relative to the group's start, the N block, and
    ``b_shared``: whether every CTA of the cluster multiplies this tile by the same B block (B may be
    multicast along the cluster's M mode; a scheduler whose clusters always share B returns True).
    K-grouped tiles also carry ``k_start`` and ``k_rows``: the K rows of A and B the tile reduces over
    (None for the other kinds, whose tiles reduce over all of K)."""

    def __init__(self, group: Int32, row_start: Int32, rows_valid: Int32, local_row: Int32, n_block: Int32,
                 b_shared, k_start=None, k_rows=None):
        self.group = group
        self.row_start = row_start
        self.rows_valid = rows_valid
        self.local_row = local_row
        self.n_block = n_block
        self.b_shared = b_shared
        self.k_start = k_start
        self.k_rows = k_rows


class TileScheduler:
    """Interface of a tile source; implementations are built inside the kernel from its arguments."""

    def start(self, cluster_id: Int32) -> TileCursor:
        """Cursor of the first tile of cluster ``cluster_id``."""
        raise NotImplementedError

    def has_tile(self, cursor: TileCursor):
        """Whether the cursor points at a tile (False once this cluster's work is over)."""
        raise NotImplementedError

    def tile(self, cursor: TileCursor) -> WorkTile:
        """This CTA's work for the cursor's tile."""
        raise NotImplementedError

    def next(self, cursor: TileCursor) -> TileCursor:
        """Cursor of this cluster's next tile."""
        raise NotImplementedError
