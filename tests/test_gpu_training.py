"""Training (backward) GEMMs on a Hopper GPU against an FP32 reference: DeepGEMM's nn / tn / tt
dense GEMMs, the M-grouped nn contiguous GEMM (dX = dY . W), the K-grouped weight-gradient GEMM and
grouped_mm's 2-D x 2-D (offs along K) and N-major-B forms. Outputs are NaN-poisoned before each
call; sizes are multiples of no tile; groups are uneven and include empty ones."""

import pytest
import torch

import cute_moe
from cute_moe.layouts.alignment import align
from cute_moe.testing import calc_diff, relative_error

pytestmark = pytest.mark.gpu
bf16 = torch.bfloat16
M, N, K = 200, 264, 328  # no multiple of 64 (tiles) but whole 16-byte rows


def randn(*shape, scale: float = 1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(bf16)


def poisoned(*shape, dtype=bf16):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def assert_close(out, ref, diff=1e-5):
    assert not out.isnan().any(), "unwritten (NaN) elements where the kernel must write"
    assert calc_diff(out, ref) < diff
    assert relative_error(out, ref) < (1e-2 if out.dtype == bf16 else 1e-5)


DENSE = {  # op -> (a as given, b as given) from the logical a [M, K] and b [N, K]
    "bf16_gemm_nn": lambda a, b: (a, b.t().contiguous()),
    "bf16_gemm_tn": lambda a, b: (a.t().contiguous(), b.t().contiguous()),
    "bf16_gemm_tt": lambda a, b: (a.t().contiguous(), b),
}


@pytest.mark.parametrize("op", list(DENSE))
@pytest.mark.parametrize("m", [8, M, 1032])
@pytest.mark.parametrize("out_dtype", [bf16, torch.float32])
def test_dense_majors(op, m, out_dtype):
    a, b = randn(m, K), randn(N, K, scale=3.0)
    d = poisoned(m, N, dtype=out_dtype)
    getattr(cute_moe, op)(*DENSE[op](a, b), d)
    assert_close(d, (a.float() @ b.float().T).to(out_dtype))


@pytest.mark.parametrize("op", list(DENSE))
def test_dense_majors_with_c_and_in_place(op):
    a, b = randn(M, K), randn(N, K)
    c = torch.randn(M, N, device="cuda")
    d = poisoned(M, N, dtype=torch.float32)
    ref = c + a.float() @ b.float().T
    getattr(cute_moe, op)(*DENSE[op](a, b), d, c)
    assert_close(d, ref)
    getattr(cute_moe, op)(*DENSE[op](a, b), c, c)  # c = c + a . b
    assert_close(c, ref)


@pytest.mark.parametrize("config", [None, cute_moe.KernelConfig(tile_m=128, tile_n=128, cluster_m=2)],
                         ids=["rules", "mixed-clusters"])
def test_m_grouped_nn_contiguous(config):
    """dX = dY . W: b [G, K, N] row-major (N contiguous); experts of uneven counts, one empty."""
    alignment = cute_moe.get_mk_alignment_for_contiguous_layout()
    counts = [3 * alignment + 5, 0, 17, alignment, 2 * alignment - 1]
    starts, total = [], 0
    for cnt in counts:
        starts.append(total)
        total += align(cnt, alignment)
    layout = torch.full((total,), -1, dtype=torch.int32)
    for e, (s, cnt) in enumerate(zip(starts, counts)):
        layout[s:s + cnt] = e
    a, w = randn(total, K), randn(len(counts), K, N, scale=0.5)
    d = poisoned(total, N)
    if config is None:
        cute_moe.m_grouped_bf16_gemm_nn_contiguous(a, w, d, layout.cuda())
    else:
        from cute_moe.dispatch import force_config

        with force_config(config):
            cute_moe.m_grouped_bf16_gemm_nn_contiguous(a, w, d, layout.cuda())
    for e, (s, cnt) in enumerate(zip(starts, counts)):
        if cnt:
            assert_close(d[s:s + cnt], (a[s:s + cnt].float() @ w[e].float()).to(bf16))


KS = [0, 37, 200, 1, 64, 129, 0, 300]  # empty first and inner groups, none a multiple of 64 but one


def k_grouped_reference(a, b, ks, c=None):
    out, start = [], 0
    for g, rows in enumerate(ks):
        prod = a[start:start + rows].double().T @ b[start:start + rows].double()
        out.append(prod + (c[g].double() if c is not None else 0))
        start += rows
    return torch.stack(out)


def k_grouped_inputs(ks, m=M, n=N):
    """a [sum K, M], b [sum K, N]; group 4 (64 rows) holds values 1000x larger, so any of its rows
    read into group 3's partial last k-block would show."""
    total = sum(ks)
    a, b = randn(total, m), randn(total, n, scale=2.0)
    big = slice(sum(ks[:4]), sum(ks[:5]))
    a[big] *= 1000
    b[big] *= 1000
    return a, b


def assert_groups_close(d, ref, ks, c=None):
    assert not d.isnan().any(), "unwritten (NaN) elements where the kernel must write"
    for g, rows in enumerate(ks):
        if rows == 0:
            expected = c[g] if c is not None else torch.zeros_like(d[g])
            assert torch.equal(d[g], expected), f"empty group {g}: expected c[g] or zeros"
        else:
            assert calc_diff(d[g], ref[g]) < 1e-6, f"group {g}"
            assert relative_error(d[g], ref[g]) < 1e-5, f"group {g}"


@pytest.mark.parametrize("config", [None, cute_moe.KernelConfig(tile_m=64, tile_n=128, cluster_n=2),
                                    cute_moe.KernelConfig(tile_m=128, tile_n=64, cluster_m=2)],
                         ids=["rules", "64x128-c1x2", "128x64-c2x1"])
def test_k_grouped_tn(config):
    a, b = k_grouped_inputs(KS)
    d = poisoned(len(KS), M, N, dtype=torch.float32)
    ks_tensor = torch.tensor(KS, dtype=torch.int32, device="cuda")
    if config is None:
        cute_moe.k_grouped_bf16_gemm_tn_contiguous(a, b, d, KS, ks_tensor)
    else:
        from cute_moe.dispatch import force_config

        with force_config(config):
            cute_moe.k_grouped_bf16_gemm_tn_contiguous(a, b, d, KS, ks_tensor)
    assert_groups_close(d, k_grouped_reference(a, b, KS), KS)


def test_k_grouped_tn_with_c_accumulates():
    a, b = k_grouped_inputs(KS)
    ks_tensor = torch.tensor(KS, dtype=torch.int32, device="cuda")
    c = torch.randn(len(KS), M, N, device="cuda")
    d = poisoned(len(KS), M, N, dtype=torch.float32)
    ref = k_grouped_reference(a, b, KS, c)
    cute_moe.k_grouped_bf16_gemm_tn_contiguous(a, b, d, KS, ks_tensor, c)
    assert_groups_close(d, ref, KS, c)
    before = c.clone()
    cute_moe.k_grouped_bf16_gemm_tn_contiguous(a, b, c, KS, ks_tensor, c)  # in place: c += a.T b
    assert_groups_close(c, ref, KS, before)


def test_k_grouped_all_groups_empty_and_out_of_range_ks_tensor():
    m, n = 64, 64
    d = poisoned(3, m, n, dtype=torch.float32)
    cute_moe.k_grouped_bf16_gemm_tn_contiguous(randn(0, m), randn(0, n), d, [0, 0, 0],
                                               torch.zeros(3, dtype=torch.int32, device="cuda"))
    assert torch.equal(d, torch.zeros_like(d))
    # A device tensor that disagrees with ks (too large, negative) reads only inside a and b.
    ks = [40, 30, 30]
    a, b = randn(100, m), randn(100, n)
    d = poisoned(3, m, n, dtype=torch.float32)
    cute_moe.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, torch.tensor([-5, 1000, 7], dtype=torch.int32,
                                                                         device="cuda"))
    ref = k_grouped_reference(a, b, [0, 100, 0])
    assert_groups_close(d, ref, [0, 100, 0])
    # ks=None: the sizes live on the GPU only; rows past their sum (30..99) are ignored.
    d = poisoned(3, m, n, dtype=torch.float32)
    cute_moe.k_grouped_bf16_gemm_tn_contiguous(a, b, d, None, torch.tensor([10, 0, 20], dtype=torch.int32,
                                                                           device="cuda"))
    assert_groups_close(d, k_grouped_reference(a, b, [10, 0, 20]), [10, 0, 20])


