"""Launch signatures of the hyper-connection kernels and their compilation with fake tensors.

Runs on any machine (the target arch is a compile option). ``compile_hc_prenorm_gemm(n, k)`` returns
a TVM-FFI callable ``fn(a, b, b_hi_lo, d, sqr_sum)`` (b FP32, b_hi_lo a BF16 [2N, K] workspace) on
torch tensors, launched on the caller's current CUDA stream; M and the split count are symbolic, N
and K static. ``compile_hc_pre_tail`` and ``compile_hc_post`` compile the per-token SIMT kernels.
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

from .hc_prenorm_gemm import HcPrenormGemm

ALIGN_BYTES = 16


def _row_major(dtype, shape: tuple):
    order = tuple(range(len(shape) - 1, -1, -1))
    return make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=ALIGN_BYTES)


def prenorm_fake_arguments(n: int, k: int) -> tuple:
    """Fake (a, b, b_hi_lo workspace, d, sqr_sum, stream) with M and the split count symbolic."""
    rows, splits = cute.sym_int(), cute.sym_int()
    a = _row_major(cutlass.BFloat16, (rows, k))
    b32 = _row_major(cutlass.Float32, (n, k))
    b = _row_major(cutlass.BFloat16, (2 * n, k))
    d = _row_major(cutlass.Float32, (splits, rows, n))
    s = make_fake_compact_tensor(cutlass.Float32, (splits, rows), stride_order=(1, 0), assumed_align=4)
    return a, b32, b, d, s, make_fake_stream(use_tvm_ffi_env_stream=True)


def compile_hc_prenorm_gemm(n: int, k: int, arch: str = "sm_90a", tile_m: int = 128, stages: int = 0):
    """Compile the prenorm GEMM for (N, K) and ``arch``; returns the TVM-FFI compiled function."""
    kernel = HcPrenormGemm(n, k, tile_m=tile_m, stages=stages)
    return cute.compile(kernel, *prenorm_fake_arguments(n, k), options=f"--enable-tvm-ffi --gpu-arch {arch}")


def _natural(dtype, shape: tuple):
    """Row-major with no alignment beyond the element's own (read element by element)."""
    order = tuple(range(len(shape) - 1, -1, -1))
    return make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=dtype.width // 8)


def _rows(dtype, shape: tuple):
    """Row-major, 16-byte aligned, last extent C a multiple of 8: rows read with 16-byte vectors."""
    return _row_major(dtype, shape)


def compile_hc_post(n: int, c: int, arch: str = "sm_90a"):
    """Compile hc_post's forward and backward for (n, C); returns (forward, backward) TVM-FFI functions
    ``forward(f, res, post, comb, out)`` and ``backward(g, f, res, post, comb, grad_f, grad_res,
    grad_post, grad_comb)`` (T symbolic; bf16 streams, fp32 post / comb)."""
    from .hc_post import HcPost

    kernel = HcPost(n, c)
    tokens = cute.sym_int()
    bf16, f32 = cutlass.BFloat16, cutlass.Float32
    f, res, out = _rows(bf16, (tokens, c)), _rows(bf16, (tokens, n, c)), _rows(bf16, (tokens, n, c))
    post, comb = _natural(f32, (tokens, n)), _natural(f32, (tokens, n, n))
    options = f"--enable-tvm-ffi --gpu-arch {arch}"
    forward = cute.compile(kernel.forward, f, res, post, comb, out, make_fake_stream(use_tvm_ffi_env_stream=True),
                           options=options)
    g, grad_f, grad_res = _rows(bf16, (tokens, n, c)), _rows(bf16, (tokens, c)), _rows(bf16, (tokens, n, c))
    grad_post, grad_comb = _natural(f32, (tokens, n)), _natural(f32, (tokens, n, n))
    backward = cute.compile(kernel.backward, g, f, res, post, comb, grad_f, grad_res, grad_post, grad_comb,
                            make_fake_stream(use_tvm_ffi_env_stream=True), options=options)
    return forward, backward


