"""Compile one (GemmSpec, KernelConfig) specialization with fake tensors and symbolic token counts.

Runs on any machine: the target comes from ``CUTE_DSL_ARCH`` (set from ``spec.arch`` before cutlass is
first imported). The result is a TVM-FFI callable taking torch tensors:
``fn(a, b, d, c, sfa, sfb, group_tensor, max_clusters)`` on the caller's current CUDA stream.
"""

import os

from .specs import GemmSpec, KernelConfig

_DTYPE_NAMES = {"bf16": "BFloat16", "fp32": "Float32"}


def ensure_arch(arch: str) -> None:
    """Point the DSL at ``arch`` (must happen before cutlass is imported to take effect)."""
    current = os.environ.get("CUTE_DSL_ARCH")
    if current is None:
        os.environ["CUTE_DSL_ARCH"] = arch
    elif current != arch:
        raise RuntimeError(f"CUTE_DSL_ARCH is {current!r} in this process; cannot compile for {arch!r}")


def fake_arguments(spec: GemmSpec):
    """Fake operands of the kernel's __call__ for ``spec`` (M, G, Mmax symbolic; N, K static)."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor

    # FP8 operands cross as uint8 (DLPack-safe) and are recast to E4M3 inside the kernel.
    ab = cutlass.Uint8 if spec.fp8 else getattr(cutlass, _DTYPE_NAMES[spec.ab_dtype])
    dd = getattr(cutlass, _DTYPE_NAMES[spec.d_dtype])
    n, k = spec.n, spec.k

    def row_major(dtype, shape):
        order = tuple(range(len(shape) - 1, -1, -1))
        return make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=16)

    def mn_major_scales(shape):
        """FP32 scales with the MN mode (second to last) contiguous and a TMA-aligned K-block stride."""
        stride = [cute.sym_int64(divisibility=4) for _ in shape]
        stride[-2] = 1
        return make_fake_tensor(cutlass.Float32, shape, stride=tuple(stride), assumed_align=16)

    rows = cute.sym_int()
    groups = cute.sym_int()
    k_blocks = -(-k // 128)
    c = group = sfa = sfb = None
    if spec.kind == "masked":
        max_m = cute.sym_int()
        a = row_major(ab, (groups, max_m, k))
        d = row_major(dd, (groups, max_m, n))
        group = make_fake_compact_tensor(cutlass.Int32, (groups,), assumed_align=4)
        if spec.fp8:
            sfa = mn_major_scales((groups, max_m, k_blocks))
    else:
        a = row_major(ab, (rows, k))
        d = row_major(dd, (rows, n))
        if spec.kind == "contiguous":
            group = make_fake_compact_tensor(cutlass.Int32, (rows,), assumed_align=4)
        elif spec.kind in ("ragged", "psum"):
            group = make_fake_compact_tensor(cutlass.Int32, (groups,), assumed_align=4)
        if spec.fp8:
            sfa = mn_major_scales((rows, k_blocks))
    b = row_major(ab, (n, k)) if spec.kind == "dense" else row_major(ab, (groups, n, k))
    if spec.fp8:
        n_blocks = -(-n // 128)
        sfb = row_major(cutlass.Float32, (n_blocks, k_blocks) if spec.kind == "dense" else (groups, n_blocks, k_blocks))
    if spec.has_c:
        c = row_major(dd, (rows, n))
    return a, b, d, c, sfa, sfb, group, cutlass.Int32(1), make_fake_stream(use_tvm_ffi_env_stream=True)


def compile_gemm(spec: GemmSpec, config: KernelConfig):
    """Compile the SM90 kernel for ``spec`` with ``config``; returns the TVM-FFI compiled function."""
    ensure_arch(spec.arch)
    import cutlass.cute as cute

    from .kernels.sm90.grouped_gemm import Sm90GroupedGemm

    kernel = Sm90GroupedGemm(spec.kind, spec.fp8, config.tile_m, config.tile_n, config.cluster_m,
                             config.cluster_n, config.stages, config.panel, spec.n, spec.k, spec.has_c,
                             spec.alignment)
    return cute.compile(kernel, *fake_arguments(spec), options="--enable-tvm-ffi")
