"""FP8 block-scaled kernels on a Hopper GPU: DeepGEMM's calc_diff against an FP32 reference computed
from the unquantized BF16 inputs, NaN-poisoned outputs, random per-expert counts, CUDA graphs."""

import pytest
import torch

import cute_moe
from cute_moe.layouts.alignment import align
from cute_moe.testing import calc_diff

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16
N, K = 384, 320  # three 128-wide N blocks; K ends mid scale block (2.5 blocks)


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(bf16)


def quantize_a(x):
    """Per-token 1x128 cast of a [.., M, K] activation; scales in the kernel's MN-major layout."""
    flat = x.reshape(-1, x.shape[-1])
    q, sf = cute_moe.per_token_cast_to_fp8(flat)
    q, sf = q.view(*x.shape), sf.view(*x.shape[:-1], sf.shape[-1])
    return q, cute_moe.get_mn_major_tma_aligned_tensor(sf)


def poisoned(*shape, dtype=bf16):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def assert_close(out, ref):
    assert not out.isnan().any(), "unwritten (NaN) elements where the kernel must write"
    assert calc_diff(out, ref) < 1e-3


@pytest.mark.parametrize("m", [1, 200, 1031])
@pytest.mark.parametrize("out_dtype", [bf16, torch.float32])
def test_fp8_dense(m, out_dtype):
    a, b = randn(m, K), randn(N, K)
    d = poisoned(m, N, dtype=out_dtype)
    cute_moe.fp8_gemm_nt(quantize_a(a), cute_moe.per_block_cast_to_fp8(b), d)
    assert_close(d, a.float() @ b.float().T)


def test_fp8_dense_with_c_and_row_major_sfa():
    m = 300
    a, b = randn(m, K), randn(N, K)
    c = torch.randn(m, N, device="cuda")
    d = poisoned(m, N, dtype=torch.float32)
    a_q, sfa_row_major = cute_moe.per_token_cast_to_fp8(a)  # transformed inside the op
    cute_moe.fp8_gemm_nt((a_q, sfa_row_major), cute_moe.per_block_cast_to_fp8(b), d, c=c)
    assert_close(d, c + a.float() @ b.float().T)


@pytest.mark.parametrize("use_psum_layout", [False, True])
def test_fp8_contiguous(use_psum_layout):
    g, alignment = 7, cute_moe.get_mk_alignment_for_contiguous_layout()
    counts = torch.randint(0, 500, (g,)).tolist()
    counts[1], counts[3] = 0, alignment
    starts, start = [], 0
    for cnt in counts:
        starts.append(start)
        start += align(cnt, alignment)
    total = max(start, alignment)
    a, w = randn(total, K), randn(g, N, K)
    layout = torch.full((total,), -1, dtype=torch.int32)
    for e, (s, cnt) in enumerate(zip(starts, counts)):
        layout[s:s + cnt] = e
    ends = [s + cnt for s, cnt in zip(starts, counts)]
    groups = torch.tensor(ends, dtype=torch.int32) if use_psum_layout else layout
    d = poisoned(total, N)
    cute_moe.m_grouped_fp8_gemm_nt_contiguous(quantize_a(a), cute_moe.per_block_cast_to_fp8(w), d,
                                              groups.cuda(), use_psum_layout=use_psum_layout)
    for e, (s, cnt) in enumerate(zip(starts, counts)):
        if cnt:
            assert_close(d[s:s + cnt], a[s:s + cnt].float() @ w[e].float().T)


@pytest.mark.parametrize("expected_m", [16, 256])
def test_fp8_masked(expected_m):
    g, max_m = 5, 300
    a, w = randn(g, max_m, K), randn(g, N, K)
    masked_m = torch.randint(0, max_m + 1, (g,), dtype=torch.int32)
    masked_m[0], masked_m[1] = 0, max_m
    d = poisoned(g, max_m, N)
    cute_moe.m_grouped_fp8_gemm_nt_masked(quantize_a(a), cute_moe.per_block_cast_to_fp8(w), d, masked_m.cuda(),
                                          expected_m)
    for i, rows in enumerate(masked_m.tolist()):
        if rows:
            assert_close(d[i, :rows], a[i, :rows].float() @ w[i].float().T)
        assert d[i, rows:].isnan().all(), f"group {i}: rows >= masked_m were written"


