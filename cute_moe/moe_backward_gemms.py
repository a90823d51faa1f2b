"""The MoE layer's fused backward GEMM: ``gathered_swiglu_backward_mm`` (dO gathered in A's loads, the
SwiGLU backward and the router-weight gradient in the epilogue), an internal op of ``cute_moe.moe``
(docs/gathered_swiglu.md, "Backward").

The op is a launcher signature class (warm key, validation, kernel arguments, dispatch facts, debug
index checks) dispatched through the sm_90a backend's backward dact family
(kernels/sm90/gathered_swiglu_backward_*.py), and a ``torch.library`` custom op with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces it.
"""

from typing import Optional

import torch
from torch import Tensor

from .dispatch import forced_config
from .launcher import _launches, ROW_ELEMENTS, on_device
from .moe_gemms import MAX_ELEMENTS, GatheredRowsOp
from .operands import BF16, Operand
from .validation import check_contiguous, check_placement, check_shape, check_tensor

W2_OPERAND = Operand("bf16", major="mn")  # w2 [E, H, I]: the GEMM's B (N = I) with N contiguous


class GatheredSwigluBackwardOp(GatheredRowsOp):
    """dh [S, 2I] and d_weight [S] of the SwiGLU expert MLP for the rows r of expert e's segment
    (cumulative ``ends``); see ``gathered_swiglu_backward_mm``."""

    kind = "gathered_swiglu_backward"

    def __call__(self, grad_out: Tensor, row_index: Tensor, w2: Tensor, ends: Tensor, h: Tensor,
                 weight: Tensor, dh_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``dh_out``: where dh is written (a new tensor when None; the GPU tests pass a NaN-poisoned one)."""
        try:
            slots = row_index.shape[0]
            device = grad_out.get_device()
            key = (self, grad_out.shape[1], w2.shape, device, forced_config())
        except (AttributeError, TypeError, IndexError):
            self.validate(grad_out, row_index, w2, ends, h, weight, dh_out, None)
            raise
        warm = key in _launches and on_device(device, row_index, w2, ends, h, weight)
        if not warm or slots == 0 or dh_out is not None:
            self.validate(grad_out, row_index, w2, ends, h, weight, dh_out, None)  # before allocating
        inter = w2.shape[2]
        dh = dh_out
        if dh is None:
            dh = torch.empty((slots, 2 * inter), dtype=torch.bfloat16, device=grad_out.device)
        if slots == 0:
            return dh, torch.zeros(0, dtype=torch.float32, device=grad_out.device)
        launch = _launches.get(key)
        if launch is None:
            launch = self._build(key, **self.facts(grad_out, row_index, w2, ends, h, weight, dh, None))
        # One partial per (row, N block) of the launch's tile; rows past ends[-1] keep their zeros.
        partial = torch.zeros((slots, -(-inter // launch.config.tile_n)), dtype=torch.float32, device=grad_out.device)
        self.run(key, True, (grad_out, row_index, w2, ends, h, weight, dh, partial))
        return dh, partial.sum(1)

    def facts(self, grad_out, row_index, w2, ends, h, weight, dh, partial) -> dict:
        return dict(kind=self.kind, n=w2.shape[2], k=w2.shape[1], num_groups=w2.shape[0], expected_m=0, alignment=0,
                    d_dtype="bf16", device=grad_out.device)

    def kernel_args(self, grad_out, row_index, w2, ends, h, weight, dh, partial) -> tuple:
        return grad_out, w2, dh, partial, h, weight, row_index, ends

    def validate(self, grad_out, row_index, w2, ends, h, weight, dh, partial) -> None:
        self.check_gathered("grad_out", grad_out, row_index, "w2", w2, ends)
        check_tensor("h", h, (torch.bfloat16,), 2)
        check_tensor("weight", weight, (torch.float32,), 1)
        hidden = grad_out.shape[1]
        inter = w2.shape[2]
        slots = row_index.shape[0]
        if w2.shape[1] != hidden:
            raise ValueError(f"w2: expected [E, {hidden}, I] (H from grad_out of shape {tuple(grad_out.shape)}), "
                             f"got {tuple(w2.shape)}")
        self.check_hidden("grad_out", hidden)
        if inter == 0 or inter % ROW_ELEMENTS:
            raise ValueError(f"w2: expected I to be a positive multiple of {ROW_ELEMENTS}, got I={inter}")
        self.check_experts("w2", w2, ends)
        check_shape("h", h, (slots, 2 * inter))
        check_shape("weight", weight, (slots,))
        self.check_source_rows("grad_out", grad_out, slots)
        if slots * 2 * inter > MAX_ELEMENTS:
            raise ValueError(f"h: expected S * 2I <= {MAX_ELEMENTS} (h and dh are addressed with 32-bit offsets), "
                             f"got S={slots}, 2I={2 * inter}")
        for name, t in (("grad_out", grad_out), ("row_index", row_index), ("w2", w2), ("ends", ends), ("h", h),
                        ("weight", weight)):
            check_contiguous(name, t)
        if dh is not None:
            check_tensor("dh_out", dh, (torch.bfloat16,), 2)
            check_shape("dh_out", dh, (slots, 2 * inter))
            check_contiguous("dh_out", dh)
        check_placement(grad_out=grad_out, row_index=row_index, w2=w2, ends=ends, h=h, weight=weight, dh_out=dh)


GATHERED_SWIGLU_BACKWARD = GatheredSwigluBackwardOp("gathered_swiglu_backward_mm", BF16, W2_OPERAND)


def gathered_swiglu_backward_mm(grad_out: Tensor, row_index: Tensor, w2: Tensor, ends: Tensor, h: Tensor,
                                weight: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of the MoE layer's expert MLP through GEMM2 and SwiGLU, fused: returns (dh, d_weight)
    with, for slot r of expert e (``ends[e-1] <= r < ends[e]``, ends[-1] = 0) and c < I,

        a = grad_out[row_index[r]] . w2[e, :, c]   (FP32),   g, u = h[r, c], h[r, I + c],
        dact = weight[r] * a,   s = sigmoid(g),
        dh[r, c] = dact * u * s * (1 + g * (1 - s)),   dh[r, I + c] = dact * g * s   (bf16),
        d_weight[r] = sum_c a * g * s * u   (FP32: the gradient of slot r's routing weight).

    grad_out [T, H] bf16 (the layer's output gradient); row_index int32 [S] (token of each sorted
    slot, in [0, T)); w2 [E, H, I] bf16; ends int32 [E] cumulative ends of the experts' segments
    (empty experts allowed); h [S, 2I] bf16 (GEMM1's pre-activations, gate half first); weight
    float32 [S] (each slot's routing weight, 0 for a dropped slot). No permuted copy of grad_out is
    made: the kernel gathers its rows while loading A. d_weight is summed over N tiles in a fixed
    order (no atomics: deterministic). Rows past ends[-1]: dh left unwritten, d_weight 0. Whatever
    the index tensors hold, nothing is read outside grad_out or written outside the outputs: row
    indices are clamped to [0, T), ends as grouped_mm's (``CUTE_MOE_DEBUG=1`` checks both on the host).
    """
    if torch.compiler.is_compiling():  # torch.compile traces the custom op
        return torch.ops.cute_moe.gathered_swiglu_backward_mm(grad_out, row_index, w2, ends, h, weight)
    return GATHERED_SWIGLU_BACKWARD(grad_out, row_index, w2, ends, h, weight)


@torch.library.custom_op("cute_moe::gathered_swiglu_backward_mm", mutates_args=())
def _gathered_swiglu_backward_op(grad_out: Tensor, row_index: Tensor, w2: Tensor, ends: Tensor, h: Tensor,
                                 weight: Tensor) -> tuple[Tensor, Tensor]:
    return GATHERED_SWIGLU_BACKWARD(grad_out, row_index, w2, ends, h, weight)


@_gathered_swiglu_backward_op.register_fake
def _gathered_swiglu_backward_fake(grad_out: Tensor, row_index: Tensor, w2: Tensor, ends: Tensor, h: Tensor,
                                   weight: Tensor) -> tuple[Tensor, Tensor]:
    """dh [S, 2I] bf16 and d_weight [S] float32."""
    slots = row_index.shape[0]
    return (grad_out.new_empty((slots, 2 * w2.shape[2]), dtype=torch.bfloat16),
            grad_out.new_empty((slots,), dtype=torch.float32))
