"""The MoE layer's fused GEMMs: ``gathered_swiglu_grouped_mm`` (GEMM1 with the token gather in A's loads
and SwiGLU in the epilogue), an internal op of ``cute_moe.moe`` (docs/training.md, "The layer").

The op is a launcher signature class (warm key, validation, kernel arguments, dispatch facts, debug
index checks) dispatched through the sm_90a backend's gathered-SwiGLU family
(kernels/sm90/gathered_swiglu_*.py), and a ``torch.library`` custom op with a fake implementation,
so ``torch.compile(fullgraph=True)`` traces it.
"""

from typing import Optional

import torch
from torch import Tensor

from . import index_checks
from .dispatch import forced_config
from .launcher import _launches, INT32, ROW_ELEMENTS, GemmOp, on_device
from .operands import PRECISIONS
from .validation import check_contiguous, check_placement, check_shape, check_tensor

# The kernels address their gathered source, outputs and h with 32-bit element offsets.
MAX_ELEMENTS = 2 ** 31 - 1


class GatheredRowsOp(GemmOp):
    """What the ops whose A rows are gathered by ``row_index`` from a bf16 source [T, H] share (GEMM1
    and its backward dact GEMM): the checks of the source, the row index, the experts' bf16 weights
    [E, .., ..] and their cumulative ``ends``, and the debug checks of the index tensors. Their
    arguments begin (source, row_index, weights, ends)."""

    def check_gathered(self, source_name: str, source: Tensor, row_index: Tensor, weights_name: str,
                       weights: Tensor, ends: Tensor) -> None:
        """Dtypes and ranks of the source, the row index, the weights and the ends."""
        check_tensor(source_name, source, (torch.bfloat16,), 2)
        check_tensor("row_index", row_index, INT32, 1)
        check_tensor(weights_name, weights, (torch.bfloat16,), 3)
        check_tensor("ends", ends, INT32, 1)

    @staticmethod
    def check_hidden(source_name: str, hidden: int) -> None:
        """H (the source's row length, the GEMM's K) in whole 16-byte pieces."""
        if hidden == 0 or hidden % ROW_ELEMENTS:
            raise ValueError(f"{source_name}: expected H to be a positive multiple of {ROW_ELEMENTS}, got H={hidden}")

    def check_experts(self, weights_name: str, weights: Tensor, ends: Tensor) -> None:
        """One end per expert, and an expert count the kernel's group table holds."""
        check_shape("ends", ends, (weights.shape[0],))
        self.check_groups(weights_name, weights.shape[0], weights.device)

    @staticmethod
    def check_source_rows(source_name: str, source: Tensor, slots: int) -> None:
        """A token row to gather from whenever there are slots, and 32-bit element offsets."""
        if slots > 0 and source.shape[0] == 0:
            raise ValueError(f"{source_name}: expected at least one token row for {slots} row indices, "
                             f"got shape {tuple(source.shape)}")
        if source.numel() > MAX_ELEMENTS:
            raise ValueError(f"{source_name}: expected at most {MAX_ELEMENTS} elements (32-bit offsets), "
                             f"got {source.numel()}")

    def check_indices(self, source, row_index, weights, ends, *outputs) -> None:
        index_checks.check_ends("ends", ends, row_index.shape[0])
        index_checks.check_row_indices("row_index", row_index, source.shape[0])


