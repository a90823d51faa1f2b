"""Benchmark the FP8 backward GEMMs on one GPU against torch, our BF16 ops and our K-major FP8 kernels.

    python3 -m cute_moe.tools.bench_fp8_backward --out DIR [--quick]

Every row times the public op ("ours": the K-major copy of its MN-major operands included) three
times in the same run, each time interleaved with one baseline (CUDA graphs after warm-up, median
of interleaved replays, inputs rotated past L2; tools/bench_common.time_pair):
- torch: ``torch._scaled_mm`` / ``torch._scaled_grouped_mm`` with the row-wise FP8 recipe (a coarser
  recipe than the 1x128 / 128x128 blocks; operands in the layouts torch requires, prepared untimed),
  or the BF16 ``torch._grouped_mm`` where the FP8 form is refused; it is the row's baseline column;
- our BF16 op with the same operand majors (note: ``bf16``);
- our K-major FP8 kernel alone on operands transposed beforehand (note: ``k-major``): ours minus it
  is the cost of the transposing pass (note: ``copy``).
Shapes: dense M=4096 N=7168 K=4096; dX = dY . W over 8 uneven experts (16384 tokens in multiples of
128, K=7168, N=2048); weight gradients over 8 uneven groups of multiples of 128 tokens (M=4096,
N=7168, sum K=16000, one group empty). The full run adds a second shape per kind. calc_diff is against an
FP32 product of the dequantized operands. Writes fp8_backward_bench.md and .json to --out.
"""

import argparse
import sys
from typing import Callable, Optional

import torch

import cute_moe
from cute_moe.fp8_backward import _launch_k_grouped, transposed_copy
from cute_moe.testing import calc_diff

from . import bench_common
from .bench_common import Row, quantize_rows, randn, rowwise_fp8, run_report, sets_for, time_pair
from .bench_training import expert_of_rows, offsets, uneven_sizes
from .command import module_main

SCALE_BLOCK = 128
DENSE_SHAPES = ((4096, 7168, 4096), (4096, 2048, 7168))  # (M, N, K)
NN_SHAPES = ((8, 16384, 7168, 2048), (32, 32768, 2048, 7168))  # (experts, tokens, K, N)
K_GROUPED_SHAPES = ((8, 4096, 7168, 16000), (32, 2048, 7168, 65536))  # (groups, M, N, sum K)
# FP8 op -> (A given MN-major, B given MN-major, our BF16 op with the same operand majors)
DENSE_OPS = {"fp8_gemm_nn": (False, True, "bf16_gemm_nn"), "fp8_gemm_tn": (True, True, "bf16_gemm_tn"),
             "fp8_gemm_tt": (True, False, "bf16_gemm_tt")}


def _row(kind: str, shape: str, flops: int, nbytes: int, fns: dict[str, Callable[[int], object]], sets: int,
         torch_label: str, diff: float) -> Row:
    """Time ours against each baseline (interleaved pairs) and build the row; the torch baseline is the
    row's baseline column, our BF16 op and our K-major kernel go to the note."""
    ours = fns["ours"]
    t_ours, t_torch = time_pair(ours, fns["torch"], sets)
    _, t_bf16 = time_pair(ours, fns["bf16"], sets)
    t_ours_k, t_kernel = time_pair(ours, fns["k-major"], sets)
    note = (f"bf16 {t_bf16:.0f} us ({t_bf16 / t_ours:.2f}x); k-major {t_kernel:.0f} us; "
            f"copy {t_ours_k - t_kernel:.0f} us ({(t_ours_k - t_kernel) / t_ours_k:.0%} of ours)")
    return Row(kind, shape, t_ours, t_torch, flops / t_ours / 1e6, nbytes / t_ours / 1e3, t_torch / t_ours, diff,
               torch_label, note)


