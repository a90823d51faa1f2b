"""Hyper-connection (mHC) ops: the prenorm GEMM kernel and the differentiable hc_pre / hc_post.

``tf32_hc_prenorm_gemm`` keeps DeepGEMM's name and signature; on SM90 it runs the BF16 hi/lo-split
WGMMA kernel of ``kernels/sm90/hc_prenorm_gemm.py`` (precision better than TF32, docs/hc.md).
``hc_pre`` / ``hc_post`` are the DeepSeek-V4 block's two halves (cute_moe/hc_reference.py gives the
math), each one ``torch.library`` custom op (fake impl + ``register_autograd``, so
``torch.compile(fullgraph=True)`` traces through): hc_pre = prenorm GEMM + the fused tail kernel
(gates, Sinkhorn in registers, collapse); its backward (the op ``cute_moe::hc_pre_backward``) =
grad-pre kernel, the per-token gates + Sinkhorn backward kernel, grad-x kernel, grad fn as one cuBLAS
bf16 GEMM with FP32 output (grad_d split into bf16 hi + lo); hc_post = one fused kernel forward and one backward. On the CPU the same ops run torch math
(the Sinkhorn backward of cute_moe/hc_backward.py).
"""

import threading
from typing import Callable, Optional

import torch

from .hc_backward import split_sinkhorn_backward
from .hc_reference import HC_EPS, NORM_EPS, SINKHORN_ITERS, mix_width, split_sinkhorn
from .library import _register
from .validation import check_contiguous, check_int_arg, check_placement, check_shape, check_tensor

TILE_K = 64  # the kernel's k-tile: K must be a multiple of it, splits at most K / TILE_K
TILE_M = 128  # rows per CTA
ARCH = "sm_90a"
MAX_N = 128  # the kernel multiplies by 2N <= 256 columns (hi and lo halves of b)
N_MULTIPLE = 8
SUPPORTED_N_STREAMS = (4,)  # hc_pre / hc_post: n = 4 only (N = 24), see docs/hc.md
VEC_ALIGN_BYTES = 16  # the per-token kernels read and write rows of C bf16 values as 16-byte vectors
VEC_ELEMS = 8
TARGET_CTAS = 132  # auto split: one wave on an H200's 132 SMs (one 180 KB CTA per SM)

_compiled: dict[tuple, Callable] = {}
_compile_lock = threading.Lock()  # cute.compile is not thread-safe