class GatheredSwigluOp(GatheredRowsOp):
    """act [S, I] = silu(gate) * up with [gate | up] = x[row_index[r]] . w13[e]^T for the rows r of
    expert e's segment (cumulative ``ends``); h_out [S, 2I] receives [gate | up] when given."""

    kind = "gathered_swiglu"

    def __call__(self, x: Tensor, row_index: Tensor, w13: Tensor, ends: Tensor,
                 h_out: Optional[Tensor] = None) -> Tensor:
        try:
            slots = row_index.shape[0]
            device = x.get_device()
            key = (self, x.shape[1], w13.shape, h_out is None, device, forced_config())
        except (AttributeError, TypeError, IndexError):
            self.validate(x, row_index, w13, ends, h_out, None)
            raise
        warm = key in _launches and on_device(device, row_index, w13, ends, h_out)
        if not warm or slots == 0:
            self.validate(x, row_index, w13, ends, h_out, None)  # before allocating the output
        act = torch.empty((slots, w13.shape[1] // 2), dtype=torch.bfloat16, device=x.device)
        if slots > 0:
            self.run(key, warm, (x, row_index, w13, ends, h_out, act))
        return act

    def facts(self, x, row_index, w13, ends, h_out, act) -> dict:
        return dict(kind="gathered_swiglu" if h_out is None else "gathered_swiglu_h", n=w13.shape[1], k=w13.shape[2],
                    num_groups=w13.shape[0], expected_m=0, alignment=0, d_dtype="bf16", device=x.device)

    def kernel_args(self, x, row_index, w13, ends, h_out, act) -> tuple:
        return x, w13, act, h_out, row_index, ends

    def validate(self, x, row_index, w13, ends, h_out, act) -> None:
        self.check_gathered("x", x, row_index, "w13", w13, ends)
        hidden = x.shape[1]
        inter2 = w13.shape[1]
        slots = row_index.shape[0]
        if w13.shape[2] != hidden:
            raise ValueError(f"w13: expected [E, 2I, {hidden}] (H from x of shape {tuple(x.shape)}), "
                             f"got {tuple(w13.shape)}")
        self.check_hidden("x", hidden)
        if inter2 == 0 or inter2 % (2 * ROW_ELEMENTS):
            raise ValueError(f"w13: expected 2I rows with I a positive multiple of {ROW_ELEMENTS}, got 2I={inter2}")
        self.check_experts("w13", w13, ends)
        self.check_source_rows("x", x, slots)
        if h_out is not None:
            check_tensor("h_out", h_out, (torch.bfloat16,), 2)
            check_shape("h_out", h_out, (slots, inter2))
            check_contiguous("h_out", h_out)
        if slots * inter2 > MAX_ELEMENTS:
            raise ValueError(f"row_index: expected S * 2I <= {MAX_ELEMENTS} (h [S, 2I] is addressed with 32-bit "
                             f"offsets), got S={slots}, 2I={inter2}")
        for name, t in (("x", x), ("row_index", row_index), ("w13", w13), ("ends", ends)):
            check_contiguous(name, t)
        check_placement(x=x, row_index=row_index, w13=w13, ends=ends, h_out=h_out)


GATHERED_SWIGLU = GatheredSwigluOp("gathered_swiglu_grouped_mm", *PRECISIONS["bf16"])


def gathered_swiglu_grouped_mm(x: Tensor, row_index: Tensor, w13: Tensor, ends: Tensor,
                               h_out: Optional[Tensor] = None) -> Tensor:
    """GEMM1 of the MoE layer, fused: returns act [S, I] bf16 with, for slot r of expert e
    (``ends[e-1] <= r < ends[e]``, ends[-1] = 0),

        gate = x[row_index[r]] . w13[e, :I]^T,  up = x[row_index[r]] . w13[e, I:]^T  (FP32),
        act[r] = silu(gate) * up,  h_out[r] = [gate | up]  (when h_out is given).

    x [T, H] bf16; row_index int32 [S] (token of each sorted slot, in [0, T)); w13 [E, 2I, H] bf16
    (gate rows first, then up rows); ends int32 [E] cumulative ends of the experts' segments (empty
    experts allowed); h_out bf16 [S, 2I] or None. No permuted copy of x is made: the kernel gathers
    x's rows while loading A. Rows past ends[-1] of act and h_out are left unwritten. Whatever the
    index tensors hold, nothing is read outside x or written outside act / h_out: row indices are
    clamped to [0, T), ends as grouped_mm's (``CUTE_MOE_DEBUG=1`` checks both on the host).
    """
    if torch.compiler.is_compiling():  # torch.compile traces the custom op
        return torch.ops.cute_moe.gathered_swiglu_grouped_mm(x, row_index, w13, ends, h_out)
    return GATHERED_SWIGLU(x, row_index, w13, ends, h_out)


@torch.library.custom_op("cute_moe::gathered_swiglu_grouped_mm", mutates_args=("h_out",))
def _gathered_swiglu_op(x: Tensor, row_index: Tensor, w13: Tensor, ends: Tensor,
                        h_out: Optional[Tensor] = None) -> Tensor:
    return GATHERED_SWIGLU(x, row_index, w13, ends, h_out)


@_gathered_swiglu_op.register_fake
def _gathered_swiglu_fake(x: Tensor, row_index: Tensor, w13: Tensor, ends: Tensor,
                          h_out: Optional[Tensor] = None) -> Tensor:
    """act [S, I] bf16 (h_out is written in place)."""
    return x.new_empty((row_index.shape[0], w13.shape[1] // 2), dtype=torch.bfloat16)
