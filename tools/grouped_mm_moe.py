"""The MoE layer as most torch users run it, the baseline of ``cute-moe bench-layer``.

Written like torchtitan's MoE: the routed slots are permuted by expert (argsort, index ops), both
expert GEMMs are ``torch._grouped_mm`` with ``offs``, SwiGLU is torch ops, the top-k weights multiply
the expert outputs in FP32 and a ``scatter_add`` combines them into the tokens; autograd runs through
torch's own derivatives (``torch._grouped_mm`` has them). Same semantics as ``cute_moe.moe``
(docs/training.md, "The layer"): x [T, H], topk_idx [T, k] (an id outside [0, E) is a dropped slot),
topk_weights [T, k], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].

Group padding, as torchtitan's ``generate_permute_indices``: each expert's rows are padded to a
multiple of ``alignment`` rows (and to at least ``alignment`` rows, also for an expert without tokens),
so every group starts on a 16-byte boundary, which torch._grouped_mm's TMA loads want for BF16
(``BF16_GROUP_ALIGNMENT``); ``alignment=1`` is the plain permutation. Padding rows gather a zero row
and combine into a row that is dropped. Everything is static-shaped on the device (no host sync), so
forward and backward can be captured in a CUDA graph and traced by ``torch.compile(fullgraph=True)``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BF16_GROUP_ALIGNMENT = 8  # torchtitan's TOKEN_GROUP_ALIGN_SIZE_M for BF16: 8 rows = 16 bytes per K element


@dataclass
class Permutation:
    """Where every routed slot goes in the expert-sorted rows (R = ``permuted_rows`` of them).

    token [R] int64: the token each row gathers and combines into; T for padding rows, dropped slots
    and the rows past the last group (row T of the padded x is zero, row T of the output is dropped);
    slot [R] int64: the flat slot ``t * k + j`` whose weight scales the row, T * k (weight 0) where
    token is T; offs [E] int32: cumulative group ends (``torch._grouped_mm``'s offs)."""

    token: torch.Tensor
    slot: torch.Tensor
    offs: torch.Tensor


def permuted_rows(num_slots: int, num_experts: int, alignment: int) -> int:
    """Static row count of the permuted tensors: every slot plus the most padding the experts can take
    (fewer than ``alignment`` rows each, or exactly ``alignment`` for an expert without tokens)."""
    return num_slots + (num_experts * alignment if alignment > 1 else 0)


def permute_by_expert(topk_idx: torch.Tensor, num_experts: int, alignment: int) -> Permutation:
    """The expert-sorted row layout of the slots of ``topk_idx`` [T, k] (see ``Permutation``)."""
    tokens, top_k = topk_idx.shape
    flat = topk_idx.reshape(-1).long()
    num_slots = flat.numel()
    routed = (flat >= 0) & (flat < num_experts)
    keys = torch.where(routed, flat, num_experts)  # dropped slots: one more bin, sorted last, never padded
    order = torch.argsort(keys, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts = counts.scatter_add(0, keys, torch.ones_like(keys))
    padded = counts
    if alignment > 1:
        experts_padded = ((counts[:num_experts] + alignment - 1) // alignment * alignment).clamp_min(alignment)
        padded = torch.cat([experts_padded, counts[num_experts:]])
    sorted_keys = keys[order]
    rank = torch.arange(num_slots, device=flat.device) - (counts.cumsum(0) - counts)[sorted_keys]
    position = (padded.cumsum(0) - padded)[sorted_keys] + rank  # distinct rows, < permuted_rows
    rows = permuted_rows(num_slots, num_experts, alignment)
    valid = routed[order]
    token = torch.full((rows,), tokens, dtype=torch.long, device=flat.device)
    token = token.index_put((position,), torch.where(valid, order // top_k, tokens))
    slot = torch.full((rows,), num_slots, dtype=torch.long, device=flat.device)
    slot = slot.index_put((position,), torch.where(valid, order, num_slots))
    return Permutation(token, slot, padded[:num_experts].cumsum(0).to(torch.int32))


def grouped_mm_moe(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, alignment: int = BF16_GROUP_ALIGNMENT) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * W2[e] . SwiGLU(W13[e] . x[t]), e = topk_idx[t, j], in x's dtype.

    The rows of torch._grouped_mm's outputs past the last group are never written (any value): they
    all belong to token T and weight 0, so they only reach the dropped row T (forward and backward)."""
    tokens, hidden = x.shape
    perm = permute_by_expert(topk_idx, w13.shape[0], alignment)
    routed_x = torch.cat([x, x.new_zeros(1, hidden)]).index_select(0, perm.token)
    h = torch._grouped_mm(routed_x, w13.transpose(1, 2), offs=perm.offs)  # [R, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=perm.offs)  # [R, H]
    weights = torch.cat([topk_weights.reshape(-1), topk_weights.new_zeros(1)]).index_select(0, perm.slot)
    y = (y.float() * weights.float()[:, None]).to(x.dtype)
    out = x.new_zeros(tokens + 1, hidden).scatter_add(0, perm.token[:, None].expand(-1, hidden), y)
    return out[:tokens]
