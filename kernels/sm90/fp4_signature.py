"""Launch signature of the SM90 FP4-weight GEMM family and its compilation with fake tensors.

The compiled TVM-FFI function takes torch tensors ``fn(a, b, d, c, sfa, sfb, group_tensor,
max_clusters)`` like the grouped GEMM family's, with B packed (uint8 ``[(G,) N, K/2]``) and SFB the
UE8M0 exponents (uint8 ``[(G,) N, ceil(K/32)]``, K contiguous, row stride a multiple of 16 bytes,
as ``transform_sf_into_required_layout(sf, n, k, (1, 32), G)`` returns them). M, G, Mmax and the
scale row stride are symbolic; N and K static.
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

from cute_moe.operands import dsl_type
from cute_moe.specs import GemmSpec

from .config import Sm90Config
from .fp4_grouped_gemm import Sm90Fp4GroupedGemm
from .fp4_widen import MX_BLOCK
from .fp4_swap_gemm import Sm90Fp4SwapGemm
from .signature import ALIGN_BYTES, _row_major, row_space_arguments


def _k_major_exponents(shape: tuple):
    """UE8M0 exponents, K contiguous, every other stride symbolic and a multiple of 16 bytes."""
    stride = [cute.sym_int64(divisibility=ALIGN_BYTES) for _ in shape]
    stride[-1] = 1
    return make_fake_tensor(cutlass.Uint8, tuple(shape), stride=tuple(stride), assumed_align=ALIGN_BYTES)


def fake_arguments(spec: GemmSpec) -> tuple:
    """Fake operands of the kernel's __call__ for an FP4-weight ``spec``."""
    ab = cutlass.Uint8 if spec.a.scaled else dsl_type(spec.a.dtype)
    n, k = spec.n, spec.k
    rows, groups = cute.sym_int(), cute.sym_int()
    mx_blocks = -(-k // MX_BLOCK)
    a, d, c, sfa, group = row_space_arguments(spec, ab, rows, groups)
    if spec.kind == "dense":
        b = _row_major(cutlass.Uint8, (n, k // 2))
        sfb = _k_major_exponents((n, mx_blocks))
    else:
        b = _row_major(cutlass.Uint8, (groups, n, k // 2))
        sfb = _k_major_exponents((groups, n, mx_blocks))
    return a, b, d, c, sfa, sfb, group, cutlass.Int32(1), make_fake_stream(use_tvm_ffi_env_stream=True)


def fp4_kernel(spec: GemmSpec, config: Sm90Config):
    """The kernel object of ``spec`` and ``config`` (``config.swap_ab``: the swap-AB kernel, else the
    widen-in-shared-memory one)."""
    if config.swap_ab:
        return Sm90Fp4SwapGemm(spec.kind, spec.a.scaled, config.tile_m, config.tile_n, config.stages, config.panel,
                               spec.n, spec.k, spec.alignment)
    return Sm90Fp4GroupedGemm(spec.kind, spec.a.scaled, config.tile_m, config.tile_n, config.stages,
                              config.panel, spec.n, spec.k, spec.has_c, spec.alignment)


def compile_fp4_gemm(spec: GemmSpec, config: Sm90Config, extra_options: str = ""):
    """Compile the SM90 FP4-weight kernel for ``spec`` with ``config`` (``fp4_kernel``); returns the
    TVM-FFI function. ``extra_options``: more ``cute.compile`` options (e.g. ``--keep-cubin``)."""
    options = f"--enable-tvm-ffi --gpu-arch {spec.arch} {extra_options}".strip()
    return cute.compile(fp4_kernel(spec, config), *fake_arguments(spec), options=options)
