"""FP8 backward GEMMs on a Hopper GPU: DeepGEMM's fp8_gemm_{nn,tn,tt}, m_grouped_fp8_gemm_nn_contiguous
and k_grouped_fp8_gemm_{tn,nt}_contiguous against an FP64 reference computed from the DEQUANTIZED
operands (the repo's casts), so calc_diff < 1e-5 holds only if every scale meets its own block.
Inputs have rows and columns of magnitudes 2^-6 .. 2^6; outputs are NaN-poisoned before each call;
sizes are multiples of no tile; K-grouped groups are uneven and include empty ones."""

import pytest
import torch

import cute_moe
from cute_moe.dispatch import force_config
from cute_moe.fp8_backward import transposed_copy
from cute_moe.launcher import set_debug
from cute_moe.layouts.alignment import align
from cute_moe.testing import calc_diff

pytestmark = pytest.mark.gpu
bf16, f32 = torch.bfloat16, torch.float32
# No tile multiple; K = 2.625 scale blocks; M, N, K multiples of 16, so the K-major copies run the byte
# transpose kernel (M = 1 / 1031 and N = 136 below take torch's fallback copy).
M, N, K = 208, 272, 336
TIGHT = 1e-5  # calc_diff against the dequantized FP64 reference (as tests/test_gpu_fp8.py)


def varied(*shape, seed: int) -> torch.Tensor:
    """Normal values times a per-row and a per-column gain in 2^[-6, 6] (BF16, on the GPU)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, device="cuda", generator=gen)
    rows = torch.exp2(torch.randint(-6, 7, (shape[-2], 1), device="cuda", generator=gen).float())
    cols = torch.exp2(torch.randint(-6, 7, (1, shape[-1]), device="cuda", generator=gen).float())
    return (x * rows * cols).to(bf16)


def poisoned(*shape, dtype=bf16):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def assert_close(out, ref, diff=TIGHT):
    assert not out.isnan().any(), "unwritten (NaN) elements where the kernel must write"
    assert calc_diff(out, ref) < diff


# ------------------------------------------------------------------ the K-major copy
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 208, 80), (1, 4096, 7168), (2, 100, 264), (1, 336, 1031)],
                         ids=["one-vector", "batched-edges", "large", "fallback-rows", "fallback-cols"])
def test_transposed_copy(shape):
    """The byte transpose (R, C multiples of 16; blocks at the edges) and torch's fallback: exact."""
    x = torch.randint(0, 256, shape, device="cuda", dtype=torch.uint8).view(torch.float8_e4m3fn)
    x = x.squeeze(0) if shape[0] == 1 else x
    out = transposed_copy(x)
    assert out.is_contiguous() and out.dtype == x.dtype
    assert torch.equal(out.view(torch.uint8), x.view(torch.uint8).transpose(-2, -1))


# ------------------------------------------------------------------ dense nn / tn / tt
GIVEN = {"fp8_gemm_nn": (False, True), "fp8_gemm_tn": (True, True), "fp8_gemm_tt": (True, False)}  # (a, b) MN-major


def as_given(q, sf, transposed: bool, sf_view: bool):
    """DeepGEMM's operand form: MN-major operands as (x.T, sf.T), the data row-major [K, MN] and the
    scales transposed (a view of the cast's scales, or a contiguous copy)."""
    if not transposed:
        return q, sf
    return transposed_copy(q), (sf.t() if sf_view else sf.t().contiguous())


def dense_case(m: int, seed: int):
    a_q, sfa = cute_moe.per_token_cast_to_fp8(varied(m, K, seed=seed))
    b_q, sfb = cute_moe.per_block_cast_to_fp8(varied(N, K, seed=seed + 1))
    ref = cute_moe.per_token_dequant(a_q, sfa).double() @ cute_moe.per_block_dequant(b_q, sfb).double().T
    return (a_q, sfa), (b_q, sfb), ref


@pytest.mark.parametrize("op", list(GIVEN))
@pytest.mark.parametrize("m", [1, M, 1031])
@pytest.mark.parametrize("out_dtype", [bf16, f32])
def test_dense(op, m, out_dtype):
    a, b, ref = dense_case(m, seed=m)
    trans_a, trans_b = GIVEN[op]
    d = poisoned(m, N, dtype=out_dtype)
    getattr(cute_moe, op)(as_given(*a, trans_a, m % 2 == 1), as_given(*b, trans_b, m % 2 == 0), d)
    assert_close(d, ref)


@pytest.mark.parametrize("op", list(GIVEN))
def test_dense_with_c_and_in_place(op):
    a, b, ref = dense_case(M, seed=3)
    trans_a, trans_b = GIVEN[op]
    a, b = as_given(*a, trans_a, False), as_given(*b, trans_b, False)
    c = torch.randn(M, N, device="cuda") * 64
    c_before = c.double()
    d = poisoned(M, N, dtype=f32)
    getattr(cute_moe, op)(a, b, d, c)
    assert_close(d, ref + c_before)
    getattr(cute_moe, op)(a, b, c, c)  # c = c + a . b
    assert_close(c, ref + c_before)


