"""Token <-> expert-row layouts for MoE GEMMs, built from router output (topk_idx, topk_weights).

Contiguous layout (DeepGEMM m-grouped contiguous): the permuted A stacks each expert's rows in
one segment starting at a multiple of `alignment`; padding rows carry expert -1. Its psum form
gives, per expert g, the unaligned end of its rows, where g's segment starts at align(psum[g-1]).
Masked layout (DeepGEMM m-grouped masked): A is [G, max_m, H] and expert g uses rows [0, masked_m[g]).
Within an expert, rows are ordered by token, then top-k slot. Only build_contiguous_layout and
build_masked_layout(check=True) synchronize the host; every other function stays on device.
"""

from dataclasses import dataclass

import torch

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_same_device, check_shape, check_tensor
from .alignment import align, check_alignment, get_mk_alignment_for_contiguous_layout


@dataclass(frozen=True)
class ContiguousLayout:
    """Row maps of a contiguous-layout permuted A with num_rows rows."""

    permuted_rows: torch.Tensor  # int64 [num_rows]: source token of each row, -1 on padding rows
    grouped_layout: torch.Tensor  # int32 [num_rows]: expert of each row, -1 on padding rows
    inverse_map: torch.Tensor  # int64 [T, k]: row holding (token, slot), -1 for dropped slots
    expert_counts: torch.Tensor  # int32 [G]: rows routed to each expert
    psum: torch.Tensor  # int32 [G]: unaligned end row of each expert's segment
    num_rows: int
    alignment: int


@dataclass(frozen=True)
class MaskedLayout:
    """Row maps of a masked-layout A [G, max_m, H]."""

    permuted_rows: torch.Tensor  # int64 [G, max_m]: source token of each row, -1 past masked_m
    inverse_map: torch.Tensor  # int64 [T, k]: flat row g * max_m + i holding (token, slot), -1 if dropped
    masked_m: torch.Tensor  # int32 [G]: rows used per expert, min(expert_counts, max_m)
    expert_counts: torch.Tensor  # int32 [G]: rows routed to each expert, before clamping to max_m
    overflow: torch.Tensor  # bool []: some expert received more than max_m rows (extra rows dropped)
    max_m: int


def _resolve_alignment(alignment: int | None) -> int:
    if alignment is None:
        return get_mk_alignment_for_contiguous_layout()
    return check_alignment(alignment)


