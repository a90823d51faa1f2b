"""The MoE layer as an autograd function on the grouped GEMMs: ``moe(x, topk_idx, topk_weights, w13, w2)``.

docs/training.md, "The layer". Forward: GEMM1 is ``gathered_swiglu_grouped_mm`` (the token gather
fused into its A loads, SwiGLU into its epilogue: no permuted copy of x, no torch SwiGLU), GEMM2
``grouped_mm`` (ragged, unaligned expert segments), the top-k combine a gather of each token's k rows
and one batched matmul with the weights (no atomics: deterministic). Backward: one kernel for
dO[token] . W2[e] with the SwiGLU backward and the routing-weight gradient in its epilogue
(``gathered_swiglu_backward_mm``), ``grouped_mm`` for dX (N-major weights) and
``k_grouped_bf16_gemm_tn_contiguous`` for the weight gradients (group sizes on the device, BF16
out). The routing stays on the device (sorted slots, dropped ones last), so nothing synchronizes
with the host. Saved for backward: the routing and GEMM1's pre-activations ``h`` [T * k, 2I];
GEMM2's output is not kept.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .moe_backward_gemms import gathered_swiglu_backward_mm
from .moe_gemms import gathered_swiglu_grouped_mm
from .ops import grouped_mm, k_grouped_bf16_gemm_tn_contiguous
from .validation import check_contiguous, check_tensor

ACTIVATIONS = ("swiglu",)
ROW_ELEMENTS = 8  # H and I: whole 16-byte rows of the BF16 operands
INDEX_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_moe_arguments(x, topk_idx, topk_weights, w13, w2, activation) -> None:
    """Errors name the argument: dtypes, ranks, matching shapes, devices, 16-byte rows."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    check_tensor("x", x, (torch.bfloat16,), 2)
    check_tensor("topk_idx", topk_idx, INDEX_DTYPES, 2)
    check_tensor("topk_weights", topk_weights, WEIGHT_DTYPES, 2)
    check_tensor("w13", w13, (torch.bfloat16,), 3)
    check_tensor("w2", w2, (torch.bfloat16,), 3)
    tokens, hidden = x.shape
    experts, inter2 = w13.shape[0], w13.shape[1]
    if topk_idx.shape[0] != tokens:
        raise ValueError(f"topk_idx: expected {tokens} rows (tokens of x), got shape {tuple(topk_idx.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise ValueError(f"topk_weights: expected shape {tuple(topk_idx.shape)} (as topk_idx), "
                         f"got {tuple(topk_weights.shape)}")
    if w13.shape[2] != hidden or inter2 % 2 != 0:
        raise ValueError(f"w13: expected [E, 2I, {hidden}] (gate rows then up rows), got {tuple(w13.shape)}")
    if tuple(w2.shape) != (experts, hidden, inter2 // 2):
        raise ValueError(f"w2: expected shape {(experts, hidden, inter2 // 2)} ([E, H, I]), got {tuple(w2.shape)}")
    if hidden % ROW_ELEMENTS or (inter2 // 2) % ROW_ELEMENTS or experts == 0 or hidden == 0 or inter2 == 0:
        raise ValueError(f"w13: expected non-empty E, H and I with H and I multiples of {ROW_ELEMENTS}, "
                         f"got E={experts}, H={hidden}, I={inter2 // 2}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        check_contiguous(name, t)
    for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights), ("w13", w13), ("w2", w2)):
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (same as x), got {t.device}")


def route(topk_idx: torch.Tensor, num_experts: int):
    """Slots grouped by expert, on the device (no host synchronization, static shapes): (order: the
    T * k flat slot indices sorted by expert, stable, unrouted slots last; the token of each; routed:
    whether each sorted slot has an expert; cumulative ends int32 [E]; counts int32 [E]). A slot whose
    id lies outside [0, E) (-1: dropped) is not routed."""
    flat = topk_idx.reshape(-1).long()
    routed = (flat >= 0) & (flat < num_experts)
    keys = torch.where(routed, flat, num_experts)
    order = torch.argsort(keys, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    counts = counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))[:num_experts]
    ends = counts.cumsum(0, dtype=torch.int32)
    return order, order // topk_idx.shape[1], routed[order], ends, counts