# ------------------------------------------------------------------ M-grouped nn (dX = dY . W)
@pytest.mark.parametrize("use_psum_layout", [False, True])
@pytest.mark.parametrize("config", [None, cute_moe.KernelConfig(tile_m=128, tile_n=128, cluster_m=2)],
                         ids=["rules", "mixed-clusters"])
def test_m_grouped_nn_contiguous(use_psum_layout, config):
    alignment = cute_moe.get_mk_alignment_for_contiguous_layout()
    counts = [3 * alignment + 5, 0, 17, alignment, 2 * alignment - 1]
    ends = cute_moe.masked_m_to_psum(torch.tensor(counts, dtype=torch.int32, device="cuda"))  # aligned starts
    total = align(int(ends[-1]), alignment)
    layout = cute_moe.psum_to_grouped_layout(ends, total)  # expert per row, -1 on padding rows
    starts = [end - count for end, count in zip(ends.tolist(), counts)]
    a_q, sfa = cute_moe.per_token_cast_to_fp8(varied(total, K, seed=11))
    w_q, sfw = cute_moe.per_block_cast_to_fp8(torch.stack([varied(N, K, seed=20 + e) for e in range(len(counts))]))
    b = (transposed_copy(w_q), sfw.transpose(1, 2))  # DeepGEMM's nn form: [G, K, N], sf.mT
    d = poisoned(total, N)
    args = ((a_q, sfa), b, d, ends if use_psum_layout else layout, use_psum_layout)
    if config is None:
        cute_moe.m_grouped_fp8_gemm_nn_contiguous(*args)
    else:
        with force_config(config):
            cute_moe.m_grouped_fp8_gemm_nn_contiguous(*args)
    a_deq = cute_moe.per_token_dequant(a_q, sfa).double()
    for e, (s, count) in enumerate(zip(starts, counts)):
        if count:
            ref = a_deq[s:s + count] @ cute_moe.per_block_dequant(w_q[e], sfw[e]).double().T
            assert_close(d[s:s + count], ref)


# ------------------------------------------------------------------ K-grouped (weight gradients)
KS = [0, 256, 128, 640, 0, 384, 128]  # uneven multiples of 128, empty first and middle groups


def wgrad_operands(ks: list, m: int, n: int, seed: int):
    """a [sum K, M] and b [sum K, N] cast per channel (one FP32 scale per column per 128 rows)."""
    total = sum(ks)
    return (cute_moe.per_channel_cast_to_fp8(varied(total, m, seed=seed)),
            cute_moe.per_channel_cast_to_fp8(varied(total, n, seed=seed + 1)))


def wgrad_reference(a, b, group_rows: list, c=None) -> torch.Tensor:
    """d[g] = c[g] + a[rows of g].T @ b[rows of g] on the dequantized operands, FP64."""
    a_deq, b_deq = cute_moe.per_channel_dequant(*a).double(), cute_moe.per_channel_dequant(*b).double()
    out, start = [], 0
    for g, rows in enumerate(group_rows):
        part = a_deq[start:start + rows].T @ b_deq[start:start + rows]
        out.append(part + (c[g].double() if c is not None else 0))
        start += rows
    return torch.stack(out)


def as_nt(x, sf, ks: list):
    """DeepGEMM's nt form: each group's [MN, K] block (K-major) flattened in turn; scales as the
    transposed view [MN, sum K / 128] of the per-channel scales."""
    blocks, start = [], 0
    for k in ks:
        blocks.append(transposed_copy(x[start:start + k]).view(torch.uint8).flatten())
        start += k
    return torch.cat(blocks).view(x.dtype), sf.t()


def k_grouped(form: str, a, b, d, ks, ks_tensor, c=None):
    if form == "tn":
        cute_moe.k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks, ks_tensor, c)
    else:
        cute_moe.k_grouped_fp8_gemm_nt_contiguous(as_nt(*a, ks), as_nt(*b, ks), d, ks, ks_tensor, c)


CONFIGS = [None, cute_moe.KernelConfig(tile_m=64, tile_n=128), cute_moe.KernelConfig(tile_n=64, cluster_n=2),
           cute_moe.KernelConfig(tile_n=256, cluster_m=2, stages=2)]


@pytest.mark.parametrize("form", ["tn", "nt"])
@pytest.mark.parametrize("with_c", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=["rules", "64x128", "128x64-c1x2", "128x256-c2x1"])
def test_k_grouped(form, with_c, config):
    a, b = wgrad_operands(KS, M, N, seed=31)
    c = torch.randn(len(KS), M, N, device="cuda") * 64 if with_c else None
    d = poisoned(len(KS), M, N, dtype=f32)
    ks_tensor = torch.tensor(KS, dtype=torch.int32, device="cuda")
    if config is None:
        k_grouped(form, a, b, d, KS, ks_tensor, c)
    else:
        with force_config(config):
            k_grouped(form, a, b, d, KS, ks_tensor, c)
    assert_close(d, wgrad_reference(a, b, KS, c))
    for g in (0, 4):  # empty groups: exactly c (or zeros)
        assert torch.equal(d[g], c[g] if with_c else torch.zeros_like(d[g]))


