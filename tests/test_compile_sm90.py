"""Every SM90 kernel variant compiles for sm_90a on a machine without a GPU."""

import warnings

import pytest

from cute_moe.compile import compile_gemm
from cute_moe.kernels.sm90.config import Sm90Config as KernelConfig
from cute_moe.operands import FP8_PER_BLOCK, FP8_PER_TOKEN
from cute_moe.specs import GemmSpec

FP8 = dict(a=FP8_PER_TOKEN, b=FP8_PER_BLOCK)

VARIANTS = [
    (GemmSpec(kind, 4096, 7168, d_dtype=d_dtype), KernelConfig())
    for kind in ("dense", "contiguous", "masked", "ragged") for d_dtype in ("bf16", "fp32")
] + [
    (GemmSpec("dense", 4096, 7168, d_dtype="bf16", has_c=True), KernelConfig()),
    (GemmSpec("dense", 4096, 7168, d_dtype="fp32", has_c=True), KernelConfig()),
    (GemmSpec("masked", 4096, 7168), KernelConfig(tile_m=64, tile_n=256)),
    (GemmSpec("masked", 7168, 2048), KernelConfig(tile_m=64, tile_n=128, cluster_m=1, cluster_n=2)),
    (GemmSpec("contiguous", 7168, 2048), KernelConfig(tile_m=128, tile_n=256, cluster_m=2)),
    (GemmSpec("ragged", 384, 320), KernelConfig(tile_m=128, tile_n=128, cluster_m=2)),
    (GemmSpec("dense", 4096, 7168), KernelConfig(tile_m=128, tile_n=64, stages=4, panel=4)),
]


@pytest.mark.parametrize("spec,config", VARIANTS, ids=[f"{s.key()}|{c.key()}" for s, c in VARIANTS])
def test_variant_compiles(spec, config):
    fn = compile_gemm(spec, config)
    assert callable(fn)
    assert fn.__class__.__name__.startswith("TVMFFI")


FP8_VARIANTS = [
    (GemmSpec(kind, 4096, 7168, **FP8, alignment=128 if kind == "psum" else 0),
     KernelConfig(tile_m=128, tile_n=128, cluster_m=2))
    for kind in ("dense", "contiguous", "psum", "masked")
] + [
    (GemmSpec("masked", 7168, 2048, **FP8), KernelConfig(tile_m=64, tile_n=128, cluster_n=2)),
    (GemmSpec("dense", 384, 320, **FP8, d_dtype="fp32", has_c=True), KernelConfig(tile_n=64)),
    (GemmSpec("psum", 4096, 7168, alignment=128), KernelConfig()),
    (GemmSpec("contiguous", 4096, 7168, **FP8), KernelConfig(tile_m=128, tile_n=128, cluster_m=2)),
    # FP8 N tiles of two weight-scale blocks, promoted one block at a time
    (GemmSpec("contiguous", 4096, 7168, **FP8), KernelConfig(tile_m=128, tile_n=256, cluster_m=2)),
    (GemmSpec("masked", 384, 320, **FP8), KernelConfig(tile_m=64, tile_n=256)),
    (GemmSpec("ragged", 4096, 7168), KernelConfig(cluster_m=2, panel=4)),
]


@pytest.mark.parametrize("spec,config", FP8_VARIANTS, ids=[f"{s.key()}|{c.key()}" for s, c in FP8_VARIANTS])
def test_fp8_and_psum_variants_compile(spec, config):
    assert callable(compile_gemm(spec, config))


def test_fp8_kernel_compiles_without_dsl_performance_warnings():
    import cute_moe.kernels.sm90.signature  # noqa: F401  (the DSL sets its warning filters on import)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a variant no other test compiles: 64 accumulator values per thread, the old 64-iteration loop
        compile_gemm(GemmSpec("masked", 1152, 640, **FP8), KernelConfig(tile_m=64, tile_n=128))
    assert not [w for w in caught if "static loop" in str(w.message)]
