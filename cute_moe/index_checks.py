"""Host-side checks of index tensors, run before each launch when CUTE_MOE_DEBUG=1.

Without debug mode the kernels never read an index out of bounds whatever the values (see
docs/architecture.md, "Index tensors"); these checks turn values that would be silently clipped,
skipped or overlapped into a ValueError naming the argument and the first bad position. Each check
copies the tensor to the host (a synchronization).
"""

import torch


def _first_bad(bad: torch.Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def check_expert_ids(name: str, ids: torch.Tensor, num_groups: int) -> None:
    """Per-row expert ids: each in [-1, num_groups) (-1 marks a padding row)."""
    values = ids.cpu()
    bad = (values < -1) | (values >= num_groups)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name}: expected expert ids in [-1, {num_groups}), got {int(values[i])} at position {i}")


def check_ends(name: str, ends: torch.Tensor, rows: int) -> None:
    """Cumulative group ends: each in [0, rows] and none below the one before it."""
    values = ends.cpu().long()
    bad = (values < 0) | (values > rows)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name}: expected cumulative ends in [0, {rows}], got {int(values[i])} at position {i}")
    if values.numel() > 1:
        falling = values[1:] < values[:-1]
        if falling.any():
            i = _first_bad(falling) + 1
            raise ValueError(f"{name}: expected non-decreasing cumulative ends, got {int(values[i])} after "
                             f"{int(values[i - 1])} at position {i}")


def check_counts(name: str, counts: torch.Tensor, max_rows: int) -> None:
    """Rows per group: each in [0, max_rows]."""
    values = counts.cpu()
    bad = (values < 0) | (values > max_rows)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name}: expected row counts in [0, {max_rows}], got {int(values[i])} at position {i}")


def check_row_indices(name: str, rows: torch.Tensor, num_rows: int) -> None:
    """Row indices into a tensor of ``num_rows`` rows: each in [0, num_rows)."""
    values = rows.cpu()
    bad = (values < 0) | (values >= num_rows)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name}: expected row indices in [0, {num_rows}), got {int(values[i])} at position {i}")
