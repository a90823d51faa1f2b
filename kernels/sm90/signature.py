"""Launch signature of the SM90 grouped GEMM family and its compilation with fake tensors.

Runs on any machine, no GPU and no environment variable needed: the target arch goes to the DSL as
a compile option. The result is a TVM-FFI callable taking torch tensors,
``fn(a, b, d, c, sfa, sfb, group_tensor, max_clusters)``, launched on the caller's current CUDA
stream; M, G and Mmax are symbolic, N and K static (k_grouped: M static as the spec's ``k``, the
summed K symbolic). MN-major operands are passed as transposed views (``t.transpose(-2, -1)`` of a
row-major ``[.., K, MN]`` tensor).
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor

from cute_moe.operands import dsl_type
from cute_moe.specs import GemmSpec

from .config import FP8_SCALE_BLOCK, Sm90Config
from .grouped_gemm import Sm90GroupedGemm

ALIGN_BYTES = 16  # TMA and the 16-byte epilogue stores need 16-byte aligned bases and rows


def _row_major(dtype, shape: tuple):
    order = tuple(range(len(shape) - 1, -1, -1))
    return make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=ALIGN_BYTES)


def _operand(dtype, shape: tuple, major: str):
    """A ``(.., MN, K)`` operand: row-major (K contiguous), or MN-major (the MN mode contiguous, then
    K, then the batch mode): the transposed view of a row-major ``(.., K, MN)`` tensor."""
    if major == "k":
        return _row_major(dtype, shape)
    order = (0, 1) if len(shape) == 2 else (2, 0, 1)
    return make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=ALIGN_BYTES)


def _mn_major_scales(shape: tuple):
    """FP32 scales with the MN mode (second to last) contiguous and a TMA-aligned K-block stride."""
    stride = [cute.sym_int64(divisibility=4) for _ in shape]
    stride[-2] = 1
    return make_fake_tensor(cutlass.Float32, tuple(shape), stride=tuple(stride), assumed_align=ALIGN_BYTES)


def _index_table(length):
    return make_fake_compact_tensor(cutlass.Int32, (length,), assumed_align=4)


def fake_arguments(spec: GemmSpec) -> tuple:
    """Fake operands of the kernel's __call__ for ``spec`` (M, G, Mmax symbolic; N and K static)."""
    fp8 = spec.a.scaled
    # FP8 operands cross as uint8 (DLPack-safe) and are recast to E4M3 inside the kernel.
    ab = cutlass.Uint8 if fp8 else dsl_type(spec.a.dtype)
    dd = dsl_type(spec.d_dtype)
    n, k = spec.n, spec.k
    # An MN-major A's K stride is its row count: whole 16-byte units (the op checks it).
    rows = cute.sym_int(divisibility=ALIGN_BYTES * 8 // ab.width) if spec.a.major == "mn" else cute.sym_int()
    groups = cute.sym_int()
    k_blocks = -(-k // FP8_SCALE_BLOCK)
    c = group = sfa = sfb = None
    if spec.kind == "k_grouped":
        # k holds M; A (M, sum K) and B (N, sum K) in either major, D and C [G, M, N]. A K-major
        # operand's row stride is sum K: whole 16-byte units (the op checks it).
        k_major = "k" in (spec.a.major, spec.b.major)
        sum_k = cute.sym_int(divisibility=ALIGN_BYTES * 8 // ab.width) if k_major else cute.sym_int()
        a = _operand(ab, (k, sum_k), spec.a.major)
        b = _operand(ab, (n, sum_k), spec.b.major)
        d = _row_major(dd, (groups, k, n))
        c = _row_major(dd, (groups, k, n)) if spec.has_c else None
        return (a, b, d, c, None, None, _index_table(groups), cutlass.Int32(1),
                make_fake_stream(use_tvm_ffi_env_stream=True))
    a, d, c, sfa, group = row_space_arguments(spec, ab, rows, groups)
    b = _operand(ab, (n, k) if spec.kind == "dense" else (groups, n, k), spec.b.major)
    if fp8:
        n_blocks = -(-n // FP8_SCALE_BLOCK)
        sfb = _row_major(cutlass.Float32, (n_blocks, k_blocks) if spec.kind == "dense" else (groups, n_blocks, k_blocks))
    return a, b, d, c, sfa, sfb, group, cutlass.Int32(1), make_fake_stream(use_tvm_ffi_env_stream=True)


def row_space_arguments(spec: GemmSpec, ab, rows, groups) -> tuple:
    """Fake A, D, C, A's FP8 scales and the group table of the M-grouped kinds (dense, contiguous,
    psum, ragged: 2-D row spaces of ``rows`` rows; masked: ``[groups, Mmax, ..]``), for any B format."""
    dd = dsl_type(spec.d_dtype)
    n, k = spec.n, spec.k
    k_blocks = -(-k // FP8_SCALE_BLOCK)
    c = group = sfa = None
    if spec.kind == "masked":
        max_m = cute.sym_int()
        a = _row_major(ab, (groups, max_m, k))
        d = _row_major(dd, (groups, max_m, n))
        group = _index_table(groups)
        if spec.a.scaled:
            sfa = _mn_major_scales((groups, max_m, k_blocks))
    else:
        a = _operand(ab, (rows, k), spec.a.major)
        d = _row_major(dd, (rows, n))
        if spec.kind == "contiguous":
            group = _index_table(rows)
        elif spec.kind in ("ragged", "psum"):
            group = _index_table(groups)
        if spec.a.scaled:
            sfa = _mn_major_scales((rows, k_blocks))
    if spec.has_c:
        c = _row_major(dd, (rows, n))
    return a, d, c, sfa, group


def compile_grouped_gemm(spec: GemmSpec, config: Sm90Config):
    """Compile the SM90 kernel for ``spec`` with ``config``; returns the TVM-FFI compiled function."""
    kernel = Sm90GroupedGemm(spec.kind, spec.a.scaled, config.tile_m, config.tile_n, config.cluster_m,
                             config.cluster_n, config.stages, config.panel, spec.n, spec.k, spec.has_c,
                             spec.alignment, a_major=spec.a.major, b_major=spec.b.major)
    return cute.compile(kernel, *fake_arguments(spec), options=f"--enable-tvm-ffi --gpu-arch {spec.arch}")