def sorted_position(order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``order``: the sorted position of each flat slot ``t * k + j``."""
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return position


def cover_all_slots(ends: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Group ends whose last group also takes the unrouted slots at the end of the sorted order, so
    that the input-side GEMMs write every row (finite values: those slots' tokens are real tokens)
    and nothing downstream needs a mask; their routing weight is 0."""
    ends_all = ends.clone()
    ends_all.narrow(0, ends.numel() - 1, 1).fill_(num_slots)  # a kernel, not a host copy: capturable
    return ends_all


def slot_weights(topk_weights: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """FP32 routing weight of each flat slot, 0 where the slot is dropped (id outside [0, E))."""
    flat = topk_idx.reshape(-1)
    return torch.where((flat >= 0) & (flat < num_experts), topk_weights.reshape(-1).float(), 0.0)


def gather_tokens(rows: torch.Tensor, position: torch.Tensor, tokens: int, k: int,
                  weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per token, the (weighted) sum of its k slot rows: ``rows`` [S, H] in sorted order, gathered
    by ``position`` into [T, k, H], then one batched matmul with the weights (rounded to the rows'
    dtype, FP32 accumulation) or a sum over k. Deterministic: no atomics."""
    gathered = rows.index_select(0, position).view(tokens, k, rows.shape[1])
    if weights is None:
        return gathered.sum(dim=1)
    return torch.bmm(weights.view(tokens, 1, k).to(rows.dtype), gathered).view(tokens, rows.shape[1])


class MoEFunction(torch.autograd.Function):
    """Forward and backward of ``moe`` (see the module docstring for what is fused and saved).

    The input-side GEMMs run over every sorted slot (``cover_all_slots``: unrouted slots join the
    last expert with weight 0), so all their rows are finite; the K-grouped weight-gradient GEMMs
    take the real counts and ignore those rows (they lie past the sum of the counts)."""

    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, w13, w2):
        tokens, k = topk_idx.shape
        experts = w13.shape[0]
        order, token, routed, ends, counts = route(topk_idx, experts)
        ends_all = cover_all_slots(ends, token.shape[0])
        # GEMM1 + SwiGLU in one kernel; h (pre-activations) only when a gradient will need it.
        h = None
        if any(ctx.needs_input_grad):
            h = torch.empty((token.shape[0], w13.shape[1]), device=x.device, dtype=x.dtype)
        act = gathered_swiglu_grouped_mm(x, token.to(torch.int32), w13, ends_all, h)  # [T * k, I]
        y = grouped_mm(act, w2.transpose(1, 2), ends_all)  # [T * k, H]
        weights = slot_weights(topk_weights, topk_idx, experts)
        out = gather_tokens(y, sorted_position(order), tokens, k, weights)
        ctx.save_for_backward(x, topk_idx, topk_weights, w13, w2, order, token, routed, ends_all, counts, h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, topk_idx, topk_weights, w13, w2, order, token, routed, ends_all, counts, h = ctx.saved_tensors
        tokens, k = topk_idx.shape
        inter = w2.shape[2]
        dtype = x.dtype
        weight = slot_weights(topk_weights, topk_idx, w13.shape[0])[order]  # [S] FP32, 0 on unrouted slots
        grad_out = grad_out.to(dtype).contiguous()
        grad_w2 = grad_w13 = grad_x = grad_weights = None
        if ctx.needs_input_grad[4]:
            act = F.silu(h[:, :inter]) * h[:, inter:]  # recomputed SwiGLU output (BF16)
            grad_w2 = torch.empty(w2.shape, device=x.device, dtype=w2.dtype)  # FP32 sums, rounded once
            k_grouped_bf16_gemm_tn_contiguous(grad_out.index_select(0, token) * weight.to(dtype)[:, None], act,
                                              grad_w2, None, counts)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # One kernel: dO[token] . W2[e] (dO's rows gathered in its loads), then in its epilogue the
            # SwiGLU backward (dh) and d topk_weights per slot (<dO[token], y>, FP32, deterministic).
            dh, d_slot = gathered_swiglu_backward_mm(grad_out, token.to(torch.int32), w2, ends_all, h, weight)
            if ctx.needs_input_grad[2]:
                flat = torch.zeros(topk_weights.numel(), device=x.device, dtype=torch.float32)
                flat[order] = torch.where(routed, d_slot, 0.0)
                grad_weights = flat.view(topk_weights.shape).to(topk_weights.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = gather_tokens(grouped_mm(dh, w13, ends_all), sorted_position(order), tokens, k)
            if ctx.needs_input_grad[3]:
                grad_w13 = torch.empty(w13.shape, device=x.device, dtype=w13.dtype)
                k_grouped_bf16_gemm_tn_contiguous(dh, x.index_select(0, token), grad_w13, None, counts)
        return grad_x, None, grad_weights, grad_w13, grad_w2


def moe(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        activation: str = "swiglu") -> torch.Tensor:
    """MoE layer: out[t] = sum_j topk_weights[t, j] * W2[e] . SwiGLU(W13[e] . x[t]), e = topk_idx[t, j].

    x [T, H] bf16; topk_idx [T, k] int32 / int64 (-1 = dropped slot; an id outside [0, E) is dropped
    too); topk_weights [T, k] float; w13 [E, 2I, H] bf16 (gate rows first, then up rows, as DeepGEMM's
    Mega MoE takes its L1 weights); w2 [E, H, I] bf16; SwiGLU = silu(gate) * up. Returns out [T, H]
    bf16. Differentiable in x, topk_weights, w13 and w2. Under bf16 autocast, FP32 x / w13 / w2 are
    cast to bf16 (gradients flow back to them in their dtype). No host synchronization: forward and
    backward can be captured in a CUDA graph (after a first call compiled the kernels) and traced by
    torch.compile(fullgraph=True).
    """
    if isinstance(x, torch.Tensor):
        x, w13, w2 = (_autocast_bf16(t, x.device.type) for t in (x, w13, w2))
    check_moe_arguments(x, topk_idx, topk_weights, w13, w2, activation)
    return MoEFunction.apply(x, topk_idx, topk_weights, w13, w2)


def _autocast_bf16(t, device_type: str):
    """Under bf16 autocast, a floating-point x or weight is cast to bf16 (differentiably), as torch's
    matmuls would; otherwise ``t`` as given."""
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.bfloat16
            and torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16):
        return t.to(torch.bfloat16)
    return t


def moe_reference(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor, dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
    """The layer in plain torch (a loop over experts, in ``dtype``): the tests' reference."""
    x, w13, w2, weights = x.to(dtype), w13.to(dtype), w2.to(dtype), topk_weights.to(dtype)
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tok, slot = (topk_idx == e).nonzero(as_tuple=True)
        gate, up = (x[tok] @ w13[e].T).chunk(2, dim=1)
        out = out.index_add(0, tok, ((F.silu(gate) * up) @ w2[e].T) * weights[tok, slot][:, None])
    return out
