"""FP8 backward GEMMs on the CPU: the K-grouped FP8 kernel compiles for sm_90a, every bad argument is
refused naming it, the fake implementations and torch.compile(fullgraph=True) trace the ops, and the
ops' K-major copies and scale re-layouts (launches replaced by CPU math of the K-major kernels'
semantics) reproduce DeepGEMM's semantics on the dequantized operands."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cute_moe
from cute_moe import fp8_backward, ops
from cute_moe.compile import compile_gemm
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.operands import FP8_PER_BLOCK, FP8_PER_TOKEN
from cute_moe.specs import GemmSpec

e4m3, f32, i32 = torch.float8_e4m3fn, torch.float32, torch.int32
OPS = ("fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt", "m_grouped_fp8_gemm_nn_contiguous",
       "k_grouped_fp8_gemm_nt_contiguous", "k_grouped_fp8_gemm_tn_contiguous")


# ------------------------------------------------------------------ the K-grouped FP8 kernel compiles
K_GROUPED = [
    (GemmSpec("k_grouped", 7168, 4096, a=FP8_PER_TOKEN, b=FP8_PER_TOKEN, d_dtype="fp32"), KernelConfig(cluster_m=2)),
    (GemmSpec("k_grouped", 264, 200, a=FP8_PER_TOKEN, b=FP8_PER_TOKEN, d_dtype="fp32", has_c=True),
     KernelConfig(tile_m=64, tile_n=128)),
    (GemmSpec("k_grouped", 264, 200, a=FP8_PER_TOKEN, b=FP8_PER_TOKEN, d_dtype="fp32", has_c=True),
     KernelConfig(tile_m=128, tile_n=64, cluster_n=2)),
    (GemmSpec("k_grouped", 2048, 1024, a=FP8_PER_TOKEN, b=FP8_PER_TOKEN, d_dtype="fp32"),
     KernelConfig(tile_n=256, stages=2)),
]


@pytest.mark.parametrize("spec,config", K_GROUPED, ids=[f"{s.key()}|{c.key()}" for s, c in K_GROUPED])
def test_k_grouped_fp8_variant_compiles(spec, config):
    assert compile_gemm(spec, config).__class__.__name__.startswith("TVMFFI")


def test_backend_routes_k_grouped_fp8_to_its_family():
    from cute_moe.arch import get_backend
    from cute_moe.dispatch import problem_of

    backend = get_backend("sm_90a")
    spec = GemmSpec("k_grouped", 7168, 4096, a=FP8_PER_TOKEN, b=FP8_PER_TOKEN, d_dtype="fp32", arch="sm_90a")
    assert backend.kernel_family(spec).name == "sm90_fp8_k_grouped_gemm"
    problem = problem_of("k_grouped", 7168, 4096, 8, 4096, 0, arch="sm_90a", a=FP8_PER_TOKEN, b=FP8_PER_TOKEN,
                         d_dtype="fp32", num_sms=132)
    config = backend.rule_config(problem)
    backend.can_implement(problem, config)
    assert (config.tile_m, config.tile_n, config.cluster_m) == (128, 256, 2)
    assert backend.kernel_family(GemmSpec("k_grouped", 256, 256, d_dtype="fp32", arch="sm_90a")).name == \
        "sm90_grouped_gemm"


def test_byte_transpose_compiles():
    from cute_moe.kernels.sm90.byte_transpose import compile_byte_transpose

    assert compile_byte_transpose("sm_90a").__class__.__name__.startswith("TVMFFI")


def test_transposed_copy_off_the_gpu_swaps_the_last_two_dimensions():
    x = torch.randn(2, 48, 40).to(e4m3)
    out = fp8_backward.transposed_copy(x)
    assert out.dtype == e4m3 and out.is_contiguous() and out.shape == (2, 40, 48)
    assert torch.equal(out.view(torch.uint8), x.view(torch.uint8).transpose(1, 2))


@pytest.mark.parametrize("a,b,d_dtype,match", [
    (FP8_PER_TOKEN, FP8_PER_BLOCK, "fp32", "operands"),  # B per 128 x 128 block: not the wgrad recipe
    (FP8_PER_TOKEN, FP8_PER_TOKEN, "bf16", "d_dtype"),
])
def test_k_grouped_fp8_family_refuses(a, b, d_dtype, match):
    with pytest.raises(ValueError, match=match):
        compile_gemm(GemmSpec("k_grouped", 256, 256, a=a, b=b, d_dtype=d_dtype), KernelConfig())


# ------------------------------------------------------------------ argument refusals (CPU: before any launch)
def fp8(*shape):
    return torch.zeros(*shape, dtype=e4m3)


def sf(*shape):
    return torch.ones(*shape, dtype=f32)


M, N, K = 16, 24, 256


def dense_args(op: str, m=M, n=N, k=K):
    """(a, b, d) of a dense op as given: MN-major operands [K, MN] with transposed scales."""
    kb = -(-k // 128)
    a = (fp8(k, m), sf(kb, m)) if op in ("fp8_gemm_tn", "fp8_gemm_tt") else (fp8(m, k), sf(m, kb))
    nb = -(-n // 128)
    b = (fp8(k, n), sf(kb, nb)) if op in ("fp8_gemm_nn", "fp8_gemm_tn") else (fp8(n, k), sf(nb, kb))
    return a, b, torch.zeros(m, n, dtype=torch.bfloat16)


@pytest.mark.parametrize("op,change,error,match", [
    ("fp8_gemm_nn", dict(b=(fp8(K, N).float(), sf(2, 1))), TypeError, r"^b: expected dtype float8_e4m3fn"),
    ("fp8_gemm_nn", dict(b=(fp8(K, N), sf(1, 2))), ValueError, r"^sfb: expected shape \(2, 1\)"),
    ("fp8_gemm_nn", dict(b=(fp8(N, K).t(), sf(2, 1))), ValueError, r"^b: expected a contiguous row-major"),
    ("fp8_gemm_nn", dict(b=(fp8(128, N), sf(1, 1))), ValueError, r"^a: expected K=128 .*as \[\.\., K, N\]"),
    ("fp8_gemm_nn", dict(b=fp8(K, N)), TypeError, r"^b: expected a \(tensor, scale_factors\) pair"),
    ("fp8_gemm_tn", dict(a=(fp8(K, M), sf(2, M + 1))), ValueError, r"^sfa: expected shape \(2, 16\)"),
    ("fp8_gemm_tn", dict(a=(fp8(K, M), sf(2, M).double())), TypeError, r"^sfa: expected dtype float32"),
    ("fp8_gemm_tn", dict(a=(fp8(K - 8, M), sf(2, M))), ValueError, r"^a: expected K \(.*\) to be a multiple of 16"),
    ("fp8_gemm_tt", dict(a=(fp8(K, M), sf(2, M)), b=(fp8(N, 128), sf(1, 1))), ValueError, r"^a: expected K=128"),
    ("fp8_gemm_tt", dict(), ValueError, r"^a: expected a CUDA tensor"),
    ("fp8_gemm_tn", dict(d=torch.zeros(M, N + 8, dtype=torch.bfloat16)), ValueError, r"^d: expected shape \(16, 24\)"),
])
def test_dense_refusals_name_the_argument(op, change, error, match):
    a, b, d = dense_args(op)
    args = dict(a=a, b=b, d=d)
    args.update(change)
    with pytest.raises(error, match=match):
        getattr(cute_moe, op)(**args)


def test_m_grouped_nn_takes_b_as_g_k_n_with_transposed_block_scales():
    a, d, layout = (fp8(128, K), sf(128, 2)), torch.zeros(128, N, dtype=torch.bfloat16), torch.zeros(128, dtype=i32)
    with pytest.raises(ValueError, match=r"^sfb: expected shape \(2, 2, 1\)"):
        cute_moe.m_grouped_fp8_gemm_nn_contiguous(a, (fp8(2, K, N), sf(2, 1, 2)), d, layout)
    with pytest.raises(ValueError, match=r"^b: expected 3 dimensions"):
        cute_moe.m_grouped_fp8_gemm_nn_contiguous(a, (fp8(K, N), sf(2, 1)), d, layout)
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor"):
        cute_moe.m_grouped_fp8_gemm_nn_contiguous(a, (fp8(2, K, N), sf(2, 2, 1)), d, layout)


KS = [256, 0, 128]  # sum K = 384: three scale blocks


def k_grouped_args(form: str, ks=KS, m=M, n=N):
    """(a, b, d, ks, ks_tensor) of a K-grouped op as given: tn [sum K, MN] with sf [sum K / 128, MN];
    nt the per-group [MN, K] blocks flattened with sf [MN, sum K / 128]."""
    total, blocks = sum(ks), sum(ks) // 128
    if form == "tn":
        a, b = (fp8(total, m), sf(blocks, m)), (fp8(total, n), sf(blocks, n))
    else:
        a, b = (fp8(total * m), sf(m, blocks)), (fp8(total * n), sf(n, blocks))
    return a, b, torch.zeros(len(ks), m, n, dtype=f32), list(ks), torch.tensor(ks, dtype=i32)


SHARED_REFUSALS = [  # (change, error, match) refused alike by the tn and nt forms
    (dict(ks=[256, 64, 64]), ValueError, r"^ks: expected every group's K to be a multiple of 128"),
    (dict(ks=[256, 128]), ValueError, r"^ks: expected 3 group sizes"),
    (dict(ks=[256.0, 0, 128]), TypeError, r"^ks: expected a list of ints"),
    (dict(ks_tensor=torch.tensor(KS)), TypeError, r"^ks_tensor: expected dtype int32"),
    (dict(ks_tensor=torch.tensor(KS[:2], dtype=i32)), ValueError, r"^ks_tensor: expected shape \(3,\)"),
    (dict(d=torch.zeros(3, M, N, dtype=torch.bfloat16)), TypeError, r"^d: expected dtype float32"),
    (dict(c=torch.zeros(3, M, N + 8, dtype=f32)), ValueError, r"^c: expected shape \(3, 16, 24\)"),
    (dict(recipe=(1, 128, 128)), ValueError, r"^recipe: the sm_90a K-grouped FP8 kernel implements \(1, 1, 128\)"),
    (dict(), ValueError, r"^a: expected a CUDA tensor"),
]


@pytest.mark.parametrize("form,change,error,match", [(f, *case) for f in ("tn", "nt") for case in SHARED_REFUSALS] + [
    ("tn", dict(ks=[256, 0, 256]), ValueError, r"^ks: expected non-negative sizes summing to 384"),
    ("tn", dict(a=(fp8(384, M), sf(3, M + 8))), ValueError, r"^sfa: expected shape \(3, 16\)"),
    ("tn", dict(b=(fp8(256, N), sf(2, N))), ValueError, r"^b: expected 384 rows \(sum K"),
    ("tn", dict(a=(fp8(384, 12), sf(3, 12)), d=torch.zeros(3, 12, N, dtype=f32)), ValueError,
     r"^a: expected M to be a multiple of 8"),
    ("tn", dict(a=(fp8(384, M).t().contiguous().t(), sf(3, M))), ValueError, r"^a: expected a contiguous row-major"),
    ("tn", dict(ks=None), ValueError, r"^a: expected a CUDA tensor"),  # sizes on the device only: allowed
    ("nt", dict(ks=None), ValueError, r"^ks: k_grouped_fp8_gemm_nt_contiguous needs the groups' sizes on the host"),
    ("nt", dict(ks=[256, 0, 256]), ValueError, r"^a: expected sum\(ks\) \* M = 512 \* 16 elements"),
    ("nt", dict(a=(fp8(384 * M - 1), sf(M, 3))), ValueError, r"^a: expected sum\(ks\) \* M = 384 \* 16 elements"),
    ("nt", dict(b=(fp8(384 * N), sf(3, N))), ValueError, r"^sfb: expected shape \(24, 3\)"),
])
def test_k_grouped_refusals_name_the_argument(form, change, error, match):
    a, b, d, ks, ks_tensor = k_grouped_args(form)
    args = dict(a=a, b=b, d=d, ks=ks, ks_tensor=ks_tensor)
    args.update(change)
    with pytest.raises(error, match=match):
        getattr(cute_moe, f"k_grouped_fp8_gemm_{form}_contiguous")(**args)


def test_k_grouped_tn_needs_whole_scale_blocks_of_rows():
    a, b, d, _, _ = k_grouped_args("tn", ks=[128, 128])
    a = (fp8(208, M), sf(2, M))
    b = (fp8(208, N), sf(2, N))
    with pytest.raises(ValueError, match=r"^a: expected sum K \(rows of a \[sum K, M\]\) to be a multiple of 128"):
        cute_moe.k_grouped_fp8_gemm_tn_contiguous(a, b, d, None, torch.tensor([128, 80], dtype=i32))


# ------------------------------------------------------------------ semantics with the launches mocked
def _dequant_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q [MN, K] with s [MN, ceil(K/128)] (per row per 128 K) -> float64."""
    return q.double() * s.double().repeat_interleave(128, dim=1)[:, :q.shape[1]]


