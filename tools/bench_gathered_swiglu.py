"""Benchmark the MoE layer's fused GEMM1 (token gather + GEMM + SwiGLU in one kernel) on one GPU.

    python3 -m cute_moe.tools.bench_gathered_swiglu --out DIR [--quick] [--shapes ...] [--tokens T]

Ours: ``gathered_swiglu_grouped_mm(x, token, w13, ends, h)`` (act [S, I] and h [S, 2I], what the
layer's training forward runs). Two baselines on the same routing, each in the same run (CUDA graphs
after warm-up, median of interleaved replays, inputs rotated past L2; tools/bench_common):
- torch: torchtitan's GEMM1, ``index_select`` of x into expert-sorted rows padded to 8 per expert
  (tools/grouped_mm_moe.py), ``torch._grouped_mm(rows, w13ᵀ, offs)``, SwiGLU in torch (act bf16);
- unfused ours: ``x[token]``, ``cute_moe.grouped_mm``, SwiGLU in torch (the layer's GEMM1 before the fusion).
Shapes: the layer benchmark's (``cute-moe bench-layer``: OLMoE-1B-7B, Qwen3-30B-A3B, gpt-oss-120b,
DeepSeek-V3-EP8, top-k routing with uneven experts and an empty one); ``--quick`` runs OLMoE-1B-7B and
DeepSeek-V3-EP8. Writes gathered_swiglu_bench.md and .json to --out.
"""

import argparse
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from cute_moe.moe_gemms import gathered_swiglu_grouped_mm
from cute_moe.moe_layer import route as sort_slots
from cute_moe.ops import grouped_mm
from cute_moe.testing import calc_diff

from . import bench_common
from .bench_common import Row, randn, run_jobs, sets_for, time_pair, write_report
from .bench_moe_layer import LayerShape, route, select_shapes
from .command import make_out_dir, module_main, require_gpu
from .grouped_mm_moe import BF16_GROUP_ALIGNMENT, permute_by_expert

REPORT_STEM = "gathered_swiglu_bench"
SEED = 0


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in FP32 of GEMM1's output [S, 2I] (gate half first), rounded to BF16: the
    unfused baselines' SwiGLU."""
    gate, up = h.float().chunk(2, dim=1)
    return (F.silu(gate) * up).to(torch.bfloat16)


def gemm1_rows(shape: LayerShape) -> list[Row]:
    tokens, hidden, inter, experts = shape.tokens, shape.hidden, shape.intermediate, shape.experts
    generator = torch.Generator().manual_seed(SEED)
    topk_idx = route(tokens, experts, shape.top_k, generator)[0].cuda()
    _, token, _, ends, _ = sort_slots(topk_idx, experts)
    row_index = token.to(torch.int32)
    perm = permute_by_expert(topk_idx, experts, BF16_GROUP_ALIGNMENT)
    routed = int(ends[-1])
    slots = row_index.shape[0]
    gemm_bytes = (routed * hidden + experts * 2 * inter * hidden + routed * 3 * inter) * 2
    sets = sets_for(gemm_bytes)
    xs = [randn(tokens, hidden) for _ in range(sets)]
    w13s = [randn(experts, 2 * inter, hidden) / hidden ** 0.5 for _ in range(sets)]
    h = torch.empty(slots, 2 * inter, device="cuda", dtype=torch.bfloat16)

    def ours(i):
        return gathered_swiglu_grouped_mm(xs[i], row_index, w13s[i], ends, h)

    def torch_gemm1(i):
        rows = torch.cat([xs[i], xs[i].new_zeros(1, hidden)]).index_select(0, perm.token)
        return swiglu(torch._grouped_mm(rows, w13s[i].transpose(1, 2), offs=perm.offs))

    def unfused(i):
        return swiglu(grouped_mm(xs[i][token], w13s[i].transpose(1, 2), ends))

    act = ours(0)[:routed]
    flops = 2 * routed * hidden * 2 * inter
    rows = []
    for name, base, reference in (
            (f"torch: index_select + _grouped_mm + SwiGLU (groups padded to {BF16_GROUP_ALIGNMENT})", torch_gemm1,
             lambda: torch_gemm1(0)[perm.token < tokens]),
            ("ours unfused: x[token] + grouped_mm + SwiGLU", unfused, lambda: unfused(0)[:routed])):
        diff = calc_diff(act, reference())
        ours_us, base_us = time_pair(ours, base, sets)
        rows.append(Row("gathered_swiglu_grouped_mm (act + h)", shape.label, ours_us, base_us,
                        flops / ours_us / 1e6, gemm_bytes / ours_us / 1e3, base_us / ours_us, diff, name,
                        f"{routed} routed slots"))
    return rows


def add_layer_shape_arguments(parser: argparse.ArgumentParser, stem: str) -> None:
    """The options of a benchmark over the layer benchmark's shapes (this one and the backward dact
    GEMM's): --out, --quick, --shapes, --tokens."""
    bench_common.add_arguments(parser, stem, "OLMoE-1B-7B and DeepSeek-V3-EP8 only")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names, or all (default: all)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens T of every shape (default: per shape)")


def run_layer_shapes(args: argparse.Namespace, rows_of: Callable[[LayerShape], list[Row]], stem: str,
                     title: str) -> int:
    """Run ``rows_of`` on every selected shape and write the report ``stem``; 1 when a shape failed."""
    shapes = select_shapes(args.shapes, args.quick, args.tokens)
    require_gpu("benchmarking")
    make_out_dir(args.out)
    rows, failures = run_jobs([(rows_of, (shape,)) for shape in shapes])
    write_report(args.out, stem, title, rows, failures)
    return 1 if failures else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_layer_shape_arguments(parser, REPORT_STEM)


def run(args: argparse.Namespace) -> int:
    return run_layer_shapes(args, gemm1_rows, REPORT_STEM,
                            "MoE GEMM1 fused (gather + GEMM + SwiGLU) against unfused GEMM1s")


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.bench_gathered_swiglu``."""
    return module_main("bench_gathered_swiglu", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