def test_fp8_masked_cuda_graph_replay_follows_masked_m():
    g, max_m = 4, 256
    a, w = randn(g, max_m, K), randn(g, N, K)
    a_q, sfa = quantize_a(a)
    w_q, sfb = cute_moe.per_block_cast_to_fp8(w)
    masked_m = torch.tensor([10, 0, 256, 77], dtype=torch.int32, device="cuda")
    d = poisoned(g, max_m, N)
    cute_moe.m_grouped_fp8_gemm_nt_masked((a_q, sfa), (w_q, sfb), d, masked_m, 64)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cute_moe.m_grouped_fp8_gemm_nt_masked((a_q, sfa), (w_q, sfb), d, masked_m, 64)
    for new_counts in ([200, 3, 0, 256], [0, 0, 1, 128]):
        a, w = randn(g, max_m, K), randn(g, N, K)
        new_a, new_sfa = quantize_a(a)
        new_w, new_sfb = cute_moe.per_block_cast_to_fp8(w)
        a_q.copy_(new_a)
        sfa.copy_(new_sfa)
        w_q.copy_(new_w)
        sfb.copy_(new_sfb)
        masked_m.copy_(torch.tensor(new_counts, dtype=torch.int32))
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, rows in enumerate(new_counts):
            if rows:
                assert_close(d[i, :rows], a[i, :rows].float() @ w[i].float().T)
            assert d[i, rows:].isnan().all()


def test_fp8_rejects_bad_scales():
    a, b = randn(64, K), randn(N, K)
    a_q, sfa = quantize_a(a)
    b_q, sfb = cute_moe.per_block_cast_to_fp8(b)
    d = poisoned(64, N)
    with pytest.raises(ValueError, match=r"^sfb: expected shape \(3, 3\)"):
        cute_moe.fp8_gemm_nt((a_q, sfa), (b_q, sfb[:2]), d)
    with pytest.raises(TypeError, match=r"^a: expected dtype float8_e4m3fn, got bfloat16"):
        cute_moe.fp8_gemm_nt((a, sfa), (b_q, sfb), d)


WIDE_N_TILES = cute_moe.KernelConfig(tile_m=128, tile_n=256)  # two weight-scale blocks per N tile


@pytest.mark.parametrize("kind", ["dense", "contiguous", "masked"])
def test_fp8_wide_n_tiles_promote_each_scale_block_with_its_own_scale(kind):
    """128x256 FP8 tiles run two 128-wide parts with their own B scales; N=384 leaves the second tile's
    second part outside N. Weight blocks differ in magnitude by up to 2^7, so a part promoted with
    its neighbour's scale cannot pass; the reference uses the dequantized operands."""
    g, rows = 3, 256
    block_gain = torch.tensor([1.0, 8.0, 1 / 16], device="cuda").repeat_interleave(128)[:, None]
    a = randn(g, rows, K)
    w = (randn(g, N, K).float() * block_gain).to(bf16)
    a_q, sfa = quantize_a(a)
    w_q, sfb = cute_moe.per_block_cast_to_fp8(w)
    a_deq = cute_moe.per_token_dequant(a_q.view(-1, K), sfa.reshape(-1, sfa.shape[-1])).view(g, rows, K)
    w_deq = torch.stack([cute_moe.per_block_dequant(w_q[e], sfb[e]) for e in range(g)])
    refs = [a_deq[e].float() @ w_deq[e].float().T for e in range(g)]
    with cute_moe.dispatch.force_config(WIDE_N_TILES):
        if kind == "dense":
            d = poisoned(rows, N)
            cute_moe.fp8_gemm_nt((a_q[0], sfa[0]), (w_q[0], sfb[0]), d)
            outs = [d]
        elif kind == "contiguous":
            d = poisoned(g * rows, N)
            layout = torch.arange(g, device="cuda", dtype=torch.int32).repeat_interleave(rows)
            cute_moe.m_grouped_fp8_gemm_nt_contiguous(
                (a_q.view(-1, K), cute_moe.get_mn_major_tma_aligned_tensor(sfa.reshape(g * rows, -1))),
                (w_q, sfb), d, layout)
            outs = list(d.view(g, rows, N))
        else:
            d = poisoned(g, rows, N)
            masked_m = torch.tensor([rows, 0, 77], device="cuda", dtype=torch.int32)
            cute_moe.m_grouped_fp8_gemm_nt_masked((a_q, sfa), (w_q, sfb), d, masked_m, 128)
            outs = [d[0], None, d[2, :77]]
            refs[2] = refs[2][:77]
            assert d[1].isnan().all() and d[2, 77:].isnan().all(), "rows >= masked_m were written"
    for out, ref in zip(outs, refs):
        if out is not None:
            assert not out.isnan().any(), "unwritten (NaN) elements where the kernel must write"
            assert calc_diff(out, ref) < 1e-5