def _mn_given(q: torch.Tensor, sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's MN-major operand form (x.T, sf.T) with the data row-major."""
    return transposed_copy(q), sf.transpose(-2, -1)


def dense_rows(m: int, n: int, k: int) -> list[Row]:
    sets = sets_for((m + n) * k * 3)
    a = [randn(m, k) for _ in range(sets)]
    b = [randn(n, k) for _ in range(sets)]
    a_q = [quantize_rows(t) for t in a]  # sfa MN-major, TMA-aligned
    b_q = [cute_moe.per_block_cast_to_fp8(t) for t in b]
    rowwise = [rowwise_fp8(x, w.unsqueeze(0)) for x, w in zip(a, b)]
    d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    d_bf16 = torch.empty_like(d)
    ref = cute_moe.per_token_dequant(a_q[0][0], a_q[0][1]) @ cute_moe.per_block_dequant(*b_q[0]).T
    rows = []
    for name, (trans_a, trans_b, bf16_name) in DENSE_OPS.items():
        a_given = [_mn_given(*x) if trans_a else x for x in a_q]
        b_given = [_mn_given(*x) if trans_b else x for x in b_q]
        a_bf16 = [t.t().contiguous() if trans_a else t for t in a]
        b_bf16 = [t.t().contiguous() if trans_b else t for t in b]
        op, bf16_op = getattr(cute_moe, name), getattr(cute_moe, bf16_name)
        fns = {
            "ours": lambda i: op(a_given[i], b_given[i], d),
            "torch": lambda i: torch._scaled_mm(rowwise[i][0], rowwise[i][1][0].t(), rowwise[i][2][:, None],
                                                rowwise[i][3].view(1, -1), out_dtype=torch.bfloat16),
            "bf16": lambda i: bf16_op(a_bf16[i], b_bf16[i], d_bf16),
            "k-major": lambda i: cute_moe.fp8_gemm_nt(a_q[i], b_q[i], d),
        }
        fns["ours"](0)
        diff = calc_diff(d, ref)
        rows.append(_row(name, f"M={m} N={n} K={k}", 2 * m * n * k, (m + n) * k + m * n * 2, fns, sets,
                         "torch._scaled_mm (row-wise)", diff))
    return rows


def nn_rows(experts: int, tokens: int, k: int, n: int) -> list[Row]:
    counts = uneven_sizes(tokens, experts, SCALE_BLOCK, seed=experts + 1, empty_group=False)
    offs = offsets(counts)
    layout = expert_of_rows(counts)
    m = sum(counts)
    sets = sets_for((m * k + experts * k * n) * 3)
    a = [randn(m, k) for _ in range(sets)]
    w = [randn(experts, n, k) for _ in range(sets)]  # logical [G, N, K]: b of the nn op is its [G, K, N]
    a_q = [quantize_rows(t) for t in a]
    w_q = [cute_moe.per_block_cast_to_fp8(t) for t in w]
    w_given = [_mn_given(*x) for x in w_q]
    w_bf16 = [t.transpose(1, 2).contiguous() for t in w]
    rowwise = [rowwise_fp8(x, t) for x, t in zip(a, w)]
    d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    d_bf16 = torch.empty_like(d)
    fns = {
        "ours": lambda i: cute_moe.m_grouped_fp8_gemm_nn_contiguous(a_q[i], w_given[i], d, layout),
        "torch": lambda i: torch._scaled_grouped_mm(rowwise[i][0], rowwise[i][1].transpose(1, 2), rowwise[i][2],
                                                    rowwise[i][3], offs=offs, out_dtype=torch.bfloat16),
        "bf16": lambda i: cute_moe.m_grouped_bf16_gemm_nn_contiguous(a[i], w_bf16[i], d_bf16, layout),
        "k-major": lambda i: cute_moe.m_grouped_fp8_gemm_nt_contiguous(a_q[i], w_q[i], d, layout),
    }
    fns["ours"](0)
    a_deq = cute_moe.per_token_dequant(a_q[0][0], a_q[0][1])
    ends = [0] + offs.tolist()
    ref = torch.cat([a_deq[s:e] @ cute_moe.per_block_dequant(w_q[0][0][g], w_q[0][1][g]).T
                     for g, (s, e) in enumerate(zip(ends, ends[1:]))])
    diff = calc_diff(d, ref)
    return [_row("m_grouped_fp8_gemm_nn_contiguous", f"G={experts} M={m} N={n} K={k}", 2 * m * n * k,
                 m * k + experts * n * k + m * n * 2, fns, sets, "torch._scaled_grouped_mm (row-wise)", diff)]


def _grouped_blocks(x: torch.Tensor, ks: list) -> torch.Tensor:
    """DeepGEMM's nt operand: each group's [MN, K] block of x [sum K, MN], K-major, one after another."""
    starts = [0] + torch.tensor(ks).cumsum(0).tolist()
    blocks = [transposed_copy(x[s:e]).view(torch.uint8).flatten() for s, e in zip(starts, starts[1:])]
    return torch.cat(blocks).view(x.dtype)


def _torch_wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> tuple[Callable, str]:
    """torch's weight gradient on a [sum K, M], b [sum K, N]: FP8 row-wise 2-D x 2-D
    ``_scaled_grouped_mm`` when this torch runs it, else BF16 ``_grouped_mm``."""
    groups = offs.shape[0]
    a_fp8, b_fp8, scale_a, scale_b = rowwise_fp8(a.t().contiguous(), b.t().contiguous().unsqueeze(0))
    scale_a, scale_b = scale_a.repeat(groups), scale_b.reshape(-1).repeat(groups)
    b_fp8 = b_fp8[0]

    def fp8(_):
        return torch._scaled_grouped_mm(a_fp8, b_fp8.t(), scale_a, scale_b, offs=offs, out_dtype=torch.bfloat16)

    try:
        fp8(0)
        torch.cuda.synchronize()
        return fp8, "torch._scaled_grouped_mm 2Dx2D (row-wise)"
    except (RuntimeError, TypeError, ValueError):  # this torch does not run the FP8 2-D x 2-D form
        a_rows = a.t().contiguous()

        def bf16(_):
            return torch._grouped_mm(a_rows, b, offs=offs)

        return bf16, "torch._grouped_mm 2Dx2D BF16 (FP8 2Dx2D refused)"


def k_grouped_rows(groups: int, m: int, n: int, sum_k: int) -> list[Row]:
    ks = uneven_sizes(sum_k, groups, SCALE_BLOCK, seed=groups, empty_group=True)
    sum_k = sum(ks)
    ks_tensor, offs = torch.tensor(ks, dtype=torch.int32).cuda(), offsets(ks)
    sets = sets_for((m + n) * sum_k * 3)
    a = [randn(sum_k, m) for _ in range(sets)]
    b = [randn(sum_k, n) for _ in range(sets)]
    a_q = [cute_moe.per_channel_cast_to_fp8(t) for t in a]  # [sum K, M], sf [sum K / 128, M]
    b_q = [cute_moe.per_channel_cast_to_fp8(t) for t in b]
    k_major = [(transposed_copy(x[0]), x[1].t()) for x in a_q], [(transposed_copy(x[0]), x[1].t()) for x in b_q]
    d = torch.empty(groups, m, n, device="cuda", dtype=torch.float32)
    d_bf16 = torch.empty_like(d)
    torch_fn, torch_label = _torch_wgrad(a[0], b[0], offs)
    a_deq, b_deq = cute_moe.per_channel_dequant(*a_q[0]), cute_moe.per_channel_dequant(*b_q[0])
    starts = [0] + offs.tolist()
    ref = torch.stack([a_deq[s:e].T @ b_deq[s:e] for s, e in zip(starts, starts[1:])])
    nt = [(_grouped_blocks(x[0], ks), x[1].t()) for x in a_q], [(_grouped_blocks(x[0], ks), x[1].t()) for x in b_q]
    forms = {
        "k_grouped_fp8_gemm_tn_contiguous": lambda i: cute_moe.k_grouped_fp8_gemm_tn_contiguous(
            a_q[i], b_q[i], d, ks, ks_tensor),
        "k_grouped_fp8_gemm_nt_contiguous": lambda i: cute_moe.k_grouped_fp8_gemm_nt_contiguous(
            nt[0][i], nt[1][i], d, ks, ks_tensor),
    }
    rows = []
    for name, ours in forms.items():
        fns = {
            "ours": ours,
            "torch": torch_fn,
            "bf16": lambda i: cute_moe.k_grouped_bf16_gemm_tn_contiguous(a[i], b[i], d_bf16, ks, ks_tensor),
            "k-major": lambda i: _launch_k_grouped(*k_major[0][i], *k_major[1][i], d, ks, ks_tensor, None),
        }
        ours(0)
        diff = calc_diff(d, ref)
        rows.append(_row(name, f"G={groups} M={m} N={n} sumK={sum_k}", 2 * m * n * sum_k,
                         (m + n) * sum_k + groups * m * n * 4, fns, sets, torch_label, diff))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench_common.add_arguments(parser, "fp8_backward_bench", "the first shape of each kind only (about a minute)")


def run(args: argparse.Namespace) -> int:
    count = 1 if args.quick else 2
    jobs = ([(dense_rows, s) for s in DENSE_SHAPES[:count]] + [(nn_rows, s) for s in NN_SHAPES[:count]]
            + [(k_grouped_rows, s) for s in K_GROUPED_SHAPES[:count]])
    return run_report(args.out, "fp8_backward_bench",
                      "FP8 backward GEMMs against torch, our BF16 ops and our K-major FP8 kernels", jobs)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cute_moe.tools.bench_fp8_backward``."""
    return module_main("bench_fp8_backward", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