def _dequant_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q [MN, K] with s [ceil(MN/128), ceil(K/128)] (per 128 x 128 block) -> float64."""
    expanded = s.double().repeat_interleave(128, dim=0)[:q.shape[0]].repeat_interleave(128, dim=1)[:, :q.shape[1]]
    return q.double() * expanded


def _nt_reference(a, b, d, c=None):
    """CPU math of fp8_gemm_nt (K-major a with per-row scales, b with 128 x 128 block scales)."""
    out = _dequant_rows(*a) @ _dequant_blocks(*b).T
    d.copy_(out + (c.double() if c is not None else 0))


def _contiguous_reference(a, b, d, grouped_layout, use_psum_layout=False):
    a_deq = _dequant_rows(*a)
    for row, expert in enumerate(grouped_layout.tolist()):
        if expert >= 0:
            d[row] = (a_deq[row] @ _dequant_blocks(b[0][expert], b[1][expert]).T).to(d.dtype)


def _k_grouped_kernel(a, sfa, b, sfb, d, sizes, c):
    """CPU math of the K-grouped FP8 kernel: K-major a [M, sum K], b [N, sum K], group g over
    clamp(sizes[g], 0, rows left) rows after the earlier groups (the grouped scheduler's rule)."""
    a_deq, b_deq = _dequant_rows(a, sfa), _dequant_rows(b, sfb)
    start, total = 0, a.shape[1]
    for g, size in enumerate(sizes.tolist()):
        rows = min(max(size, 0), total - start)
        d[g] = (a_deq[:, start:start + rows] @ b_deq[:, start:start + rows].T
                + (c[g].double() if c is not None else 0)).to(d.dtype)
        start += rows


@pytest.fixture
def mocked(monkeypatch):
    monkeypatch.setitem(ops.OPS, "fp8_gemm_nt", _nt_reference)
    monkeypatch.setitem(ops.OPS, "m_grouped_fp8_gemm_nt_contiguous", _contiguous_reference)
    monkeypatch.setattr(fp8_backward.Fp8KGroupedLaunch, "__call__", lambda self, *args: _k_grouped_kernel(*args))
    monkeypatch.setattr(fp8_backward, "check_placement", lambda **tensors: None)


def _varied(*shape, seed=0):
    """Random values whose rows and columns differ in magnitude by up to 2^12 (scales must not mix)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    rows = torch.exp2(torch.randint(-6, 7, (shape[-2], 1), generator=gen).float())
    cols = torch.exp2(torch.randint(-6, 7, (1, shape[-1]), generator=gen).float())
    return x * rows * cols


@pytest.mark.parametrize("op", ["fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt"])
@pytest.mark.parametrize("sf_view", [False, True], ids=["sf-contiguous", "sf-transposed-view"])
def test_dense_ops_match_deepgemm_semantics(mocked, op, sf_view):
    m, n, k = 40, 264, 336  # K ends inside a scale block
    a_q, sfa = cute_moe.per_token_cast_to_fp8(_varied(m, k, seed=1))
    b_q, sfb = cute_moe.per_block_cast_to_fp8(_varied(n, k, seed=2))
    ref = _dequant_rows(a_q, sfa) @ _dequant_blocks(b_q, sfb).T

    def transposed(q, s):  # DeepGEMM's (x.T, sf.T): data row-major [K, MN], scales transposed
        return q.t().contiguous(), (s.t() if sf_view else s.t().contiguous())

    a = transposed(a_q, sfa) if op in ("fp8_gemm_tn", "fp8_gemm_tt") else (a_q, sfa)
    b = transposed(b_q, sfb) if op in ("fp8_gemm_nn", "fp8_gemm_tn") else (b_q, sfb)
    d = torch.full((m, n), float("nan"), dtype=torch.float64)
    getattr(cute_moe, op)(a, b, d)
    torch.testing.assert_close(d, ref, rtol=1e-9, atol=0)


def test_m_grouped_nn_matches_deepgemm_semantics(mocked):
    g, rows, n, k = 3, 128, 136, 256
    a_q, sfa = cute_moe.per_token_cast_to_fp8(_varied(g * rows, k, seed=3))
    w_q, sfw = cute_moe.per_block_cast_to_fp8(torch.stack([_varied(n, k, seed=4 + e) for e in range(g)]))
    layout = torch.arange(g, dtype=i32).repeat_interleave(rows)
    d = torch.full((g * rows, n), float("nan"), dtype=torch.float64)
    cute_moe.m_grouped_fp8_gemm_nn_contiguous((a_q, sfa), (w_q.transpose(1, 2).contiguous(), sfw.transpose(1, 2)),
                                              d, layout)
    a_deq = _dequant_rows(a_q, sfa)
    for e in range(g):
        ref = a_deq[e * rows:(e + 1) * rows] @ _dequant_blocks(w_q[e], sfw[e]).T
        torch.testing.assert_close(d[e * rows:(e + 1) * rows], ref, rtol=1e-9, atol=0)


def _wgrad_operands(ks, m, n, seed):
    """Logical a [sum K, M], b [sum K, N] cast per channel (one scale per column per 128 rows)."""
    total = sum(ks)
    a = cute_moe.per_channel_cast_to_fp8(_varied(total, m, seed=seed))
    b = cute_moe.per_channel_cast_to_fp8(_varied(total, n, seed=seed + 1))
    return a, b


def _wgrad_reference(a, b, ks, c=None):
    a_deq = a[0].double() * a[1].double().repeat_interleave(128, dim=0)
    b_deq = b[0].double() * b[1].double().repeat_interleave(128, dim=0)
    out, start = [], 0
    for g, k in enumerate(ks):
        out.append(a_deq[start:start + k].T @ b_deq[start:start + k] + (c[g].double() if c is not None else 0))
        start += k
    return torch.stack(out)


def _as_nt(x, sf_x, ks):
    """DeepGEMM's nt form of a [sum K, MN] per-channel operand: each group's [MN, K] block flattened
    in turn, scales as the transposed view [MN, sum K / 128]."""
    blocks, start = [], 0
    for k in ks:
        blocks.append(x[start:start + k].t().contiguous().flatten())
        start += k
    return torch.cat(blocks), sf_x.t()


@pytest.mark.parametrize("form", ["tn", "nt"])
@pytest.mark.parametrize("with_c", [False, True])
def test_k_grouped_ops_match_deepgemm_semantics(mocked, form, with_c):
    ks, m, n = [256, 0, 128, 384, 0], 24, 40
    a, b = _wgrad_operands(ks, m, n, seed=7)
    c = torch.randn(len(ks), m, n, dtype=f32) if with_c else None
    d = torch.full((len(ks), m, n), float("nan"), dtype=f32)
    ks_tensor = torch.tensor(ks, dtype=i32)
    if form == "tn":
        cute_moe.k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks, ks_tensor, c)
    else:
        cute_moe.k_grouped_fp8_gemm_nt_contiguous(_as_nt(*a, ks), _as_nt(*b, ks), d, ks, ks_tensor, c)
    torch.testing.assert_close(d.double(), _wgrad_reference(a, b, ks, c), rtol=1e-5, atol=1e-5)


def test_k_grouped_tn_device_sizes_are_whole_scale_blocks(mocked):
    """ks=None: a ks_tensor size that is not a multiple of 128 counts as its multiple of 128 below, so
    no group starts inside a scale block; negative sizes are empty; the last group is clamped."""
    ks, m, n = [384, 256], 16, 32
    a, b = _wgrad_operands(ks, m, n, seed=11)
    d = torch.full((3, m, n), float("nan"), dtype=f32)
    cute_moe.k_grouped_fp8_gemm_tn_contiguous(a, b, d, None, torch.tensor([130, -5, 10**6], dtype=i32))
    expected = _wgrad_reference(a, b, [128, 0, 512])
    torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5)


def test_k_grouped_empty_sum_k_fills_d_with_c(mocked):
    a, b, _, _, _ = k_grouped_args("tn", ks=[0, 0])
    c = torch.randn(2, M, N)
    d = torch.full((2, M, N), float("nan"))
    cute_moe.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [0, 0], torch.zeros(2, dtype=i32), c)
    assert torch.equal(d, c)
    cute_moe.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [0, 0], torch.zeros(2, dtype=i32))
    assert torch.equal(d, torch.zeros_like(d))


# ------------------------------------------------------------------ torch.library: custom ops, fakes, compile
def test_every_fp8_backward_op_is_a_custom_op_and_exported():
    for name in OPS:
        assert hasattr(torch.ops.cute_moe, name), name
        assert name in cute_moe.__all__ and callable(getattr(cute_moe, name)), name


def test_fakes_return_nothing_and_leave_d_alone():
    with FakeTensorMode():
        dev = "cuda"
        d = torch.empty(16, 24, dtype=torch.bfloat16, device=dev)
        a, sfa = torch.empty(256, 16, dtype=e4m3, device=dev), torch.empty(2, 16, dtype=f32, device=dev)
        b, sfb = torch.empty(256, 24, dtype=e4m3, device=dev), torch.empty(2, 1, dtype=f32, device=dev)
        assert torch.ops.cute_moe.fp8_gemm_tn(a, sfa, b, sfb, d, None) is None
        dw = torch.empty(3, 16, 24, dtype=f32, device=dev)
        ks_tensor = torch.empty(3, dtype=i32, device=dev)
        assert torch.ops.cute_moe.k_grouped_fp8_gemm_tn_contiguous(
            a, sfa, b, torch.empty(2, 24, dtype=f32, device=dev), dw, [128, 0, 128], ks_tensor, None) is None
        assert d.shape == (16, 24) and dw.shape == (3, 16, 24)


def _backward_step(dy_t, x_t, w, ks, ks_tensor):
    """FP8 backward pieces with the public ops: dX = dY . W (nn), dW per group (K-grouped tn)."""
    dx = torch.empty(dy_t[0].shape[1], w[0].shape[1], dtype=f32)
    cute_moe.fp8_gemm_tn(dy_t, w, dx)
    dw = torch.empty(len(ks), dy_t[0].shape[1], x_t[0].shape[1], dtype=f32)
    cute_moe.k_grouped_fp8_gemm_tn_contiguous(dy_t, x_t, dw, ks, ks_tensor)
    return dx, dw


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_traces_the_fp8_backward_ops(mocked, backend):
    ks, m = [128, 0, 256], 16
    dy_t, x_t = _wgrad_operands(ks, m, 24, seed=5)  # [sum K, M] and [sum K, 24]: tokens along K
    w = cute_moe.per_block_cast_to_fp8(_varied(384, 40, seed=9))  # as given to tn: b [K, N] = [384, 40]
    w = (w[0], w[1])
    ks_tensor = torch.tensor(ks, dtype=i32)
    expected = _backward_step(dy_t, x_t, w, ks, ks_tensor)
    torch._dynamo.reset()
    got = torch.compile(_backward_step, fullgraph=True, backend=backend)(dy_t, x_t, w, ks, ks_tensor)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_opcheck_fp8_backward_ops(mocked):
    # test_schema compares FP8 inputs before / after each aten op, which torch cannot do on the CPU
    # (no float8 comparison kernels there); fake tensors and AOT dispatch are checked.
    utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    a_q, sfa = cute_moe.per_token_cast_to_fp8(_varied(16, 256, seed=1))
    b_q, sfb = cute_moe.per_block_cast_to_fp8(_varied(24, 256, seed=2))
    torch.library.opcheck(torch.ops.cute_moe.fp8_gemm_nn,
                          (a_q, sfa, b_q.t().contiguous(), sfb.t().contiguous(), torch.zeros(16, 24), None),
                          test_utils=utils)
    ks = [128, 0, 256]
    a, b = _wgrad_operands(ks, 16, 24, seed=3)
    torch.library.opcheck(torch.ops.cute_moe.k_grouped_fp8_gemm_tn_contiguous,
                          (a[0], a[1], b[0], b[1], torch.zeros(3, 16, 24), ks, torch.tensor(ks, dtype=i32), None),
                          test_utils=utils)
