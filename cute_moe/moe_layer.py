"""The MoE layer as an autograd function on the grouped GEMMs: ``moe(x, topk_idx, topk_weights, w13, w2)``.

First, unfused version (docs/training.md, "The layer"): the token gather, SwiGLU, its backward and
the top-k combine are torch ops between our GEMMs; the GEMMs are ``grouped_mm`` (ragged, unaligned
expert segments: GEMM1, GEMM2 and the input gradients with N-major weights) and
``k_grouped_bf16_gemm_tn_contiguous`` (weight gradients, group sizes on the device). The routing
stays on the device (sorted slots, dropped ones last), so nothing synchronizes with the host. Saved
for backward: the routing, GEMM1's output ``h`` [T * k, 2I] and GEMM2's output ``y`` [T * k, H]; the
gathered x and the SwiGLU output are recomputed.
"""

from typing import Optional

import torch
import torch.nn.functional as F

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


def _swiglu(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(silu(gate) * up in FP32, gate, up) of GEMM1's output [S, 2I] (gate half first)."""
    gate, up = h.float().chunk(2, dim=1)
    return F.silu(gate) * up, gate, up


class MoEFunction(torch.autograd.Function):
    """Forward and backward of ``moe`` (see the module docstring for what is fused and saved).

    Rows of the sorted slots past the routed ones (dropped slots) are never written by the grouped
    GEMMs (they lie past the last expert's end): every use of a GEMM output masks them with
    ``routed``, and the K-grouped GEMMs ignore them (they lie past the sum of the counts)."""

    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, w13, w2):
        tokens, hidden = x.shape
        order, token, routed, ends, counts = route(topk_idx, w13.shape[0])
        h = grouped_mm(x[token], w13.transpose(1, 2), ends)  # [T * k, 2I]
        y = grouped_mm(_swiglu(h)[0].to(x.dtype), w2.transpose(1, 2), ends)  # [T * k, H]
        weight = topk_weights.reshape(-1)[order].float()
        out = torch.zeros(tokens, hidden, device=x.device, dtype=torch.float32)
        out.index_add_(0, token, torch.where(routed[:, None], y.float() * weight[:, None], 0.0))
        ctx.save_for_backward(x, topk_weights, w13, w2, order, token, routed, ends, counts, h, y)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, topk_weights, w13, w2, order, token, routed, ends, counts, h, y = ctx.saved_tensors
        mask = routed[:, None]
        grad_slots = torch.where(mask, grad_out.float()[token], 0.0)  # [T * k, H]
        grad_weights = None
        if ctx.needs_input_grad[2]:
            flat = torch.zeros(topk_weights.numel(), device=x.device, dtype=torch.float32)
            flat[order] = torch.where(routed, (grad_slots * y.float()).sum(dim=1), 0.0)
            grad_weights = flat.view(topk_weights.shape).to(topk_weights.dtype)
        dy = (grad_slots * topk_weights.reshape(-1)[order].float()[:, None]).to(x.dtype)  # GEMM2's output grad
        act, gate, up = _swiglu(h)
        grad_w2 = grad_w13 = grad_x = None
        if ctx.needs_input_grad[4]:
            grad_w2 = torch.empty(w2.shape, device=x.device, dtype=torch.float32)
            k_grouped_bf16_gemm_tn_contiguous(dy, act.to(x.dtype), grad_w2, None, counts)
            grad_w2 = grad_w2.to(w2.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            dact = grouped_mm(dy, w2, ends).float()  # dY . W2[e]: w2 [E, H, I] is [G, K, N], N contiguous
            sig = torch.sigmoid(gate)
            dh = torch.cat([dact * up * sig * (1 + gate * (1 - sig)), dact * gate * sig], dim=1)
            dh = torch.where(mask, dh, 0.0).to(x.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
                grad_x.index_add_(0, token, torch.where(mask, grouped_mm(dh, w13, ends).float(), 0.0))
                grad_x = grad_x.to(x.dtype)
            if ctx.needs_input_grad[3]:
                grad_w13 = torch.empty(w13.shape, device=x.device, dtype=torch.float32)
                k_grouped_bf16_gemm_tn_contiguous(dh, x[token], grad_w13, None, counts)
                grad_w13 = grad_w13.to(w13.dtype)
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
