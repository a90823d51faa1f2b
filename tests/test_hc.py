"""CPU tests of the hyper-connection ops: sm_90a compiles, argument checks, the reference itself, and
the CPU path of hc_pre / hc_post (the custom op's autograd formula) against a float64 reference."""

import pytest
import torch

import cute_moe.hc as hc
from cute_moe.hc_reference import (HC_EPS, hc_post_reference, hc_pre_reference, mix_width, split_sinkhorn)
from cute_moe.nn import HyperConnection


@pytest.mark.parametrize("n,k", [(24, 28672), (24, 7680), (24, 7168), (8, 64)])
def test_prenorm_gemm_compiles_for_sm90a(n, k):
    from cute_moe.kernels.sm90.hc_signature import compile_hc_prenorm_gemm

    assert compile_hc_prenorm_gemm(n, k) is not None


@pytest.mark.parametrize("n,c", [(4, 7168), (4, 1000)])
def test_hc_post_kernels_compile_for_sm90a(n, c):
    from cute_moe.kernels.sm90.hc_signature import compile_hc_post

    forward, backward = compile_hc_post(n, c)
    assert forward is not None and backward is not None


@pytest.mark.parametrize("c", [4096, 7168])
def test_hc_pre_kernels_compile_for_sm90a(c):
    from cute_moe.kernels.sm90.hc_signature import compile_hc_pre_backward, compile_hc_pre_tail

    assert compile_hc_pre_tail(4, c, 20, 1e-6, 1e-6) is not None
    grad_pre, grad_x = compile_hc_pre_backward(4, c)
    assert grad_pre is not None and grad_x is not None


def test_sinkhorn_backward_kernel_compiles_for_sm90a():
    from cute_moe.kernels.sm90.hc_signature import compile_hc_sinkhorn_backward

    assert compile_hc_sinkhorn_backward(4, 7168, 20, HC_EPS) is not None


def test_prenorm_kernel_refuses_bad_config():
    from cute_moe.kernels.sm90.hc_prenorm_gemm import HcPrenormGemm

    with pytest.raises(ValueError, match="n:"):
        HcPrenormGemm(20, 64)
    with pytest.raises(ValueError, match="k:"):
        HcPrenormGemm(24, 100)
    with pytest.raises(ValueError, match="tile_m"):
        HcPrenormGemm(24, 64, tile_m=96)


def _gemm_args(m=4, n=24, k=128, splits=None):
    a = torch.randn(m, k).to(torch.bfloat16)
    b = torch.randn(n, k)
    d = torch.empty((m, n) if splits is None else (splits, m, n))
    s = torch.empty((m,) if splits is None else (splits, m))
    return a, b, d, s


@pytest.mark.parametrize("change,error,match", [
    (lambda a, b, d, s: (a.float(), b, d, s), TypeError, "a: expected dtype bfloat16"),
    (lambda a, b, d, s: (a, b.double(), d, s), TypeError, "b: expected dtype float32"),
    (lambda a, b, d, s: (a, b, d.half(), s), TypeError, "d: expected dtype float32"),
    (lambda a, b, d, s: (a, b, d, s[:-1]), ValueError, "sqr_sum: expected shape"),
    (lambda a, b, d, s: (a, b, d[:, :-8], s), ValueError, "b: expected N|d: expected shape"),
    (lambda a, b, d, s: (a, b[:20], d, s), ValueError, "b: expected N"),
    (lambda a, b, d, s: (a[:, :100], b, d, s), ValueError, "a: expected K"),
    (lambda a, b, d, s: (a, b[:, :64], d, s), ValueError, "b: expected shape"),
    (lambda a, b, d, s: (a.T.contiguous().T, b, d, s), ValueError, "a: expected a contiguous"),
    (lambda a, b, d, s: (a, b, d, s), ValueError, "a: expected a CUDA tensor"),
    (lambda a, b, d, s: ("a", b, d, s), TypeError, "a: expected a torch.Tensor"),
])
def test_prenorm_gemm_refuses_bad_arguments(change, error, match):
    with pytest.raises(error, match=match):
        hc.tf32_hc_prenorm_gemm(*change(*_gemm_args()))


def test_prenorm_gemm_refuses_bad_splits():
    a, b, d, s = _gemm_args(splits=3)  # K = 128: at most 2 splits
    with pytest.raises(ValueError, match="num_splits: expected at most"):
        hc.tf32_hc_prenorm_gemm(a, b, d, s, num_splits=3)
    with pytest.raises(ValueError, match="num_splits: expected >= 1"):
        hc.tf32_hc_prenorm_gemm(a, b, d, s, num_splits=0)
    with pytest.raises(TypeError, match="num_splits: expected int"):
        hc.tf32_hc_prenorm_gemm(a, b, d, s, num_splits=2.0)
    a, b, d, s = _gemm_args(splits=2)
    with pytest.raises(ValueError, match="d: expected 2 dimensions"):
        hc.tf32_hc_prenorm_gemm(a, b, d, s)