def compile_hc_pre_tail(n: int, c: int, iters: int, norm_eps: float, hc_eps: float, arch: str = "sm_90a"):
    """Compile hc_pre's fused tail: ``fn(x, d, sqr_sum, scale, base, y, pre, post, comb, rsqrt)`` with
    T and the split count symbolic (d [S, T, (2+n)n], sqr_sum [S, T])."""
    from .hc_pre_tail import HcPreTail

    kernel = HcPreTail(n, c, iters, norm_eps, hc_eps)
    tokens, splits = cute.sym_int(), cute.sym_int()
    bf16, f32 = cutlass.BFloat16, cutlass.Float32
    width = (2 + n) * n
    args = (_rows(bf16, (tokens, n, c)), _natural(f32, (splits, tokens, width)), _natural(f32, (splits, tokens)),
            _natural(f32, (3,)), _natural(f32, (width,)), _rows(bf16, (tokens, c)), _natural(f32, (tokens, n)),
            _natural(f32, (tokens, n)), _natural(f32, (tokens, n, n)), _natural(f32, (tokens,)),
            make_fake_stream(use_tvm_ffi_env_stream=True))
    return cute.compile(kernel, *args, options=f"--enable-tvm-ffi --gpu-arch {arch}")


def compile_hc_pre_backward(n: int, c: int, arch: str = "sm_90a"):
    """Compile hc_pre's backward kernels for (n, C): (``grad_pre(grad_y, x, grad_pre)``,
    ``grad_x(grad_y, x, fn, pre, grad_d, grad_sqr, grad_x)``), T symbolic."""
    from .hc_pre_backward import HcPreBackward

    kernel = HcPreBackward(n, c)
    tokens = cute.sym_int()
    bf16, f32 = cutlass.BFloat16, cutlass.Float32
    width = (2 + n) * n
    options = f"--enable-tvm-ffi --gpu-arch {arch}"
    grad_pre = cute.compile(kernel.grad_pre, _rows(bf16, (tokens, c)), _rows(bf16, (tokens, n, c)),
                            _natural(f32, (tokens, n)), make_fake_stream(use_tvm_ffi_env_stream=True), options=options)
    grad_x = cute.compile(kernel.grad_x, _rows(bf16, (tokens, c)), _rows(bf16, (tokens, n, c)),
                          _rows(f32, (width, n * c)), _natural(f32, (tokens, n)), _natural(f32, (tokens, width)),
                          _natural(f32, (tokens,)), _rows(bf16, (tokens, n, c)),
                          make_fake_stream(use_tvm_ffi_env_stream=True), options=options)
    return grad_pre, grad_x


def compile_hc_sinkhorn_backward(n: int, c: int, iters: int, hc_eps: float, arch: str = "sm_90a"):
    """Compile the per-token gates + Sinkhorn backward: ``fn(d, rsqrt, scale, base, grad_pre, grad_post,
    grad_comb, grad_d, grad_sqr, grad_z, scale_terms)``, T symbolic, all fp32."""
    from .hc_sinkhorn_backward import SCALE_GROUPS, HcSinkhornBackward

    kernel = HcSinkhornBackward(n, c, iters, hc_eps)
    tokens = cute.sym_int()
    f32 = cutlass.Float32
    width = (2 + n) * n
    args = (_natural(f32, (tokens, width)), _natural(f32, (tokens,)), _natural(f32, (SCALE_GROUPS,)),
            _natural(f32, (width,)), _natural(f32, (tokens, n)), _natural(f32, (tokens, n)),
            _natural(f32, (tokens, n, n)), _natural(f32, (tokens, width)), _natural(f32, (tokens,)),
            _natural(f32, (tokens, width)), _natural(f32, (tokens, SCALE_GROUPS)),
            make_fake_stream(use_tvm_ffi_env_stream=True))
    return cute.compile(kernel, *args, options=f"--enable-tvm-ffi --gpu-arch {arch}")
