"""BF16 kernels on a Hopper GPU against an FP32 reference (fresh random data, NaN-poisoned outputs)."""

import contextlib

import pytest
import torch

import cute_moe
from cute_moe.layouts.alignment import align
from cute_moe.testing import calc_diff, relative_error

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16
N, K = 384, 320  # a partial 256-wide N block and a K tail past the 64-wide k-blocks


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(bf16)


def poisoned(*shape, dtype=bf16):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def assert_close(out, ref):
    assert not out.isnan().any(), "unwritten (NaN) elements where the kernel must write"
    assert calc_diff(out, ref) < 1e-5
    assert relative_error(out, ref) < (1e-2 if out.dtype == bf16 else 1e-5)


@pytest.mark.parametrize("m", [1, 100, 128, 1031])
@pytest.mark.parametrize("out_dtype", [bf16, torch.float32])
def test_dense(m, out_dtype):
    a, b = randn(m, K), randn(N, K)
    d = poisoned(m, N, dtype=out_dtype)
    cute_moe.bf16_gemm_nt(a, b, d)
    torch.cuda.synchronize()
    assert_close(d, (a.float() @ b.float().T).to(out_dtype))


@pytest.mark.parametrize("out_dtype", [bf16, torch.float32])
def test_dense_with_c(out_dtype):
    m = 515
    a, b = randn(m, K), randn(N, K)
    c = torch.randn(m, N, device="cuda").to(out_dtype)
    d = poisoned(m, N, dtype=out_dtype)
    cute_moe.bf16_gemm_nt(a, b, d, c=c)
    assert_close(d, (c.float() + a.float() @ b.float().T).to(out_dtype))
    # In place accumulation: d = d + a @ b.T
    ref = (c.float() + a.float() @ b.float().T).to(out_dtype)
    cute_moe.bf16_gemm_nt(a, b, c, c=c)
    assert_close(c, ref)


def make_contiguous(counts, alignment):
    """Aligned expert segments; returns a, grouped_layout and the (start, count, expert) of each."""
    segments, start = [], 0
    for e, cnt in enumerate(counts):
        segments.append((start, cnt, e))
        start += align(cnt, alignment)
    total = max(start, alignment)
    layout = torch.full((total,), -1, dtype=torch.int32)
    for s, cnt, e in segments:
        layout[s:s + cnt] = e
    return randn(total, K), layout.cuda(), segments


@pytest.mark.parametrize("alignment,config", [
    (128, None), (256, None),
    (128, cute_moe.KernelConfig(tile_m=128, tile_n=128, cluster_m=2)),  # clusters spanning two experts
], ids=["align128", "align256", "align128-mixed-clusters"])
@pytest.mark.parametrize("out_dtype", [bf16, torch.float32])
def test_contiguous(alignment, config, out_dtype):
    old = cute_moe.get_mk_alignment_for_contiguous_layout()
    cute_moe.set_mk_alignment_for_contiguous_layout(alignment)
    try:
        g = 7
        counts = torch.randint(0, 700, (g,)).tolist()
        counts[2] = 0
        counts[4] = 128
        a, layout, segments = make_contiguous(counts, alignment)
        b = randn(g, N, K)
        d = poisoned(a.shape[0], N, dtype=out_dtype)
        with (cute_moe.dispatch.force_config(config) if config else contextlib.nullcontext()):
            cute_moe.m_grouped_bf16_gemm_nt_contiguous(a, b, d, layout)
        for s, cnt, e in segments:
            if cnt:
                assert_close(d[s:s + cnt], (a[s:s + cnt].float() @ b[e].float().T).to(out_dtype))
    finally:
        cute_moe.set_mk_alignment_for_contiguous_layout(old)


@pytest.mark.parametrize("expected_m", [16, 200])
def test_masked(expected_m):
    g, max_m = 6, 300
    a, b = randn(g, max_m, K), randn(g, N, K)
    masked_m = torch.randint(0, max_m + 1, (g,), dtype=torch.int32)
    masked_m[0], masked_m[1], masked_m[2] = 0, max_m, 64
    d = poisoned(g, max_m, N)
    cute_moe.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m.cuda(), expected_m)
    for i, rows in enumerate(masked_m.tolist()):
        if rows:
            assert_close(d[i, :rows], (a[i, :rows].float() @ b[i].float().T).to(bf16))
        assert d[i, rows:].isnan().all(), f"group {i}: rows >= masked_m were written"


def test_masked_m_larger_than_max_m_is_clamped():
    g, max_m = 3, 64
    a, b = randn(g, max_m, K), randn(g, N, K)
    d = poisoned(g, max_m, N)
    cute_moe.m_grouped_bf16_gemm_nt_masked(a, b, d, torch.tensor([1000, 0, 64], dtype=torch.int32, device="cuda"), 64)
    assert_close(d[0], (a[0].float() @ b[0].float().T).to(bf16))
    assert d[1].isnan().all()


def ragged_offsets(counts):
    return torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()


@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_grouped_mm_matches_torch(out_dtype):
    g = 9
    counts = torch.randint(0, 300, (g,)).tolist()
    counts[0], counts[5], counts[8] = 0, 0, 1
    offs = ragged_offsets(counts)
    m = sum(counts) + 5  # rows past offs[-1] are left alone
    a = randn(m, K)
    w = randn(g, N, K)
    out = cute_moe.grouped_mm(a, w.transpose(1, 2), offs, out_dtype=out_dtype)
    expected_dtype = out_dtype or bf16
    assert out.dtype == expected_dtype and out.shape == (m, N)
    start = 0
    for e, cnt in enumerate(counts):
        if cnt:
            assert_close(out[start:start + cnt], (a[start:start + cnt].float() @ w[e].float().T).to(expected_dtype))
        start += cnt
    if out_dtype is None:
        ref = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
        valid = sum(counts)
        assert calc_diff(out[:valid], ref[:valid]) < 1e-5


def test_masked_cuda_graph_replay_follows_masked_m():
    g, max_m = 4, 256
    a, b = randn(g, max_m, K), randn(g, N, K)
    masked_m = torch.tensor([10, 0, 256, 77], dtype=torch.int32, device="cuda")
    d = poisoned(g, max_m, N)
    cute_moe.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 64)  # warm: compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cute_moe.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 64)
    for new_counts in ([200, 3, 0, 256], [0, 0, 1, 128]):
        a.copy_(randn(g, max_m, K))
        b.copy_(randn(g, N, K))
        masked_m.copy_(torch.tensor(new_counts, dtype=torch.int32))
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, rows in enumerate(new_counts):
            if rows:
                assert_close(d[i, :rows], (a[i, :rows].float() @ b[i].float().T).to(bf16))
            assert d[i, rows:].isnan().all()


def test_rejects_misaligned_and_non_contiguous_cuda_inputs():
    a = randn(65, K)[1:]  # base 640 bytes in: aligned; shift by one element instead
    misaligned = randn(64 * K + 1)[1:].view(64, K)
    b = randn(N, K)
    d = poisoned(64, N)
    with pytest.raises(ValueError, match="16-byte aligned"):
        cute_moe.bf16_gemm_nt(misaligned, b, d)
    with pytest.raises(ValueError, match="contiguous"):
        cute_moe.bf16_gemm_nt(randn(K, 64).t(), b, d)
    cute_moe.bf16_gemm_nt(a, b, d)  # a row-sliced but aligned, contiguous view is fine
    assert_close(d, (a.float() @ b.float().T).to(bf16))