def _align_tensor(x: torch.Tensor, alignment: int) -> torch.Tensor:
    return (x + alignment - 1) // alignment * alignment


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _route(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of the flattened (token, slot) pairs by expert; ids outside [0, G) sort last as dropped.

    Returns int64 (order, sorted_expert, first, counts): order[p] is the flat index token * k + slot at
    sorted position p, sorted_expert[p] its expert (G if dropped), first[g] the first sorted position
    of expert g and counts[g] its number of rows.
    """
    flat = topk_idx.reshape(-1).long()
    experts = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    sorted_expert, order = torch.sort(experts, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    counts = counts[:num_experts]
    return order, sorted_expert, _exclusive_cumsum(counts), counts


def _rank_in_expert(sorted_expert: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Position of each sorted (token, slot) pair within its expert (garbage for dropped pairs)."""
    positions = torch.arange(sorted_expert.numel(), device=sorted_expert.device)
    return positions - first[sorted_expert.clamp(max=first.numel() - 1)]


def _source_tokens(order: torch.Tensor, position: torch.Tensor, valid: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token of sorted position `position` where valid, else -1."""
    if order.numel() == 0:
        return torch.full_like(position, -1)
    return torch.where(valid, order[torch.where(valid, position, 0)] // top_k, -1)


def _inverse_map(order: torch.Tensor, sorted_rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Scatter the row of each sorted position back to its (token, slot)."""
    return torch.empty_like(sorted_rows).scatter_(0, order, sorted_rows).view(shape)


def _psum_rows(psum: torch.Tensor, num_rows: int, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows [0, num_rows) of a psum layout: (group, offset in group) as int64, group -1 on gap rows."""
    ends = psum.long()
    starts = torch.cat([ends.new_zeros(1), _align_tensor(ends[:-1], alignment)])
    rows = torch.arange(num_rows, device=psum.device)
    group = torch.searchsorted(starts, rows, right=True) - 1
    offset = rows - starts[group]
    return torch.where(rows < ends[group], group, -1), offset


def _check_topk_idx(topk_idx: torch.Tensor, num_experts: int) -> None:
    check_tensor("topk_idx", topk_idx, INDEX_DTYPES, (2,))
    check_int("num_experts", num_experts)


def _first_bad_id(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [2] on topk_idx's device: (flat position, value) of the first id outside [-1, num_experts),
    position topk_idx.numel() when there is none; sync-free."""
    flat = topk_idx.reshape(-1).long()
    bad = torch.cat([(flat < -1) | (flat >= num_experts), flat.new_ones(1, dtype=torch.bool)])
    first = bad.int().argmax()  # the first bad id, else the appended sentinel
    return torch.stack([first, torch.cat([flat, flat.new_zeros(1)])[first]])


def _raise_on_bad_id(topk_idx: torch.Tensor, num_experts: int, position: int, value: int) -> None:
    """Raise ValueError naming the first bad id found by _first_bad_id, if any."""
    if position < topk_idx.numel():
        raise ValueError(f"topk_idx: expected expert ids in [-1, {num_experts}), got {value} at position "
                         f"{divmod(position, topk_idx.size(1))}")


def build_contiguous_layout(topk_idx: torch.Tensor, num_experts: int,
                            alignment: int | None = None) -> ContiguousLayout:
    """Contiguous layout for routing topk_idx [T, k] (expert ids, -1 = dropped).

    Synchronizes the host once: the padded row count depends on the data. Raises ValueError when an
    id lies outside [-1, num_experts). alignment (a positive multiple of 64) defaults to
    get_mk_alignment_for_contiguous_layout().
    """
    _check_topk_idx(topk_idx, num_experts)
    alignment = _resolve_alignment(alignment)
    order, sorted_expert, first, counts = _route(topk_idx, num_experts)
    aligned = _align_tensor(counts, alignment)
    psum = _exclusive_cumsum(aligned) + counts
    num_rows, position, value = torch.cat([aligned.sum().view(1), _first_bad_id(topk_idx, num_experts)]).tolist()
    _raise_on_bad_id(topk_idx, num_experts, position, value)

    group, offset = _psum_rows(psum, num_rows, alignment)
    used = group >= 0
    permuted_rows = _source_tokens(order, first[group.clamp(min=0)] + offset, used, topk_idx.size(1))

    starts = psum - counts
    row = starts[sorted_expert.clamp(max=num_experts - 1)] + _rank_in_expert(sorted_expert, first)
    inverse_map = _inverse_map(order, torch.where(sorted_expert < num_experts, row, -1), topk_idx.shape)

    return ContiguousLayout(permuted_rows=permuted_rows, grouped_layout=group.int(), inverse_map=inverse_map,
                            expert_counts=counts.int(), psum=psum.int(), num_rows=num_rows, alignment=alignment)


def build_masked_layout(topk_idx: torch.Tensor, num_experts: int, max_m: int, check: bool = False) -> MaskedLayout:
    """Masked layout [G, max_m] for routing topk_idx [T, k] (expert ids, -1 = dropped).

    Sync-free by default: rows beyond max_m for an expert are dropped and reported in `overflow`
    (a device flag), ids outside [0, num_experts) count as dropped. check=True synchronizes the
    host and raises ValueError on either condition instead.
    """
    _check_topk_idx(topk_idx, num_experts)
    check_int("max_m", max_m)
    order, sorted_expert, first, counts = _route(topk_idx, num_experts)
    if check:
        _raise_on_bad_routing(topk_idx, num_experts, counts, max_m)
    masked_m = counts.clamp(max=max_m)

    slot = torch.arange(max_m, device=order.device)
    used = slot[None, :] < masked_m[:, None]
    permuted_rows = _source_tokens(order, first[:, None] + slot[None, :], used, topk_idx.size(1))

    rank = _rank_in_expert(sorted_expert, first)
    kept = (sorted_expert < num_experts) & (rank < max_m)
    inverse_map = _inverse_map(order, torch.where(kept, sorted_expert * max_m + rank, -1), topk_idx.shape)

    return MaskedLayout(permuted_rows=permuted_rows, inverse_map=inverse_map, masked_m=masked_m.int(),
                        expert_counts=counts.int(), overflow=(counts > max_m).any(), max_m=max_m)


def _raise_on_bad_routing(topk_idx: torch.Tensor, num_experts: int, counts: torch.Tensor, max_m: int) -> None:
    """Host-side check for build_masked_layout(check=True)."""
    _raise_on_bad_id(topk_idx, num_experts, *_first_bad_id(topk_idx, num_experts).tolist())
    over = {g: c for g, c in enumerate(counts.tolist()) if c > max_m}
    if over:
        raise ValueError(f"max_m: expected >= rows per expert, got {max_m} but experts {over} (expert: rows) exceed it")


def _check_layout(layout: object) -> None:
    if not isinstance(layout, (ContiguousLayout, MaskedLayout)):
        raise TypeError(f"layout: expected ContiguousLayout or MaskedLayout, got {type(layout).__name__}")


def permute_tokens(x: torch.Tensor, layout: ContiguousLayout | MaskedLayout) -> torch.Tensor:
    """Gather x [T, H] (any dtype, e.g. activations or their scale factors) into the layout's A.

    Returns [num_rows, H] (contiguous) or [G, max_m, H] (masked); unused rows are zero. Sync-free.
    """
    _check_layout(layout)
    check_tensor("x", x, None, (2,))
    num_tokens = layout.inverse_map.size(0)
    if x.size(0) != num_tokens:
        raise ValueError(f"x: expected {num_tokens} rows (tokens of the layout), got shape {tuple(x.shape)}")
    check_same_device("x", x, layout.permuted_rows)
    source = layout.permuted_rows.reshape(-1)
    out_shape = (*layout.permuted_rows.shape, x.size(1))
    if num_tokens == 0:
        return x.new_zeros(out_shape)
    gathered = x.index_select(0, source.clamp(min=0))
    return torch.where((source >= 0)[:, None], gathered, x.new_zeros(())).view(out_shape)


def unpermute_and_reduce(y: torch.Tensor, layout: ContiguousLayout | MaskedLayout,
                         topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_s topk_weights[t, s] * y[row(t, s)] with float32 accumulation, in y's dtype.

    y is [num_rows, H] (contiguous) or [G, max_m, H] (masked); dropped slots contribute 0, and rows
    no slot maps to are never read into the sum (they may hold garbage). Sync-free.
    """
    _check_layout(layout)
    check_tensor("y", y, FLOAT_DTYPES, (layout.permuted_rows.dim() + 1,))
    check_shape("y", y, (*layout.permuted_rows.shape, y.size(-1)))
    check_same_device("y", y, layout.permuted_rows)
    check_tensor("topk_weights", topk_weights, FLOAT_DTYPES, (2,))
    check_shape("topk_weights", topk_weights, tuple(layout.inverse_map.shape))
    check_same_device("topk_weights", topk_weights, layout.inverse_map)

    num_tokens, top_k = layout.inverse_map.shape
    hidden = y.size(-1)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=y.device)
    y_rows = y.reshape(-1, hidden)
    if y_rows.size(0) == 0:
        return out.to(y.dtype)
    for slot in range(top_k):
        rows = layout.inverse_map[:, slot]
        contribution = y_rows.index_select(0, rows.clamp(min=0)).float() * topk_weights[:, slot, None].float()
        out += torch.where((rows >= 0)[:, None], contribution, 0.0)
    return out.to(y.dtype)


def masked_m_to_psum(masked_m: torch.Tensor, alignment: int | None = None) -> torch.Tensor:
    """psum[g] = align(psum[g-1]) + masked_m[g] (psum[-1] = 0) as int32; sync-free."""
    check_tensor("masked_m", masked_m, INDEX_DTYPES, (1,))
    counts = masked_m.long()
    return (_exclusive_cumsum(_align_tensor(counts, _resolve_alignment(alignment))) + counts).int()


def psum_to_grouped_layout(psum: torch.Tensor, num_rows: int, alignment: int | None = None) -> torch.Tensor:
    """Per-row expert (int32 [num_rows], -1 on gap rows) of a psum layout; sync-free."""
    check_tensor("psum", psum, INDEX_DTYPES, (1,))
    if psum.numel() == 0:
        raise ValueError("psum: expected at least one group, got shape (0,)")
    check_int("num_rows", num_rows, minimum=0)
    group, _ = _psum_rows(psum, num_rows, _resolve_alignment(alignment))
    return group.int()


def layout_masked_to_psum(x: torch.Tensor, psum_m: torch.Tensor, alignment: int | None = None) -> torch.Tensor:
    """Pack masked x [G, max_m, ...] into psum-contiguous rows [G * align(max_m, alignment), ...].

    Expert g's first psum_m[g] - align(psum_m[g-1]) rows land at rows starting at align(psum_m[g-1]);
    gap rows are zero. Sync-free.
    """
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected a [G, max_m, ...] tensor, got shape {tuple(x.shape)}")
    check_tensor("psum_m", psum_m, INDEX_DTYPES, (1,))
    check_shape("psum_m", psum_m, (x.size(0),))
    check_same_device("psum_m", psum_m, x)
    alignment = _resolve_alignment(alignment)
    num_groups, max_m = x.shape[:2]
    num_rows = num_groups * align(max_m, alignment)
    group, offset = _psum_rows(psum_m, num_rows, alignment)
    used = (group >= 0) & (offset < max_m)
    flat = x.reshape(num_groups * max_m, *x.shape[2:])
    if flat.size(0) == 0:
        return x.new_zeros(num_rows, *x.shape[2:])
    source = torch.where(used, group * max_m + offset, 0)
    mask = used.view(num_rows, *([1] * (x.dim() - 2)))
    return torch.where(mask, flat.index_select(0, source), x.new_zeros(()))