@pytest.mark.parametrize("form", ["tn", "nt"])
def test_k_grouped_accumulates_in_place(form):
    ks = [384, 0, 256]
    a, b = wgrad_operands(ks, 64, 136, seed=41)
    c = torch.randn(len(ks), 64, 136, device="cuda")
    ref = wgrad_reference(a, b, ks, c)
    k_grouped(form, a, b, c, ks, torch.tensor(ks, dtype=torch.int32, device="cuda"), c)  # c += a.T b
    assert_close(c, ref)


def test_k_grouped_tn_device_sizes():
    """ks=None: the kernel reads ks_tensor only. A size that is not a multiple of 128 counts as the
    multiple of 128 below it, a negative one as 0, the last group is clamped to the rows left, and
    rows past the groups' sum are ignored; nothing faults."""
    ks = [384, 256, 128]
    a, b = wgrad_operands(ks, M, N, seed=51)
    d = poisoned(3, M, N, dtype=f32)
    cute_moe.k_grouped_fp8_gemm_tn_contiguous(a, b, d, None, torch.tensor([130, -5, 10**6], dtype=torch.int32,
                                                                          device="cuda"))
    assert_close(d, wgrad_reference(a, b, [128, 0, 640]))
    d = poisoned(2, M, N, dtype=f32)
    cute_moe.k_grouped_fp8_gemm_tn_contiguous(a, b, d, None, torch.tensor([128, 256], dtype=torch.int32,
                                                                          device="cuda"))
    assert_close(d, wgrad_reference(a, b, [128, 256]))  # rows 384.. ignored


def test_k_grouped_empty_sum_k_and_debug_check():
    a, b = wgrad_operands([128], M, N, seed=61)
    empty = ((a[0][:0], a[1][:0]), (b[0][:0], b[1][:0]))
    c = torch.randn(2, M, N, device="cuda")
    d = poisoned(2, M, N, dtype=f32)
    cute_moe.k_grouped_fp8_gemm_tn_contiguous(*empty, d, [0, 0], torch.zeros(2, dtype=torch.int32, device="cuda"), c)
    assert torch.equal(d, c)
    set_debug(True)
    try:
        with pytest.raises(ValueError, match=r"^ks_tensor: expected the values of ks"):
            cute_moe.k_grouped_fp8_gemm_tn_contiguous(a, b, poisoned(1, M, N, dtype=f32), [128],
                                                      torch.tensor([0], dtype=torch.int32, device="cuda"))
    finally:
        set_debug(False)


def test_k_grouped_tn_cuda_graph_replay_follows_ks_tensor_and_data():
    """Captured once with ks=None; new data and new group sizes are copied into the same buffers."""
    ks, new_ks = [256, 128, 256], [0, 512, 128]
    a, b = wgrad_operands(ks, M, N, seed=71)
    a2, b2 = wgrad_operands(ks, M, N, seed=72)
    buffers = [t.clone() for t in (*a, *b)]
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device="cuda")
    d = poisoned(3, M, N, dtype=f32)
    args = ((buffers[0], buffers[1]), (buffers[2], buffers[3]), d, None, ks_tensor)
    cute_moe.k_grouped_fp8_gemm_tn_contiguous(*args)  # warm-up (compile, allocator)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cute_moe.k_grouped_fp8_gemm_tn_contiguous(*args)
    for t, new in zip(buffers, (*a2, *b2)):
        t.copy_(new)
    ks_tensor.copy_(torch.tensor(new_ks, dtype=torch.int32))
    d.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(d, wgrad_reference(a2, b2, new_ks))


def test_compiled_fp8_backward_step():
    """torch.compile(fullgraph=True) (inductor) of dX = dY . W (nn) and dW (K-grouped tn)."""
    ks = [256, 0, 128]
    dy_t, x_t = wgrad_operands(ks, 64, 96, seed=81)  # [tokens, out] and [tokens, in]
    dy = cute_moe.per_token_cast_to_fp8(varied(100, 256, seed=82))
    w_q, sfw = cute_moe.per_block_cast_to_fp8(varied(256, 136, seed=83))  # W [out=256, in=136]
    ks_tensor = torch.tensor(ks, dtype=torch.int32, device="cuda")

    def step(dy, w, dy_t, x_t):
        dx = torch.empty(100, 136, device="cuda", dtype=bf16)
        cute_moe.fp8_gemm_nn(dy, w, dx)
        dw = torch.empty(3, 64, 96, device="cuda", dtype=f32)
        cute_moe.k_grouped_fp8_gemm_tn_contiguous(dy_t, x_t, dw, ks, ks_tensor)
        return dx, dw

    torch._dynamo.reset()
    dx, dw = torch.compile(step, fullgraph=True)(dy, (w_q, sfw), dy_t, x_t)
    ref_dx = cute_moe.per_token_dequant(*dy).double() @ cute_moe.per_block_dequant(w_q, sfw).double()
    assert_close(dx, ref_dx)
    assert_close(dw, wgrad_reference(dy_t, x_t, ks))