def _compiled_kernel(key: tuple) -> Callable:
    """The compiled function(s) of ``key`` = (kernel name, static sizes...), compiled on first use."""
    fn = _compiled.get(key)
    if fn is None:
        with _compile_lock:
            fn = _compiled.get(key)
            if fn is None:
                from cute_moe.kernels.sm90 import hc_signature

                compile_fn = {"prenorm": hc_signature.compile_hc_prenorm_gemm, "post": hc_signature.compile_hc_post,
                              "pre_tail": hc_signature.compile_hc_pre_tail,
                              "pre_backward": hc_signature.compile_hc_pre_backward,
                              "sinkhorn_backward": hc_signature.compile_hc_sinkhorn_backward}[key[0]]
                fn = _compiled[key] = compile_fn(*key[1:])
    return fn


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (itself when it already is, else a copy): the kernels assume
    row-major rows and use 16-byte vector accesses; a view at an odd offset must not fault, and a
    layout chosen by torch.compile must not be misread."""
    t = t.contiguous()
    return t if t.data_ptr() % VEC_ALIGN_BYTES == 0 else t.clone()


def split_hi_lo(b: torch.Tensor) -> torch.Tensor:
    """FP32 ``[N, K]`` -> BF16 ``[2N, K]``: rows ``hi = bf16(b)`` then ``lo = bf16(b - hi)`` (what the
    kernel's first launch computes; the tests use it to bound the precision)."""
    hi = b.to(torch.bfloat16)
    lo = (b - hi.float()).to(torch.bfloat16)
    return torch.cat([hi, lo])


def _check_device(a: torch.Tensor) -> None:
    if torch.cuda.get_device_capability(a.device) != (9, 0):
        major, minor = torch.cuda.get_device_capability(a.device)
        raise ValueError(f"a: the hc prenorm kernel needs an sm_90 GPU, got compute capability {major}.{minor} "
                         f"on {a.device}")


def tf32_hc_prenorm_gemm(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sqr_sum: torch.Tensor,
                         num_splits: Optional[int] = None) -> None:
    """d = a @ b.T and sqr_sum = (a.float() ** 2).sum(-1), or their per-split partial sums.

    a [M, K] bf16, b [N, K] fp32 (N a multiple of 8, at most 128; K a multiple of 64), d [M, N] fp32 and
    sqr_sum [M] fp32; with ``num_splits`` (1 <= num_splits <= K / 64) d is [num_splits, M, N] and
    sqr_sum [num_splits, M], split s holding the sums over its contiguous range of K (the caller adds
    them up). Without ``num_splits`` the call may still split K internally (``auto_splits``, to fill
    the GPU at small M) and add the partials into d / sqr_sum. Precision: b is used as bf16 hi + lo
    (~16 mantissa bits), products exact, FP32 round-to-nearest accumulation across k-tiles: at least
    TF32-accurate (the name is DeepGEMM's). A ``torch.library`` custom op (mutates d and sqr_sum) that
    this function calls while torch.compile traces."""
    if torch.compiler.is_compiling():  # torch.compile traces the custom op
        return torch.ops.cute_moe.tf32_hc_prenorm_gemm(a, b, d, sqr_sum, num_splits)
    _prenorm_gemm(a, b, d, sqr_sum, num_splits)


def _prenorm_gemm(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sqr_sum: torch.Tensor,
                  num_splits: Optional[int]) -> None:
    """tf32_hc_prenorm_gemm's checks and launch (its eager path and its custom op's implementation)."""
    check_tensor("a", a, (torch.bfloat16,), 2)
    check_tensor("b", b, (torch.float32,), 2)
    split = num_splits is not None
    if split:
        check_int_arg("num_splits", num_splits, 1)
    check_tensor("d", d, (torch.float32,), 3 if split else 2)
    check_tensor("sqr_sum", sqr_sum, (torch.float32,), 2 if split else 1)
    m, k = a.shape
    n = b.shape[0]
    if n % N_MULTIPLE != 0 or not 0 < n <= MAX_N:
        raise ValueError(f"b: expected N (rows) a multiple of {N_MULTIPLE} in [8, {MAX_N}], got shape {tuple(b.shape)}")
    if k % TILE_K != 0 or k == 0:
        raise ValueError(f"a: expected K a positive multiple of {TILE_K}, got shape {tuple(a.shape)}")
    check_shape("b", b, (n, k))
    if split and num_splits > k // TILE_K:
        raise ValueError(f"num_splits: expected at most K / {TILE_K} = {k // TILE_K}, got {num_splits}")
    check_shape("d", d, (num_splits, m, n) if split else (m, n))
    check_shape("sqr_sum", sqr_sum, (num_splits, m) if split else (m,))
    for name, t in (("a", a), ("b", b), ("d", d), ("sqr_sum", sqr_sum)):
        check_contiguous(name, t)
    check_placement(a=a, b=b, d=d)
    if sqr_sum.device != a.device:
        raise ValueError(f"sqr_sum: expected device {a.device} (same as a), got {sqr_sum.device}")
    if sqr_sum.data_ptr() % 4 != 0:
        raise ValueError(f"sqr_sum: expected a 4-byte aligned data pointer, got address {sqr_sum.data_ptr():#x}")
    _check_device(a)
    if m == 0:
        return
    workspace = torch.empty((2 * n, k), dtype=torch.bfloat16, device=a.device)
    kernel = _compiled_kernel(("prenorm", n, k, ARCH, TILE_M))
    if split:
        kernel(a, b, workspace, d, sqr_sum)
        return
    # Without num_splits the rows alone may not fill the GPU: split internally and add the partials.
    splits = auto_splits(m, k)
    if splits == 1:
        kernel(a, b, workspace, d.unsqueeze(0), sqr_sum.unsqueeze(0))
        return
    partial_d = torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
    partial_s = torch.empty((splits, m), dtype=torch.float32, device=a.device)
    kernel(a, b, workspace, partial_d, partial_s)
    torch.sum(partial_d, 0, out=d)
    torch.sum(partial_s, 0, out=sqr_sum)


def _prenorm_gemm_op(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sqr_sum: torch.Tensor,
                     num_splits: Optional[int] = None) -> None:
    """``cute_moe::tf32_hc_prenorm_gemm`` (writes d and sqr_sum; its fake does nothing)."""
    _prenorm_gemm(a, b, d, sqr_sum, num_splits)


_register("tf32_hc_prenorm_gemm", _prenorm_gemm_op, mutates=("d", "sqr_sum"))


def auto_splits(m: int, k: int) -> int:
    """Split count that fills one wave of TARGET_CTAS CTAs (1 once the rows alone fill it, at most
    K / TILE_K): every CTA then runs the same number of k-tiles (+-1) and no second wave idles SMs."""
    m_blocks = -(-m // TILE_M)
    return max(1, min(k // TILE_K, TARGET_CTAS // max(m_blocks, 1)))


# ---------------------------------------------------------------- hc_pre (custom op: forward kernels, torch backward)
@torch.library.custom_op("cute_moe::hc_pre", mutates_args=())
def _hc_pre_op(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
               sinkhorn_iters: int, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor]:
    """(y, post, comb, pre, rsqrt, d): the last three are saved for the backward. CUDA: the prenorm GEMM
    (auto split) and the fused tail kernel; CPU: the same math in torch float32."""
    t, n, c = x.shape
    width = mix_width(n)
    if not x.is_cuda:
        flat = x.reshape(t, n * c)
        d, sqr = flat.float() @ fn.T, flat.float().square().sum(-1)
        rsqrt = torch.rsqrt(sqr / (n * c) + norm_eps)
        pre, post, comb = split_sinkhorn(d * rsqrt.unsqueeze(-1), scale, base, n, sinkhorn_iters, hc_eps)
        y = (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)
        return y, post, comb, pre, rsqrt, d
    x, fn, scale, base = _aligned(x), _aligned(fn), _aligned(scale), _aligned(base)
    flat = x.view(t, n * c)
    splits = auto_splits(t, n * c)
    partial_d = torch.empty((splits, t, width), dtype=torch.float32, device=x.device)
    partial_s = torch.empty((splits, t), dtype=torch.float32, device=x.device)
    y = torch.empty((t, c), dtype=x.dtype, device=x.device)
    pre = torch.empty((t, n), dtype=torch.float32, device=x.device)
    post, comb = torch.empty_like(pre), torch.empty((t, n, n), dtype=torch.float32, device=x.device)
    rsqrt = torch.empty((t,), dtype=torch.float32, device=x.device)
    if t > 0:
        tf32_hc_prenorm_gemm(flat, fn, partial_d, partial_s, num_splits=splits)
        _compiled_kernel(("pre_tail", n, c, sinkhorn_iters, norm_eps, hc_eps))(
            x, partial_d, partial_s, scale, base, y, pre, post, comb, rsqrt)
    return y, post, comb, pre, rsqrt, partial_d.sum(0)


@_hc_pre_op.register_fake
def _hc_pre_fake(x, fn, scale, base, norm_eps, sinkhorn_iters, hc_eps):
    t, n, c = x.shape
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((t, c)), x.new_empty((t, n), **f32), x.new_empty((t, n, n), **f32), x.new_empty((t, n), **f32),
            x.new_empty((t,), **f32), x.new_empty((t, fn.shape[0]), **f32))


def _hc_pre_setup(ctx, inputs, output) -> None:
    x, fn, scale, base, norm_eps, sinkhorn_iters, hc_eps = inputs
    _, _, _, pre, rsqrt, d = output
    ctx.save_for_backward(x, fn, scale, base, pre, rsqrt, d)
    ctx.constants = (sinkhorn_iters, hc_eps)


def _sinkhorn_backward_kernel(grad_pre: torch.Tensor, grad_post: torch.Tensor, grad_comb: torch.Tensor,
                              scale: torch.Tensor, base: torch.Tensor, rsqrt: torch.Tensor, d: torch.Tensor, c: int,
                              iters: int, eps: float) -> tuple[torch.Tensor, ...]:
    """(grad_d [T, W], grad_sqr [T], grad scale [3], grad base [W]) on CUDA: the per-token kernel
    (kernels/sm90/hc_sinkhorn_backward.py, the same steps as hc_backward.split_sinkhorn_backward) and
    two sums over T."""
    t, n = grad_pre.shape
    width = mix_width(n)
    grad_d = torch.empty((t, width), dtype=torch.float32, device=d.device)
    grad_z = torch.empty_like(grad_d)
    grad_sqr = torch.empty((t,), dtype=torch.float32, device=d.device)
    scale_terms = torch.empty((t, 3), dtype=torch.float32, device=d.device)
    _compiled_kernel(("sinkhorn_backward", n, c, iters, eps))(
        _aligned(d), _aligned(rsqrt), _aligned(scale), _aligned(base), _aligned(grad_pre), _aligned(grad_post),
        _aligned(grad_comb), grad_d, grad_sqr, grad_z, scale_terms)
    return grad_d, grad_sqr, scale_terms.sum(0), grad_z.sum(0)


@torch.library.custom_op("cute_moe::hc_pre_backward", mutates_args=())
def _hc_pre_backward_op(grad_y: torch.Tensor, grad_post: torch.Tensor, grad_comb: torch.Tensor, x: torch.Tensor,
                        fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, pre: torch.Tensor,
                        rsqrt: torch.Tensor, d: torch.Tensor, sinkhorn_iters: int,
                        hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad fn, grad scale, grad base) of hc_pre. grad pre = <grad_y, x[p]> (kernel on CUDA),
    the gates + Sinkhorn backward (kernel on CUDA, hc_backward in torch on the CPU), grad x =
    pre (x) grad_y + grad_d @ fn + 2 grad_sqr x (kernel on CUDA) and grad fn = grad_d^T @ x (one
    cuBLAS GEMM on bf16 x on CUDA, an FP32 matmul on the CPU). One opaque op, so torch.compile never
    traces into a kernel launch."""
    t, n, c = x.shape
    if x.is_cuda and t > 0:
        grad_y, x, pre = _aligned(grad_y), _aligned(x), _aligned(pre)
        grad_pre_kernel, grad_x_kernel = _compiled_kernel(("pre_backward", n, c))
        grad_pre = torch.empty_like(pre)
        grad_pre_kernel(grad_y, x, grad_pre)
        grad_d, grad_sqr, grad_scale, grad_base = _sinkhorn_backward_kernel(
            grad_pre, grad_post, grad_comb, scale, base, rsqrt, d, c, sinkhorn_iters, hc_eps)
        grad_x = torch.empty_like(x)
        grad_x_kernel(grad_y, x, _aligned(fn), pre, grad_d, grad_sqr, grad_x)
        return grad_x, _grad_fn_cuda(grad_d, x.view(t, n * c)), grad_scale, grad_base
    grad_pre = torch.einsum("tc,tpc->tp", grad_y.float(), x.float())
    grad_mixes, grad_scale, grad_base = split_sinkhorn_backward(
        d * rsqrt.unsqueeze(-1), scale, base, n, sinkhorn_iters, hc_eps, grad_pre, grad_post, grad_comb)
    grad_d = grad_mixes * rsqrt.unsqueeze(-1)
    grad_sqr = (grad_mixes * d).sum(-1) * -0.5 * rsqrt.pow(3) / (n * c)
    flat = x.reshape(t, n * c).float()
    grad_x = (pre.unsqueeze(-1) * grad_y.float().unsqueeze(1)).view(t, n * c) + grad_d @ fn
    grad_x = (grad_x + 2 * grad_sqr.unsqueeze(-1) * flat).view(t, n, c).to(x.dtype)
    return grad_x, grad_d.T @ flat, grad_scale, grad_base


def _grad_fn_cuda(grad_d: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """grad fn = grad_d^T @ x_flat [W, n*C] fp32 reading x once as bf16 (no FP32 copy of x): grad_d
    split into bf16 hi + lo (~16 mantissa bits, as b in the prenorm GEMM), one cuBLAS bf16 GEMM of
    both halves [2W, T] @ [T, n*C] with FP32 output (``torch.mm(out_dtype=float32)``), halves added."""
    width = grad_d.shape[1]
    hi = grad_d.to(torch.bfloat16)
    lo = (grad_d - hi.float()).to(torch.bfloat16)
    both = torch.cat([hi, lo], dim=1).T  # [2W, T], a transposed view: cuBLAS reads it with ld = 2W
    out = torch.mm(both, flat, out_dtype=torch.float32)
    return out[:width] + out[width:]


@_hc_pre_backward_op.register_fake
def _hc_pre_backward_fake(grad_y, grad_post, grad_comb, x, fn, scale, base, pre, rsqrt, d, sinkhorn_iters, hc_eps):
    return torch.empty_like(x), torch.empty_like(fn), torch.empty_like(scale), torch.empty_like(base)


def _hc_pre_backward(ctx, grad_y, grad_post, grad_comb, *_aux_grads):
    """Fills absent gradients with zeros and calls the backward op. The auxiliary outputs (pre, rsqrt,
    d) are not differentiable: their gradients are ignored."""
    x, fn, scale, base, pre, rsqrt, d = ctx.saved_tensors
    iters, eps = ctx.constants
    t, n, c = x.shape
    grad_y = (grad_y if grad_y is not None else x.new_zeros((t, c))).contiguous()
    grad_post = (grad_post if grad_post is not None else pre.new_zeros((t, n))).contiguous()
    grad_comb = (grad_comb if grad_comb is not None else pre.new_zeros((t, n, n))).contiguous()
    grad_x, grad_fn, grad_scale, grad_base = _hc_pre_backward_op(grad_y, grad_post, grad_comb, x, fn, scale, base,
                                                                 pre, rsqrt, d, iters, eps)
    return grad_x, grad_fn, grad_scale, grad_base, None, None, None


_hc_pre_op.register_autograd(_hc_pre_backward, setup_context=_hc_pre_setup)


def _check_params(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> int:
    check_tensor("x", x, (torch.bfloat16,), 3)
    t, n, c = x.shape
    if n not in SUPPORTED_N_STREAMS:
        raise ValueError(f"x: expected n (dim 1) in {SUPPORTED_N_STREAMS}, got shape {tuple(x.shape)}")
    if (n * c) % TILE_K != 0 or c == 0:
        raise ValueError(f"x: expected n * C a positive multiple of {TILE_K}, got shape {tuple(x.shape)}")
    check_tensor("fn", fn, (torch.float32,), 2)
    check_shape("fn", fn, (mix_width(n), n * c))
    check_tensor("scale", scale, (torch.float32,), 1)
    check_shape("scale", scale, (3,))
    check_tensor("base", base, (torch.float32,), 1)
    check_shape("base", base, (mix_width(n),))
    for name, tensor in (("fn", fn), ("scale", scale), ("base", base)):
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (same as x), got {tensor.device}")
    return n


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           norm_eps: float = NORM_EPS, sinkhorn_iters: int = SINKHORN_ITERS, hc_eps: float = HC_EPS):
    """Collapse the streams into the sub-layer's input: returns (y [T, C] bf16, post [T, n] fp32,
    comb [T, n, n] fp32), differentiable in x, fn, scale and base (DeepSeek-V4 ``Block.hc_pre``)."""
    _check_params(x, fn, scale, base)
    check_int_arg("sinkhorn_iters", sinkhorn_iters, 1)
    y, post, comb, *_ = _hc_pre_op(x.contiguous(), fn.contiguous(), scale.contiguous(), base.contiguous(),
                                   float(norm_eps), sinkhorn_iters, float(hc_eps))
    return y, post, comb


@torch.library.custom_op("cute_moe::hc_post", mutates_args=())
def _hc_post_op(f_out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The fused kernel on CUDA, torch float32 math on the CPU (see hc_post)."""
    if not residual.is_cuda:
        mixed = torch.einsum("tpq,tpc->tqc", comb, residual.float())
        return (post.unsqueeze(-1) * f_out.float().unsqueeze(1) + mixed).to(residual.dtype)
    out = torch.empty_like(residual)
    if residual.shape[0] > 0:
        _compiled_kernel(("post", residual.shape[1], residual.shape[2]))[0](
            _aligned(f_out), _aligned(residual), _aligned(post), _aligned(comb), out)
    return out


@_hc_post_op.register_fake
def _hc_post_fake(f_out, residual, post, comb):
    return torch.empty_like(residual)


@torch.library.custom_op("cute_moe::hc_post_backward", mutates_args=())
def _hc_post_backward_op(grad: torch.Tensor, f_out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
                         comb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad f_out, grad residual, grad post, grad comb): the fused kernel on CUDA, torch on the CPU."""
    if not grad.is_cuda:
        g, f, r = grad.float(), f_out.float(), residual.float()
        grad_f = (post.unsqueeze(-1) * g).sum(1).to(f_out.dtype)
        grad_r = torch.einsum("tpq,tqc->tpc", comb, g).to(residual.dtype)
        return grad_f, grad_r, torch.einsum("tqc,tc->tq", g, f), torch.einsum("tpc,tqc->tpq", r, g)
    grad_f, grad_r = torch.empty_like(f_out), torch.empty_like(residual)
    grad_post, grad_comb = torch.empty_like(post), torch.empty_like(comb)
    if grad.shape[0] > 0:
        backward = _compiled_kernel(("post", residual.shape[1], residual.shape[2]))[1]
        backward(_aligned(grad), _aligned(f_out), _aligned(residual), _aligned(post), _aligned(comb), grad_f, grad_r,
                 grad_post, grad_comb)
    return grad_f, grad_r, grad_post, grad_comb


@_hc_post_backward_op.register_fake
def _hc_post_backward_fake(grad, f_out, residual, post, comb):
    return torch.empty_like(f_out), torch.empty_like(residual), torch.empty_like(post), torch.empty_like(comb)


def _hc_post_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _hc_post_backward(ctx, grad: torch.Tensor):
    f_out, residual, post, comb = ctx.saved_tensors
    return _hc_post_backward_op(grad.contiguous(), f_out, residual, post, comb)


_hc_post_op.register_autograd(_hc_post_backward, setup_context=_hc_post_setup)


def hc_post(f_out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Next streams [T, n, C] bf16: post[q] * f_out + sum_p comb[p, q] * residual[p], in FP32
    (DeepSeek-V4 ``Block.hc_post``); one fused kernel forward, one backward (grads of all four inputs)."""
    check_tensor("residual", residual, (torch.bfloat16,), 3)
    t, n, c = residual.shape
    if c % VEC_ELEMS != 0 or c == 0:
        raise ValueError(f"residual: expected C (dim 2) a positive multiple of {VEC_ELEMS}, got shape "
                         f"{tuple(residual.shape)}")
    check_tensor("f_out", f_out, (torch.bfloat16,), 2)
    check_shape("f_out", f_out, (t, c))
    check_tensor("post", post, (torch.float32,), 2)
    check_shape("post", post, (t, n))
    check_tensor("comb", comb, (torch.float32,), 3)
    check_shape("comb", comb, (t, n, n))
    for name, tensor in (("f_out", f_out), ("post", post), ("comb", comb)):
        if tensor.device != residual.device:
            raise ValueError(f"{name}: expected device {residual.device} (same as residual), got {tensor.device}")
    return _hc_post_op(f_out.contiguous(), residual.contiguous(), post.contiguous(), comb.contiguous())