def test_split_hi_lo_is_more_accurate_than_tf32():
    b = torch.randn(24, 4096, dtype=torch.float64).float()
    hl = hc.split_hi_lo(b).float()
    recon = hl[:24] + hl[24:]
    rel = ((recon - b).abs() / b.abs()).max().item()
    assert rel < 2.0 ** -15  # TF32 keeps 10 mantissa bits (2^-11 relative)
    assert hl.shape == (48, 4096)


def test_auto_splits_bounds():
    assert hc.auto_splits(1, 28672) == hc.TARGET_CTAS
    assert hc.auto_splits(1, 128) == 2
    assert hc.auto_splits(1 << 16, 7168) == 1
    for m in (1, 137, 4096, 8192, 16384):  # one wave: never more CTAs than TARGET_CTAS once split
        splits = hc.auto_splits(m, 28672)
        assert splits == 1 or -(-m // hc.TILE_M) * splits <= hc.TARGET_CTAS


# ---------------------------------------------------------------- the reference itself
def _params(n=4, c=64, t=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    magnitudes = torch.exp2(torch.randint(-3, 4, (t, 1, 1), generator=g))
    x = (torch.randn(t, n, c, generator=g) * magnitudes).to(torch.bfloat16)
    fn = torch.randn(mix_width(n), n * c, generator=g) * 0.05
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn(mix_width(n), generator=g)
    return x, fn, scale, base


def test_sinkhorn_is_doubly_stochastic():
    mixes = torch.randn(50, mix_width(4), dtype=torch.float64)
    pre, post, comb = split_sinkhorn(mixes, torch.ones(3, dtype=torch.float64), torch.zeros(24, dtype=torch.float64), 4)
    assert torch.allclose(comb.sum(-2), torch.ones(50, 4, dtype=torch.float64), atol=1e-5)  # last step: columns
    assert torch.allclose(comb.sum(-1), torch.ones(50, 4, dtype=torch.float64), atol=2e-2)  # rows drift (20 steps)
    assert (comb > 0).all() and (pre > HC_EPS).all() and (pre < 1 + 2 * HC_EPS).all()
    assert (post > 0).all() and (post < 2).all()


def test_sinkhorn_gradient_is_exact_in_float64():
    mixes = torch.randn(3, mix_width(4), dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    base = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, s, b: split_sinkhorn(m, s, b, 4, iters=5), (mixes, scale, base))


@pytest.mark.parametrize("iters", [1, 20])
def test_sinkhorn_backward_matches_autograd(iters):
    from cute_moe.hc_backward import split_sinkhorn_backward

    torch.manual_seed(iters)
    mixes = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    base = torch.randn(24, dtype=torch.float64, requires_grad=True)
    outputs = split_sinkhorn(mixes, scale, base, 4, iters)
    grads = [torch.randn_like(o) for o in outputs]
    want = torch.autograd.grad(outputs, (mixes, scale, base), grads)
    got = split_sinkhorn_backward(mixes.detach(), scale.detach(), base.detach(), 4, iters, HC_EPS, *grads)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_hc_post_reference_identity_mix():
    x, *_ = _params()
    comb = torch.eye(4, dtype=torch.float64).expand(x.shape[0], 4, 4)
    post = torch.zeros(x.shape[0], 4, dtype=torch.float64)
    out = hc_post_reference(x[:, 0], x, post, comb, dtype=torch.float64)
    assert torch.equal(out, x.double())
    # comb is applied transposed: out[q] = sum_p comb[p, q] x[p]
    comb = torch.zeros(x.shape[0], 4, 4, dtype=torch.float64)
    comb[:, 0, 1] = 1.0
    out = hc_post_reference(x[:, 0], x, post, comb, dtype=torch.float64)
    assert torch.equal(out[:, 1], x[:, 0].double()) and (out[:, 0] == 0).all()


# ---------------------------------------------------------------- ops on the CPU path
def test_hc_pre_post_match_float64_reference_with_gradients():
    x, fn, scale, base = _params(t=9)
    f_w = torch.randn(64, 64, dtype=torch.float64) * 0.1
    leaves = [x.clone().requires_grad_(), fn.float().requires_grad_(), scale.float().requires_grad_(),
              base.float().requires_grad_()]
    y, post, comb = hc.hc_pre(*leaves)
    out = hc.hc_post((y.float() @ f_w.float()).to(torch.bfloat16), leaves[0], post, comb)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ry, rpost, rcomb = hc_pre_reference(*ref_leaves, dtype=torch.float64)
    rout = hc_post_reference(ry @ f_w, ref_leaves[0], rpost, rcomb, dtype=torch.float64)
    assert (y.double() - ry).abs().max() <= 1e-2 * ry.abs().max()
    assert torch.allclose(post.double(), rpost, atol=1e-5) and torch.allclose(comb.double(), rcomb, atol=1e-5)
    g = torch.randn_like(rout)
    out.float().backward(g.float())
    rout.backward(g)
    for name, got, want in zip(("x", "fn", "scale", "base"), leaves, ref_leaves):
        err = (got.grad.double() - want.grad).norm() / want.grad.norm()
        assert err < 2e-2, f"grad {name}: relative error {err:.2e}"


def test_hc_pre_refuses_bad_inputs():
    x, fn, scale, base = (t.float() if t.dtype == torch.float64 else t for t in _params())
    with pytest.raises(ValueError, match="x: expected n"):
        hc.hc_pre(torch.zeros(2, 3, 64, dtype=torch.bfloat16), fn, scale, base)
    with pytest.raises(TypeError, match="x: expected dtype bfloat16"):
        hc.hc_pre(x.float(), fn, scale, base)
    with pytest.raises(ValueError, match="fn: expected shape"):
        hc.hc_pre(x, fn[:, :-1], scale, base)
    with pytest.raises(ValueError, match="scale: expected shape"):
        hc.hc_pre(x, fn, scale[:2], base)
    with pytest.raises(TypeError, match="base: expected dtype float32"):
        hc.hc_pre(x, fn, scale, base.double())
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        hc.hc_pre(x, fn, scale, base, sinkhorn_iters=0)
    with pytest.raises(TypeError, match="residual: expected dtype bfloat16"):
        hc.hc_post(x[:, 0], x.float(), torch.zeros(7, 4), torch.zeros(7, 4, 4))
    with pytest.raises(ValueError, match="f_out: expected shape"):
        hc.hc_post(x[:, 0, :32], x, torch.zeros(7, 4), torch.zeros(7, 4, 4))
    with pytest.raises(ValueError, match="residual: expected C"):  # 16-byte vectors of 8 bf16 along C
        hc.hc_post(x[:, 0, :12], x[:, :, :12], torch.zeros(7, 4), torch.zeros(7, 4, 4))
    with pytest.raises(ValueError, match="comb: expected shape"):
        hc.hc_post(x[:, 0], x, torch.zeros(7, 4), torch.zeros(7, 4, 3))
    with pytest.raises(ValueError, match="n: expected one of"):
        HyperConnection(2, 64)
    with pytest.raises(ValueError, match="x: expected shape"):
        HyperConnection(4, 64)(torch.zeros(3, 4, 32, dtype=torch.bfloat16))


def test_module_compiles_fullgraph_on_cpu():
    torch.manual_seed(0)
    block = HyperConnection(4, 64, torch.nn.Linear(64, 64, dtype=torch.bfloat16))
    x = torch.randn(2, 5, 4, 64).to(torch.bfloat16)
    eager = block(x)
    eager.float().square().sum().backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True)(x)  # inductor: the backend the GPU run uses
    assert compiled.shape == (2, 5, 4, 64)
    assert torch.equal(compiled, eager)
    compiled.float().square().sum().backward()  # the custom ops' backward formulas trace too
    for got, want in zip((p.grad for p in block.parameters()), eager_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_custom_ops_pass_opcheck():
    """Schema, fake impls (what torch.compile traces with) and autograd registration of every op."""
    x, fn, scale, base = (t.float() if t.dtype == torch.float64 else t for t in _params(t=5))
    args = (x, fn, scale, base, 1e-6, 20, HC_EPS)
    torch.library.opcheck(torch.ops.cute_moe.hc_pre.default, args)
    y, post, comb, pre, rsqrt, d = torch.ops.cute_moe.hc_pre(*args)
    grads = (torch.randn(y.shape).to(torch.bfloat16), torch.randn_like(post), torch.randn_like(comb))
    torch.library.opcheck(torch.ops.cute_moe.hc_pre_backward.default,
                          (*grads, x, fn, scale, base, pre, rsqrt, d, 20, HC_EPS))
    torch.library.opcheck(torch.ops.cute_moe.hc_post.default, (y, x, post, comb))
    torch.library.opcheck(torch.ops.cute_moe.hc_post_backward.default,
                          (torch.randn(x.shape).to(torch.bfloat16), y, x, post, comb))
