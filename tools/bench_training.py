"""Benchmark the training (backward) GEMMs on one GPU against torch._grouped_mm in the same run.

    python3 -m cute_moe.tools.bench_training --out DIR [--quick]

Rows (every one: ours and torch._grouped_mm on the same problem, CUDA graphs after warm-up, median
of interleaved replays, inputs rotated past L2; tools/bench_common):
- weight gradient, K grouped along tokens: ``k_grouped_bf16_gemm_tn_contiguous`` (a [sum K, M],
  b [sum K, N], FP32 d [G, M, N]) against ``torch._grouped_mm(a.T, b, offs)`` (BF16 out), and our
  ``grouped_mm`` 2-D x 2-D against torch's on the same row-major a [M, sum K];
- input gradient dX = dY . W per expert: ``m_grouped_bf16_gemm_nn_contiguous`` (b [G, K, N] row-major)
  against ``torch._grouped_mm(dY, W, offs)``, and our ``grouped_mm`` with that N-major b against torch's.
Shapes: 8 groups, M=4096, N=7168, sum K=16000 uneven (the issue's measured row) and dX with K=7168,
N=2048 over 8 experts of uneven 128-aligned token counts; the full run adds 64 groups of OLMoE-1B-7B
(M=2048, N=1024, sum K=262144). Writes training_bench.md and training_bench.json to --out;
--quick runs the first shapes only (well under a minute).
"""

import argparse
import sys
from typing import Optional

import torch

import cute_moe
from cute_moe.testing import calc_diff

from . import bench_common
from .bench_common import Row, randn, run_report, sets_for, time_pair
from .command import module_main

CONTIGUOUS_ALIGNMENT = 128
K_GROUP_MULTIPLE = 16  # weight-gradient group sizes: multiples of 16 rows, not of the 64-row k-blocks
# (groups, M, N, sum K): weight-gradient problems; the first is the measured row.
K_GROUPED_SHAPES = ((8, 4096, 7168, 16000), (64, 2048, 1024, 262144))
# (experts, tokens, K, N): dX = dY . W (K = the layer's output width, N = its input width).
NN_SHAPES = ((8, 16384, 7168, 2048), (64, 262144, 1024, 2048))


