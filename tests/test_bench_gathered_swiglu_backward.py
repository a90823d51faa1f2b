"""The fused backward dact benchmark on the CPU: its unfused baseline computes the formulas of the fused
op (checked against the op's CPU stand-in with grouped_mm replaced by CPU math). Its one-line
command-line errors are tested with GEMM1's benchmark (tests/test_bench_gathered_swiglu.py)."""

import torch

from cute_moe.tools import bench_gathered_swiglu_backward as bench

from gathered_support import cpu_backward


def test_unfused_baseline_computes_the_fused_formulas(monkeypatch):
    def ragged(a, b, offs):  # 2-D x 3-D grouped_mm on the CPU, bf16 out
        out = torch.empty(a.shape[0], b.shape[2], dtype=torch.bfloat16)
        start = 0
        for g, end in enumerate(offs.tolist()):
            out[start:end] = (a[start:end].float() @ b[g].float()).to(torch.bfloat16)
            start = end
        return out

    monkeypatch.setattr(bench, "grouped_mm", ragged)
    torch.manual_seed(0)
    grad_out, w2 = torch.randn(9, 32).to(torch.bfloat16), (torch.randn(3, 32, 16) / 6).to(torch.bfloat16)
    token, ends = torch.randint(0, 9, (20,)), torch.tensor([7, 7, 20], dtype=torch.int32)
    h, weight = torch.randn(20, 32).to(torch.bfloat16), torch.rand(20)
    dh, d_weight = bench.unfused_backward(grad_out, token, w2, ends, h, weight)
    dh_fused, d_weight_fused = cpu_backward(grad_out, token.to(torch.int32), w2, ends, h, weight)
    torch.testing.assert_close(dh, dh_fused, rtol=0.05, atol=0.02)  # BF16 intermediates vs FP32
    torch.testing.assert_close(d_weight, d_weight_fused, rtol=0.05, atol=0.05)