def test_k_grouped_cuda_graph_replay_sees_new_data():
    a, b = k_grouped_inputs(KS)
    ks_tensor = torch.tensor(KS, dtype=torch.int32, device="cuda")
    d = poisoned(len(KS), M, N, dtype=torch.float32)
    cute_moe.k_grouped_bf16_gemm_tn_contiguous(a, b, d, KS, ks_tensor)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cute_moe.k_grouped_bf16_gemm_tn_contiguous(a, b, d, KS, ks_tensor)
    a.copy_(randn(*a.shape))
    d.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_groups_close(d, k_grouped_reference(a, b, KS), KS)


@pytest.mark.parametrize("out_dtype", [bf16, torch.float32])
def test_grouped_mm_2d_2d_offs_along_k(out_dtype):
    ks = [24, 0, 136, 8, 200]  # multiples of 8 (a [M, sum K] rows are 16-byte units), not of 64
    total = sum(ks)
    a, b = randn(M, total), randn(total, N)
    offs = torch.tensor(ks, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
    out = cute_moe.grouped_mm(a, b, offs, out_dtype)
    assert out.shape == (len(ks), M, N) and out.dtype == out_dtype
    ref = k_grouped_reference(a.T, b, ks).to(out_dtype)
    for g, rows in enumerate(ks):
        if rows == 0:
            assert torch.equal(out[g], torch.zeros_like(out[g]))
        else:
            assert_close(out[g], ref[g])


def test_grouped_mm_n_major_b():
    counts = [33, 0, 150, 7]
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
    rows = sum(counts)
    a, w = randn(rows + 5, K), randn(len(counts), K, N)  # w row-major [G, K, N]; 5 rows past offs[-1]
    out = cute_moe.grouped_mm(a, w, offs)
    start = 0
    for g, cnt in enumerate(counts):
        if cnt:
            assert_close(out[start:start + cnt], (a[start:start + cnt].float() @ w[g].float()).to(bf16))
        start += cnt


def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True) of the custom ops runs the same kernels."""
    ks = [100, 0, 60]
    x, dy, w = randn(sum(ks), M), randn(sum(ks), N), randn(N, M)
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device="cuda")

    def step(x, dy, w):
        dx = torch.empty(dy.shape[0], w.shape[1], device="cuda", dtype=bf16)
        cute_moe.bf16_gemm_nn(dy, w, dx)
        dw = torch.empty(len(ks), x.shape[1], dy.shape[1], device="cuda", dtype=torch.float32)
        cute_moe.k_grouped_bf16_gemm_tn_contiguous(x, dy, dw, ks, ks_tensor)
        return dx, dw

    eager = step(x, dy, w)
    compiled = torch.compile(step, fullgraph=True)(x, dy, w)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)