def uneven_sizes(total: int, groups: int, multiple: int, seed: int, empty_group: bool) -> list[int]:
    """``groups`` sizes, multiples of ``multiple``, summing to ``total`` (rounded down to the
    multiple), drawn unevenly (with ``empty_group``, the middle group gets nothing)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(groups, generator=gen) + 0.25
    if empty_group:
        weights[groups // 2] = 0
    units = total // multiple
    sizes = (weights / weights.sum() * units).floor().long()
    sizes[0] += units - int(sizes.sum())
    return [int(s) * multiple for s in sizes]


def offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()


def expert_of_rows(sizes: list[int]) -> torch.Tensor:
    """int32 on the GPU: the group of each of the ``sum(sizes)`` rows (a contiguous grouped_layout)."""
    return torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32),
                                   torch.tensor(sizes)).to(torch.int32).cuda()


def k_grouped_rows(groups: int, m: int, n: int, sum_k: int) -> list[Row]:
    # Sizes of 16-row multiples (not of the 64-row k-blocks), none empty: torch's 2-D x 2-D path
    # wants 16-byte aligned group starts.
    ks = uneven_sizes(sum_k, groups, K_GROUP_MULTIPLE, seed=groups, empty_group=False)
    ks_tensor, offs = torch.tensor(ks, dtype=torch.int32).cuda(), offsets(ks)
    sets = sets_for((m + n) * sum_k * 2 + groups * m * n * 4)
    a = [randn(sum_k, m) for _ in range(sets)]  # [sum K, M]: the activations of the layer's input
    b = [randn(sum_k, n) for _ in range(sets)]
    d = torch.empty(groups, m, n, device="cuda", dtype=torch.float32)
    flops = 2 * m * n * sum_k
    shape = f"G={groups} M={m} N={n} sumK={sum_k}"
    rows = []

    def ours(i):
        cute_moe.k_grouped_bf16_gemm_tn_contiguous(a[i], b[i], d, ks, ks_tensor)

    a_t = [t.t() for t in a]  # torch takes a [M, sum K]: the transposed view, else a copy (untimed)
    try:
        torch._grouped_mm(a_t[0], b[0], offs=offs)
    except RuntimeError:
        a_t = [t.contiguous() for t in a_t]

    def torch_tn(i):
        return torch._grouped_mm(a_t[i], b[i], offs=offs)

    ours(0)
    diff = calc_diff(d, torch_tn(0))
    ours_us, base_us = time_pair(ours, torch_tn, sets)
    rows.append(Row("k_grouped_bf16_gemm_tn_contiguous", shape, ours_us, base_us, flops / ours_us / 1e6,
                    (m + n) * sum_k * 2 / ours_us / 1e3, base_us / ours_us, diff, "torch._grouped_mm(a.T, b, offs)",
                    "ours writes FP32 d, torch BF16"))
    a_rows = [t.t().contiguous() for t in a]  # [M, sum K]: torch's 2-D x 2-D operand

    def ours_mm(i):
        return cute_moe.grouped_mm(a_rows[i], b[i], offs)

    def torch_mm(i):
        return torch._grouped_mm(a_rows[i], b[i], offs=offs)

    diff = calc_diff(ours_mm(0), torch_mm(0))
    ours_us, base_us = time_pair(ours_mm, torch_mm, sets)
    rows.append(Row("grouped_mm 2Dx2D (offs along K)", shape, ours_us, base_us, flops / ours_us / 1e6,
                    (m + n) * sum_k * 2 / ours_us / 1e3, base_us / ours_us, diff, "torch._grouped_mm", "BF16 out"))
    return rows


def nn_rows(experts: int, tokens: int, k: int, n: int) -> list[Row]:
    counts = uneven_sizes(tokens, experts, CONTIGUOUS_ALIGNMENT, seed=experts + 1, empty_group=True)
    offs = offsets(counts)
    layout = expert_of_rows(counts)
    m = sum(counts)
    sets = sets_for((m * k + experts * k * n) * 2 + m * n * 2)
    dy = [randn(m, k) for _ in range(sets)]
    w = [randn(experts, k, n) for _ in range(sets)]  # row-major [G, K, N]: N contiguous
    dx = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * n * k
    shape = f"G={experts} M={m} N={n} K={k}"
    gbps_bytes = (m * k + experts * k * n + m * n) * 2

    def ours(i):
        cute_moe.m_grouped_bf16_gemm_nn_contiguous(dy[i], w[i], dx, layout)

    def ours_mm(i):
        return cute_moe.grouped_mm(dy[i], w[i], offs)

    def base(i):
        return torch._grouped_mm(dy[i], w[i], offs=offs)

    rows = []
    for name, fn, out in (("m_grouped_bf16_gemm_nn_contiguous", ours, lambda: dx),
                          ("grouped_mm (b N-major)", ours_mm, None)):
        result = fn(0)
        diff = calc_diff(out() if out else result, base(0))
        ours_us, base_us = time_pair(fn, base, sets)
        rows.append(Row(name, shape, ours_us, base_us, flops / ours_us / 1e6, gbps_bytes / ours_us / 1e3,
                        base_us / ours_us, diff, "torch._grouped_mm(dY, W, offs)", "128-aligned experts"))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench_common.add_arguments(parser, "training_bench", "the issue's shapes only (well under a minute)")


def run(args: argparse.Namespace) -> int:
    count = 1 if args.quick else len(K_GROUPED_SHAPES)
    jobs = [(k_grouped_rows, s) for s in K_GROUPED_SHAPES[:count]] + [(nn_rows, s) for s in NN_SHAPES[:count]]
    return run_report(args.out, "training_bench", "Training GEMMs against torch._grouped_mm", jobs)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.bench_training``."""
    return module_main("bench_training", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
