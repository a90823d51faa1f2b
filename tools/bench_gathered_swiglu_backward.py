"""Benchmark the MoE layer's fused backward dact GEMM (dO gather + GEMM + SwiGLU backward + d weight).

    python3 -m cute_moe.tools.bench_gathered_swiglu_backward --out DIR [--quick] [--shapes ...] [--tokens T]

Ours: ``gathered_swiglu_backward_mm(grad_out, token, w2, ends, h, weight)`` -> (dh [S, 2I], d_weight [S]).
Baseline, in the same run (CUDA graphs after warm-up, median of interleaved replays, inputs rotated
past L2; tools/bench_common): the layer's unfused backward lines as they were before the fusion,
``grad_out.index_select(0, token)``, ``cute_moe.grouped_mm(dO rows, w2, ends)``, d weight as
``vecdot(dact, silu(gate) * up)`` and dh as ``[silu_backward(dact * w * up, gate) | dact * w * silu(gate)]``
in BF16 torch ops. Shapes and routing: the layer benchmark's (``cute-moe bench-layer``: OLMoE-1B-7B,
Qwen3-30B-A3B, gpt-oss-120b, DeepSeek-V3-EP8; ``--quick``: the first and the last); every sorted slot
is computed (the layer's ``cover_all_slots``). TFLOPS = 2 · S · H · I / time. calc_diff of dh against
the baseline's (d weight's in the note). Writes gathered_swiglu_backward_bench.md and .json to --out.
"""

import argparse
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from cute_moe.moe_backward_gemms import gathered_swiglu_backward_mm
from cute_moe.moe_layer import cover_all_slots, slot_weights
from cute_moe.moe_layer import route as sort_slots
from cute_moe.ops import grouped_mm
from cute_moe.testing import calc_diff

from .bench_common import Row, randn, sets_for, time_pair
from .bench_gathered_swiglu import add_layer_shape_arguments, run_layer_shapes
from .bench_moe_layer import LayerShape, route
from .command import module_main

REPORT_STEM = "gathered_swiglu_backward_bench"
SEED = 0


def unfused_backward(grad_out: torch.Tensor, token: torch.Tensor, w2: torch.Tensor, ends: torch.Tensor,
                     h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's backward lines before the fusion (BF16 torch ops): (dh, d_weight)."""
    inter = w2.shape[2]
    grad_slots = grad_out.index_select(0, token)
    dact_unweighted = grouped_mm(grad_slots, w2, ends)
    gate, up = h[:, :inter], h[:, inter:]
    silu_gate = F.silu(gate)
    d_weight = torch.linalg.vecdot(dact_unweighted, silu_gate * up).float()
    dact = dact_unweighted * weight.to(h.dtype)[:, None]
    return torch.cat([torch.ops.aten.silu_backward(dact * up, gate), dact * silu_gate], dim=1), d_weight


def backward_rows(shape: LayerShape) -> list[Row]:
    tokens, hidden, inter, experts = shape.tokens, shape.hidden, shape.intermediate, shape.experts
    generator = torch.Generator().manual_seed(SEED)
    topk_idx, topk_weights = (t.cuda() for t in route(tokens, experts, shape.top_k, generator))
    order, token, _, ends, _ = sort_slots(topk_idx, experts)
    slots = token.shape[0]
    ends_all = cover_all_slots(ends, slots)
    row_index = token.to(torch.int32)
    weight = slot_weights(topk_weights, topk_idx, experts)[order].contiguous()
    gemm_bytes = (slots * hidden + experts * hidden * inter + 2 * slots * 2 * inter) * 2
    sets = sets_for(gemm_bytes)
    grad_outs = [randn(tokens, hidden) for _ in range(sets)]
    w2s = [randn(experts, hidden, inter) / hidden ** 0.5 for _ in range(sets)]
    hs = [randn(slots, 2 * inter) for _ in range(sets)]

    def ours(i):
        return gathered_swiglu_backward_mm(grad_outs[i], row_index, w2s[i], ends_all, hs[i], weight)

    def unfused(i):
        return unfused_backward(grad_outs[i], token, w2s[i], ends_all, hs[i], weight)

    (dh, d_weight), (dh_base, d_weight_base) = ours(0), unfused(0)
    note = f"{slots} slots; d_weight calc_diff {calc_diff(d_weight, d_weight_base):.1e}"
    ours_us, base_us = time_pair(ours, unfused, sets)
    flops = 2 * slots * hidden * inter
    return [Row("gathered_swiglu_backward_mm (dh + d_weight)", shape.label, ours_us, base_us, flops / ours_us / 1e6,
                gemm_bytes / ours_us / 1e3, base_us / ours_us, calc_diff(dh, dh_base),
                "index_select + grouped_mm + SwiGLU backward in torch", note)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_layer_shape_arguments(parser, REPORT_STEM)


def run(args: argparse.Namespace) -> int:
    return run_layer_shapes(args, backward_rows, REPORT_STEM, "MoE backward dact GEMM fused (dO gather + GEMM + "
                            "SwiGLU backward + d weight) against the unfused sequence")


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.bench_gathered_swiglu_backward``."""
    return module_main("bench_gathered_swiglu_backward", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
